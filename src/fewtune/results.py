"""A study's results as pandas data frames: ``load_runs`` (one row per run × eval set) and
``load_predictions`` (one row per scored example).

Why a loader of its own: the report, ``fewtune export`` and a user's notebook must see the same
numbers. Every one of them reads through this module, which reads each run's own files
(``config.yaml``, ``metrics.json``, ``predictions.jsonl``) and uses ``study.db`` only for what the
files cannot say: which runs the study plans, and their status (failed and pending runs have no
metrics file). The database is opened read-only.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fewtune import stats as st
from fewtune.config import NOT_RESULT_FIELDS
from fewtune.errors import ConfigError, DataError

RUN_COLUMNS = ["run_id", "status", "model", "task", "method", "arm", "params", "n", "n_applies", "seed", "eval_set", "domain",
               "accuracy", "mcc", "majority_baseline", "majority_label", "n_eval", "n_skipped", "peak_memory_mb", "memory_kind",
               "trainable_params", "total_params", "train_seconds", "eval_seconds", "packed", "collapsed", "warning", "selection", "error",
               "run_dir", "kept_stale"]
_INT_COLUMNS = ("n", "seed", "n_eval", "n_skipped", "trainable_params", "total_params", "packed")
_DICT_FIELDS = ("per_label", "groups")  # nested per-label/per-group metrics: in metrics.json, not in the flat table


@dataclass
class RunFiles:
    """One run as its files (or, for a run without files, the study database) describe it."""

    run_id: str
    status: str
    config: dict[str, Any]
    metrics: dict[str, Any] | None
    run_dir: Path | None
    error: str | None = None
    attempts: int = 0
    kept_for: str | None = None  # a stale run kept (--keep-stale) in place of this planned run id


@dataclass
class StudyIndex:
    """What only ``study.db`` knows: the study's metadata, its planned runs and every run it holds."""

    dir: Path
    meta: dict[str, Any]
    runs: list[RunFiles]  # the current plan's runs (all statuses), in plan order
    all_records: list[Any] = field(default_factory=list)  # store.RunRecord of every run, planned or not


def read_study(study_dir: Path | str) -> StudyIndex:
    """The study's plan and statuses from ``study.db`` (read-only), each run completed from its files."""
    d = Path(study_dir)
    if not (d / "study.db").is_file():
        raise ConfigError(f"{d} is not a study directory (no study.db)", "pass the --out directory of `fewtune study`")
    from fewtune.study.stale import kept_stale
    from fewtune.study.store import Store, rebuild_hint  # the one place that reads the study database

    with Store(d, create=False) as store:
        try:
            meta = json.loads(store.get_meta("study") or "{}")
            ids_json = store.get_meta("study_run_ids")
            records = store.runs()
            kept = kept_stale(store)
        except (sqlite3.DatabaseError, json.JSONDecodeError, KeyError) as e:
            raise DataError(f"the study database {store.path} is damaged: {e}", rebuild_hint(d)) from None
    planned = records
    if ids_json:  # only the current plan's runs: never results of another identity or config
        wanted = set(json.loads(ids_json))
        planned = [r for r in records if r.run_id in wanted]
    by_id = {r.run_id: r for r in records}
    runs = []
    for r in planned:  # a planned run not done whose stale counterpart the user kept: the kept one
        old = by_id.get(kept.get(r.run_id, ""))
        if r.status != "done" and old is not None and old.status == "done":
            runs.append(dataclasses.replace(_from_record(d, old), kept_for=r.run_id))
        else:
            runs.append(_from_record(d, r))
    return StudyIndex(d, meta, runs, records)


