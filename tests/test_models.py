import torch

from fewtune.errors import ConfigError
from fewtune.models import backbone_and_head, load_model, resolve_precision
from fewtune.scoring import last_token_logits, pad_batch

import pytest


def test_tiny_model_is_seeded_and_pads_right(tokenizer):
    a, b = load_model("tiny-random", seed=3), load_model("tiny-random", seed=3)
    c = load_model("tiny-random", seed=4)
    pa, pb, pc = (next(m.model.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.tokenizer.padding_side == "right" and a.tokenizer.pad_token_id is not None


def test_last_token_logits_ignore_right_padding(tiny_lm):
    tok = tiny_lm.tokenizer
    short, long = tok("A short one ?")["input_ids"], tok("A much longer sentence than the other one ?")["input_ids"]
    dev = torch.device("cpu")
    both = last_token_logits(tiny_lm.model, *pad_batch([short, long], tok.pad_token_id, dev))
    alone = last_token_logits(tiny_lm.model, *pad_batch([short], tok.pad_token_id, dev))
    full = tiny_lm.model(torch.tensor([short])).logits[0, -1]
    assert torch.allclose(both[0], alone[0], atol=1e-5)
    assert torch.allclose(alone[0], full, atol=1e-5)


def test_backbone_and_head_under_peft(tiny_lm):
    from peft import LoraConfig, get_peft_model

    body, head = backbone_and_head(tiny_lm.model)
    wrapped = get_peft_model(tiny_lm.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    body2, head2 = backbone_and_head(wrapped)
    assert body2 is body and head2 is head


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="cannot load model"):
        load_model("/nonexistent/model-dir")


def test_precision_resolution():
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("auto") in ("bf16", "fp32")


def test_verify_model_dir_finds_truncated_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    from fewtune.models import verify_model_dir

    save_file({"w": torch.zeros(64, 64), "b": torch.ones(8)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    assert verify_model_dir(tmp_path) is None
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    assert "model.safetensors" in verify_model_dir(tmp_path) and "header says" in verify_model_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:5])
    assert "too short" in verify_model_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data)
    (tmp_path / "tokenizer.json").write_text('{"model": {"vo')
    assert "tokenizer.json" in verify_model_dir(tmp_path)
