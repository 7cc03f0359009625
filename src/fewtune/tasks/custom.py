"""User-defined tasks from a YAML file.

A custom task brings its own CSV/TSV/JSONL files (or Hugging Face hub datasets, when the optional
``datasets`` package is installed) and its own prompt patterns, and then runs through every
method exactly like the built-in tasks. Example::

    name: sst2-mini
    description: Movie review sentiment
    label_names: [negative, positive]
    text_fields: [sentence]
    label_field: label               # default "label"
    label_map: {"0": negative, "1": positive, "2": null}   # optional; null drops the row
    id_field: idx                    # optional; default: the row index
    train: {path: train.csv, sha256: <optional hex>}
    eval_sets:
      dev: {path: dev.tsv, in_domain: true}
      ood: {hf_dataset: imdb, hf_split: test}
    patterns:
      minimal: {template: "{sentence} ?", target_prefix: "", verbalizer: [" No", " Yes"]}
    default_pattern: minimal         # default: the first pattern
    icl_separator: "\\n\\n"
    instruction: Is the review positive? Answer Yes or No.

Relative paths are relative to the YAML file. The format comes from ``format`` (per file or for
the whole task) or else the file extension (.csv, .tsv, .jsonl). TSV fields are split on tabs with
no quote handling (like GLUE's files); CSV follows the usual quoting rules. Without a
``label_map``, a raw label must be one of ``label_names`` or an integer id (0, 1, ...).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..config import StrictModel, validate
from ..errors import ConfigError, DataError
from ..overrides import load_yaml_text
from ..prompts import Pattern
from ..registry import unknown_hint
from .base import TASKS, DataFile, Example, Split, Task
from .files import read_text, read_tsv

Format = Literal["csv", "tsv", "jsonl"]
HF_PREFIX = "hf:"  # relpath prefix marking a split that comes from the Hugging Face hub, not a file
_EXTENSIONS: dict[str, Format] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
_custom_names: set[str] = set()  # tasks registered from YAML; only these may be replaced


class FileSpec(StrictModel):
    """Where a split's rows come from: a local file or a hub dataset split."""

    path: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    format: Format | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str | None = None


class EvalSetSpec(FileSpec):
    in_domain: bool = False
    description: str = ""
    warning: str | None = None
    breakdown_field: str | None = None  # a group field the report crosses with the gold label
    gold_names: list[str] = Field(default_factory=list)  # label names on this set, if not the task's


class PatternSpec(StrictModel):
    template: str
    target_prefix: str = ""
    verbalizer: list[str]
    source: str = "custom task"


class CustomTaskSpec(StrictModel):
    """The YAML schema of a custom task (unknown keys are errors naming the closest valid key)."""

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


def _check_spec(spec: CustomTaskSpec, where: str) -> None:
    """Cross-field checks pydantic cannot express per field; each failure is a clear ConfigError."""
    if len(set(spec.label_names)) != len(spec.label_names):
        raise ConfigError(f"{where}: label_names has duplicates: {spec.label_names}", "give each label a distinct name")
    for name, es in spec.eval_sets.items():
        if es.breakdown_field is not None and es.breakdown_field not in spec.group_fields:
            raise ConfigError(f"{where}: eval_sets.{name}.breakdown_field '{es.breakdown_field}' is not in group_fields",
                              unknown_hint(es.breakdown_field, spec.group_fields))
        if es.gold_names and len(es.gold_names) != len(spec.label_names):
            raise ConfigError(f"{where}: eval_sets.{name}.gold_names needs {len(spec.label_names)} names (one per label)")
    for name, fs in [("train", spec.train), *((f"eval_sets.{k}", v) for k, v in spec.eval_sets.items())]:
        if (fs.path is None) == (fs.hf_dataset is None):
            raise ConfigError(f"{where}: '{name}' needs exactly one of 'path' or 'hf_dataset'", "e.g. {path: train.csv}")
        if fs.hf_dataset is not None and not fs.hf_split:
            raise ConfigError(f"{where}: '{name}' uses hf_dataset '{fs.hf_dataset}' without 'hf_split'", "add e.g. hf_split: validation")
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
    if spec.default_pattern is not None and spec.default_pattern not in spec.patterns:
        raise ConfigError(f"{where}: default_pattern '{spec.default_pattern}' is not among patterns {sorted(spec.patterns)}", None)
    for name in spec.default_eval_sets or []:
        if name not in spec.eval_sets:
            raise ConfigError(f"{where}: default_eval_sets names '{name}', which is not in eval_sets {sorted(spec.eval_sets)}", None)
    if spec.label_map is not None:
        bad = sorted({v for v in spec.label_map.values() if v is not None and v not in spec.label_names})
        if bad:
            raise ConfigError(f"{where}: label_map maps to {bad}, which are not label_names {spec.label_names}",
                              "map each raw value to a label name (or null to drop the row)")


