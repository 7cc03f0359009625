"""The report's sections after ``Which method``, one function each (``Context`` → ``Doc``), in the
order a reader wants them: claims, results per n, plots, group breakdowns, paired comparisons,
warnings, failed runs, study config."""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

from fewtune import stats as st
from fewtune.report.claims import add_claims_section, add_method_section
from fewtune.report.context import FIGURES_DIR, Context
from fewtune.report.csvs import write_csv
from fewtune.report.data import breakdown_specs, report_metrics
from fewtune.report.doc import Doc, fmt_p, fmt_summary, slug
from fewtune.report.plots import cost_points, plot_accuracy_vs_n, plot_breakdown, plot_id_vs_ood, plot_pareto
from fewtune.report.tables import breakdown_table, eval_sets_ordered, resource_rows, results_table, warnings


def claims(ctx: Context) -> Doc:
    doc = Doc()
    add_claims_section(doc, ctx.specs, ctx.claims)
    return doc


def results(ctx: Context) -> Doc:
    doc = Doc()
    doc.h(2, "Results")
    doc.p("Mean ± 95 % CI half-width over data seeds (number of runs in parentheses); ≈ marks a result indistinguishable from "
          "the majority baseline (or chance); [k failed] counts runs of the cell that failed (not in the mean), [⚠ k collapsed] "
          "runs whose predictions collapsed. Full statistics (std, min, max) in `csv/summary.csv`.")
    no_n = {r.arm for r in ctx.rows if not ctx.data.n_applies(r.method)}
    for model, task in ctx.models_tasks():
        doc.h(3, f"{model} · {task}")
        for es in eval_sets_ordered(ctx.rows, model, task):
            domain = next(r.domain for r in ctx.rows if r.eval_set == es and r.task == task)
            for metric in report_metrics(task):
                header, rows = results_table(ctx.summary, model, task, es, metric, ctx.failed, ctx.collapsed)
                rows = [[f"{r[0]} (n/a: no sample used)" if r[0] in no_n else r[0], *r[1:]] for r in rows]
                doc.table(header, rows, caption=f"{es} ({domain.upper()}) {metric.upper() if metric == 'mcc' else metric}")
    return doc


def _figure(ctx: Context, doc: Doc, path: Path | None, alt: str, reading: str) -> None:
    if path is not None:
        ctx.figures.append(path)
        doc.img(f"{FIGURES_DIR}/{path.name}", alt, reading)


def plots(ctx: Context) -> Doc:
    doc = Doc()
    doc.h(2, "Plots")
    for model, task in ctx.models_tasks():
        sets = eval_sets_ordered(ctx.rows, model, task)
        _figure(ctx, doc, plot_accuracy_vs_n(ctx.summary, model, task, sets, ctx.fig_dir / f"{slug('acc_vs_n', model, task)}.png", ctx.order),
                f"{model} · {task}: accuracy vs n per method with 95% CI bands",
                "higher is better; a line above the dashed majority line whose band does not touch it beats a constant guess.")
        _figure(ctx, doc, plot_id_vs_ood(ctx.rows, model, task, ctx.fig_dir / f"{slug('id_vs_ood', model, task)}.png", ctx.order),
                f"{model} · {task}: ID vs OOD accuracy of every run, and each method's mean with 95% CI whiskers",
                "points below the dotted diagonal do worse out of domain than in domain; up and right is better on both; "
                "overlapping whiskers of two means: the data do not separate them.")
        for es in sets:
            pts = cost_points(ctx.rows, model, task, es, ctx.order)
            _figure(ctx, doc, plot_pareto(pts, model, task, es, ctx.fig_dir / f"{slug('pareto', model, task, es)}.png", ctx.order),
                    f"{model} · {task} · {es}: accuracy vs peak memory and trainable parameters (Pareto front through the "
                    "means, ringed; whiskers: 95% CI over data seeds)",
                    "up and left is better; ringed methods' means are not beaten on both accuracy and cost by any other. The front "
                    "is drawn through means: where whiskers overlap, the order along it is not established (see Which method for "
                    "the arms tied for the lead).")
    return doc