def _from_record(study_dir: Path, r: Any) -> RunFiles:
    run_dir = study_dir / r.run_dir if r.run_dir else None
    config = _read_yaml(run_dir / "config.yaml") if run_dir else None
    metrics = _read_json(run_dir / "metrics.json") if run_dir and r.status == "done" else None
    # A finished run whose metrics.json went missing keeps the copy the study recorded when it finished.
    # The store's config also holds the keys that compute nothing, which config.yaml leaves out:
    # dropped, so a run reads the same whichever of the two it comes from.
    stored = {k: v for k, v in r.config.items() if k not in NOT_RESULT_FIELDS}
    return RunFiles(r.run_id, r.status, config or stored, metrics or (r.metrics if r.status == "done" else None), run_dir,
                    r.error, r.attempts)


def read_run_dir(path: Path | str) -> RunFiles:
    """A run directory on its own (``fewtune run --out``): done when it holds metrics.json."""
    d = Path(path)
    config = _read_yaml(d / "config.yaml")
    metrics = _read_json(d / "metrics.json")
    if config is None and metrics is None:
        raise ConfigError(f"{d} is neither a study directory nor a run directory (no study.db, config.yaml or metrics.json)",
                          "pass a `fewtune study --out` directory or run directories (runs/<id>)")
    config = config or {k: metrics.get(k) for k in ("model", "task", "method", "n", "seed")}
    rid = (metrics or {}).get("run_id") or d.name
    return RunFiles(str(rid), "done" if metrics else "unknown", config, metrics, d)


def collect(source: Path | str | Sequence[Path | str]) -> list[RunFiles]:
    """The runs of a study directory, or of the given run directories."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        if (p / "study.db").is_file() or not (p / "metrics.json").is_file() and not (p / "config.yaml").is_file():
            return read_study(p).runs
        return [read_run_dir(p)]
    return [read_run_dir(p) for p in source]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}", "restore the file, or delete the run directory and re-run it") from None


def _read_yaml(path: Path) -> dict | None:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None
    except yaml.YAMLError as e:
        raise DataError(f"{path} is not valid YAML: {e}", "restore the file, or delete the run directory and re-run it") from None


def n_applies(method: str) -> bool:
    """Whether a method's result depends on the few-shot sample size (zero-shot: no; n is then n/a).
    Read from the method class (``Method.uses_sample``); unknown methods are assumed to use it."""
    from fewtune.methods import METHODS

    try:
        return bool(getattr(METHODS.get(method), "uses_sample", True))
    except Exception:  # noqa: BLE001 - a method this version does not know (an older study): keep n
        return True


def eval_rows(runs: Iterable[RunFiles]) -> list[st.EvalRow]:
    """The finished runs as ``stats.EvalRow``s; arm labels computed over every run (failed too)."""
    runs = list(runs)
    arms = st.arm_labels({r.run_id: r.config for r in runs})
    return st.eval_rows(((r.run_id, r.config, r.metrics) for r in runs if r.status == "done" and r.metrics), arms)


def _selection_cell(selection: dict | None) -> str | None:
    """The chosen values (JSON), with ``decided: false`` where CV could not tell the choice from
    another candidate (``run.selection``), so the report's "chosen" column says so."""
    if not selection:
        return None
    chosen = dict(selection.get("chosen") or {})
    if selection.get("decided") is False:
        chosen["decided"] = False
    return json.dumps(chosen)


def _run_rows(runs: Sequence[RunFiles]) -> list[dict[str, Any]]:
    arms = st.arm_labels({r.run_id: r.config for r in runs})
    by_run: dict[str, list[st.EvalRow]] = {}
    for row in eval_rows(runs):
        by_run.setdefault(row.run_id, []).append(row)
    applies = {m: n_applies(m) for m in {str(r.config.get("method")) for r in runs}}
    out = []
    for r in runs:
        common = {"status": r.status, "params": json.dumps(r.config.get("params") or {}, sort_keys=True),
                  "n_applies": applies[str(r.config.get("method"))], "error": (r.error or "").splitlines()[0] if r.error else None,
                  "selection": _selection_cell((r.metrics or {}).get("selection")),
                  "run_dir": str(r.run_dir) if r.run_dir else None, "kept_stale": _kept_note(r)}
        for row in by_run.get(r.run_id, []):
            d = {k: v for k, v in asdict(row).items() if k not in _DICT_FIELDS}
            out.append({**d, **common})
        if r.run_id not in by_run:  # no metrics: one row per planned eval set, metrics empty
            c = r.config
            for es in c.get("eval_sets") or [None]:
                out.append({"run_id": r.run_id, "model": str(c.get("model")), "task": str(c.get("task")), "method": str(c.get("method")),
                            "arm": arms[r.run_id], "n": c.get("n"), "seed": c.get("seed"), "eval_set": es, **common})
    return out


