"""The report's figures (matplotlib, Agg; no display needed). Each returns the PNG path it wrote,
or None when there is nothing to draw."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fewtune import stats as st
from fewtune.atomic import write_atomic


def _save_fig(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, buf.getvalue())
    return path


_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _method_color(method: str, order: Sequence[str]) -> str:
    return _COLORS[st.method_rank(method, order)[0] % len(_COLORS)] if method in order else _COLORS[sum(map(ord, method)) % len(_COLORS)]


def _arm_styles(arms: Sequence[tuple[str, str]], order: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(color, linestyle) per arm: colour by method, line style tells a method's arms apart."""
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
    seen: dict[str, int] = defaultdict(int)
    out = {}
    for method, arm in arms:
        out[arm] = (_method_color(method, order), styles[seen[method] % len(styles)])
        seen[method] += 1
    return out


def plot_accuracy_vs_n(rows: Sequence[st.SummaryRow], model: str, task: str, eval_sets: Sequence[str], path: Path,
                       order: Sequence[str] = ()) -> Path | None:
    """Mean accuracy vs n per arm with 95 % CI bands, one panel per eval set (ID first)."""
    cells = [r for r in rows if r.model == model and r.task == task and r.metric == "accuracy"]
    if not cells:
        return None
    fig = Figure(figsize=(5.2 * len(eval_sets) + 1.8, 4.2), layout="constrained")
    arms = sorted({(r.method, r.arm) for r in cells if r.method != st.MAJORITY}, key=lambda x: (st.method_rank(x[0], order), st.arm_sort(x[1])))
    styles = _arm_styles(arms, order)
    ns = sorted({r.n for r in cells if r.n is not None})
    for i, es in enumerate(eval_sets):
        ax = fig.add_subplot(1, len(eval_sets), i + 1)
        for j, (method, arm) in enumerate(arms):
            pts = sorted((r.n, r.stats) for r in cells if r.arm == arm and r.eval_set == es and r.n is not None)
            if not pts:
                continue
            # Dodge arms sideways (multiplicatively: the axis is log2) so equal means stay visible.
            x = np.array([p[0] for p in pts], dtype=float) * 2 ** (0.03 * (j - (len(arms) - 1) / 2))
            m = np.array([p[1].mean for p in pts])
            lo = np.array([p[1].ci_low if math.isfinite(p[1].ci_low) else p[1].mean for p in pts])
            hi = np.array([p[1].ci_high if math.isfinite(p[1].ci_high) else p[1].mean for p in pts])
            color, ls = styles[arm]
            ax.errorbar(x, m, yerr=[m - lo, hi - m], marker="o", color=color, linestyle=ls, label=arm, capsize=2, linewidth=1.2)
            if len(pts) > 1:
                ax.fill_between(x, lo, hi, color=color, alpha=0.12, linewidth=0)
        base = [r for r in cells if r.method == st.MAJORITY and r.eval_set == es]
        if base:
            ax.axhline(base[0].baseline, color="black", linestyle="--", linewidth=1, label="majority / chance")
        domain = next((r.domain for r in cells if r.eval_set == es), "")
        ax.set_title(f"{task} · {es} ({domain.upper()})")
        ax.set_xlabel("n (examples per class)")
        ax.set_ylabel("accuracy")
        if len(ns) > 1 and min(ns) > 0:
            ax.set_xscale("log", base=2)
        elif len(ns) == 1:
            ax.set_xlim(ns[0] * 0.8, ns[0] * 1.2)
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.minorticks_off()
        lo_y, hi_y = ax.get_ylim()
        ax.set_ylim(max(lo_y, -0.02 if base and base[0].metric == "accuracy" else -1.02), min(hi_y, 1.02))
        ax.grid(alpha=0.3)
        if i == len(eval_sets) - 1:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"{model}: accuracy vs n (mean, 95% CI over data seeds; arms dodged sideways)", fontsize=10)
    return _save_fig(fig, path)


def plot_id_vs_ood(rows: Sequence[st.EvalRow], model: str, task: str, path: Path, order: Sequence[str] = ()) -> Path | None:
    fig = id_vs_ood_figure(rows, model, task, order)
    return None if fig is None else _save_fig(fig, path)


