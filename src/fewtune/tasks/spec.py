"""The task YAML schema, shared by the built-in tasks (``tasks/builtin/*.yaml``) and custom tasks.

One format for every task (as lm-evaluation-harness has): the built-in CoLA and MNLI files are
loaded by the same loader as a user's file, so anything they do a custom task can do too, and
``fewtune tasks --show cola`` prints a working template. See ``custom`` for the loader and an
example; this module only validates.

Per file (``train`` and each eval set) the spec says where the rows come from (``path``
relative to the YAML, ``data_path`` inside the data directory/download cache, or a hub dataset),
how its columns map onto the task's names (``fields``), which columns are per-group metrics
(``group_fields``), and optionally a label map, a row filter and header-less ``columns``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fewtune.config import StrictModel
from fewtune.errors import ConfigError
from fewtune.registry import unknown_hint
from fewtune.tasks.prompts import Pattern

Format = Literal["csv", "tsv", "jsonl"]
_SHA = r"^[0-9a-fA-F]{64}$"


class FileSpec(StrictModel):
    """Where a split's rows come from and how its columns map onto the task's fields."""

    description: str = ""
    path: str | None = None  # relative to the YAML file
    data_path: str | None = None  # relative to the data directory (or the download cache)
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str | None = None
    sha256: str | None = Field(None, pattern=_SHA)
    # sha256 of the decompressed content of a .gz file (gzip bytes depend on the compressor).
    content_sha256: str | None = Field(None, pattern=_SHA)
    url: str | None = None  # official download of a data_path file (needs a checksum)
    unpack: str | None = Field(None, pattern=r"^(gzip|zip:.+)$")  # how to get the file from what url serves
    format: Format | None = None  # for .gz files: the inner format
    columns: list[str] | None = None  # the file has no header row; these name its columns
    # task name -> this file's column: text fields, "label", "id" and group fields.
    fields: dict[str, str] = Field(default_factory=dict)
    group_fields: list[str] | None = None  # None: the task's group_fields
    keep_fields: list[str] = Field(default_factory=list)  # columns carried into predictions, no metric
    label_map: dict[str, str | None] | None = None  # None: the task's label_map
    filter: dict[str, str] = Field(default_factory=dict)  # keep rows whose column equals the value


class EvalSetSpec(FileSpec):
    in_domain: bool = False
    warning: str | None = None
    breakdown_field: str | None = None  # a group field the report crosses with the gold label
    gold_names: list[str] = Field(default_factory=list)  # label names on this set, if not the task's


class PatternSpec(StrictModel):
    template: str
    target_prefix: str = ""
    verbalizer: list[str]
    source: str = "custom task"


class TaskSpec(StrictModel):
    """The YAML schema of a task (unknown keys are errors naming the closest valid key)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    label_names: list[str] = Field(min_length=2)
    text_fields: list[str] = Field(min_length=1)
    label_field: str = "label"
    label_map: dict[str, str | None] | None = None
    format: Format | None = None
    id_field: str | None = None
    group_fields: list[str] = Field(default_factory=list)
    train: FileSpec
    eval_sets: dict[str, EvalSetSpec] = Field(default_factory=dict)
    default_eval_sets: list[str] | None = None
    patterns: dict[str, PatternSpec] = Field(min_length=1)
    default_pattern: str | None = None
    icl_separator: str = "\n\n"
    instruction: str = ""
    notes: list[str] = Field(default_factory=list)
    report_metrics: list[Literal["accuracy", "mcc"]] = Field(default_factory=lambda: ["accuracy"], min_length=1)


CustomTaskSpec = TaskSpec  # the name before built-in tasks used the same schema


def file_specs(spec: TaskSpec) -> list[tuple[str, FileSpec]]:
    return [("train", spec.train), *((f"eval_sets.{k}", v) for k, v in spec.eval_sets.items())]


def groups_of(spec: TaskSpec, fs: FileSpec) -> list[str]:
    """The group fields of one file: its own list, else the task's."""
    return list(fs.group_fields if fs.group_fields is not None else spec.group_fields)


