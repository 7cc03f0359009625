"""Batched last-token scoring of prompts: the API every method that predicts through the LM head
uses (zero-shot, ICL, PBFT, distillation teachers and students).

It reads the next-token distribution at the last real token of a prompt. We tokenize a shared
prefix (ICL demonstrations) and each query separately and concatenate the ids (``batching``): the
naive and the prefix-cached paths then see exactly the same token sequence, so they can only
differ by floating-point summation order.

Two paths:

* **naive** — every prompt (prefix + query) runs through the model, batched by length and
  right-padded; the LM head is applied to the last real position only (a ``[B, L, vocab]`` logits
  tensor would be 49k wide).
* **prefix cache** — when many queries share one prefix, the prefix runs once and the queries
  attend to its cached keys/values (``shared_prefix``). Where the model cannot (its family is
  declared unsupported in ``models.adapter``, or the kernel detects it), scoring falls back to the
  naive path and ``Scores.note`` says so.

Either way the LM head runs in fp32 and the family's logit post-processing (soft-capping,
scaling: ``models.adapter``) is applied, so the log-probs are the model's own.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fewtune.models.adapter import LogitTransform, adapter_for, backbone_and_head
from fewtune.models.loading import autocast
from fewtune.scoring.batching import Encoded, encode_prompts, length_sorted_batches, pad_batch
from fewtune.scoring.shared_prefix import PrefixCacheUnsupported, encode_prefix, query_hidden, shared_prefix_mode

PATH_NAIVE = "naive"
PATH_PREFIX_CACHE = "prefix_cache"
# Re-exported: the scoring API's inputs (many callers import them from here).
__all__ = ["Encoded", "Scores", "argmax_breaking_ties", "encode_prompts", "head_logits", "last_hidden",
           "last_token_logits", "length_sorted_batches", "pad_batch", "score_encoded", "score_prompts"]


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
    scores = _score_encoded(model, tokenizer, enc, label_token_ids, batch_size, precision, on_batch, use_prefix_cache)
    if enc.note:  # the prompts were tokenized jointly (``batching.encode_prompts``)
        scores.note = enc.note if scores.note is None else f"{enc.note}; {scores.note}"
    return scores


def _score_encoded(model, tokenizer, enc: Encoded, label_token_ids, batch_size, precision, on_batch,
                   use_prefix_cache) -> Scores:
    was_training = model.training
    model.eval()
    try:
        # One autocast context for the whole call, not one per batch: autocast keeps its low-precision
        # copy of each weight until the outermost context exits, so the weights are cast once per call
        # rather than once per batch (at 16-shot ICL on CPU those casts were ~1/4 of the cached path).
        # Autocast caches only weights that require grad: a frozen base is still cast per batch.
        with autocast(precision, next(model.parameters()).device):
            return _score_either_path(model, tokenizer, enc, label_token_ids, batch_size, on_batch, use_prefix_cache)
    finally:
        model.train(was_training)


def _score_either_path(model, tokenizer, enc: Encoded, label_token_ids, batch_size, on_batch, use_prefix_cache) -> Scores:
    if enc.prefix_ids and use_prefix_cache and any(q is not None for q in enc.query_ids):
        try:
            return _score_cached(model, tokenizer, enc, label_token_ids, batch_size, on_batch)
        except PrefixCacheUnsupported as e:
            scores = _score_naive(model, tokenizer, enc, label_token_ids, batch_size, on_batch)
            scores.note = f"prefix cache not used, scored naively: {e}"
            return scores
    return _score_naive(model, tokenizer, enc, label_token_ids, batch_size, on_batch)


def _empty_results(n: int, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, num_labels), np.nan, dtype=np.float64), np.full(n, -1, dtype=np.int64)


def _store(logits: torch.Tensor, idx: list[int], label_ids: torch.Tensor, logprobs: np.ndarray, argmax: np.ndarray) -> None:
    """Full-vocabulary log-softmax in fp32 (``logits`` come from ``head_logits``), kept for the labels."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    logprobs[idx] = lp[:, label_ids].double().cpu().numpy()
    argmax[idx] = logits.argmax(dim=-1).cpu().numpy()


def _score_naive(model, tokenizer, enc: Encoded, label_token_ids, batch_size, on_batch) -> Scores:
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
        logits = last_token_logits(model, ids, mask, last)
        _store(logits, idx, label_ids, logprobs, argmax)
        tokens += int(mask.sum())
        if on_batch:
            on_batch(len(idx))
    return Scores(logprobs, argmax, enc.skipped, tokens, PATH_NAIVE)


def _score_cached(model, tokenizer, enc: Encoded, label_token_ids, batch_size, on_batch) -> Scores:
    reason = adapter_for(model).prefix_cache_reason
    if reason:  # known up front: do not run the prefix only to discover it
        raise PrefixCacheUnsupported(reason)
    n = len(enc.query_ids)
    dev = next(model.parameters()).device
    label_ids = torch.tensor(list(label_token_ids), device=dev)
    logprobs, argmax = _empty_results(n, len(label_token_ids))
    body, head = backbone_and_head(model)
    keep = [i for i, q in enumerate(enc.query_ids) if q is not None]
    prefix = encode_prefix(body, enc.prefix_ids, dev)
    tokens = prefix.length
    with shared_prefix_mode(body, prefix):
        for batch in length_sorted_batches([len(enc.query_ids[i]) for i in keep], batch_size):
            idx = [keep[j] for j in batch]
            hidden = query_hidden(body, prefix, [enc.query_ids[i] for i in idx], dev)
            logits = head_logits(head, hidden, transform=adapter_for(model).logit_transform)
            _store(logits, idx, label_ids, logprobs, argmax)
            tokens += sum(len(enc.query_ids[i]) for i in idx)
            if on_batch:
                on_batch(len(idx))
    return Scores(logprobs, argmax, enc.skipped, tokens, PATH_PREFIX_CACHE)
