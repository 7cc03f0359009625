"""The parameter-efficient methods beyond the study (bitfit, ia3, dora, rslora, prompt-tuning,
prefix-tuning) on the tiny random Llama: each trains exactly what it claims, leaves the base
weights bit-identical, reloads from ``save_dir`` to identical predictions, and the prompt
methods' virtual tokens really reach the model (and never the shared-prefix cache)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_methods_train import CPU, make, toy_examples

from fewtune.methods._trainable import classify
from fewtune.models.loading import backbone_and_head, load_model
from fewtune.run.resources import count_parameters
from fewtune.scoring.heads import ClassifierNet
from fewtune.scoring.scorer import PATH_NAIVE, last_token_logits, pad_batch, score_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
HIDDEN, LABELS = 64, 2  # tiny-random's hidden size; the toy task's labels

# method, params, what every trainable backbone parameter's name must contain
CASES = [
    ("bitfit", {}, ("bias",)),
    ("bitfit", {"objective": "lm", "norms": True}, ("bias", "norm.weight", "layernorm.weight")),
    ("ia3", {}, ("ia3_l",)),
    ("ia3", {"objective": "lm"}, ("ia3_l",)),
    ("dora", {"r": 2}, ("lora_",)),
    ("dora", {"r": 2, "objective": "lm"}, ("lora_",)),
    ("lora", {"r": 2, "rslora": True}, ("lora_",)),
    ("prompt-tuning", {"num_virtual_tokens": 4}, ("prompt_encoder",)),
    ("prompt-tuning", {"objective": "lm", "init": "random", "num_virtual_tokens": 4}, ("prompt_encoder",)),
    ("prefix-tuning", {"num_virtual_tokens": 3}, ("prompt_encoder",)),
    ("prefix-tuning", {"objective": "lm", "num_virtual_tokens": 3}, ("prompt_encoder",)),
]


def trained(method, params: dict, **train):
    m = make(method, params, lr=3e-2, max_steps=3, batch_size=8, warmup_ratio=0.0, **train)
    base = {n: p.detach().clone() for n, p in m.ctx.lm.model.named_parameters()}
    summary = m.fit(toy_examples(16))
    return m, base, summary


def backbone_trainables(m) -> dict[str, torch.nn.Parameter]:
    head = {id(p) for p in (m.head.parameters() if m.head is not None else [])}
    return {n: p for n, p in m.net.named_parameters() if p.requires_grad and id(p) not in head}


@pytest.mark.parametrize("method, params, allowed", CASES)
def test_trains_only_what_it_claims_and_keeps_base_weights(method, params, allowed):
    m, base, summary = trained(method, params)
    train = backbone_trainables(m)
    assert train, "no backbone parameter trains"
    assert all(any(a in n for a in allowed) for n in train), sorted(train)
    # the counted trainable parameters are exactly these plus the head
    head_params = HIDDEN * LABELS if m.objective == "classifier" else 0
    n_train = sum(p.numel() for p in {id(p): p for p in train.values()}.values())
    assert summary["trainable_params"] == count_parameters(m.model)[0] == n_train + head_params
    # every weight of the base model is bit-identical (norm gains excepted when they train)
    now = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in m.ctx.lm.model.named_parameters()}
    for n, before in base.items():
        if params.get("norms") and "norm" in n:
            continue
        assert torch.equal(now[n], before), n
    assert any(not torch.equal(now[n], base[n]) for n in base if "norm" in n) == bool(params.get("norms"))
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])


def test_bitfit_adds_zero_biases_to_every_llama_projection_and_trains_them():
    m = make("bitfit", {}, lr=3e-2, max_steps=3, batch_size=8)
    m.adapt_model()
    body = backbone_and_head(m.ctx.lm.model)[0]
    linears = [(n, mod) for n, mod in body.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert len(linears) == 7 * m.ctx.lm.model.config.num_hidden_layers  # q k v o gate up down
    assert all(mod.bias is not None and not mod.bias.any() for _, mod in linears)
    m2, _, summary = trained("bitfit", {})
    biases = {n: mod.bias for n, mod in backbone_and_head(m2.ctx.lm.model)[0].named_modules() if isinstance(mod, torch.nn.Linear)}
    assert all(b.requires_grad and b.abs().sum() > 0 for b in biases.values())  # every added bias moved
    assert summary["added_bias_params"] == summary["backbone_trainable_params"] == sum(b.numel() for b in biases.values())
    info = m2.describe()
    assert info["added_biases"] == len(biases)
    assert "layers.*.self_attn.q_proj.bias (added)" in info["trained_modules"]
    assert "layers.*.mlp.down_proj.bias (added)" in info["trained_modules"]


def test_bitfit_without_added_biases_on_a_bias_free_model_is_a_config_error():
    from fewtune.errors import ConfigError

    m = make("bitfit", {"add_biases": False})
    with pytest.raises(ConfigError, match="no bias terms"):
        m.fit(toy_examples(8))


def test_rslora_scales_by_alpha_over_sqrt_r_and_dora_adds_magnitudes():
    m, _, _ = trained("lora", {"r": 4, "alpha": 8, "rslora": True})
    scal = {mod.scaling["default"] for mod in m.ctx.lm.model.modules() if hasattr(mod, "scaling") and isinstance(mod.scaling, dict)}
    assert scal == {8 / 4 ** 0.5}
    d, _, summary = trained("dora", {"r": 2})
    assert any("lora_magnitude_vector" in n for n in backbone_trainables(d))
    assert summary["use_dora"] is True


def _reload(method: str, path):
    fresh = load_model("tiny-random", seed=0).model
    if method == "bitfit":
        from fewtune.methods.bitfit import load_bitfit

        return load_bitfit(fresh, path)
    if method in ("prompt-tuning", "prefix-tuning"):
        from fewtune.methods._prompted import load_prompted

        return load_prompted(fresh, path)
    from fewtune.methods.lora import load_adapter

    return load_adapter(fresh, path)


@pytest.mark.parametrize("method, params", [(c[0], c[1]) for c in CASES if c[0] != "lora"])
def test_saved_and_reloaded_to_identical_predictions(method, params, tmp_path):
    m, _, summary = trained(method, {**params, "save_dir": str(tmp_path / "saved")})
    assert summary["saved_to"] == str(tmp_path / "saved")
    evals = toy_examples(10, seed=5)
    texts = [m.input_text(e) for e in evals]
    want = m.predict(evals)
    model, head = _reload(method, tmp_path / "saved")
    if m.objective == "classifier":
        net = ClassifierNet(backbone_and_head(model)[0], head)
        got = classify(net, m.ctx.lm.tokenizer, texts, num_labels=LABELS, batch_size=4, max_context=2048,
                       precision="fp32", device=CPU).label_scores
    else:
        assert head is None
        got = score_prompts(model, m.ctx.lm.tokenizer, texts, m.ctx.verbalizer.token_ids, batch_size=4).label_logprobs
    assert np.allclose(got, want.label_scores, atol=1e-6)
    # and the saved state is the trained one, not the base model's
    base = score_prompts(load_model("tiny-random", seed=0).model, m.ctx.lm.tokenizer, texts, m.ctx.verbalizer.token_ids)
    if m.objective == "lm":
        assert not np.allclose(got, base.label_logprobs, atol=1e-4)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_virtual_tokens_reach_the_model_exactly_as_in_peft(method):
    """Our view (body + head at one position) gives peft's own forward's last-token logits, on a
    right-padded batch, and differs from the base model."""
    m, _, _ = trained(method, {"objective": "lm", "num_virtual_tokens": 3, "init": "random"} if method == "prompt-tuning"
                      else {"objective": "lm", "num_virtual_tokens": 3})
    tok = m.ctx.lm.tokenizer
    seqs = [tok(t)["input_ids"] for t in ("a red apple ?", "the stone is old and big ?", "x ?")]
    ids, mask, last = pad_batch(seqs, tok.pad_token_id, CPU)
    with torch.no_grad():
        ours = last_token_logits(m.scoring_model().eval(), ids, mask, last)
        full = m.peft_model.eval()(input_ids=ids, attention_mask=mask).logits
        offset = 3 if method == "prompt-tuning" else 0  # peft keeps the virtual positions in its output
        theirs = full[torch.arange(len(seqs)), last + offset]
        base = last_token_logits(m.ctx.lm.model, ids, mask, last)  # the wrapped body without the view
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-3)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_shared_prefix_cache_is_bypassed_and_agrees_with_naive(method):
    m, _, _ = trained(method, {"objective": "lm", "num_virtual_tokens": 3})
    # Queries continue the prefix after a space, as ICL builds them, so prefix + query tokenize
    # as the joint text does and it is the prompted view (no KV cache) that rules the cache out.
    queries = [" a red apple ?", " my old brick ?", " one cherry ?"]
    kw = dict(prefix="the stone ? No the banana ? Yes", batch_size=2)
    cached = score_prompts(m.scoring_model(), m.ctx.lm.tokenizer, queries, m.ctx.verbalizer.token_ids, use_prefix_cache=True, **kw)
    naive = score_prompts(m.scoring_model(), m.ctx.lm.tokenizer, queries, m.ctx.verbalizer.token_ids, use_prefix_cache=False, **kw)
    assert cached.path == PATH_NAIVE and "prefix cache not used" in cached.note
    assert np.array_equal(cached.label_logprobs, naive.label_logprobs)


def test_prompt_tuning_starts_from_the_task_instruction():
    m = make("prompt-tuning", {"num_virtual_tokens": 30})
    m.adapt_model()
    tok, emb = m.ctx.lm.tokenizer, m.ctx.lm.model.get_input_embeddings().weight
    ids = tok(m.ctx.task.instruction, add_special_tokens=False)["input_ids"]
    want = emb[torch.tensor((ids * 30)[:30])]
    got = m.peft_model.prompt_encoder["default"].embedding.weight
    assert torch.equal(got, want)
    r = make("prompt-tuning", {"num_virtual_tokens": 30, "init": "random"})
    r.adapt_model()
    assert not torch.equal(r.peft_model.prompt_encoder["default"].embedding.weight, want)


@pytest.mark.slow  # starts processes: not in the fast tier
def test_cli_lists_the_new_methods_with_their_parameters(tmp_path):
    env = dict(os.environ, COLUMNS="250")
    res = subprocess.run([sys.executable, "-m", "fewtune", "methods"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = {line.split("│")[1].strip(): line for line in res.stdout.splitlines() if line.count("│") >= 3}
    for name in ("bitfit", "ia3", "dora", "prompt-tuning", "prefix-tuning", "lora"):
        assert name in rows, name
    text = res.stdout
    for param in ("add_biases=True", "norms=False", "feedforward_modules", "init='text'", "projection=False", "rslora=False",
                  "num_virtual_tokens=20", "num_virtual_tokens=10"):
        assert param in text, param


@pytest.mark.slow  # starts processes: not in the fast tier
def test_beyond_preset_has_every_method_dry_runs_and_quick_stays_the_study(tmp_path, data_dir):
    from fewtune.methods import METHODS
    from fewtune.study import expand, load_study

    planned = {p.config.method for p in expand(load_study("beyond"))}
    assert planned == {m for m in METHODS.names() if not m.endswith("-released")}
    assert not planned.isdisjoint({"bitfit", "ia3"}) and {"bitfit", "ia3", "dora", "prompt-tuning", "prefix-tuning"}.isdisjoint(
        {p.config.method for p in expand(load_study("quick"))})
    env = dict(os.environ, COLUMNS="250", FEWTUNE_DATA_DIR=str(data_dir))
    res = subprocess.run([sys.executable, "-m", "fewtune", "study", "beyond", "--out", str(tmp_path / "b"), "--dry-run"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "60 runs" in res.stdout and "60 of 60 runs feasible" in res.stdout
