"""Batched last-token scoring of prompts, with a shared-prefix KV cache for ICL.

Every method that predicts through the LM head (zero-shot, ICL, PBFT, distillation teachers and
students) reads the next-token distribution at the last real token of a prompt. We tokenize a
shared prefix (ICL demonstrations) and each query separately and concatenate the ids: the naive
and the prefix-cached paths then see exactly the same token sequence, so they can only differ by
floating-point summation order.

Two paths:

* **naive** — every prompt (prefix + query) runs through the model, batched by length and
  right-padded; the LM head is applied to the last real position only (a ``[B, L, vocab]`` logits
  tensor would be 49k wide).
* **prefix cache** — when many queries share one prefix (all eval queries of an ICL run share the
  same demonstrations) the prefix runs once (batch 1) and its keys/values are kept. Batches of
  queries then run on their own: each attention layer attends over the cached prefix keys/values
  *and* the causal query keys, combined in one softmax. Only the query tokens pass through the
  projections and MLPs, which at 16-shot MNLI (≈635 prefix tokens, ≈41 per query) is ≈17× less
  work. The prefix keys/values are never copied per query: the attention over the prefix is one
  matrix product of all queries' rows (batch folded into rows) with the single cached copy, so
  memory does not grow with batch × prefix length. (The obvious route, expanding a DynamicCache to
  the batch, materialises batch × prefix keys/values in every layer, ≈0.5 GB per batch of 16 at
  16-shot MNLI in fp32, plus SDPA's grouped-query repeat of them.)

The cached path plugs into transformers' attention dispatch (``AttentionInterface``) for the
duration of the call and checks that every layer went through it; a model whose attention does
not (custom code, sliding windows, attention sinks, soft-capping) or that cannot return a cache
falls back to the naive path, and ``Scores.note`` says so.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ContextLengthError, DataError
from .model_adapter import LogitTransform, adapter_for, backbone_and_head
from .models import autocast

PATH_NAIVE = "naive"
PATH_PREFIX_CACHE = "prefix_cache"
_ATTN_NAME = "fewtune_shared_prefix"


@dataclass
class Encoded:
    """Token ids per prompt; ``None`` where the prompt did not fit the context (skipped)."""

    prefix_ids: list[int]
    query_ids: list[list[int] | None]

    @property
    def skipped(self) -> np.ndarray:
        return np.array([q is None for q in self.query_ids], dtype=bool)


@dataclass
class Scores:
    """Per example: log-probs of each label's verbalizer token (full-vocab softmax), the
    full-vocabulary argmax token, and whether the example was skipped.

    ``path`` is how the scores were computed (``naive`` or ``prefix_cache``); ``note`` explains a
    fallback from the requested prefix cache to the naive path, so a run can record it.
    """

    label_logprobs: np.ndarray  # [N, num_labels], NaN for skipped
    full_argmax: np.ndarray  # [N] token id, -1 for skipped
    skipped: np.ndarray  # [N] bool
    tokens_scored: int  # tokens actually run through the model
    path: str = PATH_NAIVE
    note: str | None = None

    def predictions(self, keys: Sequence[str] | None = None) -> np.ndarray:
        """Best label per example (-1 if skipped); exact ties as in ``argmax_breaking_ties``."""
        return argmax_breaking_ties(self.label_logprobs, self.skipped, keys)[0]


def argmax_breaking_ties(scores: np.ndarray, skipped: np.ndarray, keys: Sequence[str] | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, tie) per row: the best label, -1 where skipped, and whether the best score was
    shared bit-for-bit by several labels.

    ``np.argmax`` gives a tie to the lowest label, which would bias every tie toward label 0 (with
    a bf16 head, 8 % of zero-shot CoLA prompts were ties). A tie is instead broken uniformly among
    the tied labels by a generator seeded with the row's key (the example id; the row index if no
    keys are given): unbiased, and deterministic — the same example breaks the same way in every
    run and method, so paired comparisons are not perturbed by the coin. Callers record ``tie``.
    """
    filled = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    pred = filled.argmax(axis=1) if filled.size else np.zeros(len(filled), dtype=np.int64)
    top = filled.max(axis=1, keepdims=True) if filled.size else np.zeros((len(filled), 1))
    best = (filled == top) & np.isfinite(top) & ~np.asarray(skipped, dtype=bool)[:, None]
    tie = best.sum(axis=1) > 1
    for i in np.flatnonzero(tie):
        key = str(keys[i]) if keys is not None else str(int(i))
        pred[i] = np.random.default_rng(zlib.crc32(key.encode())).choice(np.flatnonzero(best[i]))
    pred[np.asarray(skipped, dtype=bool)] = -1
    return pred.astype(np.int64), tie


