"""Fair per-method tuning without peeking: k-fold cross-validation inside the few-shot sample.

A comparison at one shared learning rate can make a method look broken (the study runs LoRA at
1e-5, which barely moves it; in peft's method comparison tuning the learning rate moved some
methods by 7 to 40 points). Choosing on the eval sets would flatter every method. So a run with
``select:`` splits its own few-shot sample into k stratified folds (seeded by the data seed),
trains each candidate on k−1 folds and scores it on the held-out one, picks the best mean
(the first listed wins a tie, so list the default first), then trains on the whole sample with
the chosen values and is evaluated as usual (Perez et al. 2021, "True few-shot learning").

Honesty about what CV can tell apart: small folds give coarse scores (a 2-example fold scores
0, .5 or 1), so candidates often tie. Each candidate's fold standard deviation is recorded, and
``decided`` says whether the chosen candidate beat every other one by more than the standard
error of their paired fold differences (same folds, so the fold difficulty cancels); ``false``
means the choice is not distinguishable from another candidate at this sample size (often the
first listed, i.e. the default). ``fewtune study --dry-run`` warns where the held-out folds are
smaller than ``MIN_FOLD_EXAMPLES``.

Same training per example: with ``train.max_steps`` a trial's steps are scaled by the share of
the training set it sees ((k−1)/k of the sample), so each candidate is judged at the number of
optimizer steps per example the final fit takes (``epochs`` already does that).

Cost: candidates × folds extra trainings on (k−1)/k of the sample, before the final one. Every
score, the choice and the time are recorded in ``metrics.json`` under ``selection``.

How the trials run: ``select_values`` builds the trials (candidate × fold, in that order) and
hands them all to a batch scorer (``score_all``), or to a per-trial ``scorer`` one by one
(``one_by_one``); the choice and the record do not depend on which. The runner scores the trials
of a packable method (LoRA) on a GPU as one pack on one loaded base (``run.trial_pack``) — the
same scores as one by one, hence the same choice and run id — and everything else one by one.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from fewtune.config import RunConfig, validate
from fewtune.errors import ConfigError, TrainingDiverged
from fewtune.methods import METHODS, Method
from fewtune.overrides import set_path
from fewtune.stats.metrics import accuracy, mcc
from fewtune.tasks.base import Example

TUNABLE = ("train", "params")
MIN_FOLD_EXAMPLES = 8  # held-out examples per fold below which fold scores are too coarse to choose
FoldScorer = Callable[[RunConfig, list[Example], list[Example]], float]
"""``scorer(config, train_part, held_out)`` → the selection metric on ``held_out``."""
Trial = tuple[RunConfig, list[Example], list[Example]]
"""One trial: (the trial's config, ``fold_trial``-scaled; its training part; its held-out fold)."""
BatchScorer = Callable[[list[Trial]], list["float | None"]]
"""``score_all(trials)`` → each trial's selection metric, in order; None where it diverged."""


def candidate_grid(cfg: RunConfig) -> list[dict[str, Any]]:
    """Every combination of candidate values, in the order written (first key slowest)."""
    assert cfg.select is not None
    keys = list(cfg.select.candidates)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(cfg.select.candidates[k] for k in keys))]