def _kept_note(r: RunFiles) -> str | None:
    """For a stale run kept in place of a planned one: the code and libraries that produced it."""
    if r.kept_for is None:
        return None
    from fewtune.study.stale import produced_by

    return produced_by(r.config, (r.metrics or {}).get("provenance"))


def load_runs(source: Path | str | Sequence[Path | str]) -> pd.DataFrame:
    """One row per run × eval set, failed and pending runs included (``status``; their metrics empty).

    ``source``: a study directory (``fewtune study --out``) or run directories. Columns: ``RUN_COLUMNS``
    (``n_applies`` False: the method ignores n, e.g. zero-shot; ``selection``: the hyper-parameters a
    selection rule chose, JSON; ``kept_stale``: for a run of another identity kept with
    ``fewtune study --keep-stale``, the code and library versions that produced it). Plan order is kept."""
    frame = pd.DataFrame(_run_rows(collect(source))).reindex(columns=RUN_COLUMNS)
    # Counts stay integers where failed runs leave them empty (nullable Int64, not float).
    return frame.astype({c: "Int64" for c in _INT_COLUMNS})


def to_eval_rows(frame: pd.DataFrame) -> list[st.EvalRow]:
    """The finished rows of ``load_runs`` back as ``stats.EvalRow``s (what the statistics take)."""
    names = [f.name for f in fields(st.EvalRow) if f.name not in _DICT_FIELDS]
    done = frame[(frame["status"] == "done") & frame["eval_set"].notna()]
    out = []
    for rec in done[names].to_dict("records"):
        clean = {k: (None if pd.isna(v) and k not in ("accuracy", "mcc", "majority_baseline") else v) for k, v in rec.items()}
        clean.update({k: float("nan") for k in ("accuracy", "mcc", "majority_baseline") if pd.isna(clean[k])})
        clean.update({k: int(clean[k]) for k in ("trainable_params", "total_params", "packed") if clean[k] is not None})
        clean["n"], clean["seed"], clean["n_eval"], clean["n_skipped"] = (int(clean[k]) for k in ("n", "seed", "n_eval", "n_skipped"))
        out.append(st.EvalRow(**clean))
    return out


def read_predictions(run: RunFiles) -> list[dict[str, Any]]:
    """The run's predictions.jsonl as dicts (empty when the run has none)."""
    from fewtune.stats.resample import read_predictions as _read

    if run.run_dir is None or not (run.run_dir / "predictions.jsonl").is_file():
        return []
    return _read(run.run_dir / "predictions.jsonl")


def load_predictions(source: Path | str | Sequence[Path | str]) -> pd.DataFrame:
    """One row per scored example of every finished run: run_id, model, task, method, n, seed, and the
    predictions.jsonl fields (eval_set, id, gold, pred, skipped, …; group fields as ``group.<name>``)."""
    rows = []
    for r in collect(source):
        if r.status != "done":
            continue
        head = {"run_id": r.run_id, **{k: r.config.get(k) for k in ("model", "task", "method", "n", "seed")}}
        for p in read_predictions(r):
            groups = {f"group.{k}": v for k, v in (p.get("groups") or {}).items()}
            rows.append({**head, **{k: v for k, v in p.items() if k != "groups"}, **groups})
    return pd.DataFrame(rows)


__all__ = ["RUN_COLUMNS", "RunFiles", "StudyIndex", "collect", "load_predictions", "load_runs", "read_study", "to_eval_rows"]
