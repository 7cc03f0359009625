"""What the report reads: the study's runs through ``fewtune.results`` (the loader every reader
shares), the per-example predictions once, and what the task declares about its metrics and groups."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fewtune import results
from fewtune import stats as st
from fewtune.errors import DataError, FewtuneError
from fewtune.stats.claims import ClaimSpec
from fewtune.stats.resample import Scores, check_complete, scores_from


@dataclass
class StudyData:
    """Everything the report needs, read from the study directory."""

    dir: Path
    name: str
    description: str
    source: str
    runs: list[results.RunFiles]  # the study's planned runs (all statuses)
    frame: pd.DataFrame  # results.load_runs: one row per run × eval set
    rows: list[st.EvalRow]  # finished runs × eval sets
    breakdown: dict[str, dict[tuple[str, str], tuple[int, int]]] = field(default_factory=dict)  # run id → (group, gold) → (correct, n)
    other_runs: int = 0  # runs in the database that the current study config no longer lists
    stale_runs: int = 0  # runs of the current config made under another identity (code, libraries, task file, model, device…)
    other_code_runs: int = 0  # unplanned runs made by another code version (not blamed on the study config)
    other_code: str = ""  # which code version made them (fewtune.study.stale.describe_changes)
    overrides: list[str] = field(default_factory=list)  # --set overrides of the last `fewtune study` call
    scores: dict[str, dict[str, Scores]] = field(default_factory=dict)  # run id → eval set → per-example outcomes
    claims: list[ClaimSpec] = field(default_factory=list)  # declared by the study config (study.yaml)
    arms: dict[str, str] = field(default_factory=dict)  # run id → arm label, over all runs (failed ones too)
    method_order: list[str] = field(default_factory=list)  # the study config's methods, in its order
    excluded: list[str] = field(default_factory=list)  # runs left out of a section, and why (damaged files)

    @property
    def done(self) -> list[results.RunFiles]:
        return [r for r in self.runs if r.status == "done" and r.metrics]

    def n_applies(self, method: str) -> bool:
        sel = self.frame.loc[self.frame["method"] == method, "n_applies"]
        return bool(sel.iloc[0]) if len(sel) else True


def load_study_data(study_dir: Path | str) -> StudyData:
    d = Path(study_dir)
    index = results.read_study(d)
    frame = results.load_runs(d)
    from fewtune.study.stale import describe_changes, stale_runs

    found = stale_runs(index.all_records, [(r.kept_for or r.run_id, r.config) for r in index.runs])
    kept = {r.run_id for r in index.runs if r.kept_for}
    stale, code = len([r for r in found.records if r.run_id not in kept]), len(found.other_code)
    meta = index.meta
    data = StudyData(d, meta.get("name", d.name), meta.get("description", ""), meta.get("source", ""), index.runs, frame,
                     results.to_eval_rows(frame), other_runs=len(index.all_records) - len(index.runs) - stale - code - len(kept),
                     stale_runs=stale, other_code_runs=code, other_code=describe_changes(found.other_code_changes),
                     overrides=list(meta.get("overrides", [])), arms=st.arm_labels({r.run_id: r.config for r in index.runs}))
    data.claims, data.method_order = _study_claims_and_order(d, index.runs)
    for r in data.done:
        _read_scores(data, r)
    return data


def _read_scores(data: StudyData, r: results.RunFiles) -> None:
    """Per-example outcomes and the group breakdown of one run, from its predictions (parsed once)."""
    if r.run_dir is None:
        return
    path = r.run_dir / "predictions.jsonl"
    if not (r.run_dir / "metrics.json").is_file():  # deleted by hand after the study recorded it
        c = r.config
        data.excluded.append(f"The directory of run {r.run_id} ({c.get('method')} · n={c.get('n')} · seed={c.get('seed')}), "
                             f"{r.run_dir}, is missing: its metrics recorded in study.db are reported, but not its per-example "
                             "statistics; re-run `fewtune study` with the same config to run it again")
        return
    try:
        preds = results.read_predictions(r) if path.is_file() else None
        if preds is None:
            return
        check_complete(preds, r.metrics, path)
    except DataError as e:
        c = r.config
        data.excluded.append(f"{e.message}: run {r.run_id} ({c.get('method')} · n={c.get('n')} · seed={c.get('seed')}) is left out "
                             "of the per-example statistics and the breakdown tables (its stored metrics are kept); restore the "
                             "file to include it")
        return
    data.scores[r.run_id] = scores_from(preds)
    counts = group_breakdown(preds, r.metrics or {}, breakdown_specs(str(r.config.get("task"))))
    if counts:
        data.breakdown[r.run_id] = counts


def _study_claims_and_order(study_dir: Path, runs: Sequence[results.RunFiles]) -> tuple[list[ClaimSpec], list[str]]:
    """The claims declared in the study config stored beside the results (study.yaml), and its
    method order (without a config: the order in which the study registered its runs)."""
    order = list(dict.fromkeys(str(r.config.get("method")) for r in runs))
    path = study_dir / "study.yaml"
    if not path.is_file():
        return [], order
    raw = yaml.safe_load(path.read_text()) or {}
    listed = list(dict.fromkeys(m["method"] if isinstance(m, dict) else str(m) for m in raw.get("methods") or []))
    from fewtune.stats.claims import load_claims

    claims = load_claims(raw.get("claims"), str(path))
    return [ClaimSpec.model_validate(c) for c in claims], listed + [m for m in order if m not in listed]


def failed_counts(data: StudyData) -> dict[tuple[str, str, str, int], int]:
    """Failed runs per (model, task, arm, n): they have no metrics, but every cell says how many."""
    out: dict[tuple[str, str, str, int], int] = defaultdict(int)
    for r in data.runs:
        if r.status == "failed":
            c = r.config
            out[(str(c.get("model")), str(c.get("task")), data.arms.get(r.run_id, str(c.get("method"))), int(c.get("n")))] += 1
    return dict(out)


def _task(task: str) -> Any:
    from fewtune.tasks import TASKS

    try:
        return TASKS.get(task)
    except FewtuneError:
        return None


def report_metrics(task: str) -> tuple[str, ...]:
    """The metrics a task asks the report to show (``Task.report_metrics``); accuracy if unknown."""
    t = _task(task)
    return tuple(t.report_metrics) if t is not None else ("accuracy",)


def breakdown_specs(task: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The task's eval sets whose report crosses a group field with the gold label:
    ``{eval set: (field, gold label names)}`` (``Split.breakdown_field``, e.g. HANS heuristics)."""
    t = _task(task)
    if t is None:
        return {}
    return {name: (s.breakdown_field, s.gold_names or t.label_names) for name, s in t.eval_sets.items() if s.breakdown_field}


def group_breakdown(predictions: Sequence[dict], metrics: dict, specs: dict[str, tuple[str, tuple[str, ...]]]) -> dict[tuple[str, str], tuple[int, int]]:
    """(group, gold label) → (correct, scored) on the run's largest eval set that declares a
    breakdown, from its predictions.jsonl.

    Why the predictions file: metrics.json has accuracy per group and per label separately, but
    the HANS failure mode (always predicting entailment) shows only in their combination. Why one
    set: such sets may nest (hans ⊃ hans-lexical-overlap); counting both would count a group twice.
    """
    evals = metrics.get("eval", {})
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