def encode_prompts(tokenizer, queries: Sequence[str], prefix: str = "", max_context: int | None = None) -> Encoded:
    """Tokenize; drop (mark ``None``) any query whose prefix+query exceeds ``max_context``.

    The prefix gets the tokenizer's special tokens (BOS where the model uses one) and queries do
    not, since in the concatenated prompt they are continuations; without a prefix the queries
    get them instead.
    """
    prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"] if prefix else []
    if max_context is not None and len(prefix_ids) >= max_context:
        raise ContextLengthError(
            f"the in-context demonstrations alone are {len(prefix_ids)} tokens, the context limit is {max_context}",
            "use fewer demonstrations (params.k), a shorter pattern, or a larger context with --set max_context=N (≤ the model's window)",
        )
    enc = tokenizer(list(queries), add_special_tokens=not prefix_ids)["input_ids"] if len(queries) else []
    if not prefix_ids and any(len(q) == 0 for q in enc):
        raise DataError("an empty prompt cannot be scored (no prefix and an input with no tokens)",
                        "check the examples' text fields, or use a pattern, which adds text around them")
    if max_context is not None:
        budget = max_context - len(prefix_ids)
        enc = [q if len(q) <= budget else None for q in enc]
    return Encoded(prefix_ids, list(enc))


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so OOM shows up early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and the index of each sequence's last real token."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
    return ids.to(dev), mask.to(dev), last.to(dev)


