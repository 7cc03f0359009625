"""Executors: *where* a study's runs happen, never *what* they compute.

A study hands an executor one planned run (its id and resolved config) and the directory the run
writes into; the executor returns a ``RunOutcome`` (the run's metrics, or its error as text). The
study alone reads and writes ``study.db``. Run ids and results do not depend on the executor, nor
on how many runs execute at once (``--parallel``: the study calls ``run`` from that many threads).

- ``SubprocessExecutor`` (the default) runs every run in a fresh process. Memory figures are then
  the run's own: in one long-lived process the allocator keeps memory freed by earlier runs, and
  a run's resident-set peak (VmHWM) counts it — measured, ``lora`` peaked at 919 MB after a
  ``vanilla`` run and at 695 MB alone. A crash, an OOM kill or a segfault costs one run, not the
  study. Start-up stays cheap: children are forked from a fork server that has imported torch,
  transformers and fewtune once (the standard library's ``forkserver`` start method).
- ``InProcessExecutor`` runs in the study's own process (tests, debugging with a debugger).

- ``RayExecutor`` (``fewtune.study.ray_executor``, ``pip install fewtune[ray]``) runs each run as a
  Ray task on a local or remote cluster; imported only when chosen.

Another executor is one more subclass of ``Executor`` (``run``, and ``interrupt`` when it can hold
several runs at once), registered in ``EXECUTORS``.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewtune.errors import ConfigError
from fewtune.registry import unknown_hint
from fewtune.study.executor import PRELOAD, Executor, Runner, RunOutcome, default_runner, format_error, outcome_of

if TYPE_CHECKING:
    from fewtune.study.expand import PlannedRun

STOP_GRACE_S = 10.0  # after SIGTERM, how long a run may take to clean up before SIGKILL
SIGNAL_HINTS = {
    "SIGKILL": "out of memory (the kernel's OOM killer) or kill -9",
    "SIGSEGV": "a crash in native code",
    "SIGBUS": "a crash in native code",
    "SIGABRT": "an abort in native code",
}


class InProcessExecutor(Executor):
    """Every run in the calling process, one after another (tests, debugging). Peak memory figures
    may include memory the allocator kept from earlier runs; on CUDA the cache is emptied between
    runs and the meter resets the peak, so GPU figures stay per run."""

    name = "inprocess"
    max_parallel = 1  # runs share the process (and its torch threads, its allocator, pdb)

    def __init__(self, runner: Runner | None = None) -> None:
        self.runner = runner or default_runner()
        self._restore: int | None = None  # the caller's torch threads, given back by close()

    def start(self, parallel: int = 1, threads: int | None = None) -> None:
        import torch

        self.close()
        if threads:
            self._restore = torch.get_num_threads()
            torch.set_num_threads(threads)

    def close(self) -> None:
        restore, self._restore = self._restore, None
        if restore:
            import torch

            torch.set_num_threads(restore)

    def run(self, planned: PlannedRun, run_dir: Path, *, data_dir: Path | None = None, progress: Any = None) -> RunOutcome:
        try:
            return outcome_of(lambda: self.runner(planned.config, run_dir, data_dir=data_dir, progress=progress))
        finally:
            release_memory()


def release_memory() -> None:
    """Free what the last run left behind: Python garbage and, on CUDA, the allocator's cache (so
    the next run's reserved-memory figure is its own). torch is not imported just for this."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class SubprocessExecutor(Executor):
    """Every run in its own fresh process, forked from a fork server with ``PRELOAD`` imported.

    ``runner`` must be picklable (a module-level function). A process that dies without a result
    (a signal, ``os._exit``) is a failed run whose error names the signal. Each run's process
    computes with the study's ``threads`` torch threads however many run at once (``parallel``
    runs use ``parallel × threads`` threads together: choose them to fit the cores)."""

    name = "subprocess"

    def __init__(self, runner: Runner | None = None, *, preload: list[str] | None = None) -> None:
        self.runner = runner  # None: the child uses run_experiment (not pickled, already preloaded)
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD if preload is None else preload)
        self._threads: int | None = None
        self._lock = threading.Lock()
        self._wake: tuple[int, int] | None = None  # a pipe written by interrupt(): readable = stop now
        self._interrupted = threading.Event()

    def start(self, parallel: int = 1, threads: int | None = None) -> None:
        import torch

        self.close()
        self._threads = threads or torch.get_num_threads()
        self._interrupted.clear()
        self._wake = os.pipe()

    def close(self) -> None:
        wake, self._wake = self._wake, None
        for fd in wake or ():
            with suppress(OSError):
                os.close(fd)

    def interrupt(self) -> None:
        self._interrupted.set()
        if self._wake is not None:
            with suppress(OSError):
                os.write(self._wake[1], b"x")

    def run(self, planned: PlannedRun, run_dir: Path, *, data_dir: Path | None = None, progress: Any = None) -> RunOutcome:
        threads = self._threads
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        result_r, result_w = self._ctx.Pipe(duplex=False)
        life_r, life_w = self._ctx.Pipe(duplex=False)  # the parent holds life_w: EOF = parent gone
        proc = self._ctx.Process(
            target=_child_main, name=f"fewtune-run-{planned.run_id}",
            args=(result_w, life_r, self.runner, planned.config, Path(run_dir), data_dir, threads))
        try:
            with self._lock:  # one fork-server request at a time
                proc.start()
            result_w.close()
            life_r.close()
            return self._await(proc, result_r)
        except BaseException:  # Ctrl-C (or any error here): never leave the run's process behind
            _stop(proc)
            _remove_partial(Path(run_dir))
            raise
        finally:
            result_r.close()
            life_w.close()

    def _await(self, proc: Any, result_r: mpc.Connection) -> RunOutcome:
        """Wait for the child's outcome, its death, or ``interrupt()``, whichever comes first."""
        mpc.wait([result_r, proc.sentinel, *(self._wake[:1] if self._wake else ())])
        if self._interrupted.is_set():
            raise KeyboardInterrupt
        outcome = None
        if result_r.poll():
            try:
                outcome = result_r.recv()
            except EOFError:  # closed without a result: the process died
                pass
        proc.join(STOP_GRACE_S)
        if proc.is_alive():  # sent its result but hangs on exit
            _stop(proc)
        return outcome if outcome is not None else died(proc.exitcode)


