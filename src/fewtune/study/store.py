"""Durable storage of a study's runs: one SQLite database per study directory.

Why SQLite: a study can be killed at any moment (``kill -9``, OOM, a pre-empted GPU node) and must
resume without duplicated or corrupt rows. SQLite gives us atomic transactions and a primary key on
the run id (the content hash of the resolved config), so a run can be recorded at most once and a
crash mid-write leaves the previous committed state.

Layout of a study directory ``DIR``::

    DIR/study.db            this database (WAL mode)
    DIR/runs/<run_id>/      files written atomically by the runner: config.yaml, sample.json,
                            metrics.json, predictions.jsonl (the per-example predictions)

The ``run_dir`` column stores the run directory *relative to DIR*, so a study directory can be moved
or copied as a whole.

Durability choice: ``journal_mode=WAL`` with ``synchronous=FULL``. In WAL mode ``NORMAL`` is already
safe against a *process* crash (the case we test), but can lose the last committed transactions on a
power loss or kernel panic. A study commits only a handful of transactions per run and a run lasts
seconds to hours, so the extra fsync of ``FULL`` costs nothing measurable and buys durability against
machine crashes too.

Every state change is a single short ``BEGIN IMMEDIATE … COMMIT`` transaction.

Damage (a 0-byte or overwritten file, a failed integrity check): a reader (``create=False``, the
report) refuses it with a hint; a writer (``fewtune study``) sets it aside as
``study.db.damaged-<time>`` and starts a new one, which the study fills again by adopting every
finished run directory under ``runs/`` (``study._execute``) — nothing is run twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewtune.errors import ConfigError, DataError

DB_NAME = "study.db"
RUNS_DIR = "runs"
SCHEMA_VERSION = 1

STATUSES = ("pending", "running", "done", "failed")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    run_id       TEXT PRIMARY KEY,
    position     INTEGER NOT NULL,          -- order in the study's expansion (runs execute in this order)
    status       TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    model        TEXT NOT NULL,
    task         TEXT NOT NULL,
    method       TEXT NOT NULL,
    n            INTEGER NOT NULL,
    seed         INTEGER NOT NULL,
    params_json  TEXT NOT NULL,             -- method parameters (resolved)
    config_json  TEXT NOT NULL,             -- the whole resolved RunConfig
    metrics_json TEXT,                      -- metrics.json of a finished run
    error        TEXT,                      -- last error of a failed run
    attempts     INTEGER NOT NULL DEFAULT 0,
    created_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    run_dir      TEXT                       -- relative to the study directory
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class RunRecord:
    """One row of the ``runs`` table, with its JSON columns decoded."""

    run_id: str
    position: int
    status: str
    model: str
    task: str
    method: str
    n: int
    seed: int
    params: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Any] | None
    error: str | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    run_dir: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> RunRecord:
        return cls(
            run_id=row["run_id"],
            position=row["position"],
            status=row["status"],
            model=row["model"],
            task=row["task"],
            method=row["method"],
            n=row["n"],
            seed=row["seed"],
            params=json.loads(row["params_json"]),
            config=json.loads(row["config_json"]),
            metrics=json.loads(row["metrics_json"]) if row["metrics_json"] else None,
            error=row["error"],
            attempts=row["attempts"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            run_dir=row["run_dir"],
        )


def rebuild_hint(study_dir: Path) -> str:
    return (f"run `fewtune study <your study config> --out {study_dir}` again, with the same --set/--seeds/--n "
            f"(the config as run is in {study_dir / 'study.yaml'}): it sets the damaged database aside and rebuilds "
            f"it from the finished runs in {study_dir / RUNS_DIR}, without running them again")


def _set_aside(path: Path) -> Path:
    """Move a damaged database (and its WAL files, which belong to it) out of the way, keeping it
    for inspection; a new one is then built from the run directories."""
    target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        src = path.with_name(path.name + suffix)
        if src.exists():
            src.rename(target.with_name(target.name + suffix))
    return target


def is_study_db(path: Path) -> bool:
    """Whether ``path`` is a database fewtune wrote (its tables and schema version), read without
    writing anything beside it (``immutable``: no -wal/-shm). A user's own ``study.db`` is not."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            return {"runs", "meta"} <= tables and conn.execute("SELECT 1 FROM meta WHERE key='schema_version'").fetchone() is not None
        finally:
            conn.close()
    except sqlite3.Error:
        return False


