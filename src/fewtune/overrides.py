"""``--set [scope:]key.path=value`` overrides, deep merge, and strict YAML loading.

One module for both ``fewtune run`` and ``fewtune study`` so the two read the same text the same
way (they used to disagree on ``1e-4``). Why strict YAML: PyYAML silently keeps the *last* of two
equal keys in a mapping, so a config with ``lr:`` written twice ran with a value the user may not
have meant; here a duplicate key is an error naming the key and both lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fewtune.errors import ConfigError
from fewtune.registry import unknown_hint


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice (instead of last-one-wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges may repeat keys by design
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            seen[key] = line
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first on line {first}, again on line {line})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str, where: str) -> Any:
    """Parse YAML text strictly (duplicate keys are errors); ``where`` names it in messages."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 — a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}", _yaml_hint(e)) from None


def _yaml_hint(e: yaml.YAMLError) -> str:
    """The hint that fits the error: a duplicate key, a tag (``!!python/…``, ``!Ref``), or syntax."""
    problem = str(getattr(e, "problem", "") or "")
    if problem.startswith("found duplicate key"):
        return "each key may appear once per mapping; remove or rename one of the two"
    if "constructor for the tag" in problem:
        return "configs are plain YAML: remove the tag (the word starting with '!'); write the value itself"
    return "check the indentation and quoting near the position shown"


def load_yaml_file(path: Path | str, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file → ``{}``), read strictly."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} file {p} cannot be read: {e}") from None
    data = load_yaml_text(text, f"{what} file {p}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {p} must hold a mapping of keys to values")
    return data


def parse_value(raw: str, where: str = "--set") -> Any:
    """A ``--set`` value: YAML (``2``, ``[1, 8]``, ``null``, ``true``), plus ``1e-4`` as a float
    (YAML 1.1 reads exponent numbers without a dot as strings). An empty value is ``None``."""
    if raw.strip() == "":
        return None
    value = load_yaml_text(raw, where)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@dataclass(frozen=True)
class Override:
    """One ``--set [scope:]key.path=value``; ``scope`` (a method name) None applies it to every run."""

    path: tuple[str, ...]
    value: Any
    scope: str | None = None

    @property
    def method(self) -> str | None:  # the scope is a method name
        return self.scope

    def key(self) -> str:
        return (f"{self.scope}:" if self.scope else "") + ".".join(self.path)

    def text(self) -> str:
        return f"{self.key()}={json.dumps(self.value)}"


def parse_override(item: str) -> Override:
    """Parse ``[scope:]key.path=value`` (syntax only; which keys exist is the caller's business)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}", "e.g. --set train.lr=1e-4 or --set lora:params.r=8")
    key, raw = item.split("=", 1)
    scope = None
    if ":" in key:
        scope, key = (s.strip() for s in key.split(":", 1))
        if not scope:
            raise ConfigError(f"--set {item}: empty method scope before ':'", "e.g. --set lora:params.r=8")
    parts = tuple(p.strip() for p in key.strip().split("."))
    if any(not p for p in parts):
        raise ConfigError(f"--set key {key!r} is malformed", "e.g. train.lr or params.r")
    return Override(parts, parse_value(raw, f"--set {item}"), scope)


def parse_overrides(items: Iterable[str]) -> list[Override]:
    """Parse every ``--set``; the same key given twice (or a key and its parent) is a conflict."""
    parsed = [parse_override(i) for i in items]
    for i, a in enumerate(parsed):
        for b in parsed[:i]:
            if a.scope == b.scope and _overlap(a.path, b.path):
                raise ConfigError(f"--set {b.text()} and --set {a.text()} set the same key",
                                  "give each key once")
    return parsed


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def check_flag_conflicts(flags: Mapping[str, Any], overrides: Iterable[Override], flag_names: Mapping[str, str] | None = None) -> None:
    """A command-line flag and a ``--set`` of the same key (``--n 2 --set n=3``): refuse rather
    than let one silently win. ``flags`` holds the flags actually given (key → value)."""
    names = flag_names or {}
    for o in overrides:
        for key, value in flags.items():
            if value is not None and _overlap(o.path, tuple(key.split("."))):
                flag = names.get(key, f"--{key.replace('_', '-')}")
                raise ConfigError(f"{flag} and --set {o.text()} both set '{key}'", f"use either {flag} or --set {o.key()}=…")


def set_path(d: Mapping[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of ``d`` with ``value`` at ``path`` (intermediate mappings created or copied)."""
    if len(path) == 1:
        return {**d, path[0]: value}
    sub = d.get(path[0])
    return {**d, path[0]: set_path(sub if isinstance(sub, Mapping) else {}, path[1:], value)}


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge mappings recursively (``train``, ``params``); any other value in ``over`` replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def apply(data: Mapping[str, Any], overrides: Iterable[Override]) -> dict[str, Any]:
    """``data`` with every override set (scopes are the caller's business)."""
    out = dict(data)
    for o in overrides:
        out = set_path(out, o.path, o.value)
    return out


def check_scopes(overrides: Iterable[Override], known: Iterable[str], used: Iterable[str] | None = None, what: str = "this run") -> None:
    """A scope must name a known method (a typo such as ``lroa:`` would otherwise apply to
    nothing, silently) and, when ``used`` is given, one that ``what`` actually runs."""
    known, used_list = list(known), None if used is None else sorted(set(used))
    for o in overrides:
        if o.scope is None:
            continue
        if o.scope not in known:
            raise ConfigError(f"--set {o.key()}=…: unknown method '{o.scope}' before ':'", unknown_hint(o.scope, known))
        if used_list is not None and o.scope not in used_list:
            raise ConfigError(f"--set {o.key()}=… applies to method '{o.scope}', which {what} does not use",
                              f"{what} uses: {', '.join(used_list)}; drop the override or fix its scope")


def run_data(base: Mapping[str, Any], flags: Mapping[str, Any], items: Iterable[str]) -> dict[str, Any]:
    """The raw config of ``fewtune run``: the YAML ``base``, then the flags given (not None), then
    ``--set`` items. A flag and a ``--set`` of the same key is refused, not silently resolved."""
    from fewtune.methods import METHODS  # lazy: the method classes pull in torch

    given = {k: v for k, v in flags.items() if v is not None}
    overrides = parse_overrides(items)
    check_flag_conflicts(given, overrides)
    data = deep_merge(base, given)
    method = data.get("method", "icl")
    check_scopes(overrides, METHODS.names(), [method] if isinstance(method, str) else None)
    return apply(data, overrides)
