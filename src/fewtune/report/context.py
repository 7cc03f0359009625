"""The statistics every section shares, computed once per report (``Context``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fewtune import stats as st
from fewtune.report.data import StudyData, failed_counts
from fewtune.stats.claims import ClaimResult, ClaimSpec, evaluate_claims

FIGURES_DIR = "figures"
CSV_DIR = "csv"


@dataclass
class Context:
    data: StudyData
    fig_dir: Path
    csv_dir: Path
    order: list[str]
    summary: list[st.SummaryRow]
    pairs: list[st.Comparison]  # every pair of arms per (model, task, n, eval set)
    specs: list[ClaimSpec]
    claims: list[ClaimResult]
    failed: dict[tuple[str, str, str, int], int]
    collapsed: dict[tuple[str, int, str], int]
    figures: list[Path] = field(default_factory=list)  # written by the sections, in document order
    csvs: list[Path] = field(default_factory=list)

    @property
    def rows(self) -> list[st.EvalRow]:
        return self.data.rows

    def models_tasks(self) -> list[tuple[str, str]]:
        """(model, task) pairs with results; models in the study's order (e.g. a size sweep), tasks sorted."""
        models = list(dict.fromkeys(r.model for r in self.rows))
        return [(m, t) for m in models for t in sorted({r.task for r in self.rows if r.model == m})]


def claim_specs(data: StudyData, margin: float | None) -> list[ClaimSpec]:
    """The study's claims; ``margin`` (``fewtune report --margin``) replaces every claim's margin."""
    if margin is None:
        return data.claims
    return [s.model_copy(update={"margin": margin}) if s.kind != "direction" else s for s in data.claims]


def build_context(data: StudyData, study_dir: Path, margin: float | None = None) -> Context:
    rows, order = data.rows, data.method_order
    specs = claim_specs(data, margin)
    failed_by_method: dict[str, int] = defaultdict(int)
    for r in data.runs:
        if r.status == "failed":
            failed_by_method[str(r.config.get("method"))] += 1
    collapsed: dict[tuple[str, int, str], int] = defaultdict(int)
    for r in rows:
        if r.collapsed:
            collapsed[(r.arm, r.n, r.eval_set)] += 1
    return Context(data, study_dir / FIGURES_DIR, study_dir / CSV_DIR, order, st.summary_table(rows, order=order),
                   st.paired_comparisons(rows, None, "accuracy", order), specs,
                   evaluate_claims(specs, rows, data.scores, failed_by_method), failed_counts(data), dict(collapsed))
