"""One experiment, end to end: data → few-shot sample → method → scores → metrics → files.

``run_experiment`` is the single entry point used by the CLI's ``run`` and by studies. Output is
written to a temporary sibling directory and renamed into place at the end, so a failed or
killed run never leaves a partial result behind. In a data-parallel launch (``fewtune.training.distributed``)
every process trains; only process 0 evaluates, writes and logs to trackers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewtune.config import RunConfig
from fewtune.errors import FewtuneError, TrainingDiverged
from fewtune.methods import METHODS, Method, Predictions
from fewtune.models.loading import resolve_precision
from fewtune.run.evaluation import EvalData, load_eval_sets, predict_eval_sets
from fewtune.run.build import make_method
from fewtune.run.identity import provenance
from fewtune.run.output import check_out_dir, clean_json, write_run
from fewtune.run.resolve import resolve
from fewtune.run.resources import ResourceMeter
from fewtune.run.selection import held_out_score, one_by_one, select_values, with_values, without_curve
from fewtune.run.trial_pack import packed_scorer, trials_packable
from fewtune.stats.metrics import accuracy, eval_set_metrics, loss_collapse, mcc
from fewtune.tasks import get_task, load_train
from fewtune.tasks.base import Example, Task
from fewtune.tasks.prompts import Pattern
from fewtune.tasks.sampling import FewShotSample, few_shot_sample
from fewtune.training import distributed
from fewtune.training.tracking import check_available, log_run


@dataclass
class RunResult:
    config: RunConfig
    metrics: dict
    out_dir: Path | None
    reused: bool = False  # out_dir already held this finished run; nothing was run
    main_process: bool = True  # False on the other processes of a data-parallel launch (they write nothing)


@dataclass
class _Run:
    """What the phases of one run share (``run_experiment``)."""

    cfg: RunConfig
    run_id: str
    out_dir: Path | None
    data_dir: Path | None
    dev: torch.device
    main: bool
    progress: Any
    task: Task
    pattern: Pattern
    meter: ResourceMeter
    started: float
    pool: list[Example] = field(default_factory=list)
    sample: FewShotSample | None = None
    evals: list[EvalData] = field(default_factory=list)
    selection: dict | None = None
    extra_resources: dict = field(default_factory=dict)  # a pack member's share of the pack's costs


def run_experiment(cfg: RunConfig, out_dir: Path | None = None, *, data_dir: Path | None = None, progress=None,
                   overwrite: bool = False) -> RunResult:
    """Run one experiment; write its files to ``out_dir`` (atomically) if given.

    ``out_dir`` is checked before any work (see ``check_out_dir``): if it already holds this very
    run, finished, nothing is run and its metrics are returned with ``reused=True``. The phases:
    check, sample, select, build, train (a divergence is recorded), evaluate, assemble the
    metrics, write, log.
    """
    cfg, run_id, dev = _checked(cfg)
    if out_dir is not None:
        done = distributed.from_main(lambda: check_out_dir(cfg, run_id, Path(out_dir), overwrite=overwrite))
        if done is not None:
            return RunResult(cfg, done, Path(out_dir), reused=True, main_process=distributed.is_main())
    run = _start(cfg, run_id, out_dir, data_dir, dev, progress)
    _sample(run)
    fit_cfg = _select(run)
    method = _build(run, fit_cfg)
    train_summary = _train(run, method)
    if not run.main:  # trained its share; process 0 evaluates and writes
        return RunResult(cfg, {}, None, main_process=False)
    metrics = _finish(run, method, train_summary)
    return RunResult(cfg, metrics, Path(out_dir) if out_dir is not None else None)


def _finish(run: _Run, method: Method, train_summary: dict | None) -> dict:
    """A trained run's second half: evaluate, assemble ``metrics.json``, write, log."""
    preds = _evaluate(run, method, train_summary)
    metrics = _assemble_metrics(run, method, train_summary, preds)
    if run.out_dir is not None:
        write_run(Path(run.out_dir), run.cfg, run.sample.manifest(), metrics, run.evals, preds, run.task, method.ctx.lm.tokenizer)
    _log(run, metrics)
    return metrics


