"""The report's CSV exports (``csv/``): the tables behind the document, for spreadsheets and scripts.
``runs.csv`` is ``fewtune.results.load_runs`` as it is (the same rows ``fewtune export`` writes)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fewtune import stats as st
from fewtune.atomic import write_atomic
from fewtune.report.claims import CLAIMS_CSV_HEADER, claims_csv_rows
from fewtune.report.context import Context
from fewtune.report.tables import resource_rows


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if (isinstance(x, float) and not math.isfinite(x)) or x is None else x for x in r])
    write_atomic(path, buf.getvalue().encode())
    return path


def write_csvs(ctx: Context) -> list[Path]:
    d = ctx.csv_dir
    frame = ctx.data.frame
    gaps = st.id_ood_gaps(ctx.rows, order=ctx.order)
    return [
        write_csv(d / "runs.csv", list(frame.columns), frame.itertuples(index=False)),
        write_csv(d / "summary.csv", ["model", "task", "method", "arm", "n", "eval_set", "domain", "metric", "runs", "mean", "std",
                                      "ci_low", "ci_high", "min", "max", "baseline", "at_baseline", "seeds"],
                  [[r.model, r.task, r.method, r.arm, "" if r.n is None else r.n, r.eval_set, r.domain, r.metric, r.stats.count,
                    r.stats.mean, r.stats.std, r.stats.ci_low, r.stats.ci_high, r.stats.min, r.stats.max, r.baseline, r.at_baseline,
                    " ".join(map(str, r.seeds))] for r in ctx.summary]),
        write_csv(d / "paired.csv", ["model", "task", "n", "eval_set", "domain", "metric", "arm_a", "arm_b", "pairs", "mean_diff",
                                     "std_diff", "ci_low", "ci_high", "t_stat", "t_p", "wilcoxon_stat", "wilcoxon_p", "note"],
                  [[c.model, c.task, c.n, c.eval_set, c.domain, c.metric, c.arm_a, c.arm_b, c.test.n_pairs, c.test.mean_diff,
                    c.test.std_diff, c.test.ci_low, c.test.ci_high, c.test.t_stat, c.test.t_p, c.test.w_stat, c.test.w_p, c.test.note]
                   for c in ctx.pairs]),
        write_csv(d / "gaps.csv", ["model", "task", "method", "arm", "n", "id_set", "ood_set", "runs", "id_mean", "ood_mean", "gap_mean",
                                   "gap_std", "gap_ci_low", "gap_ci_high"],
                  [[g.model, g.task, g.method, g.arm, g.n, g.id_set, g.ood_set, g.gap.count, g.id.mean, g.ood.mean, g.gap.mean,
                    g.gap.std, g.gap.ci_low, g.gap.ci_high] for g in gaps]),
        write_csv(d / "claims.csv", CLAIMS_CSV_HEADER, claims_csv_rows(ctx.claims, {c.key: c for c in ctx.specs})),
        write_csv(d / "resources.csv", ["model", "task", "method", "n", "runs", "peak_memory_mb", "memory_kind", "trainable_params",
                                        "total_params", "train_seconds", "eval_seconds"], [r[11] for r in resource_rows(ctx.rows, ctx.order)]),
    ]