# --- reading rows ----------------------------------------------------------------------------

RowIter = Iterator[tuple[int, dict[str, object]]]


def _rows_tsv(path: Path) -> RowIter:
    header, rows = read_tsv(path, header=True)
    assert header is not None
    for line, cols in rows:
        yield line, dict(zip(header, cols))


def _rows_csv(path: Path) -> RowIter:
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: the file is empty (expected a header row)", "add a header row naming the columns")
        for cols in reader:
            if not cols:  # blank line
                continue
            if len(cols) != len(header):
                raise DataError(
                    f"{path}, line {reader.line_num}: expected {len(header)} comma-separated columns, found {len(cols)}",
                    "fix the row (quote fields that contain commas)",
                )
            yield reader.line_num, dict(zip(header, cols))
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: {e}", "fix the CSV quoting") from None


def _rows_jsonl(path: Path) -> RowIter:
    for i, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {i}: invalid JSON ({e.msg})", "each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {i}: expected a JSON object, found {type(row).__name__}", "each line must be one JSON object")
        yield i, row


def _rows_hf(fs: FileSpec, task: str, split: str) -> RowIter:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(
            f"task '{task}' split '{split}' comes from the Hugging Face hub dataset '{fs.hf_dataset}', "
            "but the 'datasets' package is not installed",
            "pip install datasets (downloading the data also needs internet access), or export the split "
            "to a CSV/TSV/JSONL file and give its 'path' instead",
        ) from None
    try:
        ds = datasets.load_dataset(fs.hf_dataset, fs.hf_config, split=fs.hf_split)
    except Exception as e:  # network, unknown dataset or split: all user-fixable
        raise DataError(
            f"task '{task}' split '{split}': loading hub dataset '{fs.hf_dataset}' "
            f"(config {fs.hf_config!r}, split '{fs.hf_split}') failed: {e}",
            "check the dataset/config/split names and your internet connection",
        ) from None
    for i, row in enumerate(ds):
        yield i + 1, dict(row)


def _resolve_format(fs: FileSpec, spec: CustomTaskSpec, path: Path) -> Format:
    if fs.format or spec.format:
        return fs.format or spec.format  # type: ignore[return-value]
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ConfigError(
            f"cannot tell the format of '{path}' from its extension '{suffix}'",
            "set format: csv, tsv or jsonl (for the file or the whole task)",
        )
    return _EXTENSIONS[suffix]


def _label_of(raw: object, spec: CustomTaskSpec, where: str) -> int | None:
    value = str(raw).strip()
    if spec.label_map is not None:
        if value not in spec.label_map:
            raise DataError(f"{where}: unknown label {_short(value)} (label_map has {sorted(spec.label_map)})",
                            "add it to label_map (null drops such rows) or fix the data")
        mapped = spec.label_map[value]
        return None if mapped is None else spec.label_names.index(mapped)
    if value in spec.label_names:
        return spec.label_names.index(value)
    if value.isdigit() and int(value) < len(spec.label_names):
        return int(value)
    raise DataError(
        f"{where}: unknown label {_short(value)} (expected one of {spec.label_names} or an id 0..{len(spec.label_names) - 1})",
        "fix the data or add a label_map from raw values to label names",
    )


def _fields_found(row: dict[str, object], needed: list[str]) -> str:
    """The field names a row has, for an error message, but only when they look like the header
    the task expects (some expected name is there): a task's ``path`` may point at any file, and
    its first line is then content, which an error message should not echo."""
    names = [str(k) for k in row]
    if not set(names) & set(needed):
        return f"the first line has {len(names)} column(s) and none of {', '.join(needed)}: is it a header row?"
    return "fields: " + ", ".join(n if len(n) <= 40 else n[:37] + "..." for n in names[:20]) + (" ..." if len(names) > 20 else "")