def _member_run(cfg: RunConfig, run_id: str, out_dir: Path | None, method: Method, meter: ResourceMeter, sample,
                evals: list[EvalData], selection: dict | None, started: float, progress, extra_resources: dict | None) -> _Run:
    """The phases' shared state for a run trained elsewhere (a member of a pack, ``run.pack``)."""
    ctx = method.ctx
    return _Run(cfg, run_id, out_dir, None, ctx.device, True, progress,
                ctx.task, ctx.pattern, meter, started, sample=sample, evals=evals, selection=selection,
                extra_resources=dict(extra_resources or {}))


def finish_run(cfg: RunConfig, run_id: str, out_dir: Path | None, *, method: Method, meter: ResourceMeter, sample,
               evals: list[EvalData], train_summary: dict | None, selection: dict | None, started: float,
               progress=None, extra_resources: dict | None = None) -> dict:
    """``_finish`` for a run trained in a pack: the same evaluation, metrics and files as alone."""
    run = _member_run(cfg, run_id, out_dir, method, meter, sample, evals, selection, started, progress, extra_resources)
    return _finish(run, method, train_summary)


def write_diverged(out_dir: Path, cfg: RunConfig, run_id: str, e: TrainingDiverged, method: Method, sample,
                   meter: ResourceMeter, extra_resources: dict | None = None) -> None:
    """A pack member's divergence record, the same as a lone run's (``_record_divergence``)."""
    run = _member_run(cfg, run_id, out_dir, method, meter, sample, [], None, time.time(), None, extra_resources)
    _record_divergence(run, method, e)


def _checked(cfg: RunConfig) -> tuple[RunConfig, str, torch.device]:
    """The resolved config, its run id and the device, after every check that needs no data."""
    cfg = resolve(cfg)
    run_id = cfg.content_hash()  # of exactly the config written to config.yaml
    dev = distributed.device()
    check_available(cfg.log_to)
    distributed.check_supported(cfg.method, METHODS.get(cfg.method).trains, getattr(cfg, "device_map", None),
                                resolve_precision(cfg.precision, dev))
    return cfg, run_id, dev


def _start(cfg: RunConfig, run_id: str, out_dir: Path | None, data_dir: Path | None, dev: torch.device, progress) -> _Run:
    main = distributed.is_main()
    task = get_task(cfg.task)
    return _Run(cfg, run_id, out_dir, data_dir, dev, main, progress if main else None, task, task.pattern(cfg.pattern),
                ResourceMeter(dev), time.time())


def _sample(run: _Run) -> None:
    """The train pool, the few-shot sample and the eval sets."""
    cfg, task = run.cfg, run.task
    with run.meter.phase("prepare"), distributed.main_first():
        run.pool = load_train(task, run.data_dir)
        run.sample = few_shot_sample(run.pool, cfg.n, cfg.seed, task.num_labels, per_class=not cfg.n_is_total)
        run.evals = load_eval_sets(task, cfg, run.data_dir)


def _select(run: _Run) -> RunConfig:
    """The config the final model trains with: ``cfg``, or its ``select:`` choice by k-fold CV on
    the few-shot sample only (the eval sets are not touched). The trials of a packable method
    train as packs on a GPU (``run.trial_pack``: same scores, one base load), else one by one."""
    cfg = run.cfg
    if cfg.select is None:
        return cfg
    metric = cfg.select.metric
    with run.meter.phase("select"):
        build = lambda c: make_method(c, run.task, run.pattern, run.dev, run.meter, run.pool, run.data_dir)  # noqa: E731
        alone = one_by_one(lambda c, tr, ho: _fold_score(build, metric, c, tr, ho))
        packs: list[int] = []
        score_all = alone if not trials_packable(cfg, run.dev) else \
            packed_scorer(run.task, run.pattern, run.dev, run.meter, run.pool, run.data_dir, metric, alone, packs)
        chosen, run.selection = select_values(cfg, run.sample.examples, score_all=score_all)
    if packs:  # how the trials ran (not what they gave): resources, as a pack member's
        run.extra_resources["select_packs"] = packs
    return with_values(cfg, chosen)