def id_vs_ood_figure(rows: Sequence[st.EvalRow], model: str, task: str, order: Sequence[str] = ()) -> Figure | None:
    """Every run as a point: ID accuracy (x) vs OOD accuracy (y), as in Mosbach et al. (2023); over
    them each method's mean per n with its 95 % CI whiskers on both axes."""
    by_run: dict[str, list[st.EvalRow]] = defaultdict(list)
    for r in rows:
        if r.model == model and r.task == task:
            by_run[r.run_id].append(r)
    pairs: dict[tuple[str, str], list[tuple[st.EvalRow, st.EvalRow]]] = defaultdict(list)
    for rs in by_run.values():
        for i in (r for r in rs if r.domain == "id"):
            for o in (r for r in rs if r.domain == "ood"):
                pairs[(i.eval_set, o.eval_set)].append((i, o))
    if not pairs:
        return None
    keys = sorted(pairs)
    fig = Figure(figsize=(5.2 * len(keys) + 1.8, 4.8), layout="constrained")
    ns = sorted({i.n for v in pairs.values() for i, _ in v})
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    for k, (id_set, ood_set) in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), k + 1)
        pts = pairs[(id_set, ood_set)]
        for method in sorted({i.method for i, _ in pts}, key=lambda m: st.method_rank(m, order)):
            for j, n in enumerate(ns):
                sel = [(i.accuracy, o.accuracy) for i, o in pts if i.method == method and i.n == n]
                if sel:
                    ax.scatter(*zip(*sel), color=_method_color(method, order), marker=markers[j % len(markers)], alpha=0.35, s=18)
                    _mean_cross(ax, sel, _method_color(method, order), markers[j % len(markers)],
                                f"{method} n={n}" if len(ns) > 1 else method)
        lims = [0, 1]
        ax.plot(lims, lims, color="gray", linewidth=0.8, linestyle=":")
        i0, o0 = pts[0]
        ax.axvline(i0.majority_baseline, color="black", linestyle="--", linewidth=0.8)
        ax.axhline(o0.majority_baseline, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlabel(f"{id_set} accuracy (ID)")
        ax.set_ylabel(f"{ood_set} accuracy (OOD)")
        ax.set_title(f"{task}: ID vs OOD, all runs")
        ax.grid(alpha=0.3)
        if k == len(keys) - 1:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"{model}: small points = runs, large = mean per method and n with 95% CI whiskers over data seeds "
                 "(dashed: majority / chance; dotted: ID = OOD)", fontsize=10)
    return fig


def _mean_cross(ax, pairs: Sequence[tuple[float, float]], color: str, marker: str, label: str) -> None:
    """The mean of a method's runs with its 95 % CI whiskers on both axes (ID and OOD accuracy)."""
    x, y = st.summarize(p[0] for p in pairs), st.summarize(p[1] for p in pairs)
    ax.errorbar([x.mean], [y.mean], xerr=_yerr([x.mean], [x.ci_low], [x.ci_high]), yerr=_yerr([y.mean], [y.ci_low], [y.ci_high]),
                color=color, marker=marker, markersize=8, markeredgecolor="black", capsize=3, linewidth=1.2, label=label)


@dataclass(frozen=True)
class CostPoint:
    arm: str
    method: str
    n: int
    accuracy: float  # mean over data seeds
    memory_mb: float
    trainable: float
    on_front_memory: bool = False
    on_front_params: bool = False
    ci_low: float = math.nan  # 95 % t-interval of the mean accuracy over data seeds
    ci_high: float = math.nan


def cost_points(rows: Sequence[st.EvalRow], model: str, task: str, eval_set: str, order: Sequence[str] = ()) -> list[CostPoint]:
    """Mean accuracy, peak memory and trainable parameters per (arm, n), with Pareto flags."""
    cells: dict[tuple[str, str, int], list[st.EvalRow]] = defaultdict(list)
    for r in rows:
        if r.model == model and r.task == task and r.eval_set == eval_set:
            cells[(r.arm, r.method, r.n)].append(r)
    raw = []
    for (arm, method, n), rs in sorted(cells.items(), key=lambda kv: (st.method_rank(kv[0][1], order), st.arm_sort(kv[0][0]), kv[0][2])):
        mem = [r.peak_memory_mb for r in rs if r.peak_memory_mb is not None]
        tr = [r.trainable_params for r in rs if r.trainable_params is not None]
        acc = st.summarize(r.accuracy for r in rs)
        raw.append((arm, method, n, acc.mean, float(np.mean(mem)) if mem else math.nan, float(np.mean(tr)) if tr else math.nan,
                    acc.ci_low, acc.ci_high))
    fm = st.pareto_front([p[4] for p in raw], [p[3] for p in raw])
    fp = st.pareto_front([p[5] for p in raw], [p[3] for p in raw])
    return [CostPoint(a, m, n, acc, mem, tr, f1, f2, lo, hi) for (a, m, n, acc, mem, tr, lo, hi), f1, f2 in zip(raw, fm, fp)]


