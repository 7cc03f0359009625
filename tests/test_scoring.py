"""Last-token scoring: the prefix-cached path must give what scoring every full prompt gives.

All on the tiny random Llama (4 layers, grouped-query attention), so a mistake in the shared-
prefix attention (positions, head grouping, causal mask, padding, softmax over prefix + query)
shows up as a log-prob difference far above the 1e-3 tolerance: the tiny model is initialised
with std 0.3 (``tiny_config``) so that its outputs depend strongly on every token and position
(positions restarting at 0 in the cached path move log-probs by ≈5 nats).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewtune.errors import ContextLengthError, DataError
from fewtune.models.loading import load_model
from fewtune.scoring.scorer import PATH_NAIVE, PATH_PREFIX_CACHE, encode_prompts, score_prompts
from fewtune.tasks.prompts import verbalizer_token_ids

SENTENCES = [
    "The book was read by the student ?",
    "Him the cat chased ?",
    "John seems to be happy ?",
    "What did you wonder whether Mary bought ?",
    "The more you eat, the fatter you get ?",
    "She sang ?",
    "Every student who has ever read a book about syntax knows that the answer, which was given in class, is wrong ?",
    "Bill is taller than I think that Mary is ?",
    "They made him president of the club before anyone else could object ?",
    "It is easy to please John ?",
]
DEMOS = " ".join(
    f"{s}{w}" for s, w in [
        ("The dog barked loudly ?", " Yes"), ("Barked dog the ?", " No"),
        ("Sue gave the book to Bill ?", " Yes"), ("Sue gave to Bill the book ?", " No"),
    ]
)
PREFIX = DEMOS
QUERIES = [" " + s for s in SENTENCES]  # continuations of the demonstrations, as ICL builds them


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return load_model("tiny-random", seed=0)


@pytest.fixture(scope="module")
def label_ids(lm):
    return verbalizer_token_ids(lm.tokenizer, (" No", " Yes")).token_ids


def _score(lm, label_ids, **kw):
    return score_prompts(lm.model, lm.tokenizer, kw.pop("queries", QUERIES), label_ids, **kw)


def test_prefix_cache_matches_naive_fp32(lm, label_ids):
    naive = _score(lm, label_ids, prefix=PREFIX, use_prefix_cache=False, precision="fp32")
    cached = _score(lm, label_ids, prefix=PREFIX, use_prefix_cache=True, precision="fp32")
    assert naive.path == PATH_NAIVE and cached.path == PATH_PREFIX_CACHE and cached.note is None
    np.testing.assert_allclose(cached.label_logprobs, naive.label_logprobs, atol=1e-3, rtol=0)
    assert (cached.predictions() == naive.predictions()).all()
    assert (cached.full_argmax == naive.full_argmax).all()
    # Only the prefix (once) and the query tokens ran through the model.
    enc = encode_prompts(lm.tokenizer, QUERIES, PREFIX)
    assert cached.tokens_scored == len(enc.prefix_ids) + sum(len(q) for q in enc.query_ids)
    assert naive.tokens_scored == len(QUERIES) * len(enc.prefix_ids) + sum(len(q) for q in enc.query_ids)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # grouped-query heads; plain multi-head
def test_every_prefix_kernel_matches_naive_in_fp32(family, label_ids, monkeypatch):
    """Each kernel computes the naive path's attention: within fp32 rounding, same argmax; ``auto``
    is the fused log-sum-exp kernel (``split``) on CPU. (On the embedded model bench 9 measures
    ≤ 5e-6; this model's log-probs are 10–15 nats, so its rounding reaches ~7e-6, while a wrong
    mask, position or merge moves them by ≥ 0.01.)"""
    from fewtune.scoring import shared_prefix

    lm = load_model(f"tiny-random:{family}", seed=0)
    naive = _score(lm, label_ids, prefix=PREFIX, use_prefix_cache=False, precision="fp32", batch_size=4)
    runs = {}
    for kernel in ("fp32", "sdpa", "split", "auto"):
        calls = {k: 0 for k in ("fp32", "sdpa", "split")}
        for k in calls:
            real = getattr(shared_prefix, f"_{k}_attention")
            monkeypatch.setattr(shared_prefix, f"_{k}_attention",
                                lambda *a, _k=k, _real=real: calls.__setitem__(_k, calls[_k] + 1) or _real(*a))
        with shared_prefix.prefix_kernel(kernel):
            s = runs[kernel] = _score(lm, label_ids, prefix=PREFIX, precision="fp32", batch_size=4)
        monkeypatch.undo()
        assert s.path == PATH_PREFIX_CACHE
        assert [k for k, n in calls.items() if n] == ["split" if kernel == "auto" else kernel]
        np.testing.assert_allclose(s.label_logprobs, naive.label_logprobs, atol=1e-5, rtol=0)
        assert (s.full_argmax == naive.full_argmax).all()
    assert np.ptp(naive.label_logprobs[:, 1] - naive.label_logprobs[:, 0]) > 0.05  # the model reads its input


def test_weights_are_cast_once_per_call_and_the_prefix_kept_in_the_compute_dtype(lm, label_ids, monkeypatch):
    """Under bf16 autocast each weight is cast once per scoring call, not once per batch (autocast's
    weight cache lives as long as one context spans the call), and the cached prefix keys/values
    are stored in bf16 once, not re-cast per batch and layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fewtune.scoring import shared_prefix

    weights = {m.weight.data_ptr() for m in lm.model.modules() if isinstance(m, torch.nn.Linear)}
    casts: list[int] = []

    class CountWeightCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in weights:
                casts.append(args[0].data_ptr())
            return func(*args, **(kwargs or {}))

    stored = []
    real_encode = shared_prefix.encode_prefix
    monkeypatch.setattr("fewtune.scoring.scorer.encode_prefix", lambda *a: stored.append(real_encode(*a)) or stored[-1])
    for cached in (True, False):
        casts.clear()
        with CountWeightCasts():
            _score(lm, label_ids, prefix=PREFIX, precision="bf16", batch_size=2, use_prefix_cache=cached)  # 5 batches
        assert casts and len(casts) == len(set(casts)), (cached, len(casts), len(set(casts)))
    assert {t.dtype for t in stored[0].keys + stored[0].values} == {torch.bfloat16}


