"""The study report: ``report.md`` and a self-contained ``report.html`` (plots embedded as base64
PNG), the plots beside them in ``figures/``, and CSV exports in ``csv/``.

Why a generated report: a study's numbers are only useful with their spread over few-shot samples,
their baselines and their caveats (overlapping eval sets, results at the majority baseline,
skipped prompts). The report puts all of that next to each other, and states for each claim of the
study we build on whether this study's data supports it, with the test behind the verdict.

The document is built once as a list of blocks and rendered to both Markdown and HTML, so the two
always say the same thing.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import yaml

from . import stats as st
from .atomic import write_atomic
from .claims import ClaimSpec, evaluate_claims
from .report_claims import CLAIMS_CSV_HEADER, add_claims_section, add_method_section, claims_csv_rows
from .resample import Scores, check_complete, read_predictions, scores_from
from .errors import ConfigError, DataError, FewtuneError
from .identity import stale_runs
from .study.store import RunRecord, Store, rebuild_hint

FIGURES_DIR = "figures"
CSV_DIR = "csv"


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    html: Path
    csv_dir: Path
    figures_dir: Path
    figures: tuple[Path, ...] = ()
    csvs: tuple[Path, ...] = ()


# --------------------------------------------------------------------------------------------
# loading


@dataclass
class StudyData:
    """Everything the report needs, read from the study directory."""

    dir: Path
    name: str
    description: str
    source: str
    records: list[RunRecord]  # the study's runs (all statuses)
    rows: list[st.EvalRow]  # finished runs × eval sets
    breakdown: dict[str, dict[tuple[str, str], tuple[int, int]]] = field(default_factory=dict)  # run id → (group, gold label) → (correct, n)
    other_runs: int = 0  # runs in the database that the current study config no longer lists
    stale_runs: int = 0  # runs of the current config made under another identity (version, task file, model, device)
    overrides: list[str] = field(default_factory=list)  # --set overrides of the last `fewtune study` call
    scores: dict[str, dict[str, Scores]] = field(default_factory=dict)  # run id → eval set → per-example outcomes
    claims: list[ClaimSpec] = field(default_factory=list)  # declared by the study config (study.yaml)
    arms: dict[str, str] = field(default_factory=dict)  # run id → arm label, over all runs (failed ones too)
    method_order: list[str] = field(default_factory=list)  # the study config's methods, in its order: tables follow it
    excluded: list[str] = field(default_factory=list)  # runs left out of a section, and why (damaged files)

    @property
    def done(self) -> list[RunRecord]:
        return [r for r in self.records if r.status == "done" and r.metrics]


def load_study_data(study_dir: Path | str) -> StudyData:
    d = Path(study_dir)
    if not (d / "study.db").is_file():
        raise ConfigError(f"{d} is not a study directory (no study.db)", "pass the --out directory of `fewtune study`")
    with Store(d, create=False) as store:
        try:
            meta = json.loads(store.get_meta("study") or "{}")
            ids_json = store.get_meta("study_run_ids")
            all_records = store.runs()
        except (sqlite3.DatabaseError, json.JSONDecodeError, KeyError) as e:
            raise DataError(f"the study database {store.path} is damaged: {e}", rebuild_hint(d)) from None
    if ids_json:  # only the current plan's runs: never results of another identity or config
        wanted = set(json.loads(ids_json))
        records = [r for r in all_records if r.run_id in wanted]
    else:
        records = all_records
    stale = len(stale_runs(all_records, [(r.run_id, r.config) for r in records]))
    done = [r for r in records if r.status == "done" and r.metrics]
    arms = st.arm_labels({r.run_id: r.config for r in records})
    rows = st.eval_rows(((r.run_id, r.config, r.metrics) for r in done), arms)
    data = StudyData(d, meta.get("name", d.name), meta.get("description", ""), meta.get("source", ""), records, rows,
                     other_runs=len(all_records) - len(records) - stale, stale_runs=stale,
                     overrides=list(meta.get("overrides", [])), arms=arms)
    data.claims, data.method_order = _study_claims_and_order(d, records)
    for r in done:
        if not r.run_dir:
            continue
        path = d / r.run_dir / "predictions.jsonl"
        try:
            preds = read_predictions(path)  # parsed once: the largest input of the report
            check_complete(preds, r.metrics, path)
        except DataError as e:
            data.excluded.append(f"{e.message}: run {r.run_id} ({r.method} · n={r.n} · seed={r.seed}) is left out of the "
                                 "per-example statistics and the breakdown tables (its stored metrics are kept); "
                                 "restore the file to include it")
            continue
        data.scores[r.run_id] = scores_from(preds)
        counts = group_breakdown(preds, r, breakdown_specs(r.task))
        if counts:
            data.breakdown[r.run_id] = counts
    return data


def _study_claims_and_order(study_dir: Path, records: Sequence[RunRecord]) -> tuple[list[ClaimSpec], list[str]]:
    """The claims declared in the study config stored beside the results (study.yaml), and its
    method order (without a config: the order in which the study registered its runs)."""
    from .study import STUDY_FILE, parse_study

    order = list(dict.fromkeys(r.method for r in records))
    path = study_dir / STUDY_FILE
    if not path.is_file():
        return [], order
    study = parse_study(yaml.safe_load(path.read_text()), str(path))
    listed = list(dict.fromkeys(m["method"] for m in study.methods or []))
    return [ClaimSpec.model_validate(c) for c in study.claims], listed + [m for m in order if m not in listed]


def failed_counts(data: StudyData) -> dict[tuple[str, str, str, int], int]:
    """Failed runs per (model, task, arm, n): they have no metrics, but every cell says how many."""
    out: dict[tuple[str, str, str, int], int] = defaultdict(int)
    for r in data.records:
        if r.status == "failed":
            out[(str(r.config.get("model")), r.task, data.arms.get(r.run_id, r.method), int(r.n))] += 1
    return dict(out)


def report_metrics(task: str) -> tuple[str, ...]:
    """The metrics a task asks the report to show (``Task.report_metrics``); accuracy if unknown."""
    from .tasks import TASKS

    try:
        return tuple(TASKS.get(task).report_metrics)
    except FewtuneError:
        return ("accuracy",)


def breakdown_specs(task: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The task's eval sets whose report crosses a group field with the gold label:
    ``{eval set: (field, gold label names)}`` (``Split.breakdown_field``, e.g. HANS heuristics)."""
    from .tasks import TASKS

    try:
        t = TASKS.get(task)
    except FewtuneError:
        return {}
    return {name: (s.breakdown_field, s.gold_names or t.label_names) for name, s in t.eval_sets.items() if s.breakdown_field}


