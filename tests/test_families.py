"""Every model family fewtune ships a tiny random model of (``tiny-random:<family>``): scoring
(prefix-cached and naive agree, or the cache falls back cleanly), logit post-processing (the
log-probs are the model's own), every method runs, LoRA reloads, adaptive FT freezes what it says.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_methods_train import toy_examples, toy_task

from fewtune.config import RunConfig, TrainConfig, validate
from fewtune.methods import METHODS, RunContext
from fewtune.models import adapter as model_adapter
from fewtune.models.adapter import ModelAdapter, adapter_for, backbone_and_head
from fewtune.models.loading import load_model, load_tokenizer
from fewtune.models.tiny import build_tiny
from fewtune.run.resources import ResourceMeter
from fewtune.scoring.heads import LMNet
from fewtune.scoring.scorer import PATH_NAIVE, PATH_PREFIX_CACHE, encode_prompts, pad_batch, score_prompts
from fewtune.tasks.prompts import verbalizer_token_ids

CPU = torch.device("cpu")
FAMILIES = ["llama", "opt", "gpt2", "gpt_neox", "qwen2", "gemma3", "phi"]
# The families whose attention the shared-prefix kernel reproduces (measured: cached = naive to 5e-6).
CACHED = {"llama", "opt", "gpt2", "gpt_neox", "qwen2", "phi"}
PREFIX = "Sentence: the cat sat on the mat. Answer: Yes\n\nSentence: stone cold stone. Answer: No\n\n"
QUERIES = [" Sentence: dogs bark at night. Answer:", " Sentence: a red apple. Answer:", " x", " Sentence: no. Answer:"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


def label_ids(tok) -> list[int]:
    return [tok(w, add_special_tokens=False)["input_ids"][0] for w in (" No", " Yes")]


def own_logprobs(model, tok, query: str, prefix: str = PREFIX) -> torch.Tensor:
    """The model's own forward (``*ForCausalLM``, with its logit post-processing) at the last token."""
    enc = encode_prompts(tok, [query], prefix)
    with torch.no_grad():
        return model(torch.tensor([enc.prefix_ids + enc.query_ids[0]])).logits[0, -1].float().log_softmax(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_is_the_models_own_and_cache_agrees_or_falls_back(family, tok):
    model = load_model(f"tiny-random:{family}").model
    labels = label_ids(tok)
    naive = score_prompts(model, tok, QUERIES, labels, prefix=PREFIX, use_prefix_cache=False)
    cached = score_prompts(model, tok, QUERIES, labels, prefix=PREFIX)
    for i, q in enumerate(QUERIES):
        assert np.allclose(naive.label_logprobs[i], own_logprobs(model, tok, q)[labels].numpy(), atol=1e-5)
    assert np.allclose(cached.label_logprobs, naive.label_logprobs, atol=1e-4)
    assert np.array_equal(cached.full_argmax, naive.full_argmax)
    if family in CACHED:
        assert cached.path == PATH_PREFIX_CACHE and cached.note is None
    else:
        assert cached.path == PATH_NAIVE and adapter_for(model).prefix_cache_reason in cached.note
    # the model reads its input: scores vary across queries (else the comparisons above prove little)
    margin = naive.label_logprobs[:, 1] - naive.label_logprobs[:, 0]
    assert np.ptp(margin) > 0.05


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_unsupported_attention_falls_back_at_run_time_too(family, tok, monkeypatch):
    """Without the family entry the kernel itself detects sliding windows / soft-capping and the
    scores still equal the naive ones (the declared list only skips the wasted prefix pass)."""
    monkeypatch.setattr(model_adapter, "_NO_PREFIX_CACHE", {})
    model = load_model(f"tiny-random:{family}").model
    labels = label_ids(tok)
    cached = score_prompts(model, tok, QUERIES, labels, prefix=PREFIX)
    naive = score_prompts(model, tok, QUERIES, labels, prefix=PREFIX, use_prefix_cache=False)
    assert cached.path == PATH_NAIVE and "prefix cache not used" in cached.note
    assert np.array_equal(cached.label_logprobs, naive.label_logprobs)


@pytest.mark.parametrize("family,cap", [("gemma2", 2.0), ("gemma3", 3.0)])
def test_logit_softcapping_is_applied_like_the_model_does(family, cap, tok):
    """Scoring and the LM-objective net (PBFT's loss, distillation) apply the head to one hidden
    state, bypassing ``forward``: they must redo its ``final_logit_softcapping``."""
    model, _ = build_tiny(f"tiny-random:{family}", tok, final_logit_softcapping=cap)
    model.eval()
    assert adapter_for(model).softcap == cap
    labels = label_ids(tok)
    ours = score_prompts(model, tok, QUERIES, labels, prefix=PREFIX).label_logprobs
    own = np.stack([own_logprobs(model, tok, q)[labels].numpy() for q in QUERIES])
    assert np.allclose(ours, own, atol=1e-5)
    # without the cap the log-probs would differ by far more than the tolerance
    body, head = backbone_and_head(model)
    enc = encode_prompts(tok, QUERIES, PREFIX)
    ids, mask, last = pad_batch([enc.prefix_ids + q for q in enc.query_ids], tok.pad_token_id, CPU)
    with torch.no_grad():
        raw = LMNet(body, head)(ids, mask, last).log_softmax(-1)[:, labels].numpy()
        capped = LMNet(body, head, transform=adapter_for(model).logit_transform)(ids, mask, last)
        want = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(last)), last]
    assert np.abs(raw - own).max() > 1e-2
    assert torch.allclose(capped, want, atol=1e-5)