def test_queries_run_packed_without_padding(lm, label_ids, monkeypatch):
    """The body sees each batch's query tokens packed in one row: no pads go through the MLPs."""
    body = lm.model.model
    shapes = []
    hook = body.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        _score(lm, label_ids, prefix=PREFIX, batch_size=4)
    finally:
        hook.remove()
    enc = encode_prompts(lm.tokenizer, QUERIES, PREFIX)
    assert shapes[0] == (1, len(enc.prefix_ids))
    assert sum(w for _, w in shapes[1:]) == sum(len(q) for q in enc.query_ids) and {b for b, _ in shapes} == {1}


def test_prefix_cache_matches_naive_bf16(lm, label_ids):
    """bf16 autocast rounds differently on the two paths; both stay close to the fp32 answer.

    The tolerance is bf16's error in the body of a model with large weights (init std 0.3),
    ≈0.3 nats here; a real error of the cache (e.g. positions restarting at 0) is ≈5 nats."""
    ref = _score(lm, label_ids, prefix=PREFIX, use_prefix_cache=False, precision="fp32")
    cached = _score(lm, label_ids, prefix=PREFIX, use_prefix_cache=True, precision="bf16")
    naive = _score(lm, label_ids, prefix=PREFIX, use_prefix_cache=False, precision="bf16")
    assert cached.path == PATH_PREFIX_CACHE
    np.testing.assert_allclose(cached.label_logprobs, ref.label_logprobs, atol=0.5, rtol=0)
    np.testing.assert_allclose(cached.label_logprobs, naive.label_logprobs, atol=0.5, rtol=0)


