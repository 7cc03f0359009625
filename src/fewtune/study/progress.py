"""The study's progress display: one overall bar with done / running / failed counts and an ETA,
and one line per running run with its name.

The ETA comes from the runs finished in this call (time since the first run started, divided by
the runs finished, times the runs left): with runs in parallel, that rate already counts the
parallelism, and unlike rich's own estimate (a moving window of seconds) it does not blank out
when each run takes minutes. Only the driver's thread updates it.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text


class _CountsColumn(ProgressColumn):
    """The overall bar's counts and ETA, a run line's nothing, an inner bar's (a run's own
    training or eval, in-process) ``completed/total``."""

    def render(self, task: Task) -> Text:
        if "counts" in task.fields:
            return Text(task.fields["counts"])
        if task.fields.get("run_line"):
            return Text("")
        total = "?" if task.total is None else f"{task.total:.0f}"
        return Text(f"{task.completed:.0f}/{total}")


class StudyProgress:
    """Progress of one call of ``run_study`` over ``total`` runs to execute."""

    def __init__(self, name: str, total: int, console: Any, *, enabled: bool = True) -> None:
        self.name = name
        self.total = total
        self.done = self.failed = self.executed = 0
        self.t0: float | None = None
        self._running: dict[str, TaskID] = {}
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), _CountsColumn(), TimeElapsedColumn(),
                                 console=console, disable=not enabled, transient=False)
        self._overall = self.progress.add_task(escape(f"study {name}"), total=total, counts="")
        self._refresh()

    def __enter__(self) -> StudyProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def eta(self) -> timedelta | None:
        """Time left at the rate of the runs finished in this call; None before the first."""
        if not self.executed or self.t0 is None:
            return None
        per_run = (time.time() - self.t0) / self.executed
        return timedelta(seconds=round(per_run * (self.total - self.done - self.failed)))

    def counts_text(self) -> str:
        eta = self.eta()
        return (f"{self.done + self.failed}/{self.total} · done {self.done} · running {len(self._running)} · "
                f"failed {self.failed} · ETA {eta if eta is not None else '–'}")

    def started(self, run_id: str, label: str) -> None:
        if self.t0 is None:
            self.t0 = time.time()
        self._running[run_id] = self.progress.add_task(escape(f"  ▸ {label}"), total=None, run_line=True)
        self._refresh()

    def finished(self, run_id: str, *, ok: bool) -> None:
        self.executed += 1
        self.done += ok
        self.failed += not ok
        self.progress.remove_task(self._running.pop(run_id))
        self._drop_leftovers()
        self.progress.advance(self._overall)
        self._refresh()

    def adopted(self) -> None:
        """A run found finished on disk: done, but no measure of how long runs take."""
        self.done += 1
        self.progress.advance(self._overall)
        self._refresh()

    def _drop_leftovers(self) -> None:
        """Bars a finished in-process run left behind (its training, its eval sets)."""
        keep = {self._overall, *self._running.values()}
        for t in list(self.progress.task_ids):
            if t not in keep:
                self.progress.remove_task(t)

    def _refresh(self) -> None:
        self.progress.update(self._overall, counts=self.counts_text())