def test_logit_scaling_families():
    """Cohere multiplies by ``logit_scale``, Granite divides by ``logits_scaling`` (config only)."""
    from transformers import AutoConfig

    class M(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

    x = torch.tensor([[1.0, -2.0]])
    cohere = adapter_for(M(AutoConfig.for_model("cohere", logit_scale=0.5)))
    granite = adapter_for(M(AutoConfig.for_model("granite", logits_scaling=4.0)))
    assert torch.equal(cohere.logit_transform(x), x * 0.5) and torch.equal(granite.logit_transform(x), x / 4)
    assert adapter_for(M(AutoConfig.for_model("llama"))).logit_transform is None


# --------------------------------------------------------------------------- methods on every family


def make(family: str, method: str, params: dict | None = None, **train):
    lm = load_model(f"tiny-random:{family}", seed=0)
    task = toy_task()
    pattern = task.pattern("minimal")
    cfg = RunConfig(task="cola", method=method, params=params or {}, model=f"tiny-random:{family}", precision="fp32",
                    eval_batch_size=8, train=TrainConfig(**{"batch_size": 4, "warmup_ratio": 0.0, **train}))
    ctx = RunContext(cfg, task, pattern, lm, verbalizer_token_ids(lm.tokenizer, pattern.verbalizer), "fp32", CPU,
                     ResourceMeter(CPU), train_pool=toy_examples(8, seed=7, prefix="p"))
    cls = METHODS.get(method)
    return cls(ctx, validate(cls.Params, params or {}))


METHOD_CASES = [("zero-shot", {}), ("icl", {"k": 2}), ("vanilla", {}), ("pbft", {}), ("adaptive", {}),
                ("lora", {"r": 2}), ("distill", {"k": 2, "pool_size": 4})]


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,params", METHOD_CASES, ids=[m for m, _ in METHOD_CASES])
def test_every_method_runs(family, method, params):
    m = make(family, method, params, lr=1e-3, max_steps=2)
    summary = m.fit(toy_examples(8))
    if summary is not None and "loss_history" in summary:
        assert np.isfinite(summary["loss_history"]).all() and summary["steps"] == 2
    p = m.predict(toy_examples(4, seed=1))
    assert p.label_scores.shape == (4, 2) and np.isfinite(p.label_scores).all() and not p.skipped.any()
    assert set(p.pred.tolist()) <= {0, 1}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_reloads_to_identical_predictions(family, tmp_path):
    from fewtune.methods._trainable import classify
    from fewtune.methods.lora import load_adapter
    from fewtune.scoring.heads import ClassifierNet

    m = make(family, "lora", {"r": 2, "save_dir": str(tmp_path / "a")}, lr=1e-2, max_steps=2)
    m.fit(toy_examples(8))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in m.ctx.lm.model.named_parameters())
    evals = toy_examples(6, seed=5)
    want = m.predict(evals)
    model, head = load_adapter(load_model(f"tiny-random:{family}", seed=0).model, tmp_path / "a")
    got = classify(ClassifierNet(backbone_and_head(model)[0], head), m.ctx.lm.tokenizer,
                   [m.input_text(e) for e in evals], num_labels=2, batch_size=4, max_context=2048,
                   precision="fp32", device=CPU)
    assert np.allclose(got.label_scores, want.label_scores, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_trains_exactly_the_top_layer_and_final_norm(family):
    m = make(family, "adaptive", {"top_layers": 1}, lr=1e-2, max_steps=2)
    model = m.ctx.lm.model
    layers, norm = ModelAdapter.decoder_layers(model), ModelAdapter.final_norm(model)
    assert len(layers) == model.config.num_hidden_layers and norm is not None
    names = {id(p): n for n, p in model.named_parameters()}
    norm_names = {names[id(p)] for p in norm.parameters()}
    assert all(n.rsplit(".", 2)[-2] in ("norm", "ln_f", "final_layer_norm", "final_layernorm") for n in norm_names)
    top_ids = {id(p) for p in layers[-1].parameters()}
    assert all(f".{len(layers) - 1}." in names[i] for i in top_ids)  # the top block by its own name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m.fit(toy_examples(8))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {names[i] for i in top_ids} | norm_names
    assert changed == expected
    assert m.describe()["trained_layers"] == [len(layers) - 1]


def test_unknown_tiny_family_is_a_config_error_naming_the_choices():
    from fewtune.errors import ConfigError

    with pytest.raises(ConfigError, match="gpt_neox"):
        load_model("tiny-random:nosuch")


@pytest.mark.parametrize("method", ["pbft", "lora"])
def test_lm_objective_net_gives_the_models_own_logits_on_a_softcapped_family(method, tok):
    """PBFT's loss and LM-objective students read these logits: they must be soft-capped too."""
    m = make("gemma2", method, {"objective": "lm"} if method == "lora" else {}, max_steps=1)
    m.adapt_model()
    net = m.build_net().eval()
    enc = encode_prompts(tok, QUERIES, PREFIX)
    ids, mask, last = pad_batch([enc.prefix_ids + q for q in enc.query_ids], tok.pad_token_id, CPU)
    with torch.no_grad():
        want = m.ctx.lm.model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(last)), last]
        assert torch.allclose(net(ids, mask, last), want, atol=1e-5)