def group_breakdown(predictions: Sequence[dict], record: RunRecord, specs: dict[str, tuple[str, tuple[str, ...]]]) -> dict[tuple[str, str], tuple[int, int]]:
    """(group, gold label) → (correct, scored) on the run's largest eval set that declares a
    breakdown, from its predictions.jsonl.

    Why the predictions file: metrics.json has accuracy per group and per label separately, but
    the HANS failure mode (always predicting entailment) shows only in their combination. Why one
    set: such sets may nest (hans ⊃ hans-lexical-overlap); counting both would count a group twice.
    """
    evals = (record.metrics or {}).get("eval", {})
    cands = [(int(evals[n].get("n") or 0), n) for n in evals if n in specs]
    if not cands:
        return {}
    chosen = max(cands)[1]
    field_name, names = specs[chosen]
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for p in predictions:
        if p.get("eval_set") != chosen or p.get("skipped"):
            continue
        g, gold = (p.get("groups") or {}).get(field_name), p.get("gold")
        if g is None or not isinstance(gold, int) or not 0 <= gold < len(names):
            continue
        c = counts[(g, names[gold])]
        c[0] += int(p.get("pred") == gold)
        c[1] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}


# --------------------------------------------------------------------------------------------
# document model


@dataclass
class Doc:
    """Blocks rendered to Markdown and HTML alike."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> None:
        self.blocks.append(("table", list(header), [[_cell(c) for c in r] for r in rows], caption))

    def img(self, path: Path, rel: str, alt: str) -> None:
        self.blocks.append(("img", path, rel, alt))

    def headings(self) -> list[str]:
        return [b[2] for b in self.blocks if b[0] == "h"]


def _cell(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else f"{x:.3f}"
    return str(x)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Doc) -> str:
    out: list[str] = []
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2] + "\n")
        elif kind == "p":
            out.append(b[1] + "\n")
        elif kind == "ul":
            out.append("\n".join(f"- {i}" for i in b[1]) + "\n")
        elif kind == "table":
            _, header, rows, caption = b
            if caption:
                out.append(f"*{caption}*\n")
            out.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            for r in rows:
                out.append("| " + " | ".join(_md_escape(c) for c in r) + " |")
            out.append("")
        elif kind == "img":
            out.append(f"![{b[3]}]({b[2]})\n")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;vertical-align:top}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-style:italic;padding:.2em 0}
img{max-width:100%;border:1px solid #eee;margin:.5em 0 1.5em}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #aaa;margin-top:2em}
code{background:#f5f5f5;padding:0 .2em}
.verdict-supported{color:#1a7f37;font-weight:600}.verdict-contradicted{color:#b42318;font-weight:600}
"""


