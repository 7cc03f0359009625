import numpy as np
import pytest
import torch

from fewtune.errors import ConfigError
from fewtune.models.loading import autocast, backbone_and_head, load_model, resolve_precision
from fewtune.scoring.scorer import head_logits, last_hidden, last_token_logits, pad_batch


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


@pytest.mark.parametrize("native", [True, False])
def test_precision_resolution(monkeypatch, native):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    if native:
        assert resolve_precision("bf16", cpu) == "bf16"
    else:
        with pytest.raises(ConfigError, match="no native bf16"):
            resolve_precision("bf16", cpu)


QUERIES = ["The book was read by the student ?", "Him the cat chased ?", "John seems to be happy ?", "She sang ?",
           "It is easy to please John ?", "What did you wonder whether Mary bought ?"]


def test_tiny_model_reads_its_input(tiny_lm):
    """The test model must condition on the query strongly, or scoring bugs hide under tolerances:
    its " No"−" Yes" margin varies by nats across queries (≈0.2 at Llama's default init 0.02)."""
    from fewtune.scoring.scorer import score_prompts
    from fewtune.tasks.prompts import verbalizer_token_ids

    ids = verbalizer_token_ids(tiny_lm.tokenizer, (" No", " Yes")).token_ids
    lp = score_prompts(tiny_lm.model, tiny_lm.tokenizer, QUERIES, ids, precision="fp32").label_logprobs
    margin = lp[:, 0] - lp[:, 1]
    assert margin.std() > 1.0 and np.ptp(lp[:, 0]) > 2.0


def _bf16_hidden_and_batch(lm):
    body, head = backbone_and_head(lm.model)
    seqs = [lm.tokenizer(q)["input_ids"] for q in QUERIES]
    ids, mask, last = pad_batch(seqs, lm.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad(), autocast("bf16", torch.device("cpu")):
        h = last_hidden(body, ids, mask, last)
    return h, head, (ids, mask, last)


def test_head_runs_in_fp32_under_bf16_autocast(tiny_lm):
    """bf16 logits have a resolution of 1/16–1/8 at magnitudes 16–32: exact label ties and flipped
    predictions. The body may run in bf16; the head must not."""
    h, head, batch = _bf16_hidden_and_batch(tiny_lm)
    want = torch.nn.functional.linear(h.float(), head.weight.float())  # fp32, outside autocast
    with torch.no_grad(), autocast("bf16", torch.device("cpu")):
        got = last_token_logits(tiny_lm.model, *batch)
        rows = head_logits(head, h, torch.tensor([5, 7]))
    assert got.dtype == torch.float32 and rows.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(rows, want[:, [5, 7]], atol=1e-4, rtol=1e-5)
    assert want.abs().max() > 4  # large enough that a bf16 head would be off by > 1e-2


@pytest.mark.parametrize("use_cache", [False, True])
def test_scores_at_bf16_are_not_on_the_bf16_grid(tiny_lm, use_cache):
    """Black-box check of the same, on both scoring paths: with a bf16 head both label logits are
    bf16 numbers (multiples of 2⁻⁷ for |logit| ≥ 1), so is their difference; with an fp32 head
    practically never."""
    from fewtune.scoring.scorer import score_prompts
    from fewtune.tasks.prompts import verbalizer_token_ids

    ids = verbalizer_token_ids(tiny_lm.tokenizer, (" No", " Yes")).token_ids
    queries = [" " + q for q in QUERIES * 3] + [" x " + q for q in QUERIES]
    s = score_prompts(tiny_lm.model, tiny_lm.tokenizer, queries, ids, prefix="Sentences:", precision="bf16",
                      use_prefix_cache=use_cache)
    margin = (s.label_logprobs[:, 0] - s.label_logprobs[:, 1]) * 2**7
    on_grid = np.abs(margin - np.round(margin)) < 1e-3
    assert on_grid.mean() < 0.25, on_grid


def test_verify_model_dir_finds_truncated_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    from fewtune.models.loading import verify_model_dir

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