def with_values(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """``cfg`` with the candidate values set and ``select`` cleared (what one trial trains)."""
    data = cfg.model_dump(mode="json", exclude={"select", "identity"})
    for key, value in values.items():
        data = set_path(data, tuple(key.split(".")), value)
    where = f"candidate {values} of 'select'"
    params = validate(METHODS.get(cfg.method).Params, data.get("params"), where=f"params of {where}")
    data["params"] = params.model_dump(mode="json")
    return validate(RunConfig, data, where=where).model_copy(update={"identity": cfg.identity})


def without_curve(trial: RunConfig) -> RunConfig:
    """What a trial trains: no learning curve (it would read the eval sets)."""
    return trial.model_copy(update={"train": trial.train.model_copy(update={"eval_every_epoch": False})})


def resolved_values(trial: RunConfig, values: dict[str, Any]) -> dict[str, Any]:
    """The candidate values as validated into ``trial`` (typed, defaults applied)."""
    data = trial.model_dump(mode="json")
    out = {}
    for key in values:
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def check_selection(cfg: RunConfig) -> None:
    """Before any work: candidate keys are tunable, their values valid, and every class of the
    sample has at least ``folds`` examples (a stratified split needs one per class and fold)."""
    sel = cfg.select
    if sel is None:
        return
    trains = METHODS.get(cfg.method).trains
    for key, values in sel.candidates.items():
        if key.split(".")[0] not in TUNABLE or "." not in key:
            raise ConfigError(f"select: '{key}' cannot be selected",
                              "select train./params. keys only (e.g. train.lr, params.r); task, model, n and seed define the run")
        if key.startswith("train.") and not trains:
            raise ConfigError(f"select: '{key}' is a training option, and method '{cfg.method}' trains nothing",
                              "select this method's params. keys only (e.g. params.k), or drop select: for it")
        if not values:
            raise ConfigError(f"select: '{key}' has no candidate values", "give at least two values to choose from")
    for values in candidate_grid(cfg):
        with_values(cfg, values)  # raises a ConfigError naming the candidate
    if not cfg.n_is_total and cfg.n < 2:
        raise ConfigError("select needs at least 2 examples per class (one to train on, one to hold out per fold)",
                          "raise n, or drop select: for this run")


def folds(sample: Sequence[Example], k: int, seed: int) -> list[tuple[list[Example], list[Example]]]:
    """Stratified k-fold split of the sample, shuffled by the data seed: (train part, held out).
    ``k`` is lowered to the smallest class's count (each fold holds out one example per class)."""
    labels = np.array([e.label for e in sample])
    k = min(k, int(np.bincount(labels).min(initial=len(sample))))
    if k < 2:
        raise ConfigError("select needs at least 2 examples of every class in the sample", "raise n, or drop select:")
    split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(sample)), labels)
    return [([sample[i] for i in tr], [sample[i] for i in ho]) for tr, ho in split]


def fold_trial(trial: RunConfig, train_size: int, sample_size: int) -> RunConfig:
    """The trial config of one fold: ``train.max_steps`` scaled to the share of the training set
    the fold trains on, for methods whose training set is the sample (optimizer steps per example
    as in the final fit). ``epochs`` scale by themselves; a method training on a pool does not."""
    steps = trial.train.max_steps
    if steps is None or not METHODS.get(trial.method).trains_on_sample(trial.params) or train_size >= sample_size:
        return trial
    scaled = max(1, round(steps * train_size / sample_size))
    return trial.model_copy(update={"train": trial.train.model_copy(update={"max_steps": scaled})})


def fold_size_warning(cfg: RunConfig, sample: Sequence[Example]) -> str | None:
    """A warning where the held-out folds are too small for CV to tell candidates apart."""
    if cfg.select is None:
        return None
    labels = np.array([e.label for e in sample])
    k = max(2, min(cfg.select.folds, int(np.bincount(labels).min(initial=len(sample)))))
    held = len(sample) // k
    if held >= MIN_FOLD_EXAMPLES:
        return None
    return (f"select: {k} folds of {held} held-out examples: fold scores move in steps of {1 / max(held, 1):.2g}, "
            "candidates will mostly tie and the first listed wins (recorded as decided: false)")