def died(exitcode: int | None) -> RunOutcome:
    """The outcome of a run whose process ended without reporting one."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = SIGNAL_HINTS.get(name)
        msg = f"the run's process was killed by signal {name}" + (f" ({hint})" if hint else "")
    else:
        msg = f"the run's process exited with code {exitcode} without a result"
    return RunOutcome(error=f"ProcessDied: {msg}", error_type="ProcessDied")


def _stop(proc: Any) -> None:
    """SIGTERM (the child turns it into KeyboardInterrupt, so the runner removes its temporary
    directory), then SIGKILL if it does not end within the grace period."""
    if proc.pid is None:  # never started
        return
    if proc.is_alive():
        proc.terminate()
        proc.join(STOP_GRACE_S)
    if proc.is_alive():
        proc.kill()
    proc.join()


def _remove_partial(run_dir: Path) -> None:
    """Temporary directories of a run stopped mid-write (``.<id>.tmp-*``, see run.output.write_run).
    A complete ``run_dir`` is left alone: the next call of the study adopts it."""
    import shutil

    if run_dir.parent.is_dir():
        for p in run_dir.parent.glob(f".{run_dir.name}.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _watch_parent(life_r: mpc.Connection) -> None:
    """End this process as soon as the study process is gone (even by kill -9), so that no orphan
    keeps writing into a study that a new process may be resuming."""
    try:
        life_r.recv()
    except (EOFError, OSError):
        pass
    os._exit(70)


def _child_main(result_w: mpc.Connection, life_r: mpc.Connection, runner: Runner | None, config: Any,
                run_dir: Path, data_dir: Path | None, threads: int) -> None:
    """The run's process: run, send the outcome, exit."""
    # Ctrl-C reaches the whole process group; the parent decides, and stops us with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    threading.Thread(target=_watch_parent, args=(life_r,), daemon=True).start()
    import torch

    torch.set_num_threads(threads)  # the study's threads: part of the run's identity
    run_fn = runner or default_runner()
    try:
        outcome = outcome_of(lambda: run_fn(config, run_dir, data_dir=data_dir, progress=None))
    except KeyboardInterrupt:
        sys.exit(130)
    try:
        result_w.send(outcome)
    except Exception as e:  # noqa: BLE001 — e.g. metrics that do not pickle
        result_w.send(RunOutcome(error=f"could not return the run's result: {format_error(e)}", error_type=type(e).__name__))


def _ray(runner: Runner | None = None, **options: Any) -> Executor:
    """Ray is an optional dependency: imported only when ``--executor ray`` is chosen."""
    from fewtune.study.ray_executor import RayExecutor

    return RayExecutor(runner, **options)


EXECUTORS: dict[str, Callable[..., Executor]] = {"subprocess": SubprocessExecutor, "inprocess": InProcessExecutor, "ray": _ray}
"""``--executor`` names → a factory called as ``factory(runner, **options)`` (``runner`` None: the
real one). An executor with optional dependencies registers a function that imports them."""


def make_executor(kind: str, runner: Runner | None = None, **options: Any) -> Executor:
    """An executor by name (``--executor``); ``options`` are its own settings (``ray``: ``address``,
    ``resources`` per run such as ``{"cpus": 1, "gpus": 0.25}``)."""
    if kind not in EXECUTORS:
        raise ConfigError(f"unknown executor '{kind}'", unknown_hint(kind, list(EXECUTORS)))
    if "ray_address" in options:
        options["address"] = options.pop("ray_address")
    if kind != "ray" and any(v is not None for v in options.values()):
        raise ConfigError(f"--ray-address and run resources apply to --executor ray, not '{kind}'",
                          "add --executor ray, or drop them")
    return EXECUTORS[kind](runner, **({} if kind != "ray" else options))