def _short(value: str, limit: int = 20) -> str:
    """A raw value for an error message, cut short (file contents stay out of messages)."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _make_loader(spec: CustomTaskSpec, fs: FileSpec, split: str) -> Callable[[Path], list[Example]]:
    def load(path: Path) -> list[Example]:
        if fs.hf_dataset is not None:
            rows, name = _rows_hf(fs, spec.name, split), f"hub dataset '{fs.hf_dataset}' ({fs.hf_split})"
        else:
            fmt = _resolve_format(fs, spec, path)
            rows, name = {"csv": _rows_csv, "tsv": _rows_tsv, "jsonl": _rows_jsonl}[fmt](path), str(path)
        needed = [spec.label_field, *spec.text_fields, *([spec.id_field] if spec.id_field else []), *spec.group_fields]
        out: list[Example] = []
        seen: set[str] = set()
        for idx, (line, row) in enumerate(rows):
            where = f"{name}, line {line}" if fs.hf_dataset is None else f"{name}, row {line}"
            for col in needed:
                if col not in row:
                    raise DataError(f"{where}: no field '{col}' ({_fields_found(row, needed)})",
                                    "check the task's label_field/text_fields/id_field or the file's header")
            label = _label_of(row[spec.label_field], spec, where)
            if label is None:
                continue
            fields: dict[str, str] = {}
            for f in spec.text_fields:
                value = row[f]
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{where}: empty or non-text '{f}' ({type(value).__name__})", "every text field needs non-empty text")
                fields[f] = value.strip()
            ex_id = f"{split}:{row[spec.id_field] if spec.id_field else idx}"
            if ex_id in seen:
                raise DataError(f"{where}: duplicate id '{ex_id}'", "ids (id_field) must be unique within a file")
            seen.add(ex_id)
            out.append(Example(ex_id, fields, label, {g: str(row[g]) for g in spec.group_fields}))
        if not out:
            raise DataError(f"{name}: no examples (after dropping rows mapped to null)", "check the file and label_map")
        return out

    return load


def _datafile(fs: FileSpec, base: Path) -> DataFile:
    if fs.hf_dataset is not None:
        return DataFile(f"{HF_PREFIX}{fs.hf_dataset}/{fs.hf_config or ''}/{fs.hf_split}")
    assert fs.path is not None
    return DataFile(str((base / Path(fs.path).expanduser()).resolve()), sha256=fs.sha256.lower() if fs.sha256 else None)


def task_from_spec(spec: CustomTaskSpec, base_dir: Path, where: str = "task") -> Task:
    """Build a Task from a validated spec; relative paths are resolved against ``base_dir``."""
    _check_spec(spec, where)

    def split(name: str, fs: FileSpec, **kw: object) -> Split:
        return Split(name, _datafile(fs, base_dir), _make_loader(spec, fs, name), group_fields=tuple(spec.group_fields), **kw)  # type: ignore[arg-type]

    return Task(
        name=spec.name,
        description=spec.description or f"custom task from {where}",
        label_names=tuple(spec.label_names),
        text_fields=tuple(spec.text_fields),
        train=split(f"{spec.name}-train", spec.train),
        eval_sets={k: split(k, v, description=v.description, warning=v.warning, breakdown_field=v.breakdown_field,
                            gold_names=tuple(v.gold_names)) for k, v in spec.eval_sets.items()},
        patterns={k: Pattern(k, p.template, p.target_prefix, tuple(p.verbalizer), source=p.source) for k, p in spec.patterns.items()},
        default_pattern=spec.default_pattern or next(iter(spec.patterns)),
        default_eval_sets=tuple(spec.default_eval_sets if spec.default_eval_sets is not None else spec.eval_sets),
        in_domain=tuple(k for k, v in spec.eval_sets.items() if v.in_domain),
        icl_separator=spec.icl_separator,
        instruction=spec.instruction,
        notes=tuple(spec.notes),
        report_metrics=tuple(spec.report_metrics),
    )


def load_custom_task(path: str | Path) -> Task:
    """Read and validate a task YAML file (without registering it)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"task file '{p}' does not exist", "give the path to a task YAML file")
    data = load_yaml_text(p.read_text(encoding="utf-8-sig"), f"task file '{p}'")
    if not isinstance(data, dict):
        raise ConfigError(f"task file '{p}' must contain a mapping (name:, label_names:, ...)", "see fewtune.tasks.custom for an example")
    # Validate nested entries on their own first: their unknown keys then get "did you mean" hints.
    nested: list[tuple[str, type[StrictModel], object]] = [("train", FileSpec, data.get("train"))]
    for key, cls in (("eval_sets", EvalSetSpec), ("patterns", PatternSpec)):
        if isinstance(data.get(key), dict):
            nested += [(f"{key}.{k}", cls, v) for k, v in data[key].items()]
    for loc, cls, value in nested:
        if isinstance(value, dict):
            validate(cls, value, where=f"'{loc}' of task file '{p}'")
    spec = validate(CustomTaskSpec, data, where=f"task file '{p}'")
    return task_from_spec(spec, p.resolve().parent, where=f"task file '{p}'")


def register_custom_task(path: str | Path) -> Task:
    """Load a task YAML and add it to ``TASKS``; re-registering the same custom name replaces it."""
    task = load_custom_task(path)
    if task.name in TASKS and task.name not in _custom_names:
        raise ConfigError(f"custom task name '{task.name}' clashes with a built-in task", "choose another name")
    TASKS.add(task.name, task, replace=True)
    _custom_names.add(task.name)
    return task


def is_hub_split(split: Split) -> bool:
    return split.file.relpath.startswith(HF_PREFIX)

