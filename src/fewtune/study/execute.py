"""Executing a study: the driver that runs the missing runs of a grid, records each in ``study.db``
and resumes after any crash.

The driver is the only writer of ``study.db``, and writes it from its own (main) thread only: an
executor's ``run`` returns the run's outcome as data, and with ``parallel`` > 1 up to that many
``run`` calls execute at once in a thread pool while the driver marks runs running before it
submits them and done or failed as they complete. A run that finished on disk but was never
recorded (the driver died in between) is adopted, not run twice.
"""

from __future__ import annotations

import dataclasses
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
from fewtune.errors import ConfigError, DataError, OutputError
from fewtune.study.config import DEFAULT_THREADS, StudyConfig
from fewtune.study.executor import Executor, RunOutcome, check_parallel
from fewtune.study.executors import SubprocessExecutor
from fewtune.study.expand import PlannedRun, expand
from fewtune.study.pack import PackPlan, check_pack, group, member_outcomes
from fewtune.study.progress import StudyProgress
from fewtune.study.stale import decide_kept
from fewtune.study.store import DB_NAME, RUNS_DIR, Store, is_study_db

LOCK_NAME = ".lock"
STUDY_FILE = "study.yaml"
MARKER_NAME = ".fewtune-study"  # written first into every study directory: what makes it one
THREADS_META = "threads"  # study.db meta: the torch threads every run of the study computes with


def recorded_threads(out_dir: Path) -> int | None:
    """The thread count a study directory's runs were computed with (None: no study yet)."""
    if not (Path(out_dir) / DB_NAME).is_file():
        return None
    try:
        with Store(out_dir, create=False) as store:
            value = store.get_meta(THREADS_META)
    except (DataError, sqlite3.DatabaseError):  # damaged: the study rebuilds it (and records again)
        return None
    return int(value) if value and value.isdigit() else None


def study_threads(study: StudyConfig, out_dir: Path, requested: int | None = None) -> int:
    """The torch threads of every run of ``study`` in ``out_dir``: ``requested`` (``--threads``),
    else the study's ``threads`` key, else what the directory recorded, else ``DEFAULT_THREADS``.
    A study is never resumed with another count: on CPU the numbers depend on it, so its runs
    would mix (or all run again under new ids) — a usage error instead. ``study`` is left as it is:
    the caller passes the value on (``dataclasses.replace(study, threads=…)``)."""
    threads, source = (requested, "--threads") if requested else (study.threads, "the study config")
    recorded = recorded_threads(out_dir)
    if recorded is not None and threads is not None and threads != recorded:
        raise ConfigError(
            f"the runs in {out_dir} compute with {recorded} torch thread(s) each (recorded in {DB_NAME}), but "
            f"{source} asks for {threads}: on CPU the thread count changes the results",
            f"resume with {recorded} thread(s) (drop --threads / the study's 'threads:' key, or set it to {recorded}), "
            "or start a new --out directory",
        )
    return threads or recorded or DEFAULT_THREADS


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
    if not marker.exists():  # atomic: a failed write (full disk) must not leave a half marker that claims the directory
        write_atomic(marker, "a fewtune study directory (fewtune study --out); fewtune writes here\n")
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
    kept: int = 0  # planned runs standing in for by a kept stale run (--keep-stale)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (run id, label, error)

    @property
    def complete(self) -> bool:
        return self.counts.get("done", 0) + self.counts.get("kept", 0) == self.planned


def _metrics_line(metrics: dict[str, Any]) -> str:
    parts = []
    for name, ev in (metrics.get("eval") or {}).items():
        acc = ev.get("accuracy")
        parts.append(f"{name} {acc:.3f}" if isinstance(acc, (int, float)) else f"{name} –")
    return ", ".join(parts)


