"""A pack of runs: several runs of one frozen base (LoRA, DoRA, IA³, BitFit) trained together, each written as its own run.

``run_pack(configs, out_dirs)`` is ``run_experiment`` for up to K runs that ``pack_key`` says can
share a base: the base is loaded once, each member is prepared exactly as a lone run would be
(its sample, eval sets, method, peft's adapter initialisation, head), the members train together
(``run.pack_engine``, ``training.packed``), and each member is evaluated and written the moment it finishes — its own
run directory, ``metrics.json`` (``resources.packed`` = K, the pack's peak memory and wall time
with the member's share) and predictions — through the runner's own ``finish_run``. A member that
diverges fails alone (its record says so); a member already finished on disk is not run again.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewtune.config import RunConfig
from fewtune.errors import FewtuneError, TrainingDiverged
from fewtune.run.build import make_method
from fewtune.run.evaluation import load_eval_sets
from fewtune.run.output import check_out_dir
from fewtune.run.pack_engine import Slot, pack_base, prepare_members, train_members
from fewtune.run.packable import PackResult, PackSpec
from fewtune.run.resolve import resolve
from fewtune.run.resources import ResourceMeter
from fewtune.run.runner import finish_run, run_experiment, write_diverged
from fewtune.tasks import get_task, load_train
from fewtune.tasks.sampling import few_shot_sample
from fewtune.training import distributed
from fewtune.training.packed import Member, MemberRun, Routing


@dataclass
class _Slot(Slot):
    """One member run while the pack runs."""

    run_id: str = ""
    out_dir: Path = Path()
    sample: Any = None
    evals: list = field(default_factory=list)
    started: float = field(default_factory=time.time)


def run_pack(configs: list[RunConfig], out_dirs: list[Path], *, data_dir: Path | None = None, progress=None,
             members_per_pass: int | None | str = "auto") -> list[Any]:
    """Run the members; per member its metrics (a dict) or the exception it failed with, in order.
    A member whose ``out_dir`` already holds it finished returns those metrics unrun.
    ``members_per_pass``: members through the base at once (``train_pack``; "auto": by device)."""
    slots, results = [], [None] * len(configs)
    for i, (cfg, out) in enumerate(zip(configs, out_dirs)):
        cfg = resolve(cfg)
        run_id = cfg.content_hash()
        try:
            done = check_out_dir(cfg, run_id, Path(out))
        except Exception as e:  # noqa: BLE001 — this member fails, the others run
            results[i] = e
            continue
        if done is not None:
            results[i] = done
        else:
            slots.append((i, _Slot(cfg, run_id=run_id, out_dir=Path(out))))
    if slots:
        _run_slots([s for _, s in slots], data_dir, progress, members_per_pass)
        for i, s in slots:
            results[i] = s.result
    return results


def _run_slots(slots: list[_Slot], data_dir: Path | None, progress, members_per_pass: int | None | str) -> None:
    dev = distributed.device()
    meter = ResourceMeter(dev)  # one peak for the pack: the process's
    t0 = time.time()
    with meter.phase("prepare"):
        lm = pack_base(slots[0].cfg, dev)
    if lm is None:  # the base has dropout of its own: run the members alone
        for s in slots:
            s.result = _outcome(lambda s=s: run_experiment(s.cfg, s.out_dir, data_dir=data_dir, progress=progress).metrics)
        return
    routing = Routing()
    loaded: dict[tuple, Any] = {}
    members = prepare_members(slots, lm, meter, routing, dev, lambda s: _build(s, lm, dev, loaded, data_dir, progress))
    prepare_s = time.time() - t0
    k = len(slots)
    t_train = time.time()

    def on_done(s: _Slot, run: MemberRun, error: TrainingDiverged | None) -> None:
        s.meter.timings.update(prepare=prepare_s / k, train=time.time() - t_train)
        extra = _pack_resources(s, run.m, meter, k, t0)
        if error is not None:
            s.result = error
            _outcome(lambda: write_diverged(s.out_dir, s.cfg, s.run_id, error, s.method, s.sample, s.meter, extra))
            return
        s.result = _outcome(lambda: _finish(s, run, extra, progress))

    with meter.phase("train"):
        train_members(slots, members, lm, routing, dev, on_done, members_per_pass)


def _build(s: _Slot, lm, dev: torch.device, loaded: dict[tuple, Any], data_dir: Path | None, progress) -> None:
    """A member run's sample, eval sets and method on the shared base, as its lone run's. The
    task's train pool and eval sets are read once per pack (``loaded``; HANS alone is 30,000
    examples) and shared read-only by the members that ask for the same ones."""
    task = get_task(s.cfg.task)
    pool = _once(loaded, ("train", task.name), lambda: load_train(task, data_dir))
    s.sample = few_shot_sample(pool, s.cfg.n, s.cfg.seed, task.num_labels, per_class=not s.cfg.n_is_total)
    s.examples = s.sample.examples
    eval_key = ("eval", task.name, tuple(s.cfg.eval_sets or ()), s.cfg.eval_limit, s.cfg.eval_seed)
    s.evals = _once(loaded, eval_key, lambda: load_eval_sets(task, s.cfg, data_dir))
    s.method = make_method(s.cfg, task, task.pattern(s.cfg.pattern), dev, s.meter, pool, data_dir, progress, lm=lm)


def _once(loaded: dict[tuple, Any], key: tuple, load: Callable[[], Any]) -> Any:
    if key not in loaded:
        loaded[key] = load()
    return loaded[key]


def _finish(s: _Slot, run: MemberRun, extra: dict, progress) -> dict:
    summary = s.method.fit_summary(run.res)
    summary["trainable_params"] = extra["trainable_params"]
    if summary.get("train_tokens"):
        s.meter.add_tokens("train", int(summary["train_tokens"]))
    return finish_run(s.cfg, s.run_id, s.out_dir, method=s.method, meter=s.meter, sample=s.sample, evals=s.evals,
                      train_summary=summary, selection=None, started=s.started, progress=progress, extra_resources=extra)


def _pack_resources(s: _Slot, m: Member, meter: ResourceMeter, k: int, t0: float) -> dict:
    """The member's own parameter counts, and the pack's peak memory and wall time (so far) with
    the member's share of each: what a packed run cost is the pack's cost over its members."""
    own = sum(p.numel() for p in m.params)
    base = sum(p.numel() for p in s.method.ctx.lm.model.parameters() if not p.requires_grad)
    peak, wall = meter.peak_mb(), time.time() - t0
    return {"packed": k, "trainable_params": own, "total_params": base + own,
            "pack": {"members": k, "peak_memory_mb": round(peak, 1), "wall_seconds": round(wall, 3),
                     "memory_share_mb": round(peak / k, 1), "wall_share_seconds": round(wall / k, 3),
                     "note": "peak memory and wall time are the pack's, shared by its members"}}


def _outcome(fn: Callable[[], Any]) -> Any:
    """``fn()``, or the exception it raised (a member's failure is its own)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return e


def run_unit(config: RunConfig | PackSpec, out_dir: Path | None = None, *, data_dir: Path | None = None, progress=None) -> Any:
    """The executors' default runner: one run (``run_experiment``) or one pack (``run_pack``)."""
    if not isinstance(config, PackSpec):
        return run_experiment(config, out_dir, data_dir=data_dir, progress=progress)
    results = run_pack(list(config.configs), list(config.out_dirs), data_dir=data_dir, progress=progress)
    members = {}
    for out, r in zip(config.out_dirs, results):
        members[Path(out).name] = ({"error": _error_text(r), "error_type": type(r).__name__} if isinstance(r, BaseException)
                                   else {"metrics": r})
    return PackResult({"pack_members": members})


def _error_text(e: BaseException) -> str:
    """As ``study.executor.format_error``: the message, and the traceback for a bug."""
    if isinstance(e, FewtuneError):
        return f"{type(e).__name__}: {e}"
    return f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exception(type(e), e, e.__traceback__))
