"""User-facing errors.

Every error a user can cause by bad input is a ``FewtuneError``: the CLI prints its message and
its hint (how to fix it) without a traceback and exits non-zero. Anything else is a bug.
"""

from __future__ import annotations


class FewtuneError(Exception):
    """An error caused by the user's input or environment, with a hint on how to fix it."""

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
