"""The SQLite store: WAL and durability settings, no duplicate runs, state transitions, resumption."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fewtune.errors import ConfigError
from fewtune.study.store import DB_NAME, Store


def _cfg(task: str = "cola", method: str = "icl", n: int = 16, seed: int = 0) -> dict:
    return {"task": task, "method": method, "model": "tiny-random", "n": n, "seed": seed, "params": {"k": None}}


def test_wal_and_full_sync(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert s.integrity_check() == "ok"


def test_register_is_idempotent_and_keeps_status(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        assert s.register([("a", _cfg()), ("b", _cfg(seed=1))]) == 2
        s.mark_running("a")
        s.mark_done("a", {"eval": {}}, "runs/a")
        assert s.register([("b", _cfg(seed=1)), ("a", _cfg()), ("c", _cfg(seed=2))]) == 1
        assert [r.run_id for r in s.runs()] == ["b", "a", "c"]  # positions follow the latest expansion
        assert s.get("a").status == "done"
        assert s.counts() == {"pending": 2, "running": 0, "done": 1, "failed": 0}


def test_primary_key_forbids_duplicate_rows(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.register([("a", _cfg())])
        with pytest.raises(sqlite3.IntegrityError):
            s.conn.execute("INSERT INTO runs(run_id, position, status, model, task, method, n, seed, params_json, config_json, created_at)"
                           " VALUES('a', 0, 'pending', 'm', 't', 'x', 1, 0, '{}', '{}', 0)")


def test_lifecycle_and_attempts(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.register([("a", _cfg())])
        s.mark_running("a")
        s.mark_failed("a", "TrainingDiverged: loss is NaN")
        r = s.get("a")
        assert (r.status, r.attempts, r.error) == ("failed", 1, "TrainingDiverged: loss is NaN")
        s.mark_running("a")  # a retry
        s.mark_done("a", {"eval": {"cola-id": {"accuracy": 0.5}}}, "runs/a")
        r = s.get("a")
        assert (r.status, r.attempts, r.error, r.run_dir) == ("done", 2, None, "runs/a")
        assert r.metrics == {"eval": {"cola-id": {"accuracy": 0.5}}}
        assert r.config["method"] == "icl" and r.params == {"k": None}
        with pytest.raises(RuntimeError):
            s.mark_running("a")  # a finished run is never started again


def test_stale_running_runs_reset_after_crash(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.register([("a", _cfg()), ("b", _cfg(seed=1))])
    s.mark_running("a")
    s.conn.close()  # the process "dies" with a run marked running
    with Store(tmp_path) as s2:
        assert s2.get("a").status == "running"
        assert s2.reset_stale() == 1
        assert s2.get("a").status == "pending" and s2.get("a").attempts == 1


def test_interrupted_run_goes_back_to_pending(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.register([("a", _cfg())])
        s.mark_running("a")
        s.mark_pending("a")
        assert s.get("a").status == "pending"


def test_failed_transaction_rolls_back(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.register([("a", _cfg())])
        with pytest.raises(KeyError):
            with s.transaction() as c:
                c.execute("UPDATE runs SET status='done' WHERE run_id='a'")
                raise KeyError("boom")
        assert s.get("a").status == "pending"


def test_filters(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.register([("a", _cfg()), ("b", _cfg(seed=1)), ("c", _cfg(seed=2))])
        s.mark_running("b")
        s.mark_failed("b", "x")
        assert [r.run_id for r in s.runs(status="pending")] == ["a", "c"]
        assert [r.run_id for r in s.runs(status=["failed", "done"])] == ["b"]
        assert [r.run_id for r in s.runs(run_ids=["c", "a"])] == ["a", "c"]
        with pytest.raises(ValueError):
            s.runs(status="finished")


def test_missing_study_and_schema_version(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no study database"):
        Store(tmp_path / "nowhere", create=False)
    with Store(tmp_path) as s:
        s.set_meta("schema_version", "999")
    with pytest.raises(ConfigError, match="schema version 999"):
        Store(tmp_path)
    assert (tmp_path / DB_NAME).exists()
