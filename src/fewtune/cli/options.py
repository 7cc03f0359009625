"""Options shared by several commands (``cli.app`` and ``cli.study`` both import this; neither
imports the other at module level)."""

from __future__ import annotations

from typing import Any

import typer

from fewtune.errors import ctrl_c_deferred

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


def import_torch() -> None:
    """Import torch (and the runner that needs it) with Ctrl-C held back until it is done, and
    apply ``--threads``. Commands that run models call it first."""
    # ``import torch`` swallows a Ctrl-C met while numpy initialises from C (measured: about one in
    # twelve sent during the first second of ``fewtune run`` gave an import error, not exit 130)
    with ctrl_c_deferred(only_default_handler=True):
        import torch

        from fewtune.run import runner  # noqa: F401
    if _threads:
        torch.set_num_threads(_threads)
