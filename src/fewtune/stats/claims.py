"""Claims as data: one declarative spec per claim, evaluated by one generic function.

A study YAML lists its claims under ``claims:`` — either inline specs or the name of a bundled
claim file (``presets/claims/<name>.yaml``, e.g. ``claims: srinivasan2024``)::

    claims:
      - key: lora-not-worse
        statement: LoRA is at most 0.05 worse than vanilla fine-tuning.
        kind: non-inferiority        # direction | non-inferiority | equivalence | gap-equivalence
        methods: [lora]              # each compared with the reference
        reference: vanilla
        domains: [id, ood]
        margin: 0.05

Why each kind is tested the way it is:

- ``direction`` (A is higher/lower than B): one test per method × domain, a family corrected with
  Holm, so taking "the better of ID and OOD" cannot inflate the error rate. Supported when a
  Holm-adjusted test is significant in the claimed direction and none in the other.
- ``non-inferiority`` ("comparable to or slightly worse"): supported when the (1 − 2α) interval of
  A − B lies above −margin; contradicted when it lies below −margin; with ``upper_margin``, an
  interval above +upper_margin contradicts "comparable" from the other side.
- ``equivalence`` / ``gap-equivalence`` (of A − B, or of the ID − OOD gaps): TOST by interval —
  the (1 − 2α) interval inside ±margin. Every test of these kinds must pass (an intersection-union
  test), which needs no multiplicity correction.

Every interval is the union of the two-level bootstrap interval (seeds × eval examples,
``resample``) and the seed-level paired t-interval (``scipy.stats.ttest_rel``): the bootstrap adds
the eval-sampling error, the t-interval keeps the small-sample correction a percentile bootstrap
over 3–10 seeds lacks. p-values are the larger of the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from statsmodels.stats.multitest import multipletests

from fewtune import stats as st
from fewtune.errors import ConfigError
from fewtune.stats.resample import PairedBootstrap, Scores, Term, paired_bootstrap

Kind = Literal["direction", "non-inferiority", "equivalence", "gap-equivalence"]
CLAIM_FILES = "presets/claims"


class ClaimSpec(BaseModel):
    """One claim: what is compared, in which domains, by which test, with which margins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    statement: str
    kind: Kind
    methods: list[str]  # each compared with ``reference``; absent ones are named in the verdict
    reference: str
    domains: list[Literal["id", "ood"]] = ["id", "ood"]
    direction: Literal["higher", "lower"] | None = None
    margin: float | None = None
    upper_margin: float | None = None
    alpha: float = 0.05
    metric: Literal["accuracy"] = "accuracy"  # per-example outcomes exist for accuracy only
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> ClaimSpec:
        if self.kind == "direction" and self.direction is None:
            raise ValueError("a direction claim needs 'direction: higher' or 'direction: lower'")
        if self.kind != "direction" and (self.margin is None or self.margin <= 0):
            raise ValueError(f"a {self.kind} claim needs a positive 'margin'")
        if not 0 < self.alpha < 0.5:
            raise ValueError("'alpha' must be in (0, 0.5)")
        if not self.methods:
            raise ValueError("'methods' must name at least one method")
        return self

    def margins_text(self) -> str:
        if self.kind == "direction":
            return f"A {self.direction} than B, Holm-corrected α = {self.alpha}"
        if self.kind == "non-inferiority":
            up = f", and ≤ +{self.upper_margin:.2f}" if self.upper_margin is not None else ""
            return f"{100 * (1 - 2 * self.alpha):.0f} % CI of A − B > −{self.margin:.2f}{up}"
        what = "gap(A) − gap(B)" if self.kind == "gap-equivalence" else "A − B"
        return f"{100 * (1 - 2 * self.alpha):.0f} % CI of {what} inside ±{self.margin:.2f}"


