"""Statistics over a study's runs: summaries over data seeds, per-cell paired comparisons, ID–OOD
gaps and Pareto fronts — thin wrappers over scipy. The claims (with a bootstrap over seeds × eval
examples) are in ``fewtune.stats.claims`` and ``fewtune.stats.resample``.

Why these statistics: few-shot results vary a lot with *which* examples were sampled (Mosbach et
al. 2023), so a single number per method is meaningless. Every run is one few-shot sample (data
seed); we report the spread over samples (std, 95 % t-interval, min/max) and compare methods
*paired* on the same samples, which removes the sample-to-sample variance shared by both methods.

Everything here works on plain ``EvalRow`` records (one per run × eval set) built from the
runner's ``metrics.json`` dicts, so it can be tested on hand-computed numbers without a model.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

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


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def arm_labels(configs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """A readable label per run that tells apart runs of one method with different settings.

    Why: a study may sweep anything (LoRA rank, learning rate, pattern). Runs that differ only in
    the grid axes (task, model, n, data seed) belong to the same arm; every other key that varies
    among a method's runs *within one task and model* goes into the label, e.g. ``lora r=8``.
    Keys that vary only across tasks (the task's default pattern) are not part of the label.
    """
    flat = {rid: flatten(cfg) for rid, cfg in configs.items()}
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
                peak_memory_mb=res.get("peak_memory_mb"),
                memory_kind=res.get("memory_kind"),
                trainable_params=res.get("trainable_params"),
                total_params=res.get("total_params"),
                train_seconds=res.get("train_seconds"),
                eval_seconds=res.get("eval_seconds"),
                per_label=ev.get("per_label") or {},
                groups=ev.get("groups") or {},
                collapsed=collapse_reason(m, ev),
            ))
    return rows


# --------------------------------------------------------------------------------------------
# summaries


@dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof=1), 95 % t-interval, min/max and count of finite values.

    With a single value the std and CI are undefined and are NaN (``note`` says so) — never 0,
    which would claim a certainty one run cannot give.
    """

    count: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    min: float
    max: float
    note: str = ""

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


def t_interval(mean: float, std: float, count: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided t-interval for a mean: mean ± t_{(1+c)/2, n−1} · std/√n."""
    if count < 2 or not math.isfinite(std):
        return float("nan"), float("nan")
    if std == 0:
        return mean, mean
    lo, hi = sps.t.interval(confidence, count - 1, loc=mean, scale=std / math.sqrt(count))
    return float(lo), float(hi)


def summarize(values: Iterable[float], confidence: float = CONFIDENCE) -> Summary:
    arr = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    nan = float("nan")
    if len(arr) == 0:
        return Summary(0, nan, nan, nan, nan, nan, nan, "no finite values")
    if len(arr) == 1:
        v = float(arr[0])
        return Summary(1, v, nan, nan, nan, v, v, "one run: std and CI undefined")
    mean, std = float(arr.mean()), float(arr.std(ddof=1))
    lo, hi = t_interval(mean, std, len(arr), confidence)
    return Summary(len(arr), mean, std, lo, hi, float(arr.min()), float(arr.max()))


@dataclass(frozen=True)
class SummaryRow:
    """One cell of the results: (model, task, arm, n, eval set) summarised over data seeds."""

    model: str
    task: str
    method: str
    arm: str
    n: int | None  # None for the majority baseline, which does not depend on n
    eval_set: str
    domain: str
    metric: str
    stats: Summary
    baseline: float  # the majority baseline (accuracy) or 0 (MCC of a constant predictor)
    at_baseline: bool | None  # True: not distinguishable from the majority baseline / chance
    seeds: tuple[int, ...] = ()


def baseline_for(metric: str, majority: float) -> float:
    return 0.0 if metric == "mcc" else majority


def baseline_margin(s: Summary, baseline: float, n_eval: int, metric: str = "accuracy") -> float:
    """How far from the baseline a mean must be to count as different from it.

    The larger of the 95 % CI half-width over seeds and the eval-sampling error of one evaluation on
    ``n_eval`` examples: for accuracy the wider side of the Wilson interval of a constant
    predictor's accuracy (``scipy.stats.binomtest``), for MCC 1.96/√n. Why both: every run of a cell is
    scored on the *same* eval examples, so the eval-set sampling error does not shrink with more
    seeds — and seeds that happen to agree exactly (a constant predictor) give a zero-width CI.
    """
    if n_eval > 0:
        if metric == "mcc":
            floor = 1.96 / math.sqrt(n_eval)
        else:
            ci = sps.binomtest(round(min(max(baseline, 0.0), 1.0) * n_eval), n_eval).proportion_ci(CONFIDENCE, method="wilson")
            floor = max(baseline - ci.low, ci.high - baseline)
    else:
        floor = 0.0
    half = s.half_width if s.count >= 2 and math.isfinite(s.half_width) else 0.0
    return max(half, floor)


def indistinguishable(s: Summary, baseline: float, n_eval: int, metric: str = "accuracy") -> bool | None:
    """Is a result within noise of the majority baseline (or HANS chance)? See ``baseline_margin``."""
    if s.count == 0 or not math.isfinite(baseline) or not math.isfinite(s.mean):
        return None
    if n_eval <= 0 and s.count < 2:
        return None
    return bool(abs(s.mean - baseline) <= baseline_margin(s, baseline, n_eval, metric))


def summary_table(rows: Sequence[EvalRow], metrics: Sequence[str] = ("accuracy", "mcc"), order: Sequence[str] = ()) -> list[SummaryRow]:
    """Summaries per (model, task, arm, n, eval set, metric), plus one majority-baseline row per
    (model, task, eval set, metric)."""
    groups: dict[tuple, list[EvalRow]] = defaultdict(list)
    for r in rows:
        groups[(r.model, r.task, r.method, r.arm, r.n, r.eval_set, r.domain)].append(r)
    out: list[SummaryRow] = []
    base_groups: dict[tuple, list[EvalRow]] = defaultdict(list)
    for r in rows:
        base_groups[(r.model, r.task, r.eval_set, r.domain)].append(r)
    for metric in metrics:
        for (model, task, eval_set, domain), rs in sorted(base_groups.items()):
            maj = summarize(r.majority_baseline for r in rs)
            b = baseline_for(metric, maj.mean)
            out.append(SummaryRow(model, task, MAJORITY, "majority baseline", None, eval_set, domain, metric,
                                  summarize([b] * len({r.run_id for r in rs})), b, True))
        for (model, task, method, arm, n, eval_set, domain), rs in sorted(groups.items(), key=lambda kv: _group_sort(kv[0], order)):
            s = summarize(r.value(metric) for r in rs)
            b = baseline_for(metric, float(np.nanmean([r.majority_baseline for r in rs])) if rs else float("nan"))
            n_eval = int(np.median([r.n_eval for r in rs]))
            out.append(SummaryRow(model, task, method, arm, n, eval_set, domain, metric, s, b,
                                  indistinguishable(s, b, n_eval, metric), tuple(sorted({r.seed for r in rs}))))
    return out


def method_rank(method: str, order: Sequence[str] = ()) -> tuple[int, str]:
    """Sort key of a method: its position in ``order`` (the study's ``methods`` list, so tables
    follow the study config), methods not listed after them by name."""
    return (order.index(method) if method in order else len(order), method)


def _group_sort(key: tuple, order: Sequence[str]) -> tuple:
    model, task, method, arm, n, eval_set, domain = key
    return (model, task, method_rank(method, order), _arm_sort(arm), n, domain != "id", eval_set)


def _arm_sort(arm: str) -> tuple:
    """Sort 'lora r=2' before 'lora r=16': numeric parts compare as numbers."""
    out: list[Any] = []
    for tok in arm.replace("=", " ").split():
        try:
            out.append((0, float(tok), ""))
        except ValueError:
            out.append((1, 0.0, tok))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# paired comparisons


@dataclass(frozen=True)
class PairedTest:
    """A − B on paired values: mean difference, its 95 % t-interval, paired t-test and Wilcoxon."""

    n_pairs: int
    mean_diff: float
    std_diff: float
    ci_low: float
    ci_high: float
    t_stat: float
    t_p: float
    w_stat: float
    w_p: float
    note: str = ""

    def significant(self, alpha: float = ALPHA) -> bool:
        return math.isfinite(self.t_p) and self.t_p < alpha


def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> PairedTest:
    """Paired comparison of ``a`` and ``b`` (same order = same few-shot sample).

    Degenerate cases get explicit values rather than scipy's NaN and warnings: fewer than two
    pairs → NaN everywhere; all differences zero → p = 1; all differences equal but non-zero →
    t-test undefined (NaN: its variance estimate is 0, and in few-shot studies this happens when
    constant predictors or tiny eval sets make every sample agree — not evidence of certainty),
    noted in ``note``; the Wilcoxon test is still computed.
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples differ in length: {a_arr.shape} vs {b_arr.shape}")
    keep = np.isfinite(a_arr) & np.isfinite(b_arr)
    a_arr, b_arr = a_arr[keep], b_arr[keep]
    d = a_arr - b_arr
    n = len(d)
    nan = float("nan")
    if n < 2:
        mean = float(d.mean()) if n else nan
        return PairedTest(n, mean, nan, nan, nan, nan, nan, nan, nan, "fewer than 2 pairs: no CI, no test")
    mean, std = float(d.mean()), float(d.std(ddof=1))
    if np.all(np.abs(d) < 1e-12):
        return PairedTest(n, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, "all differences are zero")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if std < 1e-12:
            t_stat, t_p, lo, hi, note = nan, nan, nan, nan, "all differences equal: t-test undefined"
        else:
            res = sps.ttest_rel(a_arr, b_arr)
            ci = res.confidence_interval(confidence)
            t_stat, t_p, lo, hi, note = float(res.statistic), float(res.pvalue), float(ci.low), float(ci.high), ""
        w = sps.wilcoxon(d, zero_method="wilcox")
    return PairedTest(n, mean, std, lo, hi, t_stat, t_p, float(w.statistic), float(w.pvalue), note)


@dataclass(frozen=True)
class Comparison:
    """Arm A vs arm B in one cell (model, task, n, eval set), paired by data seed."""

    model: str
    task: str
    n: int
    eval_set: str
    domain: str
    metric: str
    arm_a: str
    arm_b: str
    test: PairedTest
    seeds: tuple[int, ...]


def paired_comparisons(rows: Sequence[EvalRow], reference_method: str | None = "vanilla", metric: str = "accuracy",
                       order: Sequence[str] = ()) -> list[Comparison]:
    """Arm A − arm B per (model, task, n, eval set), paired on the data seed (same seed = same
    few-shot sample). Seed-level only: the interval leaves out eval-sampling error (the claims'
    bootstrap includes it), which the report says next to these tables. With ``reference_method``, every arm against that method's arms; with None,
    every pair of arms (B is the one earlier in the method order, e.g. ``vanilla − icl``)."""
    cells: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    methods: dict[str, str] = {}
    for r in rows:
        cells[(r.model, r.task, r.n, r.eval_set, r.domain)][r.arm][r.seed] = r.value(metric)
        methods[r.arm] = r.method
    arm_key = lambda a: (method_rank(methods[a], order), _arm_sort(a))  # noqa: E731
    out: list[Comparison] = []
    for (model, task, n, eval_set, domain), arms in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][4] != "id", kv[0][3])):
        ranked = sorted(arms, key=arm_key)
        if reference_method is not None:
            pairs = [(a, ref) for ref in ranked if methods[ref] == reference_method for a in ranked if a != ref]
        else:
            pairs = [(ranked[j], ranked[i]) for i in range(len(ranked)) for j in range(i + 1, len(ranked))]
        for arm, ref in pairs:
            seeds = sorted(set(arms[arm]) & set(arms[ref]))
            if not seeds:
                continue
            test = paired_test([arms[arm][s] for s in seeds], [arms[ref][s] for s in seeds])
            out.append(Comparison(model, task, n, eval_set, domain, metric, arm, ref, test, tuple(seeds)))
    return out


