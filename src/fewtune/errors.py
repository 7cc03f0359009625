"""User-facing errors.

Every error a user can cause by bad input is a ``FewtuneError``: the CLI prints its message and
its hint (how to fix it) without a traceback and exits non-zero. Anything else is a bug.
"""

from __future__ import annotations


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
