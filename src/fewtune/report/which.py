"""``## Which method``: the report's answer first. Per model × task, one table of every method arm
with its accuracy in and out of domain, its costs and its place on the accuracy/memory Pareto
front, then per n the arms tied for the lead and a recommendation per budget among them.

Why "tied for the lead" rather than "the best": the best of many noisy means is biased upwards
(winner's curse). Every statement here uses the claims' uncertainty model (two-level paired
bootstrap over seeds × eval examples, union with the seed-level t-interval; ``stats.two_level_test``)
and the lead is a multiple comparison with the best (``stats.leaders``, Holm).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fewtune import stats as st
from fewtune.report.context import Context
from fewtune.report.data import report_metrics
from fewtune.report.doc import Doc, fmt_n, fmt_p, fmt_summary
from fewtune.report.tables import eval_sets_ordered


@dataclass
class ArmResult:
    arm: str
    method: str
    n: int
    n_applies: bool
    id: st.SummaryRow | None
    ood: st.SummaryRow | None
    mcc: st.SummaryRow | None
    memory: float
    trainable: float
    train_s: float
    eval_s: float
    chosen: str = ""
    pareto: bool = False
    # per domain: "winner" (alone in the lead), "tied" (tied for the lead), "" (significantly below the best)
    lead: dict[str, str] = field(default_factory=dict)

    def cell(self, domain: str) -> st.SummaryRow | None:
        return self.id if domain == "id" else self.ood

    def mean(self, domain: str) -> float:
        c = self.cell(domain)
        return c.stats.mean if c is not None and c.stats.count else math.nan


def _mean(values: Sequence[float | None]) -> float:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else math.nan


def _chosen(ctx: Context, model: str, task: str, arm: str, n: int) -> str:
    """The hyper-parameters a selection rule chose (metrics.json ``selection.chosen``), over seeds."""
    f = ctx.data.frame
    sel = f[(f["model"] == model) & (f["task"] == task) & (f["arm"] == arm) & (f["n"] == n) & f["selection"].notna()]
    per_run = sel.drop_duplicates("run_id")["selection"]
    counts = Counter(", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (json.loads(s) or {}).items())
                     for s in per_run)
    return "; ".join(f"{k} ({c} of {len(per_run)} runs)" if len(counts) > 1 else k for k, c in counts.most_common())


def arm_results(ctx: Context, model: str, task: str, id_set: str | None, ood_set: str | None) -> list[ArmResult]:
    """One ArmResult per (arm, n) of the model × task, costs averaged over its runs."""
    def cell(arm: str, n: int, es: str | None, metric: str = "accuracy") -> st.SummaryRow | None:
        return next((s for s in ctx.summary if s.model == model and s.task == task and s.arm == arm and s.n == n
                     and s.eval_set == es and s.metric == metric), None)

    runs: dict[str, st.EvalRow] = {}
    for r in ctx.rows:
        if r.model == model and r.task == task:
            runs.setdefault(r.run_id, r)
    keys = sorted({(r.method, r.arm, r.n) for r in runs.values()},
                  key=lambda k: (k[2], st.method_rank(k[0], ctx.order), st.arm_sort(k[1])))
    out = []
    for method, arm, n in keys:
        rs = [r for r in runs.values() if r.arm == arm and r.n == n]
        out.append(ArmResult(arm, method, n, ctx.data.n_applies(method), cell(arm, n, id_set), cell(arm, n, ood_set),
                             cell(arm, n, id_set, "mcc") if "mcc" in report_metrics(task) else None,
                             _mean([r.peak_memory_mb for r in rs]), _mean([r.trainable_params for r in rs]),
                             _mean([r.train_seconds for r in rs]), _mean([r.eval_seconds for r in rs]),
                             _chosen(ctx, model, task, arm, n)))
    return out


def mark_pareto(arms: Sequence[ArmResult], domain: str) -> None:
    """Pareto-optimal in (peak memory ↓, accuracy ↑) among the arms of one n."""
    for n in {a.n for a in arms}:
        group = [a for a in arms if a.n == n]
        for a, front in zip(group, st.pareto_front([a.memory for a in group], [a.mean(domain) for a in group])):
            a.pareto = front


def _se(t: st.TwoLevelTest) -> str:
    return f"SE over seeds {t.boot.se('seed_only'):.3f}, over seeds × eval examples {t.boot.se('total'):.3f}"


def fmt_vs(v: st.VsBest, other: ArmResult, domain: str) -> str:
    """'lora (0.795; best − it +0.005 [−0.020, +0.031], p=0.62, Holm p=1; SE …)': the two-level test."""
    t = v.test
    if not t.enough:
        return (f"{other.arm} ({other.mean(domain):.3f}; no paired test possible: {t.n_pairs} shared few-shot samples from "
                f"{t.boot.seeds} data seeds, at least {st.MIN_PAIRS} from {st.MIN_SEEDS} are needed)")
    note = f"; {t.t_note}" if t.t_note else ""
    return (f"{other.arm} ({other.mean(domain):.3f}; best − it {t.diff:+.3f} [{t.ci_low:+.3f}, {t.ci_high:+.3f}], "
            f"p={fmt_p(t.p)}, Holm p={fmt_p(v.p_holm)}; {_se(t)}{note})")


def _none_beats_baseline(arms: Sequence[ArmResult], domain: str) -> bool:
    """No arm is significantly above the majority baseline (each is indistinguishable from it, or below)."""
    cells = [a.cell(domain) for a in arms if a.cell(domain) is not None and a.cell(domain).stats.count]
    return bool(cells) and all(c.at_baseline or c.stats.mean <= c.baseline for c in cells)


def _domain(arms: Sequence[ArmResult], sets: dict[str, str | None], lines: list[str]) -> str | None:
    """OOD where any arm beats the baseline there, else ID; None when no arm beats it anywhere."""
    domains = [d for d in ("ood", "id") if sets[d] and any(math.isfinite(a.mean(d)) for a in arms)]
    if not domains or all(_none_beats_baseline(arms, d) for d in domains):
        return None
    if _none_beats_baseline(arms, domains[0]) and len(domains) > 1:
        lines.append(f"Out of domain ({sets[domains[0]]}) no method beats the majority baseline (or chance); ranked by "
                     "in-domain accuracy instead.")
        return domains[1]
    return domains[0]


def _lead_line(lead: st.Leaders, by_arm: dict[str, ArmResult], label: str, domain: str) -> list[str]:
    best = by_arm[lead.best]
    tied = [v for v in lead.vs_best if not v.worse]
    worse = [v for v in lead.vs_best if v.worse]
    if not tied:
        head = f"Best {label} accuracy: **{best.arm}** ({best.mean(domain):.3f})"
        if not worse:
            return [head + "; the only arm with a result."]
        return [head + ", significantly above every other arm (two-level tests, Holm-corrected); closest: "
                + fmt_vs(worse[0], by_arm[worse[0].arm], domain) + "."]
    lines = [f"Tied for the lead in {label} accuracy, **not distinguishable at this sample size** (two-level tests against the "
             f"best mean, Holm-corrected): {best.arm} ({best.mean(domain):.3f}, best mean), "
             + ", ".join(fmt_vs(v, by_arm[v.arm], domain) for v in tied) + "."]
    if worse:
        lines.append("Significantly below the best mean: " + ", ".join(fmt_vs(v, by_arm[v.arm], domain) for v in worse) + ".")
    return lines


def _budget_lines(lead: st.Leaders, by_arm: dict[str, ArmResult], domain: str) -> list[str]:
    """Least memory / fewest trainable parameters among the arms tied for the lead."""
    best, tied = by_arm[lead.best], [by_arm[a] for a in lead.tied]
    out = []
    for attr, what, unit in (("memory", "least memory", " MB"), ("trainable", "fewest trainable parameters", "")):
        cands = [a for a in tied if math.isfinite(getattr(a, attr))]
        if not cands:
            continue
        pick = min(cands, key=lambda a: getattr(a, attr))
        head = f"{what.capitalize()} among the arms tied for the lead"
        if len(tied) == 1:
            out.append(f"{head}: the winner itself ({best.arm}).")
        elif pick is best or getattr(pick, attr) >= getattr(best, attr):
            out.append(f"{head}: {best.arm}, the best mean itself.")
        else:
            out.append(f"{head}: {pick.arm} ({getattr(pick, attr):,.0f}{unit} vs {getattr(best, attr):,.0f}{unit} for "
                       f"{best.arm}, the best mean; {pick.mean(domain):.3f} vs {best.mean(domain):.3f}, not distinguishable "
                       "at this sample size).")
    return out


def _leaders(ctx: Context, model: str, task: str, arms: Sequence[ArmResult], domain: str, es: str) -> st.Leaders | None:
    """The arms tied for the lead at one n on eval set ``es``; marks ``lead[domain]`` on the arms."""
    rows = [r for r in ctx.rows if r.model == model and r.task == task and r.n == arms[0].n and r.eval_set == es]
    lead = st.leaders(rows, ctx.data.scores, {(a.method, a.arm): a.mean(domain) for a in arms}, domain)
    for a in arms:
        if lead is not None and math.isfinite(a.mean(domain)):
            a.lead[domain] = ("winner" if len(lead.tied) == 1 else "tied") if a.arm in lead.tied else ""
    return lead


def recommend(ctx: Context, model: str, task: str, arms: Sequence[ArmResult], sets: dict[str, str | None]) -> list[str]:
    """The recommendation for one n: the arms tied for the lead per domain (multiple comparison with
    the best, two-level tests), and per budget the cheapest of them in the deciding domain (OOD
    where some method beats the baseline there). Marks ``lead`` on the arms."""
    lines: list[str] = []
    domain = _domain(arms, sets, lines)
    if domain is None:
        if any(sets[d] and any(math.isfinite(a.mean(d)) for a in arms) for d in ("ood", "id")):
            return [(f"None of these beats the majority baseline at this n and model ({model}): every method is within noise of "
                     "always predicting the most frequent label. More examples or a larger model.")]
        return []
    by_arm = {a.arm: a for a in arms}
    for d in [domain, *(d for d in ("ood", "id") if d != domain and sets[d])]:
        lead = _leaders(ctx, model, task, arms, d, str(sets[d]))
        if lead is not None:
            lines += _lead_line(lead, by_arm, d.upper(), d) + (_budget_lines(lead, by_arm, d) if d == domain else [])
    return lines


def _fmt(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else "–"


def _table(doc: Doc, task: str, arms: Sequence[ArmResult], sets: dict[str, str | None]) -> None:
    has_mcc, has_chosen = any(a.mcc for a in arms), any(a.chosen for a in arms)
    header = ["method", "n", f"ID accuracy ({sets['id'] or '–'})", f"OOD accuracy ({sets['ood'] or '–'})",
              *([f"ID MCC ({sets['id']})"] if has_mcc else []), "peak memory MB", "trainable params", "train s", "eval s",
              "Pareto", *[f"lead ({d.upper()})" for d in ("id", "ood") if sets[d]], *(["chosen (selection)"] if has_chosen else [])]
    rows = []
    for a in arms:
        acc = [fmt_summary(c.stats) + (" ≈" if c.at_baseline else "") if c else "–" for c in (a.id, a.ood)]
        rows.append([a.arm, fmt_n(a.n, a.n_applies), *acc, *([fmt_summary(a.mcc.stats) if a.mcc else "–"] if has_mcc else []),
                     _fmt(a.memory, ".0f"), _fmt(a.trainable, ",.0f"), _fmt(a.train_s, ".1f"), _fmt(a.eval_s, ".1f"),
                     "★" if a.pareto else "", *[a.lead.get(d, "") for d in ("id", "ood") if sets[d]],
                     *([a.chosen or "–"] if has_chosen else [])])
    doc.table(header, rows, caption=f"{task}: methods at a glance")


def models_side_by_side(doc: Doc, task: str, by_model: dict[str, list[ArmResult]], domain: str) -> None:
    """One row per method arm and n, one column per model: the same question asked of each model size."""
    models = list(by_model)
    keys = list(dict.fromkeys((a.arm, a.n, a.n_applies) for arms in by_model.values() for a in arms))
    rows = []
    for arm, n, applies in keys:
        line = [arm, fmt_n(n, applies)]
        for m in models:
            a = next((a for a in by_model[m] if a.arm == arm and a.n == n), None)
            c = a.cell(domain) if a else None
            line.append(f"{fmt_summary(c.stats)} · {_fmt(a.memory, '.0f')} MB" if c is not None and a is not None else "–")
        rows.append(line)
    doc.table(["method", "n", *models], rows, caption=f"{task}: {domain.upper()} accuracy · peak memory, per model")


def which_method(ctx: Context) -> Doc:
    doc = Doc()
    doc.h(2, "Which method")
    if not ctx.rows:
        doc.p("No finished runs yet: nothing to recommend.")
        return doc
    doc.p("Per method arm and n: mean accuracy ± 95 % CI half-width over data seeds (runs), ≈ = indistinguishable from the "
          "majority baseline; costs are means per run. ★ = Pareto-optimal in mean accuracy (OOD where there is an OOD set) vs "
          "peak memory among the methods at the same n. lead (per domain and n): 'winner' = the only arm not significantly "
          "worse than the best mean, 'tied' = one of several such arms. Every comparison is paired on the same few-shot samples and eval examples "
          "and has both sources of variance: a paired bootstrap over data seeds × eval examples (on the examples no compared "
          "run skipped), united with the seed-level paired t-interval; the best mean is tested against each other arm, "
          f"Holm-corrected (α = {st.ALPHA}). 'Not distinguishable at this sample size' is not equivalence: more seeds or eval "
          "examples may separate them. See docs/statistics.md.")
    per_task: dict[str, dict[str, tuple[list[ArmResult], str]]] = {}
    for model, task in ctx.models_tasks():
        sets_all = eval_sets_ordered(ctx.rows, model, task)
        dom = {r.eval_set: r.domain for r in ctx.rows if r.model == model and r.task == task}
        sets = {d: next((s for s in sets_all if dom[s] == d), None) for d in ("id", "ood")}
        arms = arm_results(ctx, model, task, sets["id"], sets["ood"])
        mark_pareto(arms, "ood" if sets["ood"] else "id")
        items = []
        for n in sorted({a.n for a in arms}):
            group = [a for a in arms if a.n == n]
            label = f"n={n}" if any(a.n_applies for a in group) else "n/a"
            items += [f"{label}: {line}" for line in recommend(ctx, model, task, group, sets)]
        doc.h(3, f"{model} · {task}")
        _table(doc, task, arms, sets)
        doc.items(items)
        per_task.setdefault(task, {})[model] = (arms, "ood" if sets["ood"] else "id")
    for task, by_model in per_task.items():
        if len(by_model) > 1:
            doc.h(3, f"Models side by side · {task}")
            models_side_by_side(doc, task, {m: v[0] for m, v in by_model.items()}, next(iter(by_model.values()))[1])
    return doc
