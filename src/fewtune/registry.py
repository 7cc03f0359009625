"""A small name → object registry with helpful errors, shared by tasks, methods and patterns."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fewtune.errors import ConfigError

T = TypeVar("T")


def closest(name: str, options: list[str]) -> str | None:
    """The most similar valid option, for "did you mean" hints."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return match[0] if match else None


def unknown_hint(name: str, options: list[str]) -> str:
    guess = closest(name, options)
    listed = ", ".join(sorted(options))
    return (f"did you mean '{guess}'? " if guess else "") + f"valid: {listed}"


class Registry(Generic[T]):
    """Maps names to objects; ``get`` on an unknown name raises a ConfigError naming the closest."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T, *, replace: bool = False) -> None:
        if name in self._items and not replace:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} '{name}'", unknown_hint(name, list(self._items))) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
