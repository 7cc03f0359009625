"""Comparisons: paired tests over data seeds, the two-level test (seeds × eval examples) every
"better / not distinguishable" statement uses, the set of arms tied with the best, ID–OOD gaps and
Pareto fronts."""


from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from fewtune.stats.resample import BOOTSTRAP_REPLICATES, PairedBootstrap, Scores, Term, paired_bootstrap
from fewtune.stats.rows import ALPHA, CONFIDENCE, MIN_PAIRS, MIN_SEEDS, EvalRow
from fewtune.stats.summary import Summary, arm_sort, indistinguishable, method_rank, summarize

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
    arm_key = lambda a: (method_rank(methods[a], order), arm_sort(a))  # noqa: E731
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
# two-level test and the arms tied with the best


@dataclass(frozen=True)
class TwoLevelTest:
    """A − B with both sources of variance: the union of the two-level bootstrap interval (seeds ×
    eval examples) and the seed-level paired t-interval; p is the larger of the two p-values.

    Why both: the bootstrap adds the eval-sampling error (every seed is scored on the same
    examples, so more seeds never remove it); the t-interval keeps the small-sample correction a
    percentile bootstrap over 3–10 seeds lacks.
    """

    boot: PairedBootstrap
    ci_low: float
    ci_high: float
    t_low: float
    t_high: float
    t_p: float
    p: float
    t_note: str = ""  # why the seed-level t-test is undefined; "" when it is defined

    @property
    def diff(self) -> float:
        return self.boot.diff

    @property
    def n_pairs(self) -> int:
        return len(self.boot.units)

    @property
    def enough(self) -> bool:
        """Enough paired few-shot samples to test at all (``MIN_PAIRS`` from ``MIN_SEEDS`` seeds)."""
        return self.n_pairs >= MIN_PAIRS and self.boot.seeds >= MIN_SEEDS

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.enough and math.isfinite(self.p) and self.p < alpha


def _t_note(d: np.ndarray) -> str:
    if len(d) < 2:
        return "fewer than 2 paired samples: no seed-level t-test"
    if np.ptp(d) < 1e-12:
        return (f"every sample's difference is the same ({d[0]:+.3f}): the seed-level t-test is undefined (zero variance), "
                "only the eval-example bootstrap measures the uncertainty")
    return ""


def two_level_test(boot: PairedBootstrap, confidence: float = CONFIDENCE) -> TwoLevelTest:
    """The project's one uncertainty model for a paired difference (claims and Which method)."""
    d = boot.unit_a - boot.unit_b
    note = _t_note(d)
    t_lo = t_hi = t_p = math.nan
    if not note:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = sps.ttest_rel(boot.unit_a, boot.unit_b)
            ci = res.confidence_interval(confidence)
        t_lo, t_hi, t_p = float(ci.low), float(ci.high), float(res.pvalue)
    b_lo, b_hi = boot.ci(confidence)
    lo = [x for x in (b_lo, t_lo) if math.isfinite(x)]
    hi = [x for x in (b_hi, t_hi) if math.isfinite(x)]
    ps = [x for x in (boot.p_value(), t_p) if math.isfinite(x)]
    return TwoLevelTest(boot, min(lo, default=math.nan), max(hi, default=math.nan), t_lo, t_hi, t_p,
                        max(ps, default=math.nan), note)


@dataclass(frozen=True)
class VsBest:
    """best − arm: the two-level test and its Holm-adjusted p over the best-vs-each family."""

    arm: str
    test: TwoLevelTest
    p_holm: float
    worse: bool  # significantly below the best after Holm


@dataclass(frozen=True)
class Leaders:
    """The arms not significantly worse than the best mean (multiple comparison with the best)."""

    best: str
    domain: str
    vs_best: tuple[VsBest, ...]

    @property
    def tied(self) -> list[str]:
        return [self.best, *(v.arm for v in self.vs_best if not v.worse)]

    def vs(self, arm: str) -> VsBest | None:
        return next((v for v in self.vs_best if v.arm == arm), None)


def leaders(rows: Sequence[EvalRow], scores: Mapping[str, Mapping[str, Scores]], means: Mapping[tuple[str, str], float],
            domain: str, alpha: float = ALPHA, replicates: int = BOOTSTRAP_REPLICATES) -> Leaders | None:
    """Which arms (``means``: (method, arm) → mean accuracy) are tied for the lead in ``rows`` (one
    model × task × n × eval set)?

    Why not the argmax: the best of up to 15 noisy means is biased upwards (winner's curse). The
    best is tested against each other arm with the two-level test, Holm-corrected over those
    comparisons (statsmodels ``multipletests``); an arm stays in the lead unless it is significantly
    worse. An arm with too few shared few-shot samples cannot be shown worse, so it stays too.
    """
    finite = {k: v for k, v in means.items() if math.isfinite(v)}
    if not finite:
        return None
    (bm, best), others = max(finite, key=lambda k: finite[k]), sorted(finite, key=lambda k: -finite[k])[1:]
    tests = [two_level_test(paired_bootstrap(rows, scores, [Term(bm, domain, arm=best)], [Term(m, domain, arm=a)], replicates),
                            1 - alpha) for m, a in others]
    ps = [t.p if t.enough and math.isfinite(t.p) else 1.0 for t in tests]
    reject, p_adj = (multipletests(ps, alpha=alpha, method="holm")[:2]) if ps else ([], [])
    vs = tuple(VsBest(a, t, float(pa), bool(rej) and t.diff > 0) for (_, a), t, rej, pa in zip(others, tests, reject, p_adj))
    return Leaders(best, domain, vs)


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
    for key, pairs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], method_rank(kv[0][2], order), arm_sort(kv[0][3]), kv[0][4], kv[0][5], kv[0][6])):
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
