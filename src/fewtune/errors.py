"""User-facing errors.

Every error a user can cause by bad input is a ``FewtuneError``: the CLI prints its message and
its hint (how to fix it) without a traceback and exits non-zero. Anything else is a bug.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class FewtuneError(Exception):
    """An error caused by the user's input or environment, with a hint on how to fix it."""

    exit_code = 2  # the CLI's exit status: 2 = usage or input error

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class DataError(FewtuneError):
    """Missing, corrupted or malformed data."""


class ConfigError(FewtuneError):
    """An invalid configuration value or key."""


class ContextLengthError(FewtuneError):
    """A prompt that cannot fit the model's context."""


class TrainingDiverged(FewtuneError):
    """The training loss became NaN or infinite."""


class OutputError(FewtuneError):
    """The output location cannot be written (read-only, full, not a directory…). Exit 1, not 2:
    the input was fine, the machine said no, and a study can be resumed once it is fixed."""

    exit_code = 1


class Interrupted(Exception):
    """Ctrl-C, caught by a command so that it can say how to continue (``hint``). Not a
    ``KeyboardInterrupt``: typer would turn that into a bare exit status and lose the hint."""

    def __init__(self, hint: str | None = None) -> None:
        super().__init__("interrupted")
        self.hint = hint


@contextmanager
def ctrl_c_deferred(only_default_handler: bool = False) -> Iterator[None]:
    """Hold a Ctrl-C back while the block runs, then raise it as KeyboardInterrupt.

    Why: some code cannot be interrupted half way without damage — ``import torch`` initialises
    numpy from C and swallows an error met there (a half-imported numpy), and Ray's own Python code
    (``ray.init``, ``ray.wait``, ``ray.shutdown``) can be left with a cluster half started or a lock
    never released. Only the main thread receives signals; elsewhere this does nothing. With
    ``only_default_handler`` it also does nothing unless SIGINT has Python's default handler
    (e.g. it is ignored in a background job)."""
    if threading.current_thread() is not threading.main_thread() or (
            only_default_handler and signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
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