def _yerr(means: Sequence[float], lows: Sequence[float], highs: Sequence[float]) -> np.ndarray:
    """Whisker lengths below and above each mean (0 where the CI is undefined: a single run)."""
    m = np.asarray(means, dtype=float)
    lo = np.array([x if math.isfinite(x) else y for x, y in zip(lows, m)])
    hi = np.array([x if math.isfinite(x) else y for x, y in zip(highs, m)])
    return np.vstack([m - lo, hi - m])


def plot_pareto(points: Sequence[CostPoint], model: str, task: str, eval_set: str, path: Path, order: Sequence[str] = ()) -> Path | None:
    fig = pareto_figure(points, model, task, eval_set, order)
    return None if fig is None else _save_fig(fig, path)


def pareto_figure(points: Sequence[CostPoint], model: str, task: str, eval_set: str, order: Sequence[str] = ()) -> Figure | None:
    """Accuracy (mean, 95 % CI whiskers) vs peak memory and vs trainable parameters; the Pareto
    front through the means is drawn and ringed (overlapping whiskers: the front is not a ranking)."""
    if not points:
        return None
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    for k, (attr, flag, xlabel) in enumerate((("memory_mb", "on_front_memory", "peak memory (MB)"),
                                               ("trainable", "on_front_params", "trainable parameters"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for method in sorted({p.method for p in points}, key=lambda m: st.method_rank(m, order)):
            sel = [p for p in points if p.method == method and math.isfinite(getattr(p, attr))]
            if sel:
                ax.errorbar([getattr(p, attr) for p in sel], [p.accuracy for p in sel],
                            yerr=_yerr([p.accuracy for p in sel], [p.ci_low for p in sel], [p.ci_high for p in sel]),
                            color=_method_color(method, order), label=method, fmt="o", markersize=5, alpha=0.8, capsize=2, linewidth=1)
        front = sorted((p for p in points if getattr(p, flag)), key=lambda p: getattr(p, attr))
        if front:
            ax.step([getattr(p, attr) for p in front], [p.accuracy for p in front], where="post", color="black", linewidth=1, label="Pareto front")
            ax.scatter([getattr(p, attr) for p in front], [p.accuracy for p in front], facecolors="none", edgecolors="black", s=110, linewidths=1.2)
            for p in front:
                ax.annotate(f"{p.arm} n={p.n}", (getattr(p, attr), p.accuracy), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if attr == "trainable":
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{eval_set} accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{model} · {task} · {eval_set}: accuracy vs cost (mean per method arm and n, whiskers: 95% CI over data "
                 "seeds); the Pareto front is drawn through the means", fontsize=10)
    return fig


def plot_breakdown(cols: Sequence[str], table: Sequence[tuple[str, str, int, dict[str, st.Summary]]], model: str, title: str, path: Path,
                   order: Sequence[str] = ()) -> Path | None:
    """Grouped bars: accuracy per group × gold label, one bar per method arm, one panel per n."""
    if not table:
        return None
    ns = sorted({t[2] for t in table})
    fig = Figure(figsize=(12, 3.4 * len(ns)), layout="constrained")
    for k, n in enumerate(ns):
        ax = fig.add_subplot(len(ns), 1, k + 1)
        rows = [t for t in table if t[2] == n]
        width = 0.8 / max(len(rows), 1)
        x = np.arange(len(cols))
        for j, (arm, method, _, vals) in enumerate(rows):
            means = [vals[c].mean if vals[c].count else np.nan for c in cols]
            errs = [vals[c].half_width if math.isfinite(vals[c].half_width) else 0 for c in cols]
            ax.bar(x + (j - (len(rows) - 1) / 2) * width, means, width, yerr=errs, color=_method_color(method, order),
                   alpha=0.85, label=arm, capsize=2, edgecolor="white", linewidth=0.5)
        ax.axhline(0.5, color="black", linestyle=":", linewidth=1)
        ax.set_xticks(x)
        ax.set_xticklabels([c.replace(" / ", "\n") for c in cols], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}, n={n} (dotted: 0.5)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"{model}: bars = mean over data seeds, whiskers = 95% CI", fontsize=10)
    return _save_fig(fig, path)
