"""Executing a study: the driver that runs the missing runs of a grid, records each in ``study.db``
and resumes after any crash.

The driver is the only writer of ``study.db``, and writes it from its own (main) thread only: an
executor's ``run`` returns the run's outcome as data, and with ``parallel`` > 1 up to that many
``run`` calls execute at once in a thread pool while the driver marks runs running before it
submits them and done or failed as they complete. A run that finished on disk but was never
recorded (the driver died in between) is adopted, not run twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewtune.atomic import write_atomic
from fewtune.errors import ConfigError, OutputError
from fewtune.study.config import StudyConfig
from fewtune.study.executor import Executor, RunOutcome, check_parallel
from fewtune.study.executors import SubprocessExecutor
from fewtune.study.expand import PlannedRun, expand
from fewtune.study.progress import StudyProgress
from fewtune.study.store import DB_NAME, RUNS_DIR, Store, is_study_db

LOCK_NAME = ".lock"
STUDY_FILE = "study.yaml"
MARKER_NAME = ".fewtune-study"  # written first into every study directory: what makes it one


def is_study_dir(out: Path) -> bool:
    """Whether fewtune made ``out`` a study: its marker file, or (a study from before the marker)
    a ``study.db`` with fewtune's schema. A ``study.yaml`` or ``report.md`` proves nothing: they
    may be the user's own files, which a study must never overwrite."""
    out = Path(out)
    return (out / MARKER_NAME).is_file() or is_study_db(out / DB_NAME)


def _same_file(source: str, path: Path) -> bool:
    try:
        return bool(source) and Path(source).resolve() == path.resolve()
    except OSError:
        return False