def test_batch_size_and_order_do_not_change_scores(lm, label_ids):
    one = _score(lm, label_ids, prefix=PREFIX, batch_size=1)
    seven = _score(lm, label_ids, prefix=PREFIX, batch_size=7)
    np.testing.assert_allclose(one.label_logprobs, seven.label_logprobs, atol=1e-5, rtol=0)
    perm = np.random.default_rng(0).permutation(len(QUERIES))
    shuffled = _score(lm, label_ids, prefix=PREFIX, batch_size=3, queries=[QUERIES[i] for i in perm])
    np.testing.assert_allclose(shuffled.label_logprobs, one.label_logprobs[perm], atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_right_padding_equals_unpadded_single_example(lm, label_ids, use_cache):
    """The longest and the shortest query batched together (the short one padded) vs each alone."""
    lengths = [len(q) for q in encode_prompts(lm.tokenizer, QUERIES, PREFIX).query_ids]
    pair = [QUERIES[int(np.argmax(lengths))], QUERIES[int(np.argmin(lengths))]]
    batched = _score(lm, label_ids, prefix=PREFIX, queries=pair, batch_size=2, use_prefix_cache=use_cache)
    for i, q in enumerate(pair):
        alone = _score(lm, label_ids, prefix=PREFIX, queries=[q], batch_size=1, use_prefix_cache=use_cache)
        np.testing.assert_allclose(batched.label_logprobs[i], alone.label_logprobs[0], atol=1e-5, rtol=0)


def test_no_prefix_scores_naively(lm, label_ids):
    s = _score(lm, label_ids, queries=SENTENCES)
    assert s.path == PATH_NAIVE and not s.skipped.any() and np.isfinite(s.label_logprobs).all()


def test_over_context_queries_are_skipped_and_counted(lm, label_ids):
    enc = encode_prompts(lm.tokenizer, QUERIES, PREFIX)
    lengths = np.array([len(q) for q in enc.query_ids])
    max_context = len(enc.prefix_ids) + int(np.median(lengths))
    expected = lengths > max_context - len(enc.prefix_ids)
    assert 0 < expected.sum() < len(QUERIES)
    full = _score(lm, label_ids, prefix=PREFIX)
    for use_cache in (True, False):
        s = _score(lm, label_ids, prefix=PREFIX, max_context=max_context, use_prefix_cache=use_cache)
        assert (s.skipped == expected).all()
        assert np.isnan(s.label_logprobs[expected]).all() and (s.predictions()[expected] == -1).all()
        assert (s.full_argmax[expected] == -1).all()
        # The examples that fit are scored exactly as without a limit.
        np.testing.assert_allclose(s.label_logprobs[~expected], full.label_logprobs[~expected], atol=1e-5, rtol=0)


def test_prefix_longer_than_context_is_an_error(lm, label_ids):
    n_prefix = len(encode_prompts(lm.tokenizer, [], PREFIX).prefix_ids)
    with pytest.raises(ContextLengthError, match="demonstrations alone"):
        _score(lm, label_ids, prefix=PREFIX, max_context=n_prefix)


def test_empty_query_scores_the_token_after_the_prefix(lm, label_ids):
    naive = _score(lm, label_ids, prefix=PREFIX, queries=["", QUERIES[0]], use_prefix_cache=False)
    cached = _score(lm, label_ids, prefix=PREFIX, queries=["", QUERIES[0]])
    np.testing.assert_allclose(cached.label_logprobs, naive.label_logprobs, atol=1e-3, rtol=0)


def test_empty_prompt_without_prefix_is_a_data_error(lm):
    with pytest.raises(DataError, match="empty prompt"):
        encode_prompts(lm.tokenizer, ["fine ?", ""])


def test_peft_wrapped_model_uses_the_cache(lm, label_ids):
    peft = pytest.importorskip("peft")
    model = load_model("tiny-random", seed=1).model
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, cfg)
    naive = score_prompts(wrapped, lm.tokenizer, QUERIES, label_ids, prefix=PREFIX, use_prefix_cache=False)
    cached = score_prompts(wrapped, lm.tokenizer, QUERIES, label_ids, prefix=PREFIX)
    assert cached.path == PATH_PREFIX_CACHE
    np.testing.assert_allclose(cached.label_logprobs, naive.label_logprobs, atol=1e-3, rtol=0)
    # The adapters are live in both paths: disabling them changes the scores.
    with wrapped.disable_adapter():
        base = score_prompts(wrapped, lm.tokenizer, QUERIES, label_ids, prefix=PREFIX)
    assert np.abs(base.label_logprobs - cached.label_logprobs).max() > 1e-3


def test_attention_implementation_is_restored(lm, label_ids):
    before = lm.model.config._attn_implementation
    _score(lm, label_ids, prefix=PREFIX)
    assert lm.model.config._attn_implementation == before


def test_unsupported_cache_falls_back_to_naive_with_a_note(lm, label_ids):
    """A sliding-window model's cache is not a plain full-attention cache: naive, and say so."""
    from transformers import AutoModelForCausalLM, MistralConfig

    tok = lm.tokenizer
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4096,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    naive = score_prompts(model, tok, QUERIES[:3], label_ids, prefix=PREFIX, use_prefix_cache=False)
    s = score_prompts(model, tok, QUERIES[:3], label_ids, prefix=PREFIX)
    assert s.path == PATH_NAIVE and s.note and "prefix cache not used" in s.note
    np.testing.assert_allclose(s.label_logprobs, naive.label_logprobs, atol=0, rtol=0)
