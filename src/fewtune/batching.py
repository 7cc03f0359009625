"""Token ids for scoring and training: encode prompts (a shared prefix + queries), group them
into batches of similar length, and right-pad a batch.

Right padding everywhere: the scored (or pooled) position of a row is its last real token,
``length - 1``, and positions run 0..length-1 as in an unpadded forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ContextLengthError, DataError


@dataclass
class Encoded:
    """Token ids per prompt; ``None`` where the prompt did not fit the context (skipped)."""

    prefix_ids: list[int]
    query_ids: list[list[int] | None]

    @property
    def skipped(self) -> np.ndarray:
        return np.array([q is None for q in self.query_ids], dtype=bool)


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