@contextmanager
def study_lock(out_dir: Path) -> Iterator[None]:
    """One process per study directory. An OS file lock (flock) is released by the kernel when
    the holder dies — even by ``kill -9`` — so a crashed study never blocks its own resumption."""
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / MARKER_NAME
    if not marker.exists():
        marker.write_text("a fewtune study directory (fewtune study --out); fewtune writes here\n")
    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(f"another fewtune study is running in {out_dir} (pid {holder})",
                              "wait for it to finish, or use another --out directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _clean_leftovers(runs_dir: Path) -> int:
    """Temporary run directories of a run killed mid-write (the runner renames them into place
    only when complete). Safe to delete: we hold the study lock."""
    removed = 0
    if runs_dir.is_dir():
        for p in runs_dir.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
    return removed


@dataclass
class StudyOutcome:
    """What a call of ``run_study`` did, and where the study stands."""

    out_dir: Path
    planned: int
    ran: int = 0  # runs executed in this call (successful or not)
    succeeded: int = 0
    failed_now: int = 0
    adopted: int = 0  # finished on disk but not yet recorded (crash between write and commit)
    skipped_done: int = 0
    skipped_failed: int = 0
    missing: list[str] = field(default_factory=list)  # recorded done, directory deleted: run again
    counts: dict[str, int] = field(default_factory=dict)  # over the study's runs, after this call
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (run id, label, error)

    @property
    def complete(self) -> bool:
        return self.counts.get("done", 0) == self.planned


def _metrics_line(metrics: dict[str, Any]) -> str:
    parts = []
    for name, ev in (metrics.get("eval") or {}).items():
        acc = ev.get("accuracy")
        parts.append(f"{name} {acc:.3f}" if isinstance(acc, (int, float)) else f"{name} –")
    return ", ".join(parts)


def run_study(
    study: StudyConfig,
    out_dir: Path | str,
    *,
    retry_failed: bool = False,
    limit: int | None = None,
    data_dir: Path | None = None,
    console: Any = None,
    show_progress: bool = True,
    executor: Executor | None = None,
    planned: list[PlannedRun] | None = None,
    parallel: int = 1,
) -> StudyOutcome:
    """Run every missing run of ``study`` into ``out_dir``; safe to call again after any crash.

    ``executor`` decides where each run happens: by default ``SubprocessExecutor`` (a fresh
    process per run, so each run's peak memory is its own); ``InProcessExecutor(runner)`` for
    tests and debugging. ``parallel`` runs up to that many runs at once (not with an executor
    whose ``max_parallel`` is 1). ``limit`` caps how many runs this call executes. Failed runs are
    recorded with their error and skipped on the next call unless ``retry_failed``. A run
    recorded done whose directory was deleted runs again.
    """
    from rich.console import Console

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    ex = executor or SubprocessExecutor()
    check_parallel(ex, parallel)
    out = Path(out_dir)
    console = console or Console(stderr=True)
    planned = planned if planned is not None else expand(study)
    outcome = StudyOutcome(out, len(planned))
    with study_lock(out), ex:
        ex.start(parallel)
        if not _same_file(study.source, out / STUDY_FILE):  # the user's own config is never rewritten in place
            write_atomic(out / STUDY_FILE, study.to_yaml())
        with Store(out) as store:
            todo = _prepare(study, planned, store, out, retry_failed, outcome, console)
            if limit is not None:
                todo = todo[:limit]
            with StudyProgress(study.name, len(todo), console, enabled=show_progress) as board:
                _Driver(store, out, ex, data_dir, outcome, console, board, parallel).run_all(todo)
            outcome.counts = _counts(store, [p.run_id for p in planned])
    return outcome


def _prepare(study: StudyConfig, planned: list[PlannedRun], store: Store, out: Path, retry_failed: bool,
             outcome: StudyOutcome, console: Any) -> list[PlannedRun]:
    """Record the study and its runs, undo what a crash left behind, and list the runs to execute."""
    from rich.markup import escape

    if store.quarantined:
        console.print(f"[yellow]warning:[/yellow] {escape(str(store.path))} was damaged; set aside as "
                      f"{escape(store.quarantined.name)} and rebuilt from the finished runs in {escape(str(out / RUNS_DIR))}")
    store.set_meta("study", json.dumps({"name": study.name, "description": study.description, "source": study.source,
                                        "overrides": [o.text() for o in study.overrides]}))
    store.set_meta("study_run_ids", json.dumps([p.run_id for p in planned]))
    store.register((p.run_id, p.config.model_dump(mode="json")) for p in planned)
    store.reset_stale()
    _clean_leftovers(out / RUNS_DIR)
    return _select(planned, store, out, retry_failed, outcome, console)


def _select(planned: list[PlannedRun], store: Store, out: Path, retry_failed: bool, outcome: StudyOutcome,
            console: Any) -> list[PlannedRun]:
    """The runs to execute, in order. A run recorded done whose ``metrics.json`` is gone (its
    directory deleted by hand) goes back to pending and runs again: reports read the files."""
    from rich.markup import escape

    records = {r.run_id: r for r in store.runs(run_ids=[p.run_id for p in planned])}
    todo = []
    for p in planned:
        rec = records[p.run_id]
        if rec.status == "done" and not (out / (rec.run_dir or f"{RUNS_DIR}/{p.run_id}") / "metrics.json").is_file():
            store.requeue_missing(p.run_id)
            outcome.missing.append(p.run_id)
            console.print(f"[yellow]![/yellow] {escape(p.label())} {escape(f'[{p.run_id}]')}: recorded done but its "
                          f"directory is missing; running it again")
            todo.append(p)
        elif rec.status == "done":
            outcome.skipped_done += 1
        elif rec.status == "failed" and not retry_failed:
            outcome.skipped_failed += 1
        else:
            todo.append(p)
    return todo


def _counts(store: Store, run_ids: list[str]) -> dict[str, int]:
    counts = {"pending": 0, "running": 0, "done": 0, "failed": 0}
    for r in store.runs(run_ids=run_ids):
        counts[r.status] += 1
    return counts


def _adopt(p: PlannedRun, store: Store, run_dir: Path, rel: str) -> bool:
    """A run directory written completely (the runner renames a finished directory into place)
    but not recorded, because the process died in between: record it rather than run it twice.
    Anything else in its place is removed. True when adopted."""
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError):
            metrics = None
        # (The directory name is the run id; metrics["run_id"] is the runner's own hash, which may
        # differ, e.g. after it clips max_context to the model's positions.)
        if isinstance(metrics, dict) and metrics.get("status", "ok") == "ok" and isinstance(metrics.get("eval"), dict):
            store.mark_done(p.run_id, metrics, rel)
            return True
    if run_dir.exists():
        shutil.rmtree(run_dir)  # not a finished run: never produced by the atomic runner, but be safe
    return False


def _raise_output_error(result: RunOutcome) -> None:
    """An ``OutputError`` (a full or read-only disk) raised where the run executed comes back as
    data; it is not the run's fault, so it stops the study instead of failing the run."""
    if result.error_type == OutputError.__name__:
        message, _, hint = (result.error or "").split(": ", 1)[-1].partition("\n  hint: ")
        raise OutputError(message, hint or None)