def render_html(doc: Doc, title: str) -> str:
    """Self-contained HTML: inline CSS, PNGs embedded as data URIs."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            _, header, rows, caption = b
            cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td{_verdict_class(c)}>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(b[3])}' src='data:image/png;base64,{data}'><figcaption>{html.escape(b[3])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def _verdict_class(text: str) -> str:
    return f" class='verdict-{text}'" if text in ("supported", "contradicted") else ""


def _inline(text: str) -> str:
    """Escape, then render `code` and **bold** (the only Markdown inline markup we emit)."""
    t = html.escape(text)
    parts = t.split("`")
    t = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = t.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


# --------------------------------------------------------------------------------------------
# formatting helpers


def fmt_summary(s: st.Summary, digits: int = 3) -> str:
    """'0.612 ± 0.031 (n=10)': mean ± 95 % CI half-width over data seeds."""
    if s.count == 0:
        return "–"
    if s.count == 1 or not math.isfinite(s.half_width):
        return f"{s.mean:.{digits}f} (1 run)"
    return f"{s.mean:.{digits}f} ± {s.half_width:.{digits}f} ({s.count})"


def _fmt_p(p: float) -> str:
    return "–" if not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _fmt_diff(t: st.PairedTest) -> str:
    if not math.isfinite(t.mean_diff):
        return "–"
    if not math.isfinite(t.ci_low):
        return f"{t.mean_diff:+.3f}"
    return f"{t.mean_diff:+.3f} [{t.ci_low:+.3f}, {t.ci_high:+.3f}]"


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if (isinstance(x, float) and not math.isfinite(x)) or x is None else x for x in r])
    write_atomic(path, buf.getvalue().encode())
    return path


def _save_fig(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, buf.getvalue())
    return path


def _slug(*parts: str) -> str:
    return "_".join("".join(c if c.isalnum() or c in "-._" else "-" for c in p) for p in parts)


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


# --------------------------------------------------------------------------------------------
# plots


def plot_accuracy_vs_n(rows: Sequence[st.SummaryRow], model: str, task: str, eval_sets: Sequence[str], path: Path,
                       order: Sequence[str] = ()) -> Path | None:
    """Mean accuracy vs n per arm with 95 % CI bands, one panel per eval set (ID first)."""
    cells = [r for r in rows if r.model == model and r.task == task and r.metric == "accuracy"]
    if not cells:
        return None
    fig = Figure(figsize=(5.2 * len(eval_sets) + 1.8, 4.2), layout="constrained")
    arms = sorted({(r.method, r.arm) for r in cells if r.method != st.MAJORITY}, key=lambda x: (st.method_rank(x[0], order), st._arm_sort(x[1])))
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
    """Every run as a point: ID accuracy (x) vs OOD accuracy (y), as in Mosbach et al. (2023)."""
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
                    ax.scatter(*zip(*sel), color=_method_color(method, order), marker=markers[j % len(markers)], alpha=0.7, s=28,
                               label=f"{method} n={n}" if len(ns) > 1 else method)
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
    fig.suptitle(f"{model} (dashed: majority / chance; dotted: ID = OOD)", fontsize=10)
    return _save_fig(fig, path)


@dataclass(frozen=True)
class CostPoint:
    arm: str
    method: str
    n: int
    accuracy: float
    memory_mb: float
    trainable: float
    on_front_memory: bool = False
    on_front_params: bool = False


def cost_points(rows: Sequence[st.EvalRow], model: str, task: str, eval_set: str, order: Sequence[str] = ()) -> list[CostPoint]:
    """Mean accuracy, peak memory and trainable parameters per (arm, n), with Pareto flags."""
    cells: dict[tuple[str, str, int], list[st.EvalRow]] = defaultdict(list)
    for r in rows:
        if r.model == model and r.task == task and r.eval_set == eval_set:
            cells[(r.arm, r.method, r.n)].append(r)
    raw = []
    for (arm, method, n), rs in sorted(cells.items(), key=lambda kv: (st.method_rank(kv[0][1], order), st._arm_sort(kv[0][0]), kv[0][2])):
        mem = [r.peak_memory_mb for r in rs if r.peak_memory_mb is not None]
        tr = [r.trainable_params for r in rs if r.trainable_params is not None]
        raw.append((arm, method, n, float(np.nanmean([r.accuracy for r in rs])),
                    float(np.mean(mem)) if mem else math.nan, float(np.mean(tr)) if tr else math.nan))
    fm = st.pareto_front([p[4] for p in raw], [p[3] for p in raw])
    fp = st.pareto_front([p[5] for p in raw], [p[3] for p in raw])
    return [CostPoint(a, m, n, acc, mem, tr, f1, f2) for (a, m, n, acc, mem, tr), f1, f2 in zip(raw, fm, fp)]


def plot_pareto(points: Sequence[CostPoint], model: str, task: str, eval_set: str, path: Path, order: Sequence[str] = ()) -> Path | None:
    """Accuracy vs peak memory and vs trainable parameters; the Pareto front is drawn and ringed."""
    if not points:
        return None
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    for k, (attr, flag, xlabel) in enumerate((("memory_mb", "on_front_memory", "peak memory (MB)"),
                                               ("trainable", "on_front_params", "trainable parameters"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for method in sorted({p.method for p in points}, key=lambda m: st.method_rank(m, order)):
            sel = [p for p in points if p.method == method and math.isfinite(getattr(p, attr))]
            if sel:
                ax.scatter([getattr(p, attr) for p in sel], [p.accuracy for p in sel], color=_method_color(method, order), label=method, s=30, alpha=0.8)
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
    fig.suptitle(f"{model} · {task} · {eval_set}: accuracy vs cost (mean per method arm and n)", fontsize=10)
    return _save_fig(fig, path)


def breakdown_table(data: StudyData, model: str, task: str, order: Sequence[str] = ()) -> tuple[list[str], list[tuple[str, str, int, dict[str, st.Summary]]]]:
    """Per (arm, n): accuracy over seeds for each group × gold label (columns in order of appearance)."""
    keys = [k for r in data.done if r.task == task and r.config.get("model") == model for k in data.breakdown.get(r.run_id, {})]
    groups, labels = list(dict.fromkeys(k[0] for k in keys)), list(dict.fromkeys(k[1] for k in keys))
    cols = [f"{g} / {lab}" for g in groups for lab in labels]
    cells: dict[tuple[str, str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    arms = {row.run_id: row.arm for row in data.rows}
    for r in data.done:
        if r.config.get("model") != model or r.task != task or r.run_id not in data.breakdown:
            continue
        arm = arms.get(r.run_id, r.method)
        for (h, lab), (correct, total) in data.breakdown[r.run_id].items():
            if total:
                cells[(arm, r.method, r.n)][f"{h} / {lab}"].append(correct / total)
    out = []
    for (arm, method, n), vals in sorted(cells.items(), key=lambda kv: (st.method_rank(kv[0][1], order), st._arm_sort(kv[0][0]), kv[0][2])):
        out.append((arm, method, n, {c: st.summarize(vals.get(c, [])) for c in cols}))
    return cols, out


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


# --------------------------------------------------------------------------------------------
# sections


def _eval_sets_ordered(rows: Sequence[st.EvalRow], model: str, task: str) -> list[str]:
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
    for arm in [r.arm for r in cells if r.method != st.MAJORITY] + [k[2] for k in sorted(failed, key=lambda k: st._arm_sort(k[2]))]:
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


def _warnings(data: StudyData, summary: Sequence[st.SummaryRow]) -> list[str]:
    out: list[str] = list(data.excluded)
    counts = defaultdict(int)
    for r in data.records:
        counts[r.status] += 1
    if counts["pending"] or counts["running"] or counts["failed"]:
        out.append(f"The study is incomplete: {counts['done']} of {len(data.records)} runs done, {counts['failed']} failed, "
                   f"{counts['pending'] + counts['running']} not run yet. Statistics cover finished runs only.")
    if data.other_runs:
        out.append(f"{data.other_runs} runs in this directory belong to an earlier version of the study config and are not reported.")
    if data.stale_runs:
        out.append(f"{data.stale_runs} runs in this directory are stale (made by another fewtune version, task file, model "
                   "or device) and are not reported; their current counterparts are.")
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


def _claim_specs(data: StudyData, margin: float | None) -> list[ClaimSpec]:
    """The study's claims; ``margin`` (``fewtune report --margin``) replaces every claim's margin."""
    if margin is None:
        return data.claims
    return [s.model_copy(update={"margin": margin}) if s.kind != "direction" else s for s in data.claims]


def build_report(data: StudyData, study_dir: Path, margin: float | None = None) -> tuple[Doc, list[Path], list[Path]]:
    """Compute statistics, write figures and CSVs, and assemble the document."""
    fig_dir, csv_dir = study_dir / FIGURES_DIR, study_dir / CSV_DIR
    rows = data.rows
    order = data.method_order
    summary = st.summary_table(rows, order=order)
    comparisons = st.paired_comparisons(rows, "vanilla", "accuracy", order)
    all_pairs = st.paired_comparisons(rows, None, "accuracy", order)
    gaps = st.id_ood_gaps(rows, order=order)
    specs = _claim_specs(data, margin)
    failed = failed_counts(data)
    failed_by_method: dict[str, int] = defaultdict(int)
    for r in data.records:
        if r.status == "failed":
            failed_by_method[r.method] += 1
    claims = evaluate_claims(specs, rows, data.scores, failed_by_method)
    collapsed: dict[tuple[str, int, str], int] = defaultdict(int)
    for r in rows:
        if r.collapsed:
            collapsed[(r.arm, r.n, r.eval_set)] += 1
    figures: list[Path] = []
    csvs: list[Path] = []
    doc = Doc()
    counts = defaultdict(int)
    for r in data.records:
        counts[r.status] += 1

    doc.h(1, f"Study report: {data.name}")
    if data.description:
        doc.p(data.description)
    models = sorted({r.model for r in rows})
    tasks = sorted({r.task for r in rows})
    model_names = sorted({str((r.metrics or {}).get("model_name", r.config.get("model"))) for r in data.done})
    doc.table(["", ""], [
        ["study", f"{data.name} ({data.source})" if data.source else data.name],
        ["generated", time.strftime("%Y-%m-%d %H:%M:%S %Z")],
        ["runs", f"{counts['done']} done, {counts['failed']} failed, {counts['pending'] + counts['running']} pending (of {len(data.records)})"],
        ["models", ", ".join(model_names) or "–"],
        ["tasks", ", ".join(tasks) or "–"],
        ["methods", ", ".join(sorted({r.method for r in rows}, key=lambda m: st.method_rank(m, order))) or "–"],
        ["n per class", ", ".join(str(n) for n in sorted({r.n for r in rows})) or "–"],
        ["data seeds", ", ".join(str(s) for s in sorted({r.seed for r in rows})) or "–"],
        ["overrides", " ".join(f"--set {o}" for o in data.overrides) or "none"],
    ], caption="overview (the study config as run: study.yaml)")

    # warnings
    doc.h(2, "Warnings")
    warns = _warnings(data, summary)
    if warns:
        doc.items(warns)
    else:
        doc.p("None.")

    add_claims_section(doc, specs, claims)

    # results tables
    doc.h(2, "Results")
    doc.p("Mean ± 95 % CI half-width over data seeds (number of runs in parentheses); ≈ marks a result "
          "indistinguishable from the majority baseline (HANS: chance); [k failed] counts runs of the cell that failed (not in "
          "the mean), [⚠ k collapsed] runs whose predictions collapsed. Full statistics (std, min, max) in `csv/summary.csv`.")
    for model in models:
        for task in tasks:
            sets = _eval_sets_ordered(rows, model, task)
            if not sets:
                continue
            doc.h(3, f"{model} · {task}")
            for es in sets:
                domain = next(r.domain for r in rows if r.eval_set == es and r.task == task)
                for metric in report_metrics(task):
                    header, trows = results_table(summary, model, task, es, metric, failed, collapsed)
                    doc.table(header, trows, caption=f"{es} ({domain.upper()}) {metric.upper() if metric == 'mcc' else metric}")

    # plots
    doc.h(2, "Plots")
    for model in models:
        for task in tasks:
            sets = _eval_sets_ordered(rows, model, task)
            if not sets:
                continue
            p = plot_accuracy_vs_n(summary, model, task, sets, fig_dir / f"{_slug('acc_vs_n', model, task)}.png", order)
            if p:
                figures.append(p)
                doc.img(p, f"{FIGURES_DIR}/{p.name}", f"{model} · {task}: accuracy vs n per method with 95% CI bands")
            p = plot_id_vs_ood(rows, model, task, fig_dir / f"{_slug('id_vs_ood', model, task)}.png", order)
            if p:
                figures.append(p)
                doc.img(p, f"{FIGURES_DIR}/{p.name}", f"{model} · {task}: ID vs OOD accuracy of every run")
            for es in sets:
                pts = cost_points(rows, model, task, es, order)
                p = plot_pareto(pts, model, task, es, fig_dir / f"{_slug('pareto', model, task, es)}.png", order)
                if p:
                    figures.append(p)
                    doc.img(p, f"{FIGURES_DIR}/{p.name}", f"{model} · {task} · {es}: accuracy vs peak memory and trainable parameters (Pareto front ringed)")

    # paired comparisons
    doc.h(2, "Paired comparisons with vanilla fine-tuning")
    if comparisons:
        doc.p("Each method arm minus vanilla FT on the same few-shot samples (same data seeds): mean difference in accuracy "
              "with its 95 % t-interval over seeds, paired t-test and Wilcoxon signed-rank test. These per-cell intervals leave the "
              "eval-sampling error out (every seed is scored on the same examples); the claims above include it. Every pair of "
              "methods is in `csv/paired.csv`.")
        doc.table(["model", "task", "n", "eval set", "method", "vs", "mean diff [95% CI]", "t-test p", "Wilcoxon p", "pairs"],
                  [[c.model, c.task, c.n, c.eval_set, c.arm_a, c.arm_b, _fmt_diff(c.test), _fmt_p(c.test.t_p), _fmt_p(c.test.w_p),
                    str(c.test.n_pairs)] for c in comparisons])
    else:
        doc.p("No pairs: vanilla fine-tuning and another method must share model, task, n and data seeds.")

    # gaps
    doc.h(2, "ID vs OOD gap")
    if gaps:
        doc.p("ID accuracy minus OOD accuracy, per run, summarised over data seeds (positive: worse out of domain).")
        doc.table(["model", "task", "method", "n", "ID set", "OOD set", "ID", "OOD", "gap"],
                  [[g.model, g.task, g.arm, g.n, g.id_set, g.ood_set, fmt_summary(g.id), fmt_summary(g.ood), fmt_summary(g.gap)] for g in gaps])
    else:
        doc.p("No run has both an ID and an OOD eval set.")

    # resources
    doc.h(2, "Resources")
    res_rows = _resource_rows(rows, order)
    if res_rows:
        doc.p("Per run (means over runs): peak memory (CPU: process RSS high-water mark; GPU: max allocated), trainable and "
              "total parameters, training and evaluation wall time.")
        doc.table(["model", "task", "method", "n", "runs", "peak memory MB", "memory kind", "trainable params", "total params",
                   "train s", "eval s"], [r[:11] for r in res_rows])

    # group × label breakdowns (eval sets that declare one: HANS heuristics)
    for model in models:
        for task in tasks:
            figures_, csvs_ = _breakdown_section(doc, data, model, task, order, fig_dir, csv_dir)
            figures += figures_
            csvs += csvs_

    # failures
    failed = [r for r in data.records if r.status == "failed"]
    doc.h(2, "Failed runs")
    if failed:
        doc.table(["run id", "method", "task", "n", "seed", "attempts", "error"],
                  [[r.run_id, r.method, r.task, r.n, r.seed, r.attempts, (r.error or "").splitlines()[0][:300]] for r in failed])
        doc.p("Re-run them with `fewtune study CONFIG --out DIR --retry-failed` once the cause is fixed.")
    else:
        doc.p("None.")

    add_method_section(doc, specs)

    # method notes
    doc.h(2, "How to read this report")
    doc.items([
        "Each run is one few-shot sample (data seed) adapted by one method; its id is the hash of its fully resolved config "
        "(`runs/<id>/config.yaml`), per-example predictions are in `runs/<id>/predictions.jsonl`.",
        "n is per class (balanced sample) unless the run config sets `n_is_total`.",
        "CI: two-sided 95 % t-interval of the mean over data seeds (undefined for a single run).",
        "Majority baseline: accuracy of always predicting the eval set's (subsample's) most frequent label; its MCC is 0.",
        "CSV exports: `csv/runs.csv` (one row per run × eval set), `csv/summary.csv`, `csv/paired.csv`, `csv/gaps.csv`, "
        "`csv/claims.csv`, `csv/resources.csv`.",
    ])

    # CSVs
    csvs.append(_write_csv(csv_dir / "runs.csv",
        ["run_id", "model", "task", "method", "arm", "n", "seed", "eval_set", "domain", "accuracy", "mcc", "n_eval", "n_skipped",
         "majority_baseline", "peak_memory_mb", "memory_kind", "trainable_params", "total_params", "train_seconds", "eval_seconds"],
        [[r.run_id, r.model, r.task, r.method, r.arm, r.n, r.seed, r.eval_set, r.domain, r.accuracy, r.mcc, r.n_eval, r.n_skipped,
          r.majority_baseline, r.peak_memory_mb, r.memory_kind, r.trainable_params, r.total_params, r.train_seconds, r.eval_seconds] for r in rows]))
    csvs.append(_write_csv(csv_dir / "summary.csv",
        ["model", "task", "method", "arm", "n", "eval_set", "domain", "metric", "runs", "mean", "std", "ci_low", "ci_high", "min", "max",
         "baseline", "at_baseline", "seeds"],
        [[r.model, r.task, r.method, r.arm, "" if r.n is None else r.n, r.eval_set, r.domain, r.metric, r.stats.count, r.stats.mean, r.stats.std,
          r.stats.ci_low, r.stats.ci_high, r.stats.min, r.stats.max, r.baseline, r.at_baseline, " ".join(map(str, r.seeds))] for r in summary]))
    csvs.append(_write_csv(csv_dir / "paired.csv",
        ["model", "task", "n", "eval_set", "domain", "metric", "arm_a", "arm_b", "pairs", "mean_diff", "std_diff", "ci_low", "ci_high",
         "t_stat", "t_p", "wilcoxon_stat", "wilcoxon_p", "note"],
        [[c.model, c.task, c.n, c.eval_set, c.domain, c.metric, c.arm_a, c.arm_b, c.test.n_pairs, c.test.mean_diff, c.test.std_diff,
          c.test.ci_low, c.test.ci_high, c.test.t_stat, c.test.t_p, c.test.w_stat, c.test.w_p, c.test.note] for c in all_pairs]))
    csvs.append(_write_csv(csv_dir / "gaps.csv",
        ["model", "task", "method", "arm", "n", "id_set", "ood_set", "runs", "id_mean", "ood_mean", "gap_mean", "gap_std", "gap_ci_low", "gap_ci_high"],
        [[g.model, g.task, g.method, g.arm, g.n, g.id_set, g.ood_set, g.gap.count, g.id.mean, g.ood.mean, g.gap.mean, g.gap.std,
          g.gap.ci_low, g.gap.ci_high] for g in gaps]))
    csvs.append(_write_csv(csv_dir / "claims.csv", CLAIMS_CSV_HEADER, claims_csv_rows(claims, {c.key: c for c in specs})))
    csvs.append(_write_csv(csv_dir / "resources.csv",
        ["model", "task", "method", "n", "runs", "peak_memory_mb", "memory_kind", "trainable_params", "total_params", "train_seconds", "eval_seconds"],
        [r[11] for r in res_rows]))
    return doc, figures, csvs


def _breakdown_section(doc: Doc, data: StudyData, model: str, task: str, order: Sequence[str], fig_dir: Path,
                       csv_dir: Path) -> tuple[list[Path], list[Path]]:
    """Accuracy per group × gold label of the task's eval sets that declare a breakdown."""
    cols, htable = breakdown_table(data, model, task, order)
    if not htable:
        return [], []
    field_name = next(iter(breakdown_specs(task).values()))[0]
    title = f"{task} per {field_name} and gold label ({model})"
    doc.h(2, title)
    doc.p(f"Accuracy per {field_name} and gold label (from the per-example predictions of each run's largest eval set with "
          f"this breakdown: {', '.join(breakdown_specs(task))}). On HANS, a model that relies on lexical overlap scores "
          "near 1 on entailment and near 0 on non-entailment.")
    doc.table(["method", "n", *cols], [[arm, n, *[fmt_summary(v[c]) for c in cols]] for arm, _, n, v in htable])
    figures = []
    p = plot_breakdown(cols, htable, model, title, fig_dir / f"{_slug('breakdown', model, task)}.png", order)
    if p:
        figures.append(p)
        doc.img(p, f"{FIGURES_DIR}/{p.name}", f"{title}: mean over data seeds, 95% CI")
    out = _write_csv(csv_dir / f"{_slug('breakdown', model, task)}.csv", ["model", "task", "method", "arm", "n", "column", "count", "mean",
                     "std", "ci_low", "ci_high"], [[model, task, m, arm, n, c, v[c].count, v[c].mean, v[c].std, v[c].ci_low, v[c].ci_high]
                                                  for arm, m, n, v in htable for c in cols])
    return figures, [out]


