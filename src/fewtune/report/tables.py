"""The report's tables as rows (header, cells), computed from the study's statistics."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from fewtune import stats as st
from fewtune.report.data import StudyData
from fewtune.report.doc import fmt_summary


def eval_sets_ordered(rows: Sequence[st.EvalRow], model: str, task: str) -> list[str]:
    sets = {(r.domain != "id", r.eval_set) for r in rows if r.model == model and r.task == task}
    return [s for _, s in sorted(sets)]


def results_table(summary: Sequence[st.SummaryRow], model: str, task: str, eval_set: str, metric: str,
                  failed: dict[tuple[str, str, str, int], int] | None = None,
                  collapsed: dict[tuple[str, int, str], int] | None = None) -> tuple[list[str], list[list[str]]]:
    """Rows: method arms (majority baseline first); columns: n. Cells: mean ± CI half-width (runs);
    '≈' marks a result indistinguishable from the majority baseline (or chance on HANS); 'k failed'
    counts runs of the cell that failed (they have no result), '⚠ k collapsed' runs that collapsed."""
    failed = {k: v for k, v in (failed or {}).items() if k[0] == model and k[1] == task}
    collapsed = collapsed or {}
    cells = [r for r in summary if r.model == model and r.task == task and r.eval_set == eval_set and r.metric == metric]
    ns = sorted({r.n for r in cells if r.n is not None} | {k[3] for k in failed})
    header = ["method", *[f"n={n}" for n in ns]]
    rows: list[list[str]] = []
    base = [r for r in cells if r.method == st.MAJORITY]
    if base:
        rows.append(["majority baseline", *[f"{base[0].baseline:.3f}"] * len(ns)])
    arms = []
    for arm in [r.arm for r in cells if r.method != st.MAJORITY] + [k[2] for k in sorted(failed, key=lambda k: st.arm_sort(k[2]))]:
        if arm not in arms:
            arms.append(arm)
    for arm in arms:
        line = [arm]
        for n in ns:
            c = next((r for r in cells if r.arm == arm and r.n == n), None)
            text = "–" if c is None else fmt_summary(c.stats) + (" ≈" if c.at_baseline and c.method != st.MAJORITY else "")
            notes = [f"{k} failed" for k in [failed.get((model, task, arm, n), 0)] if k]
            notes += [f"⚠ {k} collapsed" for k in [collapsed.get((arm, n, eval_set), 0)] if k]
            line.append(text + (f" [{', '.join(notes)}]" if notes else ""))
        rows.append(line)
    return header, rows


def breakdown_table(data: StudyData, model: str, task: str, order: Sequence[str] = ()) -> tuple[list[str], list[tuple[str, str, int, dict[str, st.Summary]]]]:
    """Per (arm, n): accuracy over seeds for each group × gold label (columns in order of appearance)."""
    keys = [k for r in data.done if r.config.get("task") == task and r.config.get("model") == model for k in data.breakdown.get(r.run_id, {})]
    groups, labels = list(dict.fromkeys(k[0] for k in keys)), list(dict.fromkeys(k[1] for k in keys))
    cols = [f"{g} / {lab}" for g in groups for lab in labels]
    cells: dict[tuple[str, str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    arms = {row.run_id: row.arm for row in data.rows}
    for r in data.done:
        if r.config.get("model") != model or r.config.get("task") != task or r.run_id not in data.breakdown:
            continue
        arm = arms.get(r.run_id, str(r.config.get("method")))
        for (h, lab), (correct, total) in data.breakdown[r.run_id].items():
            if total:
                cells[(arm, str(r.config.get("method")), int(r.config.get("n")))][f"{h} / {lab}"].append(correct / total)
    out = []
    for (arm, method, n), vals in sorted(cells.items(), key=lambda kv: (st.method_rank(kv[0][1], order), st.arm_sort(kv[0][0]), kv[0][2])):
        out.append((arm, method, n, {c: st.summarize(vals.get(c, [])) for c in cols}))
    return cols, out


def resource_rows(rows: Sequence[st.EvalRow], order: Sequence[str] = ()) -> list[list[Any]]:
    """One row per (model, task, arm, n), resources are per run (the first eval row of each run)."""
    per_run: dict[str, st.EvalRow] = {}
    for r in rows:
        per_run.setdefault(r.run_id, r)
    cells: dict[tuple, list[st.EvalRow]] = defaultdict(list)
    for r in per_run.values():
        cells[(r.model, r.task, r.method, r.arm, r.n)].append(r)
    out = []
    for (model, task, method, arm, n), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], st.method_rank(kv[0][2], order), st.arm_sort(kv[0][3]), kv[0][4])):
        def mean(attr: str) -> float:
            v = [getattr(r, attr) for r in rs if getattr(r, attr) is not None]
            return float(np.mean(v)) if v else math.nan

        kinds = ",".join(sorted({r.memory_kind for r in rs if r.memory_kind}))
        raw = [model, task, arm, n, len(rs), mean("peak_memory_mb"), kinds, mean("trainable_params"), mean("total_params"),
               mean("train_seconds"), mean("eval_seconds")]
        shown = [model, task, arm, n, len(rs), f"{raw[5]:.0f}" if math.isfinite(raw[5]) else "–", kinds or "–",
                 f"{raw[7]:,.0f}" if math.isfinite(raw[7]) else "–", f"{raw[8]:,.0f}" if math.isfinite(raw[8]) else "–",
                 f"{raw[9]:.1f}" if math.isfinite(raw[9]) else "–", f"{raw[10]:.1f}" if math.isfinite(raw[10]) else "–"]
        out.append([*shown, raw])
    return out


def identity_warnings(data: StudyData) -> list[str]:
    """Runs left out because another identity made them, and stale runs kept (``--keep-stale``)."""
    out: list[str] = []
    if data.other_runs:
        out.append(f"{data.other_runs} runs in this directory belong to an earlier version of the study config and are not reported.")
    if data.other_code_runs:
        out.append(f"{data.other_code_runs} runs in this directory were made by {data.other_code or 'another fewtune code version'}, "
                   "under configs the current code resolves differently, and are not reported.")
    if data.stale_runs:
        out.append(f"{data.stale_runs} runs in this directory are stale (made by another code or library version, task file, "
                   "model, device, thread or process count) and are not reported; their current counterparts are.")
    kept = Counter(r.kept_stale for r in data.frame.drop_duplicates("run_id").itertuples() if isinstance(r.kept_stale, str))
    if kept:
        out.append("Kept with --keep-stale, computed by other code or library versions than the rest: "
                   + "; ".join(f"{k} runs by {v}" for v, k in sorted(kept.items())) + " (column kept_stale of csv/runs.csv).")
    return out


def warnings(data: StudyData, summary: Sequence[st.SummaryRow]) -> list[str]:
    out: list[str] = list(data.excluded)
    counts = defaultdict(int)
    for r in data.runs:
        counts[r.status] += 1
    if counts["pending"] or counts["running"] or counts["failed"]:
        out.append(f"The study is incomplete: {counts['done']} of {len(data.runs)} runs done, {counts['failed']} failed, "
                   f"{counts['pending'] + counts['running']} not run yet. Statistics cover finished runs only.")
    out += identity_warnings(data)
    seen_sets = {}
    for r in data.rows:
        if r.warning and r.eval_set not in seen_sets:
            seen_sets[r.eval_set] = r.warning
    for es, w in sorted(seen_sets.items()):
        out.append(f"Eval set `{es}`: {w}")
    at_base = [r for r in summary if r.metric == "accuracy" and r.method != st.MAJORITY and r.at_baseline]
    total = [r for r in summary if r.metric == "accuracy" and r.method != st.MAJORITY]
    if at_base:
        listed = "; ".join(f"{r.arm} · {r.task} · n={r.n} · {r.eval_set} ({r.stats.mean:.3f} vs {r.baseline:.3f})" for r in at_base[:25])
        more = f" … and {len(at_base) - 25} more (column at_baseline in csv/summary.csv)" if len(at_base) > 25 else ""
        out.append(f"{len(at_base)} of {len(total)} results are indistinguishable from the majority baseline (HANS: chance, 0.5) "
                   f"and are marked ≈ in the tables: {listed}{more}.")
    below = [r for r in total if r.at_baseline is False and r.stats.mean < r.baseline]
    if below:
        listed = "; ".join(f"{r.arm} · {r.task} · n={r.n} · {r.eval_set} ({r.stats.mean:.3f} vs {r.baseline:.3f})" for r in below[:25])
        more = f" … and {len(below) - 25} more" if len(below) > 25 else ""
        out.append(f"{len(below)} of {len(total)} results are significantly *below* the majority baseline (a constant "
                   f"predictor would score higher): {listed}{more}.")
    skipped: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for r in data.rows:
        if r.n_skipped:
            skipped[(r.arm, r.task, r.n, r.eval_set)].append((r.n_skipped, r.n_skipped + r.n_eval))
    for (arm, task, n, es), v in sorted(skipped.items(), key=str):
        s, t = sum(a for a, _ in v), sum(b for _, b in v)
        out.append(f"{arm} · {task} · n={n} · {es}: {s} of {t} eval examples skipped (prompt longer than the context) "
                   f"over {len(v)} runs; accuracy is over the remaining examples only.")
    packed = {r.run_id for r in data.rows if r.packed}
    if packed:
        out.append(f"{len(packed)} runs were trained in packs (--pack): their peak memory and training time are the pack's, "
                   "shared with other runs, so they are left out of the memory and time figures (each run's metrics.json "
                   "holds them under resources.pack); their results are those of the runs alone.")
    kinds = {r.memory_kind for r in data.rows if r.memory_kind}
    if len(kinds) > 1:
        out.append(f"Peak memory was measured in different ways ({', '.join(sorted(kinds))}); those numbers are not comparable.")
    single = [r for r in summary if r.metric == "accuracy" and r.method != st.MAJORITY and r.stats.count == 1]
    if single:
        out.append(f"{len(single)} results rest on a single run: their std and CI are undefined (shown as '(1 run)').")
    covered = {f"{es}: {w}" for es, w in seen_sets.items()}
    other: dict[str, int] = defaultdict(int)
    for rec in data.done:
        for w in (rec.metrics or {}).get("warnings", []):
            if w not in covered and "examples skipped" not in w:
                other[w] += 1
    for w, c in sorted(other.items(), key=lambda kv: -kv[1]):
        out.append(f"{w} ({c} run{'s' if c != 1 else ''})")
    return out
