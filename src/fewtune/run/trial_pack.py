"""A run's ``select:`` trials trained as packs: one base load, the trials as members.

The trials of one run (candidates × folds: ``paper-tuned``'s 3 learning rates × 4 folds = 12
LoRA trainings; DoRA, IA³ and BitFit trials likewise) share model, task and frozen base, so
where the method is packable and every trial passes ``pack_key`` they train together through the pack engine (``run.pack_engine``),
each prepared exactly as ``runner._fold_score`` prepares it alone (a fresh method on the base,
the held-out fold taken out of the train pool, trained on its training part), and each is scored
on its held-out fold the moment it finishes with the same ``selection.held_out_score``. A trial
that diverges scores None, as alone; one that fails otherwise fails the run, as alone.

Packing decides how, never what: the same scores, choice and run id (``FEWTUNE_SELECT_PACK`` is
not part of the run). It is automatic on a CUDA device, where a lone trial of a small model
leaves the device mostly idle, and off on a CPU, where training is compute-bound, a pack runs
one trial per pass and gains little: measured (``bench/bench_select_pack.py``, embedded model,
1 thread, 12 trials) 0.96× the one-by-one selection time at 1.15× the peak memory. Memory is one
base plus K adapters and their optimizer states, and one (CPU) or K (accelerator) micro-batches
of activations, instead of one base and one of each. ``FEWTUNE_SELECT_PACK=K`` (K ≥ 2) packs at most K trials at a time on any device,
``1`` (or ``0``/``off``) runs them one by one. A pack that runs out of GPU memory is given up
and its trials are scored one by one (same scores, slower).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewtune.config import RunConfig
from fewtune.errors import ConfigError, TrainingDiverged
from fewtune.run.build import make_method
from fewtune.run.pack_engine import Slot, pack_base, prepare_members, train_members
from fewtune.run.packable import PACKABLE, pack_key
from fewtune.run.resources import ResourceMeter
from fewtune.run.selection import BatchScorer, Trial, candidate_grid, held_out_score, with_values, without_curve
from fewtune.tasks.base import Example, Task
from fewtune.training import distributed
from fewtune.training.packed import MemberRun, Routing

ENV = "FEWTUNE_SELECT_PACK"


def max_trials(dev: torch.device) -> int | None:
    """Trials per pack: ``FEWTUNE_SELECT_PACK`` if set (1: off), else all of a run's trials on a
    CUDA device (None) and one by one elsewhere (1)."""
    raw = os.environ.get(ENV, "").strip().lower()
    if not raw:
        return None if dev.type == "cuda" else 1
    if raw in ("off", "0", "1"):
        return 1
    if not raw.isdigit():
        raise ConfigError(f"{ENV}={raw!r} is not a number of trials", f"set {ENV} to a whole number (1: no packing), or unset it")
    return int(raw)


def trials_packable(cfg: RunConfig, dev: torch.device) -> bool:
    """Whether ``cfg``'s trials can train as packs: a packable method, one process, and every
    trial (``select`` cleared, no learning curve, no tracker: what a trial runs) passes ``pack_key``
    with one key. Otherwise the trials run one by one, as before."""
    if cfg.select is None or cfg.method not in PACKABLE or distributed.world_size() > 1 or max_trials(dev) == 1:
        return False
    keys = {pack_key(without_curve(with_values(cfg, v)).model_copy(update={"log_to": [], "log_dir": None}))
            for v in candidate_grid(cfg)}
    return None not in keys and len(keys) == 1


@dataclass
class _Trial(Slot):
    """One trial while its pack runs: ``result`` becomes its held-out score (None: diverged)."""

    held_out: list = field(default_factory=list)


def packed_scorer(task: Task, pattern, dev: torch.device, meter: ResourceMeter, pool: list[Example], data_dir: Path | None,
                  metric: str, fallback: BatchScorer, packs: list[int]) -> BatchScorer:
    """A ``select_values`` batch scorer training the trials in packs (``packs`` gets each pack's
    size: what ``resources`` records); ``fallback`` scores one by one where a pack cannot run."""
    def score_all(jobs: list[Trial]) -> list[float | None]:
        size = max_trials(dev) or len(jobs)
        scores: list[float | None] = []
        for i in range(0, len(jobs), size):
            chunk = jobs[i:i + size]
            got = _score_pack(chunk, task, pattern, dev, meter, pool, data_dir, metric)
            packs.extend([len(chunk)] if got is not None else [1] * len(chunk))
            scores += got if got is not None else fallback(chunk)
        return scores
    return score_all


def _score_pack(jobs: list[Trial], task: Task, pattern, dev: torch.device, meter: ResourceMeter, pool: list[Example],
                data_dir: Path | None, metric: str) -> list[float | None] | None:
    """The trials' held-out scores, trained as one pack; None where they must run alone (the
    base has dropout of its own, or the pack ran out of GPU memory)."""
    lm, slots, oom = None, [], False
    try:
        lm = pack_base(jobs[0][0], dev)
        if lm is None:
            return None
        slots = [_Trial(without_curve(trial), examples=list(tr), held_out=list(ho)) for trial, tr, ho in jobs]
        routing = Routing()

        def build(s: _Trial) -> None:  # as runner._fold_score prepares a lone trial
            s.method = make_method(s.cfg, task, pattern, dev, s.meter, pool, data_dir, lm=lm)
            held = {e.id for e in s.held_out}
            s.method.ctx.train_pool = [e for e in s.method.ctx.train_pool if e.id not in held]

        def on_done(s: _Trial, run: MemberRun, error: TrainingDiverged | None) -> None:
            s.result = None if error is not None else held_out_score(s.method, s.held_out, metric)

        members = prepare_members(slots, lm, meter, routing, dev, build)  # type: ignore[arg-type]
        train_members(slots, members, lm, routing, dev, on_done)  # type: ignore[arg-type]
    except torch.OutOfMemoryError:
        oom = True
    if oom:  # out of the except block: its traceback no longer holds the pack's tensors
        lm, slots = None, []
        torch.cuda.empty_cache()
        return None
    for s in slots:
        if isinstance(s.result, BaseException):
            raise s.result  # failed to prepare: as the lone trial would have failed the run
    return [s.result for s in slots]