def load_claims(value: Any, where: str = "study config") -> list[dict[str, Any]]:
    """Validated claim specs (as plain dicts) from a study's ``claims`` value: None, the name of a
    bundled claim file, or a list of specs and bundled names."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.extend(load_claims(_bundled(item, where), f"claim file '{item}'"))
            continue
        try:
            out.append(ClaimSpec.model_validate(item).model_dump(exclude_defaults=False))
        except ValidationError as e:
            msg = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'claim'}: {err['msg']}" for err in e.errors())
            raise ConfigError(f"{where}, claims[{i}] is not a valid claim: {msg}",
                              "see fewtune.stats.claims for the keys (key, statement, kind, methods, reference, domains, margin, …)") from None
    keys = [c["key"] for c in out]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"{where}: claim keys must be unique, repeated: {', '.join(dup)}")
    return out


def _bundled(name: str, where: str) -> Any:
    path = resources.files("fewtune").joinpath(CLAIM_FILES, f"{name}.yaml")
    if not path.is_file():
        avail = sorted(p.name.removesuffix(".yaml") for p in resources.files("fewtune").joinpath(CLAIM_FILES).iterdir())
        raise ConfigError(f"{where}: unknown claim file '{name}'", f"bundled claim files: {', '.join(avail)}; or write the specs inline")
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------------------------
# evaluation


@dataclass(frozen=True)
class ClaimTest:
    """One comparison behind a verdict: the two-level test of A − B (``stats.two_level_test``, at
    the claim's test level) and what the claim makes of it."""

    label: str
    test: st.TwoLevelTest  # at 1 − α for direction claims, 1 − 2α (TOST by interval) for the others
    p: float  # the p the verdict uses: the test's for direction claims, NaN for interval-only tests
    p_holm: float = math.nan
    outcome: str = ""


@dataclass(frozen=True)
class ClaimResult:
    key: str
    claim: str
    methods: tuple[str, ...]
    verdict: str  # supported | contradicted | not supported | inconclusive | mixed | not enough data
    reason: str
    tests: tuple[ClaimTest, ...] = ()
    caveats: tuple[str, ...] = ()
    test_text: str = ""
    scope: str = "pooled"  # "pooled" (every n and task), or the stratum of a breakdown: "n=16", "task=cola"
    strata: tuple[ClaimResult, ...] = ()  # the same claim per n and per task (when the study has several)


def _test(spec: ClaimSpec, label: str, boot: PairedBootstrap) -> ClaimTest:
    conf = 1 - spec.alpha if spec.kind == "direction" else 1 - 2 * spec.alpha
    t = st.two_level_test(boot, conf)
    return ClaimTest(label, t, t.p if spec.kind == "direction" and boot.units else math.nan)


def claim_tests(spec: ClaimSpec, rows: Sequence[st.EvalRow], scores: Mapping[str, Mapping[str, Scores]], methods: Sequence[str],
                replicates: int) -> list[ClaimTest]:
    """The claim's comparisons: per method × domain, or one gap comparison per method."""
    ref = spec.reference
    out = []
    for m in methods:
        if spec.kind == "gap-equivalence":
            side = lambda x: [Term(x, "id", 1.0), Term(x, "ood", -1.0)]  # noqa: E731
            label = f"gap({m}) − gap({ref}), ID−OOD {spec.metric}"
            out.append(_test(spec, label, paired_bootstrap(rows, scores, side(m), side(ref), replicates)))
        else:
            for d in spec.domains:
                label = f"{m} − {ref}, {d.upper()} {spec.metric}"
                out.append(_test(spec, label, paired_bootstrap(rows, scores, [Term(m, d)], [Term(ref, d)], replicates)))
    return out


def _interval_outcome(spec: ClaimSpec, t: ClaimTest) -> str:
    lo, hi, m = t.test.ci_low, t.test.ci_high, float(spec.margin or 0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "no CI"
    if spec.kind == "non-inferiority":
        if spec.upper_margin is not None and lo > spec.upper_margin:
            return f"contradicts: clearly better (CI above +{spec.upper_margin:.2f})"
        if hi < -m:
            return f"contradicts: clearly worse (CI below −{m:.2f})"
        return "non-inferior" if lo > -m else f"CI reaches below −{m:.2f}: more seeds or examples needed"
    if -m <= lo and hi <= m:
        return "within margin"
    if lo > m:
        return f"contradicts: clearly higher (CI above +{m:.2f})"
    if hi < -m:
        return f"contradicts: clearly lower (CI below −{m:.2f})"
    return f"CI exceeds ±{m:.2f}: more seeds or examples needed"


def decide(spec: ClaimSpec, tests: Sequence[ClaimTest]) -> tuple[str, list[ClaimTest]]:
    """Verdict from the usable tests; direction claims are Holm-corrected over the family."""
    if spec.kind != "direction":
        done = [_with(t, outcome=_interval_outcome(spec, t)) for t in tests]
        outs = [t.outcome for t in done]
        if any(o.startswith("contradicts") for o in outs):
            return "contradicted", done
        ok = "non-inferior" if spec.kind == "non-inferiority" else "within margin"
        return ("supported" if all(o == ok for o in outs) else "inconclusive"), done
    reject, p_adj, _, _ = multipletests([t.p for t in tests], alpha=spec.alpha, method="holm")
    done = []
    for t, rej, pa in zip(tests, reject, p_adj):
        d = ("higher" if t.test.diff > 0 else "lower") if rej else "no significant difference"
        done.append(_with(t, p_holm=float(pa), outcome=d))
    claimed = [t for t in done if t.outcome == spec.direction]
    other = [t for t in done if t.outcome not in (spec.direction, "no significant difference")]
    verdict = {(True, False): "supported", (False, True): "contradicted", (True, True): "mixed"}.get((bool(claimed), bool(other)), "not supported")
    return verdict, done


def _with(t: ClaimTest, **kw: Any) -> ClaimTest:
    return replace(t, **kw)


def fmt_test(c: ClaimTest) -> str:
    """'+0.031 [−0.004, +0.066] (seed-only t [+0.010, +0.052]), p=0.08, Holm p=0.16, 12 samples / 3 seeds'."""
    t = c.test
    if not t.n_pairs:
        return "no paired samples"
    seed = f"seed-only t [{t.t_low:+.3f}, {t.t_high:+.3f}]" if math.isfinite(t.t_low) else (t.t_note or "seed-only t undefined")
    p = f", p={c.p:.3g}" if math.isfinite(c.p) else ""
    holm = f", Holm p={c.p_holm:.3g}" if math.isfinite(c.p_holm) else ""
    fixed = f"; no predictions for {', '.join(t.boot.fixed_sets)}: eval-sampling error left out there" if t.boot.fixed_sets else ""
    return (f"{t.diff:+.3f} [{t.ci_low:+.3f}, {t.ci_high:+.3f}] ({seed}){p}{holm}, "
            f"{t.n_pairs} samples / {t.boot.seeds} seeds{fixed}")


def _caveats(spec: ClaimSpec, rows: Sequence[st.EvalRow], methods: Sequence[str], failed: Mapping[str, int]) -> list[str]:
    """Failed and collapsed runs of the compared methods, and methods mostly at the baseline."""
    out = []
    lost = {m: failed.get(m, 0) for m in methods if failed.get(m, 0)}
    if lost:
        out.append("failed runs are not in this comparison: " + ", ".join(f"{m} {c}" for m, c in lost.items())
                   + " (a method that fails more often looks better than it is)")
    coll: dict[str, set[str]] = {}
    for r in rows:
        if r.method in methods and r.domain in spec.domains and r.collapsed:
            coll.setdefault(r.method, set()).add(r.run_id)
    if coll:
        out.append("collapsed runs (one predicted label, or flagged by the runner) are included: "
                   + ", ".join(f"{m} {len(v)}" for m, v in coll.items()))
    out.extend(f"most {m} results ({a}/{n}) are indistinguishable from the majority baseline / chance, so this comparison says "
               "little about the method" for m, (a, n) in st.at_baseline_methods(rows, methods, None).items())
    return out


def evaluate_claim(spec: ClaimSpec | Mapping[str, Any], rows: Sequence[st.EvalRow], scores: Mapping[str, Mapping[str, Scores]],
                   failed: Mapping[str, int] | None = None, replicates: int = 2000, breakdown: bool = True) -> ClaimResult:
    """The one generic evaluator: any claim spec against a study's rows and per-example scores.

    ``failed`` counts failed runs per method (they have no rows; the verdict says they are missing).
    With ``breakdown``, the result also holds the claim's verdict per n and per task (``strata``).
    """
    spec = spec if isinstance(spec, ClaimSpec) else ClaimSpec.model_validate(spec)
    pooled = _evaluate(spec, rows, scores, failed or {}, replicates)
    return replace(pooled, strata=_strata(spec, rows, scores, replicates)) if breakdown else pooled


def _strata(spec: ClaimSpec, rows: Sequence[st.EvalRow], scores: Mapping[str, Mapping[str, Scores]],
            replicates: int) -> tuple[ClaimResult, ...]:
    """The claim per n and per task, where the compared methods' runs span several.

    Why: a pooled mean over every n and task lets opposite effects cancel (ICL ahead at small n,
    fine-tuning at large n, say). These are uncorrected breakdowns of the pooled verdict, to read
    where an effect comes from, not additional claims.
    """
    mine = [r for r in rows if r.method in (*spec.methods, spec.reference)]
    out = []
    for axis in ("n", "task"):
        values = sorted({getattr(r, axis) for r in mine})
        if len(values) < 2:
            continue
        for v in values:
            sub = [r for r in mine if getattr(r, axis) == v]
            out.append(replace(_evaluate(spec, sub, scores, {}, replicates, caveats=False), scope=f"{axis}={v}"))
    return tuple(out)


def _evaluate(spec: ClaimSpec, rows: Sequence[st.EvalRow], scores: Mapping[str, Mapping[str, Scores]],
              failed: Mapping[str, int], replicates: int, caveats: bool = True) -> ClaimResult:
    present = {r.method for r in rows}
    all_methods = (*spec.methods, spec.reference)
    have = [m for m in spec.methods if m in present]
    missing = [m for m in all_methods if m not in present]
    notes = tuple(_caveats(spec, rows, [m for m in all_methods if m in present or failed.get(m)], failed)) if caveats else ()
    base = dict(key=spec.key, claim=spec.statement, methods=all_methods, caveats=notes, test_text=spec.margins_text())
    if spec.reference not in present or not have:
        return ClaimResult(verdict="not enough data", reason="no finished runs of " + ", ".join(missing), **base)
    tests = claim_tests(spec, rows, scores, have, replicates)
    usable = [t for t in tests if t.test.enough]
    if not usable:
        return ClaimResult(verdict="not enough data", tests=tuple(tests), **base,
                           reason=f"fewer than {st.MIN_PAIRS} paired few-shot samples from {st.MIN_SEEDS} or more data seeds "
                           "(methods must share models, tasks, n and data seeds)")
    verdict, done = decide(spec, usable)
    parts = [f"{t.label}: {fmt_test(t)} → {t.outcome}" for t in done]
    parts += [f"{t.label}: not enough data" for t in tests if not t.test.enough]
    parts += [f"{m}: no finished runs" for m in missing]
    reason = "; ".join(parts)
    at_base = st.at_baseline_methods(rows, [m for m in all_methods if m in present], None)
    if verdict != "not enough data" and set(at_base) == {m for m in all_methods if m in present}:
        reason = (f"every compared method is mostly at the majority baseline / chance, so the data cannot speak to this claim "
                  f"(would otherwise be: {verdict}). {reason}")
        verdict = "inconclusive"
    return ClaimResult(verdict=verdict, reason=reason, tests=tuple(done + [t for t in tests if not t.test.enough]), **base)


def evaluate_claims(specs: Sequence[ClaimSpec | Mapping[str, Any]], rows: Sequence[st.EvalRow],
                    scores: Mapping[str, Mapping[str, Scores]] | None = None, failed: Mapping[str, int] | None = None,
                    replicates: int = 2000) -> list[ClaimResult]:
    return [evaluate_claim(s, rows, scores or {}, failed, replicates) for s in specs]
