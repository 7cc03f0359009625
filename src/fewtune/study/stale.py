"""Stale runs: results in a study directory that the current plan would compute again under
another identity (another code version, other library versions, another task file, model,
device, thread count or process count — see ``fewtune.run.identity`` and docs/identity.md).

A study never mixes them silently. Resuming one is refused (exit 2) until the user decides:

- ``--rerun-stale``: run the current plan's runs under the current identity; the old results stay
  in ``study.db``, unreported.
- ``--keep-stale``: keep the old results in place of their current counterparts (those are then
  not run); the decision is recorded in ``study.db`` (meta ``kept_stale``: planned run id → kept
  run id), later resumes honour it, and the report and ``fewtune.results`` mark each kept run
  with the code and library versions that produced it. ``--rerun-stale`` undoes it.

Runs whose config no current run has are not stale, just unlisted — but when they were made by
other code than the plan's, that is said (a code change may change a default, and so the config),
rather than blaming an earlier version of the study config.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewtune.config import NOT_RESULT_FIELDS
from fewtune.errors import ConfigError, DataError
from fewtune.study.store import DB_NAME, RunRecord, Store

KEPT_META = "kept_stale"
CODE_FIELDS = ("code_digest", "fewtune_version", "git_commit")
# What a changed identity field means, in the order messages list them.
_WHAT = (
    ("another fewtune code version", CODE_FIELDS),
    ("other library versions", ("libraries.",)),
    ("another task file", ("task_digest",)),
    ("another model", ("model_digest",)),
    ("another device or precision", ("device", "precision", "model_dtype")),
    ("another torch thread count", ("threads",)),
    ("another number of data-parallel processes", ("processes",)),
)


def config_key(config: dict) -> str:
    """Canonical JSON of a config without its identity: equal for the same run under another
    identity (how a study recognises stale results), whether the config comes from the store or
    from ``config.yaml`` (which leaves out the keys that compute nothing: ``NOT_RESULT_FIELDS``)."""
    kept = {k: v for k, v in config.items() if k != "identity" and k not in NOT_RESULT_FIELDS}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


def flat_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config's identity block with ``libraries`` spread out (``libraries.torch``: version)."""
    ident = dict(config.get("identity") or {})
    libs = ident.pop("libraries", None) or {}
    return {**ident, **{f"libraries.{k}": v for k, v in libs.items()}}


def describe_changes(changes: Mapping[str, Iterable[tuple[Any, Any]]]) -> str:
    """``{field: {(old, new)}}`` in words: what changed, grouped by what it means."""
    parts = []
    for words, prefixes in _WHAT:
        keys = [k for k in sorted(changes) if k.startswith(prefixes)]
        if keys:
            detail = ", ".join(f"{k.removeprefix('libraries.')} {_short(a)} → {_short(b)}"
                               for k in keys for a, b in sorted(changes[k], key=str))
            parts.append(f"{words} ({detail})")
    return "; ".join(parts)


def produced_by(config: Mapping[str, Any], provenance: Mapping[str, Any] | None = None) -> str:
    """Which code and libraries produced a run, in one line (for marking kept stale runs)."""
    ident = config.get("identity") or {}
    prov = provenance or {}
    code = ident.get("code_digest") or prov.get("code_digest")
    version = prov.get("fewtune_version") or ident.get("fewtune_version")
    commit = prov.get("git_commit") or ident.get("git_commit")
    out = [f"code {_short(code)}" + (f" (fewtune {version}" + (f", commit {str(commit)[:10]}" if commit else "") + ")" if version else "")]
    out += [f"{k} {v}" for k, v in sorted((ident.get("libraries") or {}).items())]
    return ", ".join(out)


def _short(value: Any) -> str:
    return "none" if value is None else str(value)[:12]


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], into: dict[str, set[tuple[Any, Any]]]) -> None:
    a, b = flat_identity(old), flat_identity(new)
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            into.setdefault(k, set()).add((a.get(k), b.get(k)))


