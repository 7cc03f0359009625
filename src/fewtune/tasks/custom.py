"""Tasks from YAML: the one loader for built-in and custom tasks.

A task brings its CSV/TSV/JSONL files (plain or gzipped; or Hugging Face hub datasets, when the
optional ``datasets`` package is installed) and its prompt patterns, and then runs through every
method exactly like the built-in tasks, which are YAML files loaded by this same code
(``tasks/builtin/*.yaml``; ``fewtune tasks --show mnli`` prints one). Example::

    name: nli-plus-hans
    label_names: [entailment, contradiction]
    text_fields: [premise, hypothesis]
    label_map: {entailment: entailment, contradiction: contradiction, neutral: null}
    train: {path: mnli_train.tsv, fields: {id: pairID}, group_fields: [genre]}
    eval_sets:
      hans:
        path: hans.txt.gz
        format: tsv                  # the format inside the .gz
        fields: {premise: sentence1, hypothesis: sentence2, label: gold_label, id: pairID}
        label_map: {entailment: entailment, non-entailment: contradiction}
        group_fields: [heuristic]    # per file; the train file has no such column
        breakdown_field: heuristic
    patterns:
      minimal: {template: "{premise} {hypothesis} ?", verbalizer: [" Yes", " No"]}

Relative ``path``s are relative to the YAML file; ``data_path``s to the data directory (with an
optional checksummed ``url`` download, see ``files``). The format comes from ``format`` (per file
or for the whole task) or else the file extension (.csv, .tsv, .jsonl, each optionally .gz).
``fields`` maps the task's names (text fields, ``label``, ``id``, group fields) to the file's
columns; unmapped names are looked up as they are (``label``: ``label_field``, ``id``:
``id_field``). TSV fields are split on tabs with no quote handling (like GLUE's files); CSV follows
the usual quoting rules. Without a ``label_map``, a raw label must be one of ``label_names`` or an
integer id (0, 1, ...).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from fewtune.config import StrictModel, validate
from fewtune.errors import ConfigError, DataError
from fewtune.overrides import load_yaml_text
from fewtune.registry import closest
from fewtune.tasks.base import TASKS, DataFile, Example, Split, Task
from fewtune.tasks.files import read_text, read_tsv
from fewtune.tasks.prompts import Pattern
from fewtune.tasks.spec import CustomTaskSpec, EvalSetSpec, FileSpec, Format, PatternSpec, TaskSpec, check_spec, groups_of

__all__ = ["CustomTaskSpec", "TaskSpec", "FileSpec", "EvalSetSpec", "PatternSpec", "load_custom_task", "load_task_file",
           "register_custom_task", "task_from_spec", "is_hub_split"]

HF_PREFIX = "hf:"  # relpath prefix marking a split that comes from the Hugging Face hub, not a file
_EXTENSIONS: dict[str, Format] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
_custom_names: set[str] = set()  # tasks registered from YAML; only these may be replaced


# --- reading rows ----------------------------------------------------------------------------

RowIter = Iterator[tuple[int, dict[str, object]]]
Rows = tuple[list[str] | None, RowIter]  # (the column names when the file has a header or `columns`, rows)


def _rows_tsv(path: Path, columns: list[str] | None) -> Rows:
    header, rows = read_tsv(path, header=columns is None, ncols=len(columns) if columns else None)
    names = columns or header
    assert names is not None
    return names, ((line, dict(zip(names, cols))) for line, cols in rows)


def _rows_csv(path: Path, columns: list[str] | None) -> Rows:
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = columns or next(reader, None)
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: {e}", "fix the CSV quoting") from None
    if header is None:
        raise DataError(f"{path}: the file is empty (expected a header row)", "add a header row naming the columns")

    def rows() -> RowIter:
        try:
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

    return header, rows()


def _rows_jsonl(path: Path, columns: list[str] | None) -> Rows:
    def rows() -> RowIter:
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

    return None, rows()


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


def _resolve_format(fs: FileSpec, spec: TaskSpec, path: Path) -> Format:
    if fs.format or spec.format:
        return fs.format or spec.format  # type: ignore[return-value]
    name = path.name.lower().removesuffix(".gz")  # a .gz names its inner format by the extension before it
    suffix = Path(name).suffix
    if suffix not in _EXTENSIONS:
        raise ConfigError(
            f"cannot tell the format of '{path}' from its extension '{suffix}'",
            "set format: csv, tsv or jsonl (for the file or the whole task; for a .gz file, the format inside it)",
        )
    return _EXTENSIONS[suffix]


# --- columns -----------------------------------------------------------------------------------


class _Columns:
    """One file's column for each of the task's names (``fields`` mapping, else the name itself)."""

    def __init__(self, spec: TaskSpec, fs: FileSpec) -> None:
        col = lambda name, default: fs.fields.get(name, default)  # noqa: E731
        self.label = col("label", spec.label_field)
        self.id = col("id", spec.id_field)
        self.text = {f: col(f, f) for f in spec.text_fields}
        self.group_names = groups_of(spec, fs)
        self.groups = {g: col(g, g) for g in [*self.group_names, *fs.keep_fields]}
        self.filter = {col(k, k): v for k, v in fs.filter.items()}

    def needed(self) -> dict[str, str]:
        """file column -> what the task uses it for (for error messages)."""
        roles = {self.label: "label", **({self.id: "id"} if self.id else {})}
        roles.update({c: f"text field '{f}'" for f, c in self.text.items()})
        roles.update({c: f"group field '{g}'" for g, c in self.groups.items()})
        roles.update({c: "filter" for c in self.filter})
        return roles


def _missing_column(name: str, have: list[str], col: str, role: str, needed: dict[str, str]) -> DataError:
    """A missing column: the file, the columns it has and the closest one (never row contents)."""
    if not set(have) & set(needed):  # maybe no header at all: its first line is content, not names
        found = f"the first line has {len(have)} column(s) and none of {', '.join(needed)}: is it a header row?"
        return DataError(f"{name}: no field '{col}' ({found})",
                         "give the file a header row, or name its columns with columns: [...] on its spec")
    shown = ", ".join(n if len(n) <= 40 else n[:37] + "..." for n in have[:20]) + (" ..." if len(have) > 20 else "")
    guess = closest(col, have)
    key = {"label": "label", "id": "id"}.get(role) or (role.split("'")[1] if "'" in role else col)
    return DataError(
        f"{name}: no field '{col}' (fields: {shown})" + (f"; closest: '{guess}'" if guess else "") + f"; it is the task's {role}",
        f"map it on this file's spec with fields: {{{key}: {guess or '<column>'}}}, or check the task's "
        "label_field/text_fields/id_field",
    )


def _label_of(raw: object, label_map: dict[str, str | None] | None, names: list[str], where: str) -> int | None:
    value = str(raw).strip()
    if label_map is not None:
        if value not in label_map:
            raise DataError(f"{where}: unknown label {_short(value)} (label_map has {sorted(label_map)})",
                            "add it to label_map (null drops such rows) or fix the data")
        mapped = label_map[value]
        return None if mapped is None else names.index(mapped)
    if value in names:
        return names.index(value)
    if value.isdigit() and int(value) < len(names):
        return int(value)
    raise DataError(
        f"{where}: unknown label {_short(value)} (expected one of {names} or an id 0..{len(names) - 1})",
        "fix the data or add a label_map from raw values to label names",
    )


def _short(value: str, limit: int = 20) -> str:
    """A raw value for an error message, cut short (file contents stay out of messages)."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


