"""The executor interface: what a study hands an executor and gets back (``RunOutcome``), and the
base class every executor implements. Apart from the executors themselves so that each one
(``executors``, ``ray_executor``) depends on this interface only, never on another executor."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewtune.errors import ConfigError, FewtuneError

if TYPE_CHECKING:
    from fewtune.study.expand import PlannedRun

Runner = Callable[..., Any]
"""``runner(config, out_dir, *, data_dir, progress)`` → an object with ``.metrics`` (or a mapping);
``fewtune.run.runner.run_experiment`` by default. Injectable so tests can stand in for real runs."""

# Imported once by the fork server, so that each run's process starts with them in memory (the
# embedded model is a Llama: its modeling code is imported lazily by transformers otherwise).
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "peft", "fewtune.run.runner", "fewtune.run.pack"]


@dataclass(frozen=True)
class RunOutcome:
    """What became of one run: ``metrics`` when it finished, else ``error``.

    ``error`` is ``"<ExceptionType>: message"`` (plus the traceback for a bug, not for a
    ``FewtuneError``, whose message is the whole story); ``error_type`` keeps the class name so a
    ``TrainingDiverged`` stays distinguishable after crossing a process boundary."""

    metrics: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def format_error(e: BaseException) -> str:
    if isinstance(e, FewtuneError):
        return f"{type(e).__name__}: {e}"
    return f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exception(type(e), e, e.__traceback__))


def outcome_of(run: Callable[[], Any]) -> RunOutcome:
    """Call ``run`` and turn its result or exception into a ``RunOutcome`` (KeyboardInterrupt and
    SystemExit pass through: they stop the study, they are not a run's result)."""
    try:
        result = run()
    except Exception as e:  # noqa: BLE001 — a failed run is recorded, the study goes on
        return RunOutcome(error=format_error(e), error_type=type(e).__name__)
    return RunOutcome(metrics=result.metrics if hasattr(result, "metrics") else dict(result))


def default_runner() -> Runner:
    """``run_experiment``, or for a pack of runs (``study.pack``) ``run_pack``: ``run.pack.run_unit``."""
    from fewtune.run.pack import run_unit

    return run_unit


class Executor:
    """Runs planned runs somewhere; a context manager so it can hold workers between runs.

    The study calls ``start(parallel, threads)`` once, then ``run`` for each run — from ``parallel``
    threads at once when ``parallel`` > 1, so ``run`` must then be thread-safe — and, on Ctrl-C,
    ``interrupt()`` from its own thread while runs are in flight."""

    name = "executor"
    max_parallel: int | None = None  # the most runs it can hold at once; None: no limit of its own

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, parallel: int = 1, threads: int | None = None) -> None:
        """Prepare for up to ``parallel`` runs at once, each computing with ``threads`` torch
        threads (the study's; None: as the calling process). Every executor must give each run
        exactly ``threads``, whatever ``parallel`` is: the thread count is in the run's identity."""

    def prepare(self) -> None:
        """Called on the driver's main thread just before the first run is handed over, only when
        there is a run to execute: the place for slow set-up (starting a Ray cluster), where a
        Ctrl-C reaches the driver. Nothing by default."""

    def close(self) -> None:
        """Release workers (nothing to release by default)."""

    def run(self, planned: PlannedRun, run_dir: Path, *, data_dir: Path | None = None, progress: Any = None) -> RunOutcome:
        """Execute ``planned`` into ``run_dir`` (written atomically by the runner) and return its
        outcome. Raises KeyboardInterrupt when interrupted, after stopping the run."""
        raise NotImplementedError

    def interrupt(self) -> None:
        """Stop every run in flight: each ``run`` call stops its run (no half-written directory
        left) and raises KeyboardInterrupt soon. Called from another thread than ``run``'s."""


def check_parallel(executor: Executor, parallel: int) -> None:
    """``--parallel`` must be at least 1 and within what the executor can hold (a usage error)."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"--parallel must be a whole number of runs at least 1, got {parallel!r}", "e.g. --parallel 2")
    if executor.max_parallel is not None and parallel > executor.max_parallel:
        raise ConfigError(f"--executor {executor.name} runs at most {executor.max_parallel} run(s) at once, not --parallel {parallel}",
                          "use --executor subprocess for parallel runs (each in its own process)")