# --------------------------------------------------------------------------------------------
# ID vs OOD


@dataclass(frozen=True)
class GapRow:
    """ID − OOD accuracy of one arm at one n, summarised over data seeds (paired within a run)."""

    model: str
    task: str
    method: str
    arm: str
    n: int
    id_set: str
    ood_set: str
    id: Summary
    ood: Summary
    gap: Summary


def id_ood_gaps(rows: Sequence[EvalRow], metric: str = "accuracy", order: Sequence[str] = ()) -> list[GapRow]:
    by_run: dict[str, list[EvalRow]] = defaultdict(list)
    for r in rows:
        by_run[r.run_id].append(r)
    cells: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for rs in by_run.values():
        ids = [r for r in rs if r.domain == "id"]
        oods = [r for r in rs if r.domain == "ood"]
        for i in ids:
            for o in oods:
                cells[(i.model, i.task, i.method, i.arm, i.n, i.eval_set, o.eval_set)].append((i.value(metric), o.value(metric)))
    out = []
    for key, pairs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], method_rank(kv[0][2], order), _arm_sort(kv[0][3]), kv[0][4], kv[0][5], kv[0][6])):
        model, task, method, arm, n, id_set, ood_set = key
        out.append(GapRow(model, task, method, arm, n, id_set, ood_set, summarize(p[0] for p in pairs),
                          summarize(p[1] for p in pairs), summarize(p[0] - p[1] for p in pairs)))
    return out