# --- the loader ----------------------------------------------------------------------------------


def _open_rows(spec: TaskSpec, fs: FileSpec, split: str, path: Path) -> tuple[str, Rows]:
    if fs.hf_dataset is not None:
        return f"hub dataset '{fs.hf_dataset}' ({fs.hf_split})", (None, _rows_hf(fs, spec.name, split))
    fmt = _resolve_format(fs, spec, path)
    return str(path), {"csv": _rows_csv, "tsv": _rows_tsv, "jsonl": _rows_jsonl}[fmt](path, fs.columns)


def _example(row: dict[str, object], cols: _Columns, label: int, ex_id: str, where: str) -> Example:
    fields: dict[str, str] = {}
    for f, c in cols.text.items():
        value = row[c]
        if not isinstance(value, str):
            raise DataError(f"{where}: non-text {f} ({type(value).__name__})", "every text field needs non-empty text")
        if not value.strip():
            raise DataError(f"{where}: empty {f}" + (f" (column '{c}')" if c != f else ""), "every text field needs non-empty text")
        fields[f] = value.strip()
    return Example(ex_id, fields, label, {g: str(row[c]) for g, c in cols.groups.items()})


def _make_loader(spec: TaskSpec, fs: FileSpec, split: str) -> Callable[[Path], list[Example]]:
    cols = _Columns(spec, fs)
    label_map = fs.label_map if fs.label_map is not None else spec.label_map

    def load(path: Path) -> list[Example]:
        name, (header, rows) = _open_rows(spec, fs, split, path)
        needed = cols.needed()
        for c, role in needed.items():
            if header is not None and c not in header:
                raise _missing_column(name, header, c, role, needed)
        out: list[Example] = []
        seen: set[str] = set()
        for idx, (line, row) in enumerate(rows):
            where = f"{name}, line {line}" if fs.hf_dataset is None else f"{name}, row {line}"
            for c, role in needed.items():
                if c not in row:  # only rows without a header (JSONL, hub) get here
                    raise _missing_column(where, [str(k) for k in row], c, role, needed)
            label = _label_of(row[cols.label], label_map, spec.label_names, where)
            if label is None or any(str(row[c]) != v for c, v in cols.filter.items()):
                continue
            ex_id = f"{split}:{row[cols.id] if cols.id else idx}"
            if ex_id in seen:
                raise DataError(f"{where}: duplicate example id '{ex_id}'", "ids (id_field) must be unique within a file")
            seen.add(ex_id)
            out.append(_example(row, cols, label, ex_id, where))
        if not out:
            raise DataError(f"{name}: no examples (after dropping rows mapped to null or filtered out)", "check the file, label_map and filter")
        return out

    return load