@dataclass
class _Flight:
    """A run handed to the executor: what it is and when it started."""

    planned: PlannedRun
    rel: str
    t0: float = field(default_factory=time.time)


@dataclass
class _Driver:
    """Keeps up to ``parallel`` runs in flight. Every ``study.db`` write happens here, on the
    calling thread; with ``parallel`` == 1 the run executes on this thread too, so Ctrl-C reaches
    the executor directly (and an in-process run can be debugged)."""

    store: Store
    out: Path
    executor: Executor
    data_dir: Path | None
    outcome: StudyOutcome
    console: Any
    board: StudyProgress
    parallel: int = 1

    def run_all(self, todo: list[PlannedRun]) -> None:
        queue = deque(todo)
        inflight: dict[Future[RunOutcome], _Flight] = {}
        pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="fewtune-run") if self.parallel > 1 else None
        try:
            if queue:
                self.executor.prepare()
            while queue or inflight:
                while queue and len(inflight) < self.parallel:
                    flight = self._start(queue.popleft())
                    if flight is not None:
                        inflight[self._submit(flight, pool)] = flight
                if inflight:
                    done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                    for fut in done:
                        self._finish(inflight.pop(fut), fut)
        except BaseException:
            # Ctrl-C, a full disk: stop every run still in flight and keep it pending, so that
            # re-running resumes it (if even that cannot be written, the run stays "running",
            # which the next call's reset_stale turns back into pending).
            self._abandon(inflight)
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _start(self, p: PlannedRun) -> _Flight | None:
        """Adopt the run if it finished unrecorded, else mark it running (None when adopted)."""
        rel = f"{RUNS_DIR}/{p.run_id}"
        if _adopt(p, self.store, self.out / rel, rel):
            self.outcome.adopted += 1
            self.board.adopted()
            return None
        self.store.mark_running(p.run_id)
        self.outcome.ran += 1
        self.board.started(p.run_id, p.label())
        return _Flight(p, rel)

    def _submit(self, flight: _Flight, pool: ThreadPoolExecutor | None) -> Future[RunOutcome]:
        def call() -> RunOutcome:
            return self.executor.run(flight.planned, self.out / flight.rel, data_dir=self.data_dir, progress=self.board.progress)

        if pool is not None:
            return pool.submit(call)
        fut: Future[RunOutcome] = Future()
        try:
            fut.set_result(call())
        except Exception as e:  # noqa: BLE001 — handed to _finish like a pool's future; Ctrl-C passes
            fut.set_exception(e)
        except BaseException:
            self._keep_pending(flight)
            raise
        return fut

    def _finish(self, flight: _Flight, fut: Future[RunOutcome]) -> None:
        """Record one run's outcome (on the driver's thread)."""
        from rich.markup import escape

        p = flight.planned
        try:
            result = fut.result()
            _raise_output_error(result)
        except BaseException:
            self._keep_pending(flight)
            raise
        self.board.finished(p.run_id, ok=result.ok)
        if not result.ok:
            msg = result.error or ""
            self.store.mark_failed(p.run_id, msg)
            self.outcome.failed_now += 1
            self.outcome.failures.append((p.run_id, p.label(), msg.splitlines()[0] if msg else ""))
            self.console.print(f"[red]✗ failed[/red] {escape(p.label())} {escape(f'[{p.run_id}]')}: "
                               f"{escape(msg.splitlines()[0] if msg else '')}")
            return
        metrics = result.metrics or {}
        self.store.mark_done(p.run_id, metrics, flight.rel)
        self.outcome.succeeded += 1
        self.console.print(f"[green]✓[/green] {escape(p.label())} {escape(f'[{p.run_id}]')}: "
                           f"{escape(_metrics_line(metrics))} ({time.time() - flight.t0:.0f} s)")

    def _abandon(self, inflight: dict[Future[RunOutcome], _Flight]) -> None:
        """Stop the runs in flight (their processes end; no result is recorded) and keep them pending.
        A run that finished meanwhile is adopted from its directory by the next call."""
        if not inflight:
            return
        self.executor.interrupt()
        wait(inflight)
        for flight in inflight.values():
            self._keep_pending(flight)

    def _keep_pending(self, flight: _Flight) -> None:
        with suppress(sqlite3.Error):
            self.store.mark_pending(flight.planned.run_id)
