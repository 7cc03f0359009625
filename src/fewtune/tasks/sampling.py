"""Seeded, reproducible sampling: few-shot train samples, eval subsamples, ICL demonstrations.

Every function takes an explicit ``seed`` and draws from its own ``numpy.random.default_rng(seed)``
so results never depend on global RNG state (the released study code re-seeded numpy inside the
HF Trainer and so produced nine identical "runs"). Different seeds give genuinely different
samples; the same seed and pool give the same sample on every machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fewtune.errors import ConfigError
from fewtune.tasks.base import Example


def _by_label(pool: Sequence[Example], num_labels: int) -> list[list[int]]:
    """Indices into ``pool`` per label id, in pool order."""
    groups: list[list[int]] = [[] for _ in range(num_labels)]
    for i, ex in enumerate(pool):
        if not 0 <= ex.label < num_labels:
            raise ConfigError(f"example '{ex.id}' has label {ex.label}, outside 0..{num_labels - 1}",
                              "num_labels does not match the task's labels")
        groups[ex.label].append(i)
    return groups


def _label_name(label: int, label_names: Sequence[str] | None) -> str:
    return f"{label} ({label_names[label]!r})" if label_names and label < len(label_names) else str(label)


def _quotas(total: int, sizes: list[int], rng: np.random.Generator) -> list[int] | None:
    """Split ``total`` as evenly as possible over labels: floor for all, +1 for ``total % L`` labels
    picked by ``rng`` among those with room. None if impossible."""
    num = len(sizes)
    base, rem = divmod(total, num)
    if any(s < base for s in sizes):
        return None
    roomy = [i for i, s in enumerate(sizes) if s > base]
    if len(roomy) < rem:
        return None
    quotas = [base] * num
    for i in rng.choice(roomy, size=rem, replace=False) if rem else []:
        quotas[int(i)] += 1
    return quotas


def _ids_digest(examples: Sequence[Example]) -> str:
    blob = "\n".join(f"{i}\t{lab}" for i, lab in sorted((e.id, e.label) for e in examples))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class FewShotSample:
    """A few-shot training sample and what is needed to reproduce and audit it."""

    examples: list[Example]
    seed: int
    n: int
    per_class: bool
    num_labels: int
    task: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def label_counts(self) -> dict[int, int]:
        counts = {lab: 0 for lab in range(self.num_labels)}
        for ex in self.examples:
            counts[ex.label] += 1
        return counts

    def manifest(self) -> dict[str, Any]:
        """JSON-ready record of the sample; ``sha256`` identifies it independently of order."""
        out: dict[str, Any] = {
            "seed": self.seed,
            "n": self.n,
            "per_class": self.per_class,
            "size": len(self.examples),
            "ids": [ex.id for ex in self.examples],
            "label_counts": {str(k): v for k, v in self.label_counts().items()},
            "sha256": _ids_digest(self.examples),
        }
        if self.task is not None:
            out = {"task": self.task, **out}
        return out


def few_shot_sample(
    pool: Sequence[Example],
    n: int,
    seed: int,
    num_labels: int,
    per_class: bool = True,
    *,
    task: str | None = None,
    label_names: Sequence[str] | None = None,
) -> FewShotSample:
    """Draw a balanced few-shot sample from ``pool``.

    ``per_class=True`` (the study's setting): ``n`` examples of every label, ``n·num_labels`` in
    all. ``per_class=False`` (llmft's "n total"): ``n`` in all, as balanced as possible — every
    label gets ``n // num_labels`` and the remaining ``n % num_labels`` go to distinct labels
    chosen by the seeded rng. Within a label, examples are drawn without replacement; the final
    order is shuffled (so batches and ICL prompts do not see all of one label first).
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}", "use n >= 1")
    rng = np.random.default_rng(seed)
    groups = _by_label(pool, num_labels)
    sizes = [len(g) for g in groups]
    smallest = min(range(num_labels), key=lambda lab: sizes[lab])
    if per_class:
        quotas: list[int] | None = [n] * num_labels if n <= sizes[smallest] else None
        limit = f"the largest n per class is {sizes[smallest]}"
        asked = f"n={n} per class"
    else:
        quotas = _quotas(n, sizes, rng)
        m = sizes[smallest]
        limit = f"the largest balanced total n is {num_labels * m + sum(s > m for s in sizes)}"
        asked = f"n={n} in total"
    if quotas is None:
        raise ConfigError(
            f"{asked} is more than the pool allows: label {_label_name(smallest, label_names)} has only "
            f"{sizes[smallest]} examples" + (f" (task '{task}')" if task else ""),
            f"{limit}; use a smaller n",
        )
    chosen: list[int] = []
    for lab, q in enumerate(quotas):
        if q:
            picks = rng.choice(len(groups[lab]), size=q, replace=False)
            chosen.extend(groups[lab][int(p)] for p in picks)
    order = rng.permutation(len(chosen))
    examples = [pool[chosen[int(i)]] for i in order]
    return FewShotSample(examples, seed, n, per_class, num_labels, task)


def stratified_subsample(examples: Sequence[Example], limit: int | None, seed: int) -> list[Example]:
    """A fixed, seeded subsample of ``limit`` examples with the label proportions of the full set.

    Used to cap eval cost (``eval_limit``): quotas are proportional with largest-remainder
    rounding (ties go to the lower label id), and the subsample keeps the original order so it
    reads like the file. ``limit`` None or ≥ the size returns everything.
    """
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit < 1:
        raise ConfigError(f"eval limit must be at least 1, got {limit}", "use a positive limit or none")
    labels = sorted({ex.label for ex in examples})
    idx_by = {lab: [i for i, ex in enumerate(examples) if ex.label == lab] for lab in labels}
    exact = {lab: limit * len(idx_by[lab]) / len(examples) for lab in labels}
    quotas = {lab: int(exact[lab]) for lab in labels}
    leftover = limit - sum(quotas.values())
    for lab in sorted(labels, key=lambda lab: (-(exact[lab] - quotas[lab]), lab))[:leftover]:
        quotas[lab] += 1
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for lab in labels:
        if quotas[lab]:
            keep.extend(idx_by[lab][int(p)] for p in rng.choice(len(idx_by[lab]), size=quotas[lab], replace=False))
    return [examples[i] for i in sorted(keep)]


def balanced_demonstrations(examples: Sequence[Example], k: int, seed: int, num_labels: int) -> list[Example]:
    """``k`` ICL demonstrations balanced across labels, in a seeded random order.

    Each label gets ``k // num_labels``; the remainder goes to distinct labels chosen by the seeded
    rng. An error (not a silently unbalanced prompt) if some label has too few examples.
    """
    if k < 0:
        raise ConfigError(f"number of demonstrations must be >= 0, got {k}", None)
    if k == 0:
        return []
    rng = np.random.default_rng(seed)
    groups = _by_label(examples, num_labels)
    sizes = [len(g) for g in groups]
    quotas = _quotas(k, sizes, rng)
    if quotas is None:
        raise ConfigError(
            f"cannot pick {k} balanced demonstrations: examples per label are {sizes}",
            "use fewer demonstrations or a larger (balanced) sample",
        )
    chosen: list[int] = []
    for lab, q in enumerate(quotas):
        if q:
            chosen.extend(groups[lab][int(p)] for p in rng.choice(sizes[lab], size=q, replace=False))
    return [examples[chosen[int(i)]] for i in rng.permutation(len(chosen))]