def _datafile(fs: FileSpec, base: Path) -> DataFile:
    if fs.hf_dataset is not None:
        return DataFile(f"{HF_PREFIX}{fs.hf_dataset}/{fs.hf_config or ''}/{fs.hf_split}")
    lower = lambda h: h.lower() if h else None  # noqa: E731
    if fs.data_path is not None:
        return DataFile(fs.data_path, sha256=lower(fs.sha256), url=fs.url, unpack=fs.unpack, content_sha256=lower(fs.content_sha256))
    assert fs.path is not None
    return DataFile(str((base / Path(fs.path).expanduser()).resolve()), sha256=lower(fs.sha256), content_sha256=lower(fs.content_sha256))


def task_from_spec(spec: TaskSpec, base_dir: Path, where: str = "task", source_file: str | None = None) -> Task:
    """Build a Task from a validated spec; relative paths are resolved against ``base_dir``."""
    check_spec(spec, where)

    def split(name: str, fs: FileSpec, **kw: object) -> Split:
        return Split(name, _datafile(fs, base_dir), _make_loader(spec, fs, name), group_fields=tuple(groups_of(spec, fs)), **kw)  # type: ignore[arg-type]

    return Task(
        name=spec.name,
        description=spec.description or f"custom task from {where}",
        label_names=tuple(spec.label_names),
        text_fields=tuple(spec.text_fields),
        train=split(f"{spec.name}-train", spec.train, description=spec.train.description),
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
        source_file=source_file,
    )


def read_spec(path: str | Path) -> TaskSpec:
    """Read and validate a task YAML file into its spec (nested unknown keys get "did you mean")."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"task file '{p}' does not exist", "give the path to a task YAML file")
    data = load_yaml_text(p.read_text(encoding="utf-8-sig"), f"task file '{p}'")
    if not isinstance(data, dict):
        raise ConfigError(f"task file '{p}' must contain a mapping (name:, label_names:, ...)", "see `fewtune tasks --show mnli` for an example")
    # Validate nested entries on their own first: their unknown keys then get "did you mean" hints.
    nested: list[tuple[str, type[StrictModel], object]] = [("train", FileSpec, data.get("train"))]
    for key, cls in (("eval_sets", EvalSetSpec), ("patterns", PatternSpec)):
        if isinstance(data.get(key), dict):
            nested += [(f"{key}.{k}", cls, v) for k, v in data[key].items()]
    for loc, cls, value in nested:
        if isinstance(value, dict):
            validate(cls, value, where=f"'{loc}' of task file '{p}'")
    return validate(TaskSpec, data, where=f"task file '{p}'")


def load_task_file(path: str | Path) -> Task:
    """Read, validate and build the task a YAML file defines (built-in or custom; not registered)."""
    p = Path(path).expanduser()
    return task_from_spec(read_spec(p), p.resolve().parent, where=f"task file '{p}'", source_file=str(p.resolve()))


load_custom_task = load_task_file


def register_custom_task(path: str | Path) -> Task:
    """Load a task YAML and add it to ``TASKS``; re-registering the same custom name replaces it."""
    task = load_task_file(path)
    if task.name in TASKS and task.name not in _custom_names:
        raise ConfigError(f"custom task name '{task.name}' clashes with a built-in task", "choose another name")
    TASKS.add(task.name, task, replace=True)
    _custom_names.add(task.name)
    return task


def is_hub_split(split: Split) -> bool:
    return split.file.relpath.startswith(HF_PREFIX)