def _todo(study: StudyConfig, planned: list[PlannedRun], store: Store, out: Path, retry_failed: bool, outcome: StudyOutcome,
          console: Any, kept: dict[str, str], limit: int | None) -> list[PlannedRun]:
    """The runs this call executes: those not done (``_prepare``), less those whose kept stale
    counterpart stands in for them, at most ``limit``."""
    todo = [p for p in _prepare(study, planned, store, out, retry_failed, outcome, console) if p.run_id not in kept]
    outcome.kept = sum(p.run_id in kept for p in planned)
    return todo if limit is None else todo[:limit]


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
    pack: int | None = None,
    rerun_stale: bool = False,
    keep_stale: bool = False,
) -> StudyOutcome:
    """Run every missing run of ``study`` into ``out_dir``; safe to call again after any crash.

    ``executor`` decides where each run happens: by default ``SubprocessExecutor`` (a fresh
    process per run, so each run's peak memory is its own); ``InProcessExecutor(runner)`` for
    tests and debugging. ``parallel`` runs up to that many runs at once (not with an executor
    whose ``max_parallel`` is 1). ``limit`` caps how many runs this call executes. Failed runs are
    recorded with their error and skipped on the next call unless ``retry_failed``. A run
    recorded done whose directory was deleted runs again. ``pack`` (default: the study's ``pack:``,
    else off) runs up to that many packable runs together as one unit (``study.pack``).

    Every run computes with ``study_threads`` torch threads (the executor sees to it), recorded
    in ``study.db``. ``keep_stale``/``rerun_stale``: the user's decision about stale runs
    (``fewtune.study.stale``), recorded; planned runs whose stale counterpart is kept are not run.
    """
    from rich.console import Console

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    ex = executor or SubprocessExecutor()
    check_parallel(ex, parallel)
    k = check_pack(pack if pack is not None else study.pack, ex.name)
    out = Path(out_dir)
    console = console or Console(stderr=True)
    threads = study_threads(study, out)
    study = dataclasses.replace(study, threads=threads)
    planned = planned if planned is not None else expand(study)
    _check_planned_threads(planned, threads)
    outcome = StudyOutcome(out, len(planned))
    with study_lock(out), ex:
        ex.start(parallel, threads)
        if not _same_file(study.source, out / STUDY_FILE):  # the user's own config is never rewritten in place
            write_atomic(out / STUDY_FILE, study.to_yaml())
        with Store(out) as store:
            store.set_meta(THREADS_META, str(threads))
            kept = decide_kept(store, [(p.run_id, p.config.model_dump(mode="json")) for p in planned],
                               rerun_stale=rerun_stale, keep_stale=keep_stale)
            todo = _todo(study, planned, store, out, retry_failed, outcome, console, kept, limit)
            with StudyProgress(study.name, len(todo), console, enabled=show_progress) as board:
                _Driver(store, out, ex, data_dir, outcome, console, board, parallel, k).run_all(todo)
            outcome.counts = _counts(store, [p.run_id for p in planned], kept)
    return outcome


def _check_planned_threads(planned: list[PlannedRun], threads: int) -> None:
    """A plan resolved for another thread count than the executors will use would record ids
    that the runs' own config.yaml contradict (a caller's mistake, not the user's)."""
    other = {p.config.identity.threads for p in planned if p.config.identity is not None} - {None, threads}
    if other:
        raise ValueError(f"the planned runs were resolved for {sorted(other)} torch threads, the study uses {threads}: "
                         "expand the study after setting its threads (study_threads)")


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


def _counts(store: Store, run_ids: list[str], kept: dict[str, str] | None = None) -> dict[str, int]:
    """Statuses of the planned runs; a run not done whose stale counterpart is kept counts as kept."""
    counts = {"pending": 0, "running": 0, "done": 0, "failed": 0, "kept": 0}
    for r in store.runs(run_ids=run_ids):
        counts["kept" if r.status != "done" and r.run_id in (kept or {}) else r.status] += 1
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
    """A run (or a pack of runs) handed to the executor: what it is and when it started."""

    planned: PlannedRun | PackPlan
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
    pack: int = 1

    def run_all(self, todo: list[PlannedRun]) -> None:
        queue = deque(group(todo, self.pack))
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

    def _start(self, unit: list[PlannedRun]) -> _Flight | None:
        """Adopt each run that finished unrecorded, mark the others running; they fly as one run
        or as one pack (None when all were adopted)."""
        live = []
        for p in unit:
            rel = f"{RUNS_DIR}/{p.run_id}"
            if _adopt(p, self.store, self.out / rel, rel):
                self.outcome.adopted += 1
                self.board.adopted()
                continue
            self.store.mark_running(p.run_id)
            self.outcome.ran += 1
            self.board.started(p.run_id, p.label())
            live.append(p)
        if len(live) <= 1:
            return _Flight(live[0], f"{RUNS_DIR}/{live[0].run_id}") if live else None
        plan = PackPlan(tuple(live), tuple(self.out / RUNS_DIR / p.run_id for p in live))
        return _Flight(plan, f"{RUNS_DIR}/.{plan.run_id}")

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
        """Record the outcome of one run, or of each run of a pack (on the driver's thread)."""
        try:
            result = fut.result()
            members = member_outcomes(flight.planned, result) if isinstance(flight.planned, PackPlan) else [(flight.planned, result)]
            for _, r in members:
                _raise_output_error(r)
        except BaseException:
            self._keep_pending(flight)
            raise
        for p, r in members:
            self._record(p, r, f"{RUNS_DIR}/{p.run_id}", flight.t0)

    def _record(self, p: PlannedRun, result: RunOutcome, rel: str, t0: float) -> None:
        from rich.markup import escape

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
        self.store.mark_done(p.run_id, metrics, rel)
        self.outcome.succeeded += 1
        self.console.print(f"[green]✓[/green] {escape(p.label())} {escape(f'[{p.run_id}]')}: "
                           f"{escape(_metrics_line(metrics))} ({time.time() - t0:.0f} s)")

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
        members = flight.planned.members if isinstance(flight.planned, PackPlan) else (flight.planned,)
        with suppress(sqlite3.Error):
            for p in members:
                self.store.mark_pending(p.run_id)