def _dumps(obj: Any) -> str:
    """Canonical JSON (sorted keys) so equal configs are stored as equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


class Store:
    """The study database. Open with ``Store(DIR)``; use as a context manager to close it."""

    def __init__(self, study_dir: Path | str, *, create: bool = True) -> None:
        self.dir = Path(study_dir)
        self.path = self.dir / DB_NAME
        if not self.path.exists() and not create:
            raise ConfigError(
                f"no study database at {self.path}",
                "pass the directory given to `fewtune study --out DIR`",
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.quarantined: Path | None = None  # where a damaged database was moved (create=True only)
        self.conn = self._connect()
        problem = self._damage(require_tables=not create)
        if problem is not None:
            self.conn.close()
            if not create:
                raise DataError(f"the study database {self.path} is damaged: {problem}", rebuild_hint(self.dir))
            self.quarantined = _set_aside(self.path)
            self.conn = self._connect()
        mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":  # e.g. some network file systems
            raise ConfigError(
                f"cannot use WAL journal mode for {self.path} (got {mode!r})",
                "put the study directory on a local file system",
            )
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        # executescript() issues its own COMMIT first, so run it outside our explicit transaction;
        # every statement is idempotent (IF NOT EXISTS).
        self.conn.executescript(_SCHEMA)
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(version) != SCHEMA_VERSION:
            raise ConfigError(
                f"study database {self.path} has schema version {version}, this fewtune writes {SCHEMA_VERSION}",
                "use a new --out directory or the fewtune version that created it",
            )

    # -- plumbing ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so that each state change is
        # exactly one transaction (the sqlite3 module's implicit transactions are easy to leave open).
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        conn.row_factory = sqlite3.Row
        return conn

    def _damage(self, *, require_tables: bool) -> str | None:
        """Why the file is not a usable study database, or None. ``quick_check`` reads every page
        (milliseconds for a study's few MB); a 0-byte file is a valid *empty* SQLite database, so
        a reader also requires the tables and the schema version every study writes first."""
        try:
            check = str(self.conn.execute("PRAGMA quick_check").fetchone()[0])
            if check != "ok":
                return f"integrity check failed ({check})"
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if require_tables and not ({"runs", "meta"} <= tables and
                                       self.conn.execute("SELECT 1 FROM meta WHERE key='schema_version'").fetchone()):
                return f"it holds no study tables ({self.path.stat().st_size} bytes)"
        except sqlite3.DatabaseError as e:
            return str(e)
        return None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: BEGIN IMMEDIATE takes the write lock up front, so no deadlock upgrade."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])

    # -- meta --------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    # -- runs --------------------------------------------------------------------------------

    def register(self, configs: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Add runs as ``pending`` unless already known; returns how many were new.

        ``configs`` are ``(run_id, resolved config as JSON-able dict)`` pairs. An existing run keeps
        its status and results (that is what makes re-running a study skip finished runs); only its
        position is updated to the new expansion order.
        """
        now = time.time()
        new = 0
        with self.transaction() as c:
            for position, (run_id, cfg) in enumerate(configs):
                if c.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone():
                    c.execute("UPDATE runs SET position=? WHERE run_id=?", (position, run_id))
                    continue
                c.execute(
                    "INSERT INTO runs(run_id, position, status, model, task, method, n, seed, params_json,"
                    " config_json, created_at) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        run_id,
                        position,
                        "pending",
                        str(cfg["model"]),
                        str(cfg["task"]),
                        str(cfg["method"]),
                        int(cfg["n"]),
                        int(cfg["seed"]),
                        _dumps(cfg.get("params") or {}),
                        _dumps(cfg),
                        now,
                    ),
                )
                new += 1
        return new

    def get(self, run_id: str) -> RunRecord | None:
        row = self.conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return None if row is None else RunRecord.from_row(row)

    def runs(self, status: str | Iterable[str] | None = None, run_ids: Iterable[str] | None = None) -> list[RunRecord]:
        """Runs in study order, optionally filtered by status and/or ids."""
        sql, args = "SELECT * FROM runs", []
        where = []
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            for s in statuses:
                if s not in STATUSES:
                    raise ValueError(f"unknown run status {s!r}")
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args += statuses
        if run_ids is not None:
            ids = list(run_ids)
            where.append(f"run_id IN ({','.join('?' * len(ids))})")
            args += ids
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY position, run_id"
        return [RunRecord.from_row(r) for r in self.conn.execute(sql, args)]

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for status, count in self.conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"):
            out[status] = count
        return out

    def reset_stale(self) -> int:
        """Runs left ``running`` by a crashed process go back to ``pending``; returns how many.

        Only call this while holding the study lock (see ``study.StudyLock``): then no other process
        can be running them.
        """
        with self.transaction() as c:
            return c.execute("UPDATE runs SET status='pending' WHERE status='running'").rowcount

    def mark_running(self, run_id: str) -> None:
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE runs SET status='running', attempts=attempts+1, started_at=?, finished_at=NULL"
                " WHERE run_id=? AND status IN ('pending','failed')",
                (time.time(), run_id),
            )
            if cur.rowcount != 1:
                raise RuntimeError(f"run {run_id} is not pending or failed; cannot start it")

    def mark_done(self, run_id: str, metrics: dict[str, Any], run_dir: str) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status='done', metrics_json=?, error=NULL, finished_at=?, run_dir=? WHERE run_id=?",
                (_dumps(metrics), time.time(), run_dir, run_id),
            )

    def mark_failed(self, run_id: str, error: str) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status='failed', error=?, finished_at=? WHERE run_id=?",
                (error, time.time(), run_id),
            )

    def requeue_missing(self, run_id: str) -> None:
        """A run recorded done whose files were deleted: pending again, so it runs again (a
        report built from the database alone would otherwise cite files that do not exist)."""
        with self.transaction() as c:
            c.execute("UPDATE runs SET status='pending', metrics_json=NULL, run_dir=NULL WHERE run_id=? AND status='done'",
                      (run_id,))

    def mark_pending(self, run_id: str) -> None:
        """An interrupted run (Ctrl-C) is neither done nor failed: it will simply run again."""
        with self.transaction() as c:
            c.execute("UPDATE runs SET status='pending' WHERE run_id=? AND status='running'", (run_id,))