@dataclass
class StaleRuns:
    """Finished or failed runs of a study directory made under another identity than the plan's.

    ``records``: each the same config as a planned run (``pairs``: planned id → stale record),
    under another identity. ``other_code``: runs no planned config matches, made by another code
    version than the plan's (a code change may change a resolved default, hence the config)."""

    records: list[RunRecord] = field(default_factory=list)
    pairs: dict[str, RunRecord] = field(default_factory=dict)
    changes: dict[str, set[tuple[Any, Any]]] = field(default_factory=dict)  # identity field → {(old, new)}
    other_code: list[RunRecord] = field(default_factory=list)
    other_code_changes: dict[str, set[tuple[Any, Any]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __bool__(self) -> bool:
        return bool(self.records or self.other_code)

    def message(self) -> str:
        parts = []
        if self.records:
            parts.append(f"{len(self)} runs are stale: their results come from " + (describe_changes(self.changes) or "another identity"))
        if self.other_code:
            parts.append(self.other_code_message())
        return "; ".join(parts)

    def other_code_message(self) -> str:
        return (f"{len(self.other_code)} runs in this directory were made by "
                f"{describe_changes(self.other_code_changes) or 'another fewtune code version'}, under configs the "
                "current code no longer resolves to (not reported)")


def stale_runs(records: Iterable[RunRecord], planned: Iterable[tuple[str, dict]]) -> StaleRuns:
    """Classify ``records`` against ``planned`` ((run id, resolved config as JSON) pairs): finished
    or failed records whose config equals a planned one except for the identity and whose id is
    not planned are stale; unplanned, unpaired records made by other code are ``other_code``."""
    ids, by_key, codes, current = set(), {}, set(), None
    for run_id, cfg in planned:
        ids.add(run_id)
        by_key[config_key(cfg)] = (run_id, cfg)
        codes.add((cfg.get("identity") or {}).get("code_digest"))
        current = current or cfg
    out = StaleRuns()
    for r in records:
        if r.status not in ("done", "failed") or r.run_id in ids:
            continue
        match = by_key.get(config_key(r.config))
        if match is not None:
            out.records.append(r)
            out.pairs.setdefault(match[0], r)
            _diff(r.config, match[1], out.changes)
        elif current is not None and (r.config.get("identity") or {}).get("code_digest") not in codes:
            out.other_code.append(r)
            old, new = flat_identity(r.config), flat_identity(current)
            for k in CODE_FIELDS:
                if old.get(k) != new.get(k):
                    out.other_code_changes.setdefault(k, set()).add((old.get(k), new.get(k)))
    return out


def kept_stale(store: Store) -> dict[str, str]:
    """The recorded ``--keep-stale`` decisions: planned run id → the kept run's id."""
    try:
        return dict(json.loads(store.get_meta(KEPT_META) or "{}"))
    except (json.JSONDecodeError, TypeError, ValueError):
        return {}


def read_in_study(study_dir: Path, planned: Iterable[tuple[str, dict]]) -> tuple[StaleRuns, dict[str, str]]:
    """``stale_runs`` of a study directory and its recorded kept decisions (none without a study)."""
    if not (Path(study_dir) / DB_NAME).is_file():
        return StaleRuns(), {}
    try:
        with Store(study_dir, create=False) as store:
            return stale_runs(store.runs(), planned), kept_stale(store)
    except DataError:  # a damaged database: the study sets it aside and rebuilds it from runs/
        return StaleRuns(), {}


def stale_in_study(study_dir: Path, planned: Iterable[tuple[str, dict]]) -> StaleRuns:
    """``stale_runs`` of a study directory (none if it holds no study yet)."""
    return read_in_study(study_dir, planned)[0]


def undecided(stale: StaleRuns, kept: Mapping[str, str]) -> StaleRuns:
    """The stale runs no recorded ``--keep-stale`` decision covers."""
    out = StaleRuns(changes={}, other_code=stale.other_code, other_code_changes=stale.other_code_changes)
    kept_ids = set(kept.values())
    for new_id, rec in stale.pairs.items():
        if rec.run_id not in kept_ids:
            out.pairs[new_id] = rec
    out.records = [r for r in stale.records if r.run_id not in kept_ids]
    out.changes = stale.changes if out.records else {}
    return out


def guard_stale(study_dir: Path, planned: Iterable[tuple[str, dict]], *, rerun_stale: bool,
                keep_stale: bool = False) -> StaleRuns:
    """Refuse to resume a study whose results were made under another identity until the user
    decides (see the module docstring): silently running the new ids would spend the study's
    compute again, silently reporting the old ones would mix code versions."""
    if rerun_stale and keep_stale:
        raise ConfigError("--rerun-stale and --keep-stale contradict each other", "choose one")
    stale, kept = read_in_study(study_dir, planned)
    open_ = stale if rerun_stale else undecided(stale, kept)
    if open_.records and not (rerun_stale or keep_stale):
        raise ConfigError(
            f"{open_.message()}; the report leaves them out",
            "run them again under the current identity with --rerun-stale (the old results stay in the database, "
            "unreported), keep the old results with --keep-stale (the report marks which code and library versions "
            "produced them), or use a new --out directory",
        )
    return open_


def decide_kept(store: Store, planned: Iterable[tuple[str, dict]], *, rerun_stale: bool, keep_stale: bool) -> dict[str, str]:
    """Record the user's decision in ``store`` and return the kept pairs (planned id → kept id):
    ``keep_stale`` adds every finished stale run, ``rerun_stale`` forgets every earlier decision.
    A failed stale run is never kept: its planned run runs."""
    kept = {} if rerun_stale else kept_stale(store)
    if keep_stale:
        stale = stale_runs(store.runs(), planned)
        kept.update({new_id: rec.run_id for new_id, rec in stale.pairs.items() if rec.status == "done"})
    store.set_meta(KEPT_META, json.dumps(kept, sort_keys=True))
    return kept
