"""Training batches: seeded, length-grouped global batches and each process's share of them.

Split out of ``fewtune.training.loop`` (the loop); the rules are described in its docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from fewtune.scoring.batching import pad_batch

GROUP_WINDOW = 4  # length-grouping window, in batches


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of indices; a new seeded shuffle on every pass (see module docstring)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group = group_by_length
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        bs = self.batch_size
        if not self.group:
            yield from (perm[i : i + bs] for i in range(0, len(perm), bs))
            return
        window = bs * GROUP_WINDOW
        batches: list[list[int]] = []
        for w in range(0, len(perm), window):
            chunk = sorted(perm[w : w + window], key=lambda i: -self.lengths[i])
            batches.extend(chunk[i : i + bs] for i in range(0, len(chunk), bs))
        # Only the final batch of the data may be short; keep every other batch full.
        full = [b for b in batches if len(b) == bs]
        short = [i for b in batches if len(b) < bs for i in b]
        order = torch.randperm(len(full), generator=self.generator).tolist()
        out = [full[j] for j in order]
        for i in range(0, len(short), bs):
            out.append(short[i : i + bs])
        yield from out


def accumulation_scale(i: int, n_batches: int, grad_accum: int) -> float:
    """The factor that makes micro-batch ``i`` of an epoch's ``n_batches`` count fully in its
    accumulation window: accelerate divides every micro-batch loss by ``grad_accum``, so the
    epoch's last window of ``m < grad_accum`` micro-batches would step with ``m / grad_accum`` of
    its mean gradient; its losses are scaled by ``grad_accum / m`` instead (1 in full windows)."""
    start = (i // grad_accum) * grad_accum
    return grad_accum / min(grad_accum, n_batches - start)


def shard_batch(batch: Sequence[int], rank: int, world: int) -> list[tuple[int, float]]:
    """This process's contiguous share of a global batch, as ``(index, weight)`` keys.

    ``weight`` = share × processes / global batch size: scaling each process's mean loss by it
    makes DDP's gradient *average* equal the gradient of the global batch's mean loss, also when
    the shares differ by one (a short last batch). A process whose share is empty trains on the
    batch's first example with weight 0 (the all-reduce needs every process). One process: all
    keys, weight 1.
    """
    if world == 1:
        return [(int(i), 1.0) for i in batch]
    base, extra = divmod(len(batch), world)
    start = rank * base + min(rank, extra)
    mine = list(batch[start : start + base + (rank < extra)])
    if not mine:
        return [(int(batch[0]), 0.0)]
    weight = len(mine) * world / len(batch)
    return [(int(i), weight) for i in mine]


class ShardedBatches(Sampler[list[tuple[int, float]]]):
    """Every process iterates the same seeded global batches and keeps its ``shard_batch``."""

    def __init__(self, batches: LengthGroupedBatches, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world
        self.batch_size = batches.batch_size  # read by accelerate's loader wrapper

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        return (shard_batch(b, self.rank, self.world) for b in self.batches)


class _Keys:
    """A "dataset" whose items are the sampler's keys, so the collate function sees them whole."""

    def __getitem__(self, key: tuple[int, float]) -> tuple[int, float]:
        return key


def _collate(seqs: Sequence[Sequence[int]], pad_id: int) -> Callable[[list[tuple[int, float]]], dict]:
    def collate(keys: list[tuple[int, float]]) -> dict:
        idx = [k[0] for k in keys]
        ids, mask, last = pad_batch([seqs[i] for i in idx], pad_id, torch.device("cpu"))
        weight = keys[0][1]
        tokens = int(mask.sum()) if weight > 0 else 0  # on the host, before the copy to the device
        return {"ids": ids, "mask": mask, "last": last, "idx": torch.tensor(idx, dtype=torch.long),
                "weight": weight, "tokens": tokens}

    return collate