def _check_label_map(label_map: dict[str, str | None] | None, spec: TaskSpec, where: str) -> None:
    bad = sorted({v for v in (label_map or {}).values() if v is not None and v not in spec.label_names})
    if bad:
        raise ConfigError(f"{where}: label_map maps to {bad}, which are not label_names {spec.label_names}",
                          "map each raw value to a label name (or null to drop the row)")


def _check_file(spec: TaskSpec, name: str, fs: FileSpec, where: str) -> None:
    sources = [k for k in ("path", "data_path", "hf_dataset") if getattr(fs, k) is not None]
    if len(sources) != 1:
        raise ConfigError(f"{where}: '{name}' needs exactly one of 'path', 'data_path' or 'hf_dataset'", "e.g. {path: train.csv}")
    if fs.hf_dataset is not None and not fs.hf_split:
        raise ConfigError(f"{where}: '{name}' uses hf_dataset '{fs.hf_dataset}' without 'hf_split'", "add e.g. hf_split: validation")
    if fs.url is not None and (fs.data_path is None or not (fs.sha256 or fs.content_sha256)):
        raise ConfigError(f"{where}: '{name}' has a url but no data_path or checksum",
                          "a download needs data_path (where it is stored) and sha256 (what it must be)")
    known = [*spec.text_fields, "label", "id", *groups_of(spec, fs), *fs.keep_fields]
    for key in fs.fields:
        if key not in known:
            raise ConfigError(f"{where}: '{name}.fields' maps '{key}', which is not a text field, label, id or group field",
                              unknown_hint(key, known))
    _check_label_map(fs.label_map, spec, f"{where}: '{name}'")


def check_spec(spec: TaskSpec, where: str) -> None:
    """Cross-field checks pydantic cannot express per field; each failure is a clear ConfigError."""
    if len(set(spec.label_names)) != len(spec.label_names):
        raise ConfigError(f"{where}: label_names has duplicates: {spec.label_names}", "give each label a distinct name")
    for name, fs in file_specs(spec):
        _check_file(spec, name, fs, where)
    for name, es in spec.eval_sets.items():
        groups = groups_of(spec, es)
        if es.breakdown_field is not None and es.breakdown_field not in groups:
            raise ConfigError(f"{where}: eval_sets.{name}.breakdown_field '{es.breakdown_field}' is not in group_fields",
                              unknown_hint(es.breakdown_field, groups))
        if es.gold_names and len(es.gold_names) != len(spec.label_names):
            raise ConfigError(f"{where}: eval_sets.{name}.gold_names needs {len(spec.label_names)} names (one per label)")
    _check_patterns(spec, where)
    if spec.default_pattern is not None and spec.default_pattern not in spec.patterns:
        raise ConfigError(f"{where}: default_pattern '{spec.default_pattern}' is not among patterns {sorted(spec.patterns)}", None)
    for name in spec.default_eval_sets or []:
        if name not in spec.eval_sets:
            raise ConfigError(f"{where}: default_eval_sets names '{name}', which is not in eval_sets {sorted(spec.eval_sets)}", None)
    _check_label_map(spec.label_map, spec, where)


def _check_patterns(spec: TaskSpec, where: str) -> None:
    for pname, p in spec.patterns.items():
        try:
            placeholders = Pattern(pname, p.template, p.target_prefix, tuple(p.verbalizer)).fields()
        except ValueError as e:
            raise ConfigError(f"{where}: pattern '{pname}' has an invalid template ({e})", "write literal braces as {{ and }}") from None
        extra = sorted(set(placeholders) - set(spec.text_fields))
        if extra:
            raise ConfigError(
                f"{where}: pattern '{pname}' uses placeholders {extra} that are not text_fields {spec.text_fields}",
                "use only {field} names listed in text_fields",
            )
        if len(p.verbalizer) != len(spec.label_names):
            raise ConfigError(
                f"{where}: pattern '{pname}' has {len(p.verbalizer)} verbalizer words but the task has "
                f"{len(spec.label_names)} labels {spec.label_names}",
                "give one verbalizer word per label, in label order (e.g. [' No', ' Yes'])",
            )