def _build(run: _Run, fit_cfg: RunConfig) -> Method:
    """The run's method on a fresh model; process 0 also evaluates learning-curve points."""
    with run.meter.phase("prepare"), distributed.main_first():
        method = make_method(fit_cfg, run.task, run.pattern, run.dev, run.meter, run.pool, run.data_dir, run.progress)
    if run.main:  # learning-curve points: process 0 evaluates, the others wait in the next all-reduce
        method.ctx.evaluate = lambda: _curve_point(method, run.evals, run.task)
    return method


def _train(run: _Run, method: Method) -> dict | None:
    """``fit`` on the few-shot sample. A divergence is part of the result: the run leaves a record
    saying so (status "diverged", no eval metrics), then fails like any other error."""
    torch.manual_seed(run.cfg.model_seed)
    try:
        with run.meter.phase("train"):
            return method.fit(run.sample.examples)
    except TrainingDiverged as e:
        if run.out_dir is not None and run.main:
            _record_divergence(run, method, e)
        raise


def _record_divergence(run: _Run, method: Method, error: TrainingDiverged) -> None:
    cfg, lm = run.cfg, method.ctx.lm
    failed = {"run_id": run.run_id, "status": "diverged", "error": error.message, "task": run.task.name,
              "method": cfg.method, "model": cfg.model, "model_name": lm.name, "n": cfg.n, "seed": cfg.seed,
              "resources": {**run.meter.report(method.model, method.ctx.precision, method.optimizer_steps, trains=method.trains),
                            **run.extra_resources}}
    write_run(Path(run.out_dir), cfg, run.sample.manifest(), failed, [], {}, run.task, lm.tokenizer)  # type: ignore[arg-type]


def _evaluate(run: _Run, method: Method, train_summary: dict | None) -> dict[str, Predictions]:
    """Predictions on every eval set; the tokens trained and scored go to the resource meter."""
    if train_summary and train_summary.get("train_tokens"):
        run.meter.add_tokens("train", int(train_summary["train_tokens"]))
    with run.meter.phase("eval"):
        preds = predict_eval_sets(method, run.evals, run.progress)
    run.meter.add_tokens("eval", sum(p.tokens for p in preds.values()))
    return preds


def _assemble_metrics(run: _Run, method: Method, train_summary: dict | None, preds: dict[str, Predictions]) -> dict:
    """``metrics.json``: what ran, on what, what it cost, and the per-eval-set metrics."""
    cfg, ctx, summary = run.cfg, method.ctx, train_summary or {}
    lm, verbalizer = ctx.lm, ctx.verbalizer
    metrics = {
        "run_id": run.run_id, "status": "ok", "task": run.task.name, "method": cfg.method, "model": cfg.model,
        "model_name": lm.name, "model_load": lm.load_info(), "n": cfg.n, "seed": cfg.seed, "pattern": run.pattern.name,
        "max_context_effective": ctx.cfg.max_context,
        "identity": cfg.identity.model_dump(mode="json") if cfg.identity else None,
        "provenance": provenance(),  # version, git commit, dirty flag: metadata, not in the run id
        "verbalizer": {"words": list(verbalizer.words), "tokens": list(verbalizer.tokens), "ids": list(verbalizer.token_ids)},
        "eval": {},
        "curve": summary.get("curve", []),
        "train": _train_block(train_summary),
        "resources": {**run.meter.report(method.model, ctx.precision, method.optimizer_steps, trains=method.trains),
                      "processes": distributed.world_size(), **run.extra_resources},
        "method_info": getattr(method, "describe", lambda: {})(),
        "notes": list(run.task.notes),
        "warnings": list(method.warnings()),
        "collapsed": loss_collapse(summary.get("final_loss"), summary.get("chance_loss")),
        "selection": run.selection,
        "started_at": run.started,
        "wall_seconds": round(time.time() - run.started, 3),
    }
    if metrics["collapsed"]:
        metrics["warnings"].append(metrics["collapsed"])
    if run.selection and run.selection.get("decided") is False:
        metrics["warnings"].append(f"select: cross-validation could not tell {run.selection['chosen']} from another candidate "
                                   f"({run.selection['held_out_per_fold']} held-out examples per fold; decided: false)")
    for ev in run.evals:
        metrics["eval"][ev.name] = _eval_set_metrics(ev, preds[ev.name], run.task, ctx.cfg.max_context, metrics["warnings"])
    return metrics