# --------------------------------------------------------------------------------------------
# Pareto front


def pareto_front(costs: Sequence[float], values: Sequence[float]) -> list[bool]:
    """Which points are Pareto-optimal (no other point is at most as costly and at least as good,
    and strictly better in one of the two)? Lower cost and higher value are better."""
    pts = list(zip(costs, values))
    out = []
    for i, (c, v) in enumerate(pts):
        if not (math.isfinite(c) and math.isfinite(v)):
            out.append(False)
            continue
        dominated = any(
            j != i and math.isfinite(c2) and math.isfinite(v2) and c2 <= c and v2 >= v and (c2 < c or v2 > v)
            for j, (c2, v2) in enumerate(pts)
        )
        out.append(not dominated)
    return out


# --------------------------------------------------------------------------------------------
# baseline checks used by the claims (fewtune.stats.claims)


def at_baseline_methods(rows: Sequence[EvalRow], methods: Sequence[str], domain: str | None) -> dict[str, tuple[int, int]]:
    """Methods whose results are mostly (> half) indistinguishable from the majority baseline:
    then 'A vs B' compares constant predictors, whose perfect agreement is no evidence."""
    out = {}
    for m in methods:
        rs = [r for r in rows if r.method == m and (domain is None or r.domain == domain)]
        at = sum(bool(indistinguishable(summarize([r.accuracy]), r.majority_baseline, r.n_eval)) for r in rs)
        if rs and at > len(rs) / 2:
            out[m] = (at, len(rs))
    return out
