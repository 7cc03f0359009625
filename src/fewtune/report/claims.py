"""The report's claims section, its statement of the statistical method, and the claims CSV.

These blocks only need the claim
results and a document object with ``h``/``p``/``items``/``table`` (``report.Doc``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from fewtune import stats as st
from fewtune.stats.claims import ClaimResult, ClaimSpec
from fewtune.stats.resample import BOOTSTRAP_REPLICATES


class DocLike(Protocol):
    def h(self, level: int, text: str) -> None: ...
    def p(self, text: str) -> None: ...
    def items(self, items: Sequence[str]) -> None: ...
    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> None: ...


def _f(x: float, fmt: str = "+.3f") -> str:
    return format(x, fmt) if math.isfinite(x) else "–"


def add_claims_section(doc: DocLike, specs: Sequence[ClaimSpec], claims: Sequence[ClaimResult]) -> None:
    doc.h(2, "Claims of the study")
    if not specs:
        doc.p("This study declares no claims. Add a `claims:` list to the study YAML (e.g. `claims: [srinivasan2024]`, the "
              "claims of Srinivasan et al. 2024 and Mosbach et al. 2023, or your own specs; see `fewtune/stats/claims.py`).")
        return
    doc.p("Each claim declared by the study config, tested on this study's runs (method: see 'Statistical method'). "
          "A is the compared method, B the reference. " + SEPARATE)
    doc.table(["claim", "methods (A…; B)", "test", "verdict (pooled)", "per n and per task", "evidence"],
              [[c.claim, ", ".join(c.methods[:-1]) + "; " + c.methods[-1], c.test_text, c.verdict,
                " · ".join(f"{s.scope}: {s.verdict}" for s in c.strata) or "–", c.reason] for c in claims])
    strata = [[c.key, s.scope, s.verdict, s.reason] for c in claims for s in c.strata]
    if strata:
        doc.table(["claim", "only", "verdict", "evidence"], strata,
                  caption="the claims per n and per task (uncorrected breakdowns of the pooled verdicts)")
    rows = []
    for c in claims:
        for ct in c.tests:
            t, b = ct.test, ct.test.boot
            rows.append([c.key, ct.label, _f(b.diff), f"[{_f(t.ci_low)}, {_f(t.ci_high)}]", f"[{_f(t.t_low)}, {_f(t.t_high)}]",
                         _f(b.se("seed_only"), ".3f"), _f(b.se("eval_only"), ".3f"), _f(b.se("total"), ".3f"),
                         _f(ct.p, ".3g"), _f(ct.p_holm, ".3g"), f"{t.n_pairs} / {b.seeds}", str(b.examples), ct.outcome or "not enough data"])
    if rows:
        doc.table(["claim", "comparison", "A − B", "CI (verdict)", "seed-only t CI", "SE seeds", "SE eval", "SE both", "p",
                   "Holm p", "samples / seeds", "eval examples", "outcome"], rows,
                  caption="the claims' comparisons: both sources of variance (bootstrap standard errors)")
    doc.items([f"{c.key}: {cv}" for c in claims for cv in c.caveats])


SEPARATE = ("The claims are separate hypotheses, each tested at its own α: no correction is applied across claims. The "
            "verdict pools every n and task the compared methods share, which can hide opposite effects (one method ahead at "
            "small n, the other at large n), so each claim also gets a verdict per n and per task; those breakdowns are "
            "uncorrected and say where an effect comes from, they are not further claims.")


def add_method_section(doc: DocLike, specs: Sequence[ClaimSpec]) -> None:
    doc.h(2, "Statistical method")
    margins = [f"{s.key}: {s.kind}, {s.margins_text()}" for s in specs]
    doc.items([
        "Unit of replication: one few-shot sample = (model, task, n, data seed). A method's value for a sample and domain "
        "(ID/OOD) is its accuracy averaged over that domain's eval sets (e.g. cola-id and cola-glue-dev) and over the "
        "method's arms (e.g. LoRA ranks): two eval sets of one domain are never counted as two pairs.",
        "Paired on examples: the compared runs of a sample are scored on the examples none of them skipped (the "
        "intersection of their non-skipped examples).",
        f"Two sources of variance: a paired bootstrap ({BOOTSTRAP_REPLICATES} replicates, seeded) resamples the eval "
        "examples of every eval set (the same resample for every run and both methods) and the few-shot samples within each "
        "(model, task, n). 'SE seeds' resamples samples only, 'SE eval' examples only, 'SE both' both. Eval sets without "
        "per-example predictions keep their stored accuracy (their sampling error is then left out, and said so).",
        "Intervals: the verdict uses the union of the two-level bootstrap percentile interval and the seed-level paired "
        "t-interval (scipy.stats.ttest_rel): the bootstrap adds eval-sampling error, the t-interval keeps the small-sample "
        "correction that a bootstrap over few seeds lacks. p = the larger of the bootstrap and t-test p.",
        "Direction claims: one test per method × domain, Holm-corrected over the claim's tests (statsmodels multipletests); "
        "supported when a corrected test is significant in the claimed direction and none in the other.",
        "Non-inferiority / equivalence claims: the (1 − 2α) interval (TOST by interval) must lie above −margin "
        "(non-inferiority) or inside ±margin (equivalence); every test of the claim must pass.",
        *[f"Claim {m}" for m in margins],
        SEPARATE,
        f"A claim needs ≥ {st.MIN_PAIRS} paired samples from ≥ {st.MIN_SEEDS} data seeds, else 'not enough data'; when every "
        "compared method is mostly at the majority baseline the verdict is 'inconclusive'.",
        "Failed runs have no result and are left out of every statistic; each results cell and each claim states how many "
        "runs failed. Collapsed runs (every prediction on one label, or flagged by the runner) are kept — a collapse is a "
        "real outcome of the method — and marked ⚠ in the tables and named in the claims.",
        "Which method: per model × task × n and domain, the best mean is compared with every other arm by the same "
        "two-level test (union interval, larger p), Holm-corrected over those comparisons (statsmodels multipletests); the "
        "arms not significantly worse than the best are tied for the lead ('winner' only when one arm remains), and the "
        "least-memory and fewest-parameter recommendations are picked from them. 'Not distinguishable at this sample "
        "size' is not equivalence (declare an equivalence claim with a margin for that). Plots show 95 % CI whiskers over "
        "data seeds; the Pareto front is drawn through the means.",
        "Results tables and per-cell paired comparisons: 95 % t-intervals over data seeds only (no eval-sampling error); "
        "'≈ baseline' uses the larger of that interval and the Wilson interval (scipy binomtest) of a constant predictor.",
    ])


CLAIMS_CSV_HEADER = ["claim", "statement", "kind", "methods", "verdict", "reason", "comparison", "samples", "seeds", "mean_diff",
                     "ci_low", "ci_high", "t_ci_low", "t_ci_high", "se_seed", "se_eval", "se_total", "p", "p_holm", "outcome", "scope"]


def claims_csv_rows(claims: Sequence[ClaimResult], specs: Mapping[str, ClaimSpec]) -> list[list[Any]]:
    """One row per comparison of each claim, pooled (scope 'pooled') and per n / per task."""
    out: list[list[Any]] = []
    for c in (x for claim in claims for x in (claim, *claim.strata)):
        head = [c.key, c.claim, specs[c.key].kind if c.key in specs else "", " ".join(c.methods), c.verdict, c.reason]
        if not c.tests:
            out.append([*head, "", 0, 0, *[None] * 11, c.scope])
        for ct in c.tests:
            t, b = ct.test, ct.test.boot
            out.append([*head, ct.label, t.n_pairs, b.seeds, b.diff, t.ci_low, t.ci_high, t.t_low, t.t_high, b.se("seed_only"),
                        b.se("eval_only"), b.se("total"), ct.p, ct.p_holm, ct.outcome, c.scope])
    return out