def _eval_set_metrics(ev: EvalData, p: Predictions, task: Task, max_context: int, warnings: list[str]) -> dict:
    """One eval set's metrics; its warnings are appended to the run's ``warnings``."""
    m = eval_set_metrics(
        np.array([e.label for e in ev.examples]), p.pred, p.skipped, task.label_names,
        groups={f: [e.groups.get(f, "") for e in ev.examples] for f in ev.group_fields},
        outside_verbalizer=p.outside_verbalizer, tie=p.tie,
    )
    m.update(domain=ev.domain, warning=ev.warning, full_size=ev.full_size, subsampled=len(ev.examples) < ev.full_size)
    if p.calibration:  # the bias it estimated; batch calibration is transductive (said here)
        m["calibration"] = p.calibration
    warnings.extend(f"{ev.name}: {w}" for w in m.pop("warnings"))
    if ev.warning:
        warnings.append(f"{ev.name}: {ev.warning}")
    if m["n_skipped"]:
        warnings.append(f"{ev.name}: {m['n_skipped']} examples skipped (prompt longer than {max_context} tokens)")
    return m


def _log(run: _Run, metrics: dict) -> None:
    """To the trackers of ``log_to`` (none: nothing)."""
    cfg = run.cfg
    if cfg.log_to and (cfg.log_dir or run.out_dir is not None):
        log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(run.out_dir) / "trackers"  # type: ignore[arg-type]
        log_run(cfg.log_to, cfg.result_dump(), clean_json(metrics), log_dir)


def _fold_score(build: Callable[[RunConfig], Method], metric: str, cfg: RunConfig, train_part: list[Example],
                held_out: list[Example]) -> float:
    """One cross-validation trial alone: a fresh model trained on ``train_part``, scored on
    ``held_out`` with the selection metric (no learning curve: it would read the eval sets). The
    held-out examples are taken out of the train pool too (distillation from the pool must not
    train on the inputs it is scored on). ``run.trial_pack`` does the same for a pack of trials."""
    method = build(without_curve(cfg))
    held = {e.id for e in held_out}
    method.ctx.train_pool = [e for e in method.ctx.train_pool if e.id not in held]
    torch.manual_seed(cfg.model_seed)
    method.fit(train_part)
    return held_out_score(method, held_out, metric)


def _train_block(summary: dict | None) -> dict | None:
    if not summary:
        return None
    return {k: v for k, v in summary.items() if k not in ("curve", "train_tokens")}


def _curve_point(method: Method, evals: list[EvalData], task: Task) -> dict:
    out = {}
    for ev, p in zip(evals, predict_eval_sets(method, evals).values()):
        gold = np.array([e.label for e in ev.examples])
        keep = ~p.skipped
        out[ev.name] = {"accuracy": accuracy(gold[keep], p.pred[keep]), "mcc": mcc(gold[keep], p.pred[keep], task.num_labels)}
    return out


__all__ = ["RunResult", "run_experiment", "FewtuneError"]
