"""Options shared by several commands (``cli`` and ``cli_study`` both import this; neither
imports the other at module level)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

THREADS_HELP = ("torch CPU threads (run: default one per core; study: per run, default the study's 'threads:' key, "
                "else what the study recorded, else 1 — fixed per study, as CPU results depend on it; on a machine "
                "shared with other jobs, 1 avoids OpenMP threads waiting on each other, which was up to 10× slower here)")


def threads_option() -> Any:
    """``--threads``, accepted before the command (global) and after it (``run``, ``study``): both
    are natural places to type it."""
    return typer.Option(None, "--threads", envvar="FEWTUNE_THREADS", callback=_check_threads, help=THREADS_HELP)


def _check_threads(ctx: typer.Context, param: typer.CallbackParam, value: int | None) -> int | None:
    """At least 1, blaming where the value came from: a ``min=1`` range check names the
    environment variable even when the bad value was the flag."""
    if value is not None and value < 1:
        source = ctx.get_parameter_source(param.name) if param.name else None
        where = "FEWTUNE_THREADS (environment)" if getattr(source, "name", "") == "ENVIRONMENT" else "'--threads'"
        raise typer.BadParameter(f"must be at least 1, got {value}", param_hint=where)
    return value


_threads: int | None = None  # requested by --threads; applied when torch is imported


def set_threads(threads: int | None) -> None:
    """Remember ``--threads``; ``import_torch`` applies it, so that commands without torch
    (``tasks``, ``report``…) do not pay for importing it."""
    global _threads
    if threads:
        _threads = threads


def requested_threads() -> int | None:
    """The ``--threads`` (or ``FEWTUNE_THREADS``) given to this command, if any."""
    return _threads


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C back while the block runs, then deliver it. ``import torch`` initialises numpy
    from C and clears any error it meets there: a Ctrl-C at that moment was swallowed, leaving a
    half-imported numpy and a run that went on ignoring it (measured: about one Ctrl-C in twelve
    sent during the first second of ``fewtune run``: an import error instead of exit 130). Left
    alone when SIGINT is not Python's default handler (e.g. ignored in a background job)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def import_torch() -> None:
    """Import torch (and the runner that needs it) with Ctrl-C held back until it is done, and
    apply ``--threads``. Commands that run models call it first."""
    with interrupts_deferred():
        import torch

        from fewtune.run import runner  # noqa: F401
    if _threads:
        torch.set_num_threads(_threads)
