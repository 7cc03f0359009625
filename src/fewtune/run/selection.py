"""Fair per-method tuning without peeking: k-fold cross-validation inside the few-shot sample.

A comparison at one shared learning rate can make a method look broken (the study runs LoRA at
1e-5, which barely moves it; in peft's method comparison tuning the learning rate moved some
methods by 7 to 40 points). Choosing on the eval sets would flatter every method. So a run with
``select:`` splits its own few-shot sample into k stratified folds (seeded by the data seed),
trains each candidate on k−1 folds and scores it on the held-out one, picks the best mean
(the first listed wins a tie, so list the default first), then trains on the whole sample with
the chosen values and is evaluated as usual (Perez et al. 2021, "True few-shot learning").

Cost: candidates × folds extra trainings on (k−1)/k of the sample, before the final one. Every
score, the choice and the time are recorded in ``metrics.json`` under ``selection``.
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
from fewtune.methods import METHODS
from fewtune.overrides import set_path
from fewtune.tasks.base import Example

TUNABLE = ("train", "params")
FoldScorer = Callable[[RunConfig, list[Example], list[Example]], float]
"""``scorer(config, train_part, held_out)`` → the selection metric on ``held_out``."""


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


def select_values(cfg: RunConfig, sample: Sequence[Example], scorer: FoldScorer) -> tuple[dict[str, Any], dict]:
    """Cross-validate every candidate; return the chosen values and the record for metrics.json."""
    assert cfg.select is not None
    t0 = time.perf_counter()
    splits = folds(sample, cfg.select.folds, cfg.seed)
    trials = []
    for values in candidate_grid(cfg):
        trial = with_values(cfg, values)
        values = resolved_values(trial, values)  # as the trial uses them ("1e-5" from YAML → 1e-05)
        scores, diverged = [], 0
        for train_part, held_out in splits:
            try:
                scores.append(float(scorer(trial, train_part, held_out)))
            except TrainingDiverged:
                diverged += 1  # a candidate that diverges on a fold scores nothing there
        mean = statistics.fmean(scores) if scores and not diverged else -math.inf
        trials.append({"values": values, "cv_score": None if math.isinf(mean) else round(mean, 6),
                       "fold_scores": [round(s, 6) for s in scores], "diverged_folds": diverged, "_mean": mean})
    best = max(trials, key=lambda t: t["_mean"])  # max keeps the first of equal means
    if math.isinf(best["_mean"]):
        raise TrainingDiverged("every candidate of 'select' diverged on at least one fold", None)
    record = {"rule": "kfold", "k": len(splits), "metric": cfg.select.metric, "seed": cfg.seed,
              "candidates": [{k: v for k, v in t.items() if k != "_mean"} for t in trials],
              "chosen": best["values"], "seconds": round(time.perf_counter() - t0, 3)}
    return best["values"], record
