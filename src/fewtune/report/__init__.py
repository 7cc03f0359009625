"""The study report: ``report.md`` and a self-contained ``report.html`` (the same Markdown rendered,
plots embedded), the plots beside them in ``figures/`` and CSV exports in ``csv/``.

Why a generated report: a study's numbers are only useful with their spread over few-shot samples,
their baselines, their costs and their caveats. The report answers the user's question first
(``## Which method``: per model × task, accuracy in and out of domain against memory, parameters
and time, with a recommendation that says when the data cannot decide), then gives the evidence.
Every number comes from ``fewtune.results.load_runs``, the loader users and ``fewtune export`` share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fewtune.atomic import write_atomic
from fewtune.report import sections as s
from fewtune.report.context import CSV_DIR, FIGURES_DIR, Context, build_context, claim_specs
from fewtune.report.csvs import write_csvs
from fewtune.report.data import StudyData, load_study_data
from fewtune.report.doc import Doc, render_html, render_markdown
from fewtune.report.which import which_method

# In reading order: the answer, then the evidence, then the caveats and the set-up.
SECTIONS: list[Callable[[Context], Doc]] = [
    which_method, s.claims, s.results, s.gaps, s.resources, s.plots, s.breakdowns, s.paired, s.warnings_section,
    s.failed_runs, s.study_config, s.method, s.how_to_read,
]


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    html: Path
    csv_dir: Path
    figures_dir: Path
    figures: tuple[Path, ...] = ()
    csvs: tuple[Path, ...] = ()


def build_report(data: StudyData, study_dir: Path, margin: float | None = None) -> tuple[Doc, Context]:
    """Assemble the document section by section; figures and CSVs are written on the way."""
    ctx = build_context(data, study_dir, margin)
    doc = Doc()
    doc.h(1, f"Study report: {data.name}")
    if data.description:
        doc.p(data.description)
    for section in SECTIONS:
        doc += section(ctx)
    ctx.csvs = write_csvs(ctx) + ctx.csvs
    return doc, ctx


def write_report(study_dir: Path | str, margin: float | None = None) -> ReportPaths:
    """Write ``report.md``, ``report.html``, ``figures/*.png`` and ``csv/*.csv`` into the study dir."""
    d = Path(study_dir)
    data = load_study_data(d)
    doc, ctx = build_report(data, d, margin=margin)
    md, page = d / "report.md", d / "report.html"
    text = render_markdown(doc)
    write_atomic(md, text.encode())
    write_atomic(page, render_html(text, f"fewtune study report: {data.name}", d).encode())
    return ReportPaths(md, page, ctx.csv_dir, ctx.fig_dir, tuple(ctx.figures), tuple(ctx.csvs))


__all__ = ["CSV_DIR", "FIGURES_DIR", "SECTIONS", "ReportPaths", "StudyData", "build_report", "claim_specs", "load_study_data", "render_html",
           "render_markdown", "write_report"]
