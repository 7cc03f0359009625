"""Rows: one record per run × eval set (``EvalRow``), built from the runner's ``metrics.json``
dicts, and the arm labels that group them — what every statistic is computed from."""


from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fewtune.config import NOT_RESULT_FIELDS

CONFIDENCE = 0.95
ALPHA = 0.05
# A claim needs at least this many pairs from at least MIN_SEEDS distinct few-shot samples.
MIN_PAIRS = 3
MIN_SEEDS = 2

# Config keys that are the grid's axes rather than part of a method "arm".
AXIS_KEYS = ("task", "model", "n", "seed", "eval_sets")
MAJORITY = "majority"


# --------------------------------------------------------------------------------------------
# rows


@dataclass(frozen=True)
class EvalRow:
    """One run evaluated on one eval set: the unit every statistic is computed from."""

    run_id: str
    model: str
    task: str
    method: str
    arm: str  # method plus the parameters that distinguish it from the method's other runs
    n: int
    seed: int
    eval_set: str
    domain: str  # "id" | "ood"
    accuracy: float
    mcc: float
    n_eval: int
    n_skipped: int = 0
    majority_baseline: float = float("nan")
    majority_label: str | None = None
    warning: str | None = None
    peak_memory_mb: float | None = None
    memory_kind: str | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    # A run trained in a pack (``--pack``): its peak memory and training time are the pack's, not
    # its own, so they are left out (None) rather than compared with lone runs' costs.
    packed: int | None = None
    per_label: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, Any] = field(default_factory=dict)
    # Why kept and flagged, not dropped: a collapsed run is a real outcome of its method (it
    # failed to learn), but its accuracy is the share of one label, not skill.
    collapsed: str | None = None  # reason, None if the run did not collapse

    def value(self, metric: str) -> float:
        return _num(getattr(self, metric))


def _num(x: Any) -> float:
    """None (NaN in strict JSON) → NaN, everything else → float."""
    return float("nan") if x is None else float(x)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-5}} → {"train.lr": 1e-5}; lists become canonical JSON so they compare."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v, sort_keys=True)
        else:
            out[key] = v
    return out


def result_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """``flatten(cfg)`` without the keys a result does not depend on."""
    return {k: v for k, v in flatten(cfg).items() if k.split(".")[0] not in NOT_RESULT_FIELDS}


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def arm_labels(configs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """A readable label per run that tells apart runs of one method with different settings.

    Why: a study may sweep anything (LoRA rank, learning rate, pattern). Runs that differ only in
    the grid axes (task, model, n, data seed) belong to the same arm; every other key that varies
    among a method's runs *within one task and model* goes into the label, e.g. ``lora r=8``.
    Keys that vary only across tasks (the task's default pattern) are not part of the label, and
    neither are keys that compute nothing (``NOT_RESULT_FIELDS``: where a run is logged): the
    store's config has them, ``config.yaml`` does not, and one arm must not split in two when
    some runs' configs come from one and some from the other (a missing run directory, an
    unfinished study).
    """
    flat = {rid: result_keys(cfg) for rid, cfg in configs.items()}
    by_group: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for rid, cfg in configs.items():
        by_group[(str(cfg.get("method")), str(cfg.get("task")), str(cfg.get("model")))].append(rid)
    varying: dict[str, set[str]] = defaultdict(set)
    for (method, _, _), rids in by_group.items():
        keys = set().union(*(flat[r].keys() for r in rids))
        for key in keys:
            if key.split(".")[0] in AXIS_KEYS or key == "method":
                continue
            values = {json.dumps(flat[r].get(key), sort_keys=True, default=str) for r in rids}
            if len(values) > 1:
                varying[method].add(key)
    labels = {}
    for rid, cfg in configs.items():
        method = str(cfg.get("method"))
        keys = sorted(varying.get(method, ()))
        parts = [f"{k.removeprefix('params.')}={_fmt_value(flat[rid].get(k))}" for k in keys]
        labels[rid] = " ".join([method, *parts])
    return labels


def collapse_reason(metrics: dict[str, Any], ev: dict[str, Any]) -> str | None:
    """Why a run's result on one eval set is collapsed, or None.

    The runner's flags (``metrics["collapsed"]``: a reason for the run; ``eval[name]["collapsed"]``:
    per eval set) are read with ``.get`` so results written before them still load; besides, every
    prediction on one label (from ``pred_distribution``) counts as collapsed.
    """
    if metrics.get("collapsed"):
        return str(metrics["collapsed"])
    if ev.get("collapsed"):
        return "flagged collapsed on this eval set"
    dist = {k: int(v) for k, v in (ev.get("pred_distribution") or {}).items() if v is not None}
    total = sum(dist.values())
    if len(dist) > 1 and total > 1 and max(dist.values()) == total:
        return f"every prediction is '{max(dist, key=dist.get)}'"
    return None


def eval_rows(runs: Iterable[tuple[str, dict[str, Any], dict[str, Any]]], labels: dict[str, str] | None = None) -> list[EvalRow]:
    """Flatten finished runs ``(run_id, resolved config dict, metrics dict)`` into ``EvalRow``s.

    ``labels``: arm labels computed over *all* of a study's runs (failed ones too), so a failed
    run's arm matches the arm of its finished siblings; by default computed from ``runs``."""
    runs = list(runs)
    labels = labels or arm_labels({rid: cfg for rid, cfg, _ in runs})
    rows: list[EvalRow] = []
    for rid, cfg, m in runs:
        res = m.get("resources") or {}
        packed = res.get("packed")
        for name, ev in (m.get("eval") or {}).items():
            rows.append(EvalRow(
                run_id=rid,
                model=str(m.get("model", cfg.get("model"))),
                task=str(m.get("task", cfg.get("task"))),
                method=str(m.get("method", cfg.get("method"))),
                arm=labels[rid],
                n=int(m.get("n", cfg.get("n"))),
                seed=int(m.get("seed", cfg.get("seed"))),
                eval_set=name,
                domain=str(ev.get("domain", "id")),
                accuracy=_num(ev.get("accuracy")),
                mcc=_num(ev.get("mcc")),
                n_eval=int(ev.get("n") or 0),
                n_skipped=int(ev.get("n_skipped") or 0),
                majority_baseline=_num(ev.get("majority_baseline")),
                majority_label=ev.get("majority_label"),
                warning=ev.get("warning"),
                peak_memory_mb=None if packed else res.get("peak_memory_mb"),
                memory_kind=res.get("memory_kind"),
                trainable_params=res.get("trainable_params"),
                total_params=res.get("total_params"),
                train_seconds=None if packed else res.get("train_seconds"),
                eval_seconds=res.get("eval_seconds"),
                packed=packed,
                per_label=ev.get("per_label") or {},
                groups=ev.get("groups") or {},
                collapsed=collapse_reason(m, ev),
            ))
    return rows
