"""Options shared by several commands (``cli`` and ``cli_study`` both import this; neither
imports the other at module level)."""

from __future__ import annotations

from typing import Any

import typer

THREADS_HELP = ("torch CPU threads (default: one per core; on a machine shared with other jobs, 1 avoids "
                "OpenMP threads waiting on each other, which was up to 10× slower here)")


def threads_option() -> Any:
    """``--threads``, accepted before the command (global) and after it (``run``, ``study``): both
    are natural places to type it."""
    return typer.Option(None, "--threads", envvar="FEWTUNE_THREADS", min=1, help=THREADS_HELP)


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
