"""Batched last-token scoring of prompts.

Every method that predicts through the LM head (zero-shot, ICL, PBFT, distillation students)
reads the next-token distribution at the last real token of a prompt. We tokenize a shared prefix
(ICL demonstrations) and each query separately and concatenate the ids: the naive and the
prefix-cached paths then see exactly the same token sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ContextLengthError
from .models import autocast, backbone_and_head


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
    full-vocabulary argmax token, and whether the example was skipped."""

    label_logprobs: np.ndarray  # [N, num_labels], NaN for skipped
    full_argmax: np.ndarray  # [N] token id, -1 for skipped
    skipped: np.ndarray  # [N] bool
    tokens_scored: int  # tokens actually run through the model

    def predictions(self) -> np.ndarray:
        pred = np.nan_to_num(self.label_logprobs, nan=-np.inf).argmax(axis=1)
        pred[self.skipped] = -1
        return pred


def encode_prompts(tokenizer, queries: Sequence[str], prefix: str = "", max_context: int | None = None) -> Encoded:
    """Tokenize; drop (mark ``None``) any query whose prefix+query exceeds ``max_context``."""
    prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"] if prefix else []
    if max_context is not None and len(prefix_ids) >= max_context:
        raise ContextLengthError(
            f"the in-context demonstrations alone are {len(prefix_ids)} tokens, the context limit is {max_context}",
            "use fewer demonstrations (params.k), a shorter pattern, or a larger --max-context (≤ the model's window)",
        )
    enc = tokenizer(list(queries), add_special_tokens=not prefix_ids)["input_ids"]
    if max_context is not None:
        budget = max_context - len(prefix_ids)
        enc = [q if len(q) <= budget else None for q in enc]
    return Encoded(prefix_ids, enc)


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


def last_token_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits at the last real token: [B, V] (fp32)."""
    body, head = backbone_and_head(model)
    return head(last_hidden(body, ids, mask, last)).float()


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
) -> Scores:
    """Score ``prefix + query`` for every query; see module docstring for tokenization."""
    enc = encode_prompts(tokenizer, queries, prefix, max_context)
    return score_encoded(model, tokenizer, enc, label_token_ids, batch_size=batch_size, precision=precision, on_batch=on_batch)


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
) -> Scores:
    n = len(enc.query_ids)
    dev = next(model.parameters()).device
    label_ids = torch.tensor(list(label_token_ids), device=dev)
    logprobs = np.full((n, len(label_token_ids)), np.nan, dtype=np.float64)
    argmax = np.full(n, -1, dtype=np.int64)
    keep = [i for i, q in enumerate(enc.query_ids) if q is not None]
    seqs = {i: enc.prefix_ids + enc.query_ids[i] for i in keep}
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in length_sorted_batches([len(seqs[i]) for i in keep], batch_size):
            idx = [keep[j] for j in batch]
            ids, mask, last = pad_batch([seqs[i] for i in idx], tokenizer.pad_token_id, dev)
            with autocast(precision, dev):
                logits = last_token_logits(model, ids, mask, last)
            lp = torch.log_softmax(logits, dim=-1)
            logprobs[idx] = lp[:, label_ids].double().cpu().numpy()
            argmax[idx] = logits.argmax(dim=-1).cpu().numpy()
            tokens += int(mask.sum())
            if on_batch:
                on_batch(len(idx))
    finally:
        model.train(was_training)
    return Scores(logprobs, argmax, enc.skipped, tokens)
