"""Task abstractions: examples, data files, eval sets, and the task registry.

A task knows where its train pool and eval sets come from, how to parse them into
``Example`` objects, its label names, its prompt patterns and its caveats (e.g. an eval set that
overlaps another). Loading never mutates the data directory; files are verified by sha256.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fewtune.registry import Registry
from fewtune.tasks.prompts import Pattern


@dataclass(frozen=True)
class Example:
    """One labelled example. ``id`` is stable across runs (row index or the dataset's own id)."""

    id: str
    fields: dict[str, str]
    label: int
    groups: dict[str, str] = field(default_factory=dict)  # e.g. HANS heuristic/subcase, MNLI genre


@dataclass(frozen=True)
class DataFile:
    """A file in the data directory, its checksum and where to fetch it from."""

    relpath: str
    sha256: str | None = None
    url: str | None = None
    # How to extract ``relpath`` from what ``url`` serves: None (the file itself), "gzip", or
    # "zip:<member>" — the official CoLA release is a zip.
    unpack: str | None = None
    # sha256 of the decompressed content when the stored file is compressed (HANS).
    content_sha256: str | None = None


@dataclass(frozen=True)
class Split:
    """A named set of examples (train pool or eval set) and how to load it."""

    name: str
    file: DataFile
    loader: Callable[[Path], list[Example]]  # receives the verified local path
    description: str = ""
    group_fields: tuple[str, ...] = ()
    warning: str | None = None  # shown in outputs and reports (e.g. overlap with another set)
    # The report crosses this group field with the gold label (HANS: heuristic × label, where a
    # model that relies on overlap is right on entailment and wrong on non-entailment).
    breakdown_field: str | None = None
    gold_names: tuple[str, ...] = ()  # label names on this set when they differ from the task's


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    label_names: tuple[str, ...]
    text_fields: tuple[str, ...]
    train: Split
    eval_sets: dict[str, Split]
    patterns: dict[str, Pattern]
    default_pattern: str = "minimal"
    default_eval_sets: tuple[str, ...] = ()
    in_domain: tuple[str, ...] = ()  # eval sets that are in-domain; the rest are out-of-domain
    icl_separator: str = "\n\n"
    # Instruction the context-distillation teacher sees before its demonstrations.
    instruction: str = ""
    notes: tuple[str, ...] = ()
    # Metrics the report tables show for this task (keys of an eval set's metrics).
    report_metrics: tuple[str, ...] = ("accuracy",)
    source_file: str | None = None  # the YAML that defines the task (`fewtune tasks --show`)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def pattern(self, name: str | None = None) -> Pattern:
        from fewtune.errors import ConfigError
        from fewtune.registry import unknown_hint

        name = name or self.default_pattern
        if name not in self.patterns:
            raise ConfigError(f"unknown pattern '{name}' for task '{self.name}'", unknown_hint(name, list(self.patterns)))
        return self.patterns[name]

    def eval_split(self, name: str) -> Split:
        from fewtune.errors import ConfigError
        from fewtune.registry import unknown_hint

        if name not in self.eval_sets:
            raise ConfigError(f"unknown eval set '{name}' for task '{self.name}'", unknown_hint(name, list(self.eval_sets)))
        return self.eval_sets[name]


TASKS: Registry[Task] = Registry("task")