def last_hidden(body: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor, **kw) -> torch.Tensor:
    """Hidden state of the last real token of each row: [B, d]."""
    out = body(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h[torch.arange(h.shape[0], device=h.device), last]


def head_logits(head: torch.nn.Module, h: torch.Tensor, rows: torch.Tensor | None = None,
                transform: LogitTransform | None = None) -> torch.Tensor:
    """``head(h)`` computed in fp32 with autocast off, whatever precision the body ran at: [B, V]
    (or [B, k] for the vocabulary ``rows`` only), then the family's logit post-processing
    ``transform`` (``ModelAdapter.logit_transform``: soft-capping, scaling; elementwise, so it
    applies to a subset of rows as well), so the logits are the model's own.

    Why: under bf16 autocast the projection onto the vocabulary returns bf16 logits, whose
    resolution at magnitudes 16–32 is 1/16–1/8 — on the embedded model 17 of 200 zero-shot CoLA
    prompts then get bit-identical " Yes"/" No" log-probs and ~5 % of predictions flip against
    fp32. The head is one [B, d] × [d, V] product per batch (one position per example), a small
    share of the work; the body, where the time goes, keeps its precision. Weights are fp32 (autocast never casts them),
    so this only undoes autocast's downcast. Gradients flow through the fp32 cast as usual.
    """
    with torch.autocast(device_type=h.device.type, enabled=False):
        h = h.float()
        if type(head) is not torch.nn.Linear:  # e.g. an adapter-wrapped head: run the module itself
            out = head(h).float()
            out = out if rows is None else out[:, rows]
        else:
            w = head.weight if rows is None else head.weight[rows]
            bias = getattr(head, "bias", None)
            b = None if bias is None else (bias if rows is None else bias[rows]).float()
            out = torch.nn.functional.linear(h, w.float(), b)
        return out if transform is None else transform(out)


def last_token_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits at the last real token: [B, V], the head in fp32 and the family's
    logit post-processing applied (``head_logits``): what the model's own forward gives there."""
    body, head = backbone_and_head(model)
    return head_logits(head, last_hidden(body, ids, mask, last), transform=adapter_for(model).logit_transform)


# --------------------------------------------------------------------------- shared-prefix attention


class PrefixCacheUnsupported(RuntimeError):
    """The model cannot use the shared-prefix attention; the caller falls back to naive scoring."""


@dataclass
class PrefixKV:
    """The prefix's keys and values per layer, ``[1, kv_heads, P, head_dim]`` each (post-RoPE)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int
    last_hidden: torch.Tensor  # [d]: the prefix's last hidden state (scores an empty query)


class _Active(threading.local):
    prefix: PrefixKV | None = None
    calls: int = 0


_ACTIVE = _Active()
_REGISTERED = False


def _unsupported_kwargs(kw: dict) -> list[str]:
    """Attention features our shared-prefix kernel does not implement (fall back instead)."""
    return [k for k in ("sliding_window", "softcap", "s_aux", "position_bias", "sinks") if kw.get(k) is not None]


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of a batch of queries over [shared prefix ; own causal tokens], one softmax.

    ``query`` is ``[B, H, q, d]``, ``key``/``value`` ``[B, Hkv, q, d]`` (the query tokens only: no
    cache is passed to the model). The prefix keys/values are ``[1, Hkv, P, d]``; grouped-query
    heads are handled by viewing the query heads as ``[Hkv, g]`` instead of repeating keys. The
    scores against the prefix are a single ``[Hkv, B·g·q, d] @ [Hkv, d, P]`` product, so the prefix
    is read once per batch, never copied. Softmax statistics are computed in fp32 (as eager
    attention does) and probabilities are cast back to the value dtype for the products.
    Returns ``[B, q, H, d]`` like transformers' attention functions.
    """
    prefix = _ACTIVE.prefix
    layer = getattr(module, "layer_idx", None)
    if prefix is None or layer is None or not 0 <= layer < len(prefix.keys):
        raise PrefixCacheUnsupported("attention module without a layer index matching the prefix cache")
    bad = _unsupported_kwargs(kwargs)
    if bad or (dropout and module.training):
        raise PrefixCacheUnsupported(f"attention uses {', '.join(bad) or 'dropout'}")
    pk, pv = prefix.keys[layer], prefix.values[layer]
    b, h, q, d = query.shape
    hkv = key.shape[1]
    if h % hkv or pk.shape[1] != hkv or pk.shape[-1] != d or value.shape[-1] != pv.shape[-1]:
        raise PrefixCacheUnsupported("prefix cache shape does not match the attention heads")
    g, p, dv = h // hkv, pk.shape[2], value.shape[-1]
    scale = scaling if scaling is not None else d**-0.5
    _ACTIVE.calls += 1

    qg = query.reshape(b, hkv, g, q, d)
    rows = qg.transpose(0, 1).reshape(hkv, b * g * q, d)  # batch folded into rows
    s_pre = torch.matmul(rows, pk[0].to(rows.dtype).transpose(1, 2)).float().mul_(scale).view(hkv, b, g, q, p)
    s_own = torch.matmul(qg, key.unsqueeze(2).transpose(-1, -2)).float().mul_(scale).transpose(0, 1)  # [hkv,b,g,q,q]
    if attention_mask is None:
        causal = torch.ones(q, q, dtype=torch.bool, device=query.device).tril_()
        s_own = s_own.masked_fill(~causal, float("-inf"))
    else:
        m = attention_mask[..., -q:]  # [b|1, 1, q, q]: padding + causal, from the model's mask builder
        m = m.transpose(0, 1).unsqueeze(2)  # [1, b|1, 1, q, q]
        s_own = s_own.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s_own + m.float()
    top = torch.maximum(s_pre.amax(-1), s_own.amax(-1)).unsqueeze(-1)
    e_pre = (s_pre - top).exp_()
    e_own = (s_own - top).exp_()
    denom = e_pre.sum(-1, keepdim=True) + e_own.sum(-1, keepdim=True)
    p_pre = e_pre.div_(denom).to(value.dtype)
    p_own = e_own.div_(denom).to(value.dtype)
    out = torch.matmul(p_pre.view(hkv, b * g * q, p), pv[0].to(value.dtype)).view(hkv, b, g, q, dv)
    out = out + torch.matmul(p_own, value.transpose(0, 1).unsqueeze(2))
    return out.permute(1, 3, 0, 2, 4).reshape(b, q, h, dv), None


def _register() -> None:
    """Make our attention function known to transformers (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError as e:
        raise PrefixCacheUnsupported(_old_transformers(e)) from None

    AttentionInterface.register(_ATTN_NAME, shared_prefix_attention)
    # The model's mask builder looks masks up by implementation name; sdpa's boolean masks (or
    # None for plain causal) are what our kernel reads.
    ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTN_NAME, sdpa_mask)
    _REGISTERED = True


def _old_transformers(err: ImportError) -> str:
    """An installed transformers older than pyproject's bound (4.56) lacks the attention/mask
    registries or per-layer caches the prefix cache plugs into: score naively and say why."""
    import transformers

    return f"transformers {transformers.__version__} lacks what the prefix cache needs ({err}); upgrade to >= 4.56"


def _cache_layers_kv(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys/values per layer of a transformers cache, if it is a plain full-attention one."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError as e:
        raise PrefixCacheUnsupported(_old_transformers(e)) from None

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        raise PrefixCacheUnsupported(f"the model's cache ({type(cache).__name__}) is not a plain full-attention DynamicCache")
    return [layer.keys for layer in layers], [layer.values for layer in layers]


def encode_prefix(body: torch.nn.Module, prefix_ids: Sequence[int], dev: torch.device) -> PrefixKV:
    """Run the prefix once (batch 1) and keep its keys/values."""
    ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=dev)
    try:
        out = body(input_ids=ids, use_cache=True)
    except (TypeError, ValueError) as e:  # a model that does not take use_cache
        raise PrefixCacheUnsupported(f"the model cannot return a KV cache ({e})") from None
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise PrefixCacheUnsupported("the model returned no KV cache")
    keys, values = _cache_layers_kv(cache)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return PrefixKV(keys, values, len(prefix_ids), h[0, -1])


@contextmanager
def _shared_prefix_mode(body: torch.nn.Module, prefix: PrefixKV) -> Iterator[None]:
    """Route the model's attention through ``shared_prefix_attention`` while inside."""
    _register()
    config = body.config
    previous = config._attn_implementation
    _ACTIVE.prefix = prefix
    config._attn_implementation = _ATTN_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ACTIVE.prefix = None


def _query_hidden(body: torch.nn.Module, prefix: PrefixKV, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Last-real-token hidden states of right-padded queries that continue the cached prefix.

    No attention mask is passed: with right padding, causal attention already keeps every real
    token from seeing the pads after it, and the pads' own outputs are never read. Positions are
    explicit (prefix length + offset) so position-embedding models (RoPE, learned) agree with
    the naive path.
    """
    b, q = ids.shape
    pos = (prefix.length + torch.arange(q, device=ids.device)).unsqueeze(0).expand(b, q)
    _ACTIVE.calls = 0
    out = body(input_ids=ids, position_ids=pos, use_cache=False)
    if _ACTIVE.calls != len(prefix.keys):
        raise PrefixCacheUnsupported(
            f"only {_ACTIVE.calls} of {len(prefix.keys)} attention layers went through transformers' attention interface"
        )
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    rows = h[torch.arange(b, device=h.device), last.clamp(min=0)]
    empty = last < 0  # an empty query: its next token follows the prefix's last token
    if bool(empty.any()):
        rows = torch.where(empty.unsqueeze(1), prefix.last_hidden.to(rows.dtype).expand_as(rows), rows)
    return rows


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_prompts(
    model: torch.nn.Module,
    tokenizer,
    queries: Sequence[str],
    label_token_ids: Sequence[int],
    *,
    prefix: str = "",
    batch_size: int = 16,
    max_context: int | None = None,
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
    use_prefix_cache: bool = True,
) -> Scores:
    """Score ``prefix + query`` for every query; see the module docstring for tokenization.

    With a non-empty ``prefix`` and ``use_prefix_cache`` the prefix runs once and is shared by all
    queries (falling back to the naive path, with ``Scores.note``, where the model cannot).
    """
    enc = encode_prompts(tokenizer, queries, prefix, max_context)
    return score_encoded(model, tokenizer, enc, label_token_ids, batch_size=batch_size, precision=precision,
                         on_batch=on_batch, use_prefix_cache=use_prefix_cache)


@torch.no_grad()
def score_encoded(
    model: torch.nn.Module,
    tokenizer,
    enc: Encoded,
    label_token_ids: Sequence[int],
    *,
    batch_size: int = 16,
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
    use_prefix_cache: bool = True,
) -> Scores:
    """Score encoded prompts; the prefix-cached path when there is a prefix and it is allowed."""
    was_training = model.training
    model.eval()
    try:
        if enc.prefix_ids and use_prefix_cache and any(q is not None for q in enc.query_ids):
            try:
                return _score_cached(model, tokenizer, enc, label_token_ids, batch_size, precision, on_batch)
            except PrefixCacheUnsupported as e:
                scores = _score_naive(model, tokenizer, enc, label_token_ids, batch_size, precision, on_batch)
                scores.note = f"prefix cache not used, scored naively: {e}"
                return scores
        return _score_naive(model, tokenizer, enc, label_token_ids, batch_size, precision, on_batch)
    finally:
        model.train(was_training)


def _empty_results(n: int, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, num_labels), np.nan, dtype=np.float64), np.full(n, -1, dtype=np.int64)


def _store(logits: torch.Tensor, idx: list[int], label_ids: torch.Tensor, logprobs: np.ndarray, argmax: np.ndarray) -> None:
    """Full-vocabulary log-softmax in fp32 (``logits`` come from ``head_logits``), kept for the labels."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    logprobs[idx] = lp[:, label_ids].double().cpu().numpy()
    argmax[idx] = logits.argmax(dim=-1).cpu().numpy()


def _score_naive(model, tokenizer, enc: Encoded, label_token_ids, batch_size, precision, on_batch) -> Scores:
    n = len(enc.query_ids)
    dev = next(model.parameters()).device
    label_ids = torch.tensor(list(label_token_ids), device=dev)
    logprobs, argmax = _empty_results(n, len(label_token_ids))
    keep = [i for i, q in enumerate(enc.query_ids) if q is not None]
    seqs = {i: enc.prefix_ids + enc.query_ids[i] for i in keep}
    tokens = 0
    for batch in length_sorted_batches([len(seqs[i]) for i in keep], batch_size):
        idx = [keep[j] for j in batch]
        ids, mask, last = pad_batch([seqs[i] for i in idx], tokenizer.pad_token_id, dev)
        with autocast(precision, dev):
            logits = last_token_logits(model, ids, mask, last)
        _store(logits, idx, label_ids, logprobs, argmax)
        tokens += int(mask.sum())
        if on_batch:
            on_batch(len(idx))
    return Scores(logprobs, argmax, enc.skipped, tokens, PATH_NAIVE)


def _score_cached(model, tokenizer, enc: Encoded, label_token_ids, batch_size, precision, on_batch) -> Scores:
    reason = adapter_for(model).prefix_cache_reason
    if reason:  # known up front: do not run the prefix only to discover it
        raise PrefixCacheUnsupported(reason)
    n = len(enc.query_ids)
    dev = next(model.parameters()).device
    label_ids = torch.tensor(list(label_token_ids), device=dev)
    logprobs, argmax = _empty_results(n, len(label_token_ids))
    body, head = backbone_and_head(model)
    keep = [i for i, q in enumerate(enc.query_ids) if q is not None]
    with autocast(precision, dev):
        prefix = encode_prefix(body, enc.prefix_ids, dev)
    tokens = prefix.length
    with _shared_prefix_mode(body, prefix):
        for batch in length_sorted_batches([len(enc.query_ids[i]) for i in keep], batch_size):
            idx = [keep[j] for j in batch]
            qs = [enc.query_ids[i] for i in idx]
            if max(len(s) for s in qs) == 0:  # only empty queries: a one-pad row keeps shapes valid
                qs = [[tokenizer.pad_token_id] for _ in qs]
                ids, _, _ = pad_batch(qs, tokenizer.pad_token_id, dev)
                last = torch.full((len(qs),), -1, dtype=torch.long, device=dev)
            else:
                ids, _, last = pad_batch(qs, tokenizer.pad_token_id, dev)
            with autocast(precision, dev):
                hidden = _query_hidden(body, prefix, ids, last)
            logits = head_logits(head, hidden, transform=adapter_for(model).logit_transform)
            _store(logits, idx, label_ids, logprobs, argmax)
            tokens += sum(len(enc.query_ids[i]) for i in idx)
            if on_batch:
                on_batch(len(idx))
    return Scores(logprobs, argmax, enc.skipped, tokens, PATH_PREFIX_CACHE)