def breakdowns(ctx: Context) -> Doc:
    """Accuracy per group × gold label on the eval sets whose task declares a breakdown field."""
    doc = Doc()
    for model, task in ctx.models_tasks():
        cols, table = breakdown_table(ctx.data, model, task, ctx.order)
        if not table:
            continue
        specs = breakdown_specs(task)
        field_name = next(iter(specs.values()))[0]
        title = f"{task} per {field_name} and gold label ({model})"
        doc.h(2, title)
        doc.p(f"Accuracy per {field_name} and gold label (from the per-example predictions of each run's largest eval set with "
              f"this breakdown: {', '.join(specs)}). A method that follows a shallow rule scores near 1 on the label the rule "
              "predicts and near 0 on the other.")
        doc.table(["method", "n", *cols], [[arm, n, *[fmt_summary(v[c]) for c in cols]] for arm, _, n, v in table])
        p = plot_breakdown(cols, table, model, title, ctx.fig_dir / f"{slug('breakdown', model, task)}.png", ctx.order)
        _figure(ctx, doc, p, f"{title}: mean over data seeds, 95% CI",
                "bars far apart for the two gold labels of one group mean the method decides by the group's surface cue, not the meaning.")
        ctx.csvs.append(write_csv(ctx.csv_dir / f"{slug('breakdown', model, task)}.csv",
                                  ["model", "task", "method", "arm", "n", "column", "count", "mean", "std", "ci_low", "ci_high"],
                                  [[model, task, m, arm, n, c, v[c].count, v[c].mean, v[c].std, v[c].ci_low, v[c].ci_high]
                                   for arm, m, n, v in table for c in cols]))
    return doc


def paired(ctx: Context) -> Doc:
    doc = Doc()
    doc.h(2, "Paired comparisons with vanilla fine-tuning")
    comps = st.paired_comparisons(ctx.rows, "vanilla", "accuracy", ctx.order)
    if not comps:
        doc.p("No pairs: vanilla fine-tuning and another method must share model, task, n and data seeds.")
        return doc
    doc.p("Each method arm minus vanilla FT on the same few-shot samples (same data seeds): mean difference in accuracy with its "
          "95 % t-interval over seeds, paired t-test and Wilcoxon signed-rank test. These per-cell intervals leave the eval-sampling "
          "error out (every seed is scored on the same examples); the claims above include it. Every pair of methods is in "
          "`csv/paired.csv`.")
    doc.table(["model", "task", "n", "eval set", "method", "vs", "mean diff [95% CI]", "t-test p", "Wilcoxon p", "pairs"],
              [[c.model, c.task, c.n, c.eval_set, c.arm_a, c.arm_b, _fmt_diff(c.test), fmt_p(c.test.t_p), fmt_p(c.test.w_p),
                str(c.test.n_pairs)] for c in comps])
    return doc


def _fmt_diff(t: st.PairedTest) -> str:
    if not math.isfinite(t.mean_diff):
        return "–"
    if not math.isfinite(t.ci_low):
        return f"{t.mean_diff:+.3f}"
    return f"{t.mean_diff:+.3f} [{t.ci_low:+.3f}, {t.ci_high:+.3f}]"


def gaps(ctx: Context) -> Doc:
    doc = Doc()
    doc.h(2, "ID vs OOD gap")
    gs = st.id_ood_gaps(ctx.rows, order=ctx.order)
    if not gs:
        doc.p("No run has both an ID and an OOD eval set.")
        return doc
    doc.p("ID accuracy minus OOD accuracy, per run, summarised over data seeds (positive: worse out of domain).")
    doc.table(["model", "task", "method", "n", "ID set", "OOD set", "ID", "OOD", "gap"],
              [[g.model, g.task, g.arm, g.n, g.id_set, g.ood_set, fmt_summary(g.id), fmt_summary(g.ood), fmt_summary(g.gap)] for g in gs])
    return doc


