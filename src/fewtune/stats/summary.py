"""Summaries over data seeds: mean, std, t-interval, and the margin to the majority baseline."""


from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from fewtune.stats.rows import CONFIDENCE, MAJORITY, EvalRow

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
    return (model, task, method_rank(method, order), arm_sort(arm), n, domain != "id", eval_set)


def arm_sort(arm: str) -> tuple:
    """Sort 'lora r=2' before 'lora r=16': numeric parts compare as numbers."""
    out: list[Any] = []
    for tok in arm.replace("=", " ").split():
        try:
            out.append((0, float(tok), ""))
        except ValueError:
            out.append((1, 0.0, tok))
    return tuple(out)