def _resource_rows(rows: Sequence[st.EvalRow], order: Sequence[str] = ()) -> list[list[Any]]:
    """One row per (model, task, arm, n), resources are per run (the first eval row of each run)."""
    per_run: dict[str, st.EvalRow] = {}
    for r in rows:
        per_run.setdefault(r.run_id, r)
    cells: dict[tuple, list[st.EvalRow]] = defaultdict(list)
    for r in per_run.values():
        cells[(r.model, r.task, r.method, r.arm, r.n)].append(r)
    out = []
    for (model, task, method, arm, n), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], st.method_rank(kv[0][2], order), st._arm_sort(kv[0][3]), kv[0][4])):
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


def write_report(study_dir: Path | str, margin: float | None = None) -> ReportPaths:
    """Write ``report.md``, ``report.html``, ``figures/*.png`` and ``csv/*.csv`` into the study dir."""
    d = Path(study_dir)
    data = load_study_data(d)
    doc, figures, csvs = build_report(data, d, margin=margin)
    md = d / "report.md"
    page = d / "report.html"
    write_atomic(md, render_markdown(doc).encode())
    write_atomic(page, render_html(doc, f"fewtune study report: {data.name}").encode())
    return ReportPaths(md, page, d / CSV_DIR, d / FIGURES_DIR, tuple(figures), tuple(csvs))


__all__ = ["ReportPaths", "StudyData", "build_report", "load_study_data", "write_report", "render_markdown", "render_html"]