def resources(ctx: Context) -> Doc:
    doc = Doc()
    doc.h(2, "Resources")
    rows = resource_rows(ctx.rows, ctx.order)
    if rows:
        doc.p("Per run (means over runs): peak memory (CPU: process RSS high-water mark; GPU: max allocated), trainable and "
              "total parameters, training and evaluation wall time.")
        doc.table(["model", "task", "method", "n", "runs", "peak memory MB", "memory kind", "trainable params", "total params",
                   "train s", "eval s"], [r[:11] for r in rows])
    else:
        doc.p("No finished runs.")
    return doc


def warnings_section(ctx: Context) -> Doc:
    doc = Doc()
    doc.h(2, "Warnings")
    w = warnings(ctx.data, ctx.summary)
    doc.items(w) if w else doc.p("None.")
    return doc


def failed_runs(ctx: Context) -> Doc:
    doc = Doc()
    doc.h(2, "Failed runs")
    failed = [r for r in ctx.data.runs if r.status == "failed"]
    if not failed:
        doc.p("None.")
        return doc
    doc.table(["run id", "method", "task", "n", "seed", "attempts", "error"],
              [[r.run_id, r.config.get("method"), r.config.get("task"), r.config.get("n"), r.config.get("seed"), r.attempts,
                (r.error or "").splitlines()[0][:300] if r.error else ""] for r in failed])
    doc.p("Re-run them with `fewtune study CONFIG --out DIR --retry-failed` once the cause is fixed.")
    return doc


def study_config(ctx: Context) -> Doc:
    d, rows = ctx.data, ctx.rows
    counts = Counter(r.status for r in d.runs)
    model_names = list(dict.fromkeys(str((r.metrics or {}).get("model_name", r.config.get("model"))) for r in d.done))
    doc = Doc()
    doc.h(2, "Study config")
    doc.table(["", ""], [
        ["study", f"{d.name} ({d.source})" if d.source else d.name],
        ["generated", time.strftime("%Y-%m-%d %H:%M:%S %Z")],
        ["runs", f"{counts['done']} done, {counts['failed']} failed, {counts['pending'] + counts['running']} pending (of {len(d.runs)})"],
        ["models", ", ".join(model_names) or "–"],
        ["tasks", ", ".join(sorted({r.task for r in rows})) or "–"],
        ["methods", ", ".join(sorted({r.method for r in rows}, key=lambda m: st.method_rank(m, ctx.order))) or "–"],
        ["n per class", ", ".join(str(n) for n in sorted({r.n for r in rows if d.n_applies(r.method)})) or "–"],
        ["data seeds", ", ".join(str(s) for s in sorted({r.seed for r in rows})) or "–"],
        ["overrides", " ".join(f"--set {o}" for o in d.overrides) or "none"],
    ], caption="the study config as run (in full: study.yaml beside this report)")
    return doc


def method(ctx: Context) -> Doc:
    doc = Doc()
    add_method_section(doc, ctx.specs)
    return doc


def how_to_read(ctx: Context) -> Doc:
    doc = Doc()
    doc.h(2, "How to read this report")
    doc.items([
        "Each run is one few-shot sample (data seed) adapted by one method; its id is the hash of its fully resolved config "
        "(`runs/<id>/config.yaml`), per-example predictions are in `runs/<id>/predictions.jsonl`.",
        "n is per class (balanced sample) unless the run config sets `n_is_total`; n/a: the method does not use the sample (zero-shot).",
        "CI: two-sided 95 % t-interval of the mean over data seeds (undefined for a single run).",
        "Majority baseline: accuracy of always predicting the eval set's (subsample's) most frequent label; its MCC is 0.",
        "CSV exports: `csv/runs.csv` (one row per run × eval set, as `fewtune export` and `fewtune.results.load_runs` give it), "
        "`csv/summary.csv`, `csv/paired.csv`, `csv/gaps.csv`, `csv/claims.csv`, `csv/resources.csv`.",
    ])
    return doc