def select_values(cfg: RunConfig, sample: Sequence[Example], scorer: FoldScorer | None = None, *,
                  score_all: BatchScorer | None = None) -> tuple[dict[str, Any], dict]:
    """Cross-validate every candidate; return the chosen values and the record for metrics.json.
    The trials are scored by ``score_all`` (all at once: a pack) or else one by one by ``scorer``;
    either way the same trials, in the same order, with the same record."""
    assert cfg.select is not None and (scorer is None) != (score_all is None)
    t0 = time.perf_counter()
    splits = folds(sample, cfg.select.folds, cfg.seed)
    grid = []
    for values in candidate_grid(cfg):
        trial = with_values(cfg, values)
        grid.append((trial, resolved_values(trial, values)))  # as the trial uses them ("1e-5" from YAML → 1e-05)
    jobs = [(fold_trial(trial, len(train_part), len(sample)), train_part, held_out)
            for trial, _ in grid for train_part, held_out in splits]
    scores = (score_all or one_by_one(scorer))(jobs)  # type: ignore[arg-type]
    k = len(splits)
    trials = [_trial_record(values, scores[i * k:(i + 1) * k]) for i, (_, values) in enumerate(grid)]
    best = max(trials, key=lambda t: t["_mean"])  # max keeps the first of equal means
    if math.isinf(best["_mean"]):
        raise TrainingDiverged("every candidate of 'select' diverged on at least one fold", None)
    decided, margin, margin_se = _decided(best, trials)
    record = {"rule": "kfold", "k": k, "metric": cfg.select.metric, "seed": cfg.seed,
              "held_out_per_fold": min(len(h) for _, h in splits),
              "candidates": [{k: v for k, v in t.items() if not k.startswith("_")} for t in trials],
              "chosen": best["values"], "decided": decided, "margin": margin, "margin_se": margin_se,
              "seconds": round(time.perf_counter() - t0, 3)}
    return best["values"], record


def one_by_one(scorer: FoldScorer) -> BatchScorer:
    """``scorer`` applied to each trial in turn; a trial that diverges scores None."""
    def score_all(jobs: list[Trial]) -> list[float | None]:
        scores: list[float | None] = []
        for trial, train_part, held_out in jobs:
            try:
                scores.append(float(scorer(trial, train_part, held_out)))
            except TrainingDiverged:
                scores.append(None)  # a candidate that diverges on a fold scores nothing there
        return scores
    return score_all


def held_out_score(method: Method, held_out: list[Example], metric: str) -> float:
    """A trained trial's selection metric on its held-out fold (the lone and the packed trials
    alike); examples too long for the context are left out."""
    p = method.predict(held_out).keyed([e.id for e in held_out])
    gold, keep = np.array([e.label for e in held_out]), ~p.skipped
    if metric == "mcc":  # undefined (NaN) on a single-class fold: count it as no correlation
        return float(np.nan_to_num(mcc(gold[keep], p.pred[keep], method.ctx.task.num_labels), nan=0.0))
    return accuracy(gold[keep], p.pred[keep])


def _trial_record(values: dict[str, Any], scores: list[float | None]) -> dict:
    done = [s for s in scores if s is not None]
    diverged = len(scores) - len(done)
    mean = statistics.fmean(done) if done and not diverged else -math.inf
    sd = statistics.stdev(done) if len(done) > 1 else None
    return {"values": values, "cv_score": None if math.isinf(mean) else round(mean, 6),
            "fold_scores": [round(s, 6) for s in done], "fold_sd": None if sd is None else round(sd, 6),
            "diverged_folds": diverged, "_mean": mean, "_scores": scores}


def _decided(best: dict, trials: list[dict]) -> tuple[bool, float | None, float | None]:
    """Whether ``best`` beats every other candidate by more than the standard error of the paired
    fold differences; the closest competitor's margin and its standard error."""
    closest: tuple[float, float] | None = None
    decided = True
    for t in trials:
        if t is best or math.isinf(t["_mean"]):
            continue  # a diverged candidate is out of the running
        diffs = [a - b for a, b in zip(best["_scores"], t["_scores"])]
        mean = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
        decided &= mean > 0 and mean > se
        if closest is None or mean - se < closest[0] - closest[1]:
            closest = (mean, se)
    if closest is None:
        return True, None, None
    return decided, round(closest[0], 6), (None if math.isinf(closest[1]) else round(closest[1], 6))
