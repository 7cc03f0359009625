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

from fewtune.errors import ContextLengthError, DataError

# How many queries of a call are checked for split == joint tokenization (a tokenizer that
# differs does so systematically, e.g. SentencePiece's dummy prefix, so a few real prompts show it).
SPLIT_PROBES = 8


@dataclass
class Encoded:
    """Token ids per prompt; ``None`` where the prompt did not fit the context (skipped).

    ``note`` says why the prompts were tokenized jointly (no shared prefix) where the split
    tokenization would have differed from the joint one."""

    prefix_ids: list[int]
    query_ids: list[list[int] | None]
    note: str | None = None

    @property
    def skipped(self) -> np.ndarray:
        return np.array([q is None for q in self.query_ids], dtype=bool)


def appended_suffix(tokenizer) -> list[int]:
    """The special tokens a tokenizer appends after the text (an EOS, for some), found by
    encoding one character with and without special tokens."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[start + len(plain) :])
    return []


def token_ids(tokenizer, texts: Sequence[str], special: bool) -> list[list[int]]:
    """``input_ids`` of ``texts``, with leading special tokens (BOS) if ``special`` but never a
    trailing one: the scored position must be the text's last token, not an appended EOS."""
    out = tokenizer(list(texts), add_special_tokens=special)["input_ids"] if len(texts) else []
    suffix = appended_suffix(tokenizer) if special else []
    n = len(suffix)
    return [list(ids[:-n]) if n and list(ids[-n:]) == suffix else list(ids) for ids in out]


def encode_prompts(tokenizer, queries: Sequence[str], prefix: str = "", max_context: int | None = None) -> Encoded:
    """Tokenize; drop (mark ``None``) any query whose prefix+query exceeds ``max_context``.

    The prefix gets the tokenizer's leading special tokens (BOS where the model uses one) and
    queries do not, since in the concatenated prompt they are continuations; without a prefix the
    queries get them instead. The split ids are checked against the joint tokenization of
    ``prefix + query`` on the first queries (``SPLIT_PROBES``): where they differ (a tokenizer
    that merges across the boundary or adds a dummy-prefix space to every piece) every prompt is
    tokenized jointly instead — exactly the text's tokens, scored without the shared-prefix cache —
    and ``note`` says so.
    """
    prefix_ids = token_ids(tokenizer, [prefix], True)[0] if prefix else []
    if max_context is not None and len(prefix_ids) >= max_context:
        raise ContextLengthError(
            f"the in-context demonstrations alone are {len(prefix_ids)} tokens, the context limit is {max_context}",
            "use fewer demonstrations (params.k), a shorter pattern, or a larger context with --set max_context=N (≤ the model's window)",
        )
    enc = token_ids(tokenizer, queries, special=not prefix_ids)
    note = None
    if prefix_ids and _split_differs(tokenizer, prefix, prefix_ids, queries, enc):
        note = ("the tokenizer splits prefix + query differently from the joint text; prompts tokenized jointly "
                "and scored without the prefix cache")
        prefix_ids, enc = [], token_ids(tokenizer, [prefix + q for q in queries], True)
    if not prefix_ids and any(len(q) == 0 for q in enc):
        raise DataError("an empty prompt cannot be scored (no prefix and an input with no tokens)",
                        "check the examples' text fields, or use a pattern, which adds text around them")
    if max_context is not None:
        budget = max_context - len(prefix_ids)
        enc = [q if len(q) <= budget else None for q in enc]
    return Encoded(prefix_ids, list(enc), note)


def _split_differs(tokenizer, prefix: str, prefix_ids: list[int], queries: Sequence[str], enc: list[list[int]]) -> bool:
    """Whether prefix ids + query ids differ from the joint tokenization on the first queries."""
    probe = range(min(SPLIT_PROBES, len(queries)))
    joint = token_ids(tokenizer, [prefix + queries[i] for i in probe], True)
    return any(prefix_ids + enc[i] != joint[i] for i in probe)


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


