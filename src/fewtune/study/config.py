"""Studies: a grid of runs (models × tasks × methods with their parameters × n × data seeds),
expanded from one YAML file, executed with progress, stored durably and resumable after any crash.

A study config is a YAML mapping. Top-level keys are either study keys (``name``, ``description``,
``tasks``, ``methods``) or run parameters — any field of ``RunConfig`` (``model``, ``n``, ``seed``,
``eval_limit``, ``train: {lr: …}``, ``params: {…}``, …). A run parameter can be set for the whole
study, per task entry, or per method entry, and any value given as a list is swept::

    name: demo
    n: [2, 16]                 # swept: both values
    seed: [0, 1, 2]
    train: {lr: 1e-5, epochs: 40}
    tasks: [cola, {task: mnli, eval_limit: 500}]
    methods:
      - icl
      - vanilla
      - {method: lora, params: {r: [1, 8]}, train: {lr: 1e-4}}
      - {method: distill, tasks: [mnli]}     # run this method on these tasks only

A field whose value is itself a list (``eval_sets``, a list-typed method parameter) is swept by a
list of lists. Precedence, lowest first: study → task entry → method entry → ``--set`` overrides
(``--set train.max_steps=2`` for all runs, ``--set lora:params.r=8`` for one method).

Each run's identity is the content hash of its *resolved* config (every default filled in), so the
same run reached from two entries is run once, and re-running a study skips what is done.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import shutil
import sqlite3
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ..config import RunConfig, TrainConfig, resolve, validate
from ..errors import ConfigError, OutputError
from ..overrides import Override, check_flag_conflicts, check_scopes, deep_merge, load_yaml_text, parse_overrides, set_path
from .executors import Executor, RunOutcome, SubprocessExecutor
from ..registry import closest, unknown_hint
from ..atomic import write_atomic
from .store import RUNS_DIR, Store

STUDY_KEYS = ("name", "description", "tasks", "methods", "claims")
RUN_KEYS = tuple(RunConfig.model_fields)
TASK_ENTRY_EXTRA = ("task",)
METHOD_ENTRY_EXTRA = ("method", "tasks")
PRESETS = ("quick", "paper", "paper-released")
LOCK_NAME = ".lock"
STUDY_FILE = "study.yaml"
MAX_RUNS = 100_000  # a larger grid is almost surely a typo (--seeds 0-99999999), and would not fit in memory


# --------------------------------------------------------------------------------------------
# config


@dataclass
class StudyConfig:
    """A validated study: its name, the base run parameters and the task and method entries."""

    name: str = "study"
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    tasks: list[dict[str, Any]] | None = None  # entries: {"task": name, ...overrides}
    methods: list[dict[str, Any]] | None = None  # entries: {"method": name, "tasks": [...]?, ...overrides}
    overrides: list[Override] = field(default_factory=list)
    source: str = ""  # where it was loaded from (preset name or path)
    claims: list[dict[str, Any]] = field(default_factory=list)  # validated specs (fewtune.claims), tested by the report

    def to_dict(self) -> dict[str, Any]:
        """The study as YAML-able data (what is stored beside the results)."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out.update(self.base)
        if self.tasks is not None:
            out["tasks"] = self.tasks
        if self.methods is not None:
            out["methods"] = self.methods
        if self.claims:
            out["claims"] = self.claims
        return out

    def to_yaml(self) -> str:
        """The study as YAML; command-line overrides (which outrank every entry, so they have no
        place in the config itself) are listed in a header comment."""
        head = f"# study config as run (from {self.source or 'unknown source'})\n"
        if self.overrides:
            head += "# command-line overrides applied on top of it:\n" + "".join(f"#   --set {o.text()}\n" for o in self.overrides)
        return head + yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _check_keys(data: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"unknown key '{key}' in {where}", unknown_hint(str(key), list(allowed)))


def _entry(item: Any, name_key: str, extra: Sequence[str], forbidden: str, where: str) -> dict[str, Any]:
    """A task/method entry: a bare name or a mapping with ``name_key`` plus run overrides."""
    if isinstance(item, str):
        return {name_key: item}
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a name or a mapping, got {item!r}", f"e.g. '- vanilla' or '- {{{name_key}: vanilla, n: 16}}'")
    if name_key not in item:
        raise ConfigError(f"{where} has no '{name_key}' key", f"add '{name_key}: <name>' to the entry")
    if forbidden in item:
        raise ConfigError(f"{where} sets '{forbidden}'", f"'{forbidden}' cannot be set inside a {name_key} entry; "
                          + ("restrict a method to tasks with 'tasks: [..]'" if forbidden == "task" else "list methods under 'methods:'"))
    allowed = [k for k in (*extra, *RUN_KEYS) if k != forbidden]
    _check_keys(item, allowed, where)
    if not isinstance(item[name_key], str):
        raise ConfigError(f"{where}: '{name_key}' must be one name, got {item[name_key]!r}",
                          f"write one entry per {name_key}" if name_key == "method" else "use one task per entry")
    if "tasks" in item:
        ts = item["tasks"]
        if isinstance(ts, str):
            item = {**item, "tasks": [ts]}
        elif not (isinstance(ts, list) and all(isinstance(t, str) for t in ts)):
            raise ConfigError(f"{where}: 'tasks' must be a list of task names, got {ts!r}", "e.g. tasks: [mnli]")
    return dict(item)


def parse_study(data: Any, source: str = "") -> StudyConfig:
    """Validate the *shape* of a study config (keys, entries). Values are validated in ``expand``,
    where every run's config is built and resolved, before anything runs."""
    where = f"study config {source}".strip()
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    _check_keys(data, [*STUDY_KEYS, *RUN_KEYS], where)
    if "tasks" in data and "task" in data:
        raise ConfigError(f"{where} sets both 'task' and 'tasks'", "use 'tasks: [..]' (entries may override run parameters) or 'task:'")
    if "methods" in data and "method" in data:
        raise ConfigError(f"{where} sets both 'method' and 'methods'", "use 'methods: [..]' or 'method:'")
    tasks = methods = None
    if "tasks" in data:
        if not isinstance(data["tasks"], list) or not data["tasks"]:
            raise ConfigError(f"{where}: 'tasks' must be a non-empty list", "e.g. tasks: [cola, mnli]")
        tasks = [_entry(t, "task", TASK_ENTRY_EXTRA, "method", f"{where}, tasks[{i}]") for i, t in enumerate(data["tasks"])]
    if "methods" in data:
        if not isinstance(data["methods"], list) or not data["methods"]:
            raise ConfigError(f"{where}: 'methods' must be a non-empty list", "e.g. methods: [icl, vanilla]")
        methods = [_entry(m, "method", METHOD_ENTRY_EXTRA, "task", f"{where}, methods[{i}]") for i, m in enumerate(data["methods"])]
        if tasks is not None:
            names = [t["task"] for t in tasks]
            for i, m in enumerate(methods):
                for t in m.get("tasks", []):
                    if t not in names:
                        raise ConfigError(f"{where}, methods[{i}] ({m['method']}): task '{t}' is not among the study's tasks",
                                          unknown_hint(t, names))
    name = data.get("name", "study")
    desc = data.get("description", "")
    if not isinstance(name, str) or not isinstance(desc, str):
        raise ConfigError(f"{where}: 'name' and 'description' must be strings")
    base = {k: v for k, v in data.items() if k not in STUDY_KEYS}
    claims: list[dict[str, Any]] = []
    if data.get("claims") is not None:
        from ..claims import load_claims  # lazily: scipy/statsmodels are needed only when claims are declared

        claims = load_claims(data["claims"], where)
    return StudyConfig(name=name, description=desc, base=base, tasks=tasks, methods=methods, source=source, claims=claims)


def preset_names() -> list[str]:
    files = resources.files("fewtune") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in files.iterdir() if p.name.endswith(".yaml"))


def load_study(config: str | Path, overrides: Sequence[str] = (), *, seeds: str | None = None, n: str | None = None) -> StudyConfig:
    """A study from a YAML file path or a preset name, with ``--set``/``--seeds``/``--n`` applied."""
    path = Path(config)
    if path.is_file():
        study = parse_study(load_yaml_text(path.read_text(encoding="utf-8-sig"), f"study config {path}"), str(path))
    elif str(config) in preset_names():
        text = (resources.files("fewtune") / "presets" / f"{config}.yaml").read_text()
        study = parse_study(load_yaml_text(text, f"preset '{config}'"), f"preset '{config}'")
    else:
        guess = closest(str(config), preset_names())
        raise ConfigError(
            f"no study config file or preset named '{config}'",
            (f"did you mean preset '{guess}'? " if guess else "") + f"presets: {', '.join(preset_names())}; or give a path to a YAML file",
        )
    parsed = [_check_override(o) for o in parse_overrides(overrides)]
    check_flag_conflicts({"seed": seeds, "n": n}, parsed, {"seed": "--seeds", "n": "--n"})
    if seeds is not None:
        parsed.append(Override(("seed",), parse_int_list(seeds, "--seeds")))
    if n is not None:
        parsed.append(Override(("n",), parse_int_list(n, "--n")))
    study.overrides = parsed
    return study


def parse_int_list(text: str, flag: str) -> list[int]:
    """'0,1,2' or '0-9' (inclusive) or a mix: '0-2,5'. Counted before a list is built, so
    '0-99999999' is refused at once rather than exhausting the memory."""
    spans: list[tuple[int, int]] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                spans.append((a, b))
            else:
                spans.append((int(part), int(part)))
    except ValueError:
        raise ConfigError(f"{flag} expects integers like '0,1,2' or a range '0-9', got {text!r}") from None
    if not spans:
        raise ConfigError(f"{flag} got no values", f"e.g. {flag} 0,1")
    count = sum(b - a + 1 for a, b in spans)
    if count > MAX_RUNS:
        raise ConfigError(f"{flag} {text} gives {count:,} values; a study is limited to {MAX_RUNS:,} runs",
                          f"give a smaller range, e.g. {flag} 0-9")
    return sorted({v for a, b in spans for v in range(a, b + 1)})


def parse_override(item: str) -> Override:
    """``[method:]key.path=value``; the value is YAML (``2``, ``1e-4``, ``[1, 8]``, ``null``)."""
    return _check_override(parse_overrides([item])[0])


def _check_override(o: Override) -> Override:
    """Only run parameters may be overridden, and not the task or method of an entry."""
    parts, item = o.path, o.text()
    if parts[0] not in RUN_KEYS:
        raise ConfigError(f"unknown key '{parts[0]}' in --set {item}", unknown_hint(parts[0], list(RUN_KEYS)))
    if parts[0] in ("method", "task"):
        # A task or method entry carries overrides that belong to it (e.g. CoLA's eval sets), so
        # swapping the name underneath them would build runs nobody asked for.
        raise ConfigError(f"--set cannot change '{parts[0]}'", f"edit the study's '{parts[0]}s:' list instead (copy the preset to a YAML file)")
    if parts[0] == "train" and len(parts) > 1 and parts[1] not in TrainConfig.model_fields:
        raise ConfigError(f"unknown key 'train.{parts[1]}' in --set {item}", unknown_hint(parts[1], list(TrainConfig.model_fields)))
    return o


def _method_names() -> list[str]:
    from ..methods import METHODS

    return METHODS.names()


# --------------------------------------------------------------------------------------------
# expansion


def _is_list_type(ann: Any) -> bool:
    """Does a field's annotation accept a list value (``list[str] | None`` does)?"""
    if ann is None:
        return False
    origin = typing.get_origin(ann)
    if origin in (list, tuple, set, frozenset) or ann in (list, tuple):
        return True
    return any(_is_list_type(a) for a in typing.get_args(ann) if a is not type(None)) if origin is not None else False


def _field_ann(model: type[BaseModel] | None, key: str) -> Any:
    if model is None:
        return None
    f = model.model_fields.get(key)
    return None if f is None else f.annotation


def _alternatives(value: Any, ann: Any, sub: type[BaseModel] | None = None) -> list[Any]:
    """All concrete values a (possibly swept) value stands for.

    A list sweeps its elements unless the field is list-typed; then only a list of lists sweeps.
    A mapping (``train``, ``params``) is expanded key by key (cartesian product)."""
    if isinstance(value, dict):
        keys = list(value)
        alts = [_alternatives(value[k], _field_ann(sub, k), _submodel(_field_ann(sub, k))) for k in keys]
        return [dict(zip(keys, combo)) for combo in itertools.product(*alts)]
    if isinstance(value, list):
        if _is_list_type(ann):
            if value and all(isinstance(v, list) for v in value):
                return list(value)
            return [value]
        if not value:
            raise ConfigError("an empty list sweeps nothing", "give at least one value")
        return [alt for v in value for alt in _alternatives(v, ann, sub)]
    return [value]


def _submodel(ann: Any) -> type[BaseModel] | None:
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _params_model(method: str) -> type[BaseModel]:
    from ..methods import METHODS

    return METHODS.get(method).Params


@dataclass(frozen=True)
class PlannedRun:
    """One run of the grid: its id (hash of the resolved config) and the resolved config."""

    run_id: str
    config: RunConfig
    sort_key: tuple = ()

    def label(self) -> str:
        c = self.config
        return f"{c.method} · {c.task} · n={c.n} · seed={c.seed}"


def _entry_combos(study: StudyConfig) -> Iterator[tuple[int, int, dict[str, Any], list[str] | None, str]]:
    """Per task × method entry: positions, the merged (still swept) run dict, the method entry's
    task restriction, and a description of where it comes from (for error messages)."""
    tasks = study.tasks if study.tasks is not None else [{}]
    methods = study.methods if study.methods is not None else [{}]
    for ti, t in enumerate(tasks):
        for mi, m in enumerate(methods):
            only = m.get("tasks")
            if only is not None and "task" in t and t["task"] not in only:
                continue
            merged = deep_merge(deep_merge(study.base, t), {k: v for k, v in m.items() if k != "tasks"})
            where = "study"
            if study.tasks is not None:
                where += f", tasks[{ti}] ({t['task']})"
            if study.methods is not None:
                where += f", methods[{mi}] ({m['method']})"
            yield ti, mi, merged, only, where


def _method_runs(study: StudyConfig) -> Iterator[tuple[int, int, dict[str, Any], type[BaseModel], list[str] | None, str]]:
    """Per task × method entry × method: the run dict with ``--set`` overrides applied (still
    swept), the method's parameter model, the entry's task restriction and where it comes from."""
    from ..tasks import TASKS

    for ti, mi, merged, only, where in _entry_combos(study):
        for t in only or []:
            TASKS.get(t)  # an unknown task name in a method's 'tasks:' is an error, not a silent filter
        # Expand 'method' first: the method decides how its params are swept.
        for method in _alternatives(merged.get("method", RunConfig.model_fields["method"].default), None):
            if not isinstance(method, str):
                raise ConfigError(f"{where}: 'method' must be a method name, got {method!r}")
            params_model = _params_model(method)
            run = {**merged, "method": method}
            for o in study.overrides:
                if o.method is not None and o.method != method:
                    continue
                if o.path[0] == "params" and len(o.path) > 1 and o.method is None and o.path[1] not in params_model.model_fields:
                    raise ConfigError(
                        f"--set {o.text()}: method '{method}' has no parameter '{o.path[1]}'",
                        f"scope it to the method that has it, e.g. --set lora:{'.'.join(o.path)}=…"
                        + (f"; {method} parameters: {', '.join(params_model.model_fields)}" if params_model.model_fields else ""),
                    )
                run = set_path(run, o.path, o.value)
            yield ti, mi, run, params_model, only, where


def count_runs(study: StudyConfig) -> int:
    """How many runs the grid holds (before removing duplicates), counted without building it,
    and checks that every scoped ``--set`` names a method the study runs."""
    total, used = 0, set()
    for _, _, run, params_model, _, _ in _method_runs(study):
        used.add(run["method"])
        total += math.prod(_count(run[k], *_field_types(k, params_model)) for k in run)
    check_scopes(study.overrides, _method_names(), used, "the study")
    return total


def expand(study: StudyConfig, resolver: Callable[[RunConfig], RunConfig] = resolve) -> list[PlannedRun]:
    """Every run of the study, resolved and validated, deduplicated by run id, in execution order.

    Order: data seed, then n, then task, then method entry — so that a study cut short (``--limit``,
    a crash) has covered every method on the first samples rather than every sample of one method.
    The grid is counted first: one that is too large is refused before it fills the memory.
    """
    total = count_runs(study)
    if total > MAX_RUNS:
        raise ConfigError(f"study '{study.name}' would expand to {total:,} runs, more than the limit of {MAX_RUNS:,}",
                          "sweep fewer values (--seeds, --n, lists in the config) or split it into several studies")
    planned: dict[str, PlannedRun] = {}
    task_names: dict[str, str] = {}  # task spec (name or YAML path) → the task's name
    for ti, mi, run, params_model, only, where in _method_runs(study):
        for combo in _expand_run(run, params_model, where):
            cfg = validate(RunConfig, combo, where=where)
            if only is not None and cfg.task not in only:
                continue
            resolved = resolver(cfg)
            _check_task_name(resolved.task, task_names)
            run_id = resolved.content_hash()
            if run_id not in planned:
                key = (resolved.seed, resolved.n, ti, mi, len(planned))
                planned[run_id] = PlannedRun(run_id, resolved, key)
    if not planned:
        raise ConfigError(f"study '{study.name}' expands to no runs", "check that each method's 'tasks:' names a task of the study")
    return sorted(planned.values(), key=lambda p: p.sort_key)


def _check_task_name(spec: str, seen: dict[str, str]) -> None:
    """Two task specs (e.g. two custom YAML files) with the same ``name:`` would be merged in the
    report, which groups runs by task name (2 seeds counted as 4): refuse them."""
    from ..tasks import get_task

    if spec in seen:
        return
    name = seen[spec] = get_task(spec).name
    other = next((s for s, n in seen.items() if n == name and s != spec), None)
    if other is not None:
        raise ConfigError(f"two tasks of the study are both named '{name}': '{other}' and '{spec}'",
                          "give each custom task file a distinct 'name:' (the report groups runs by task name)")


def _field_types(key: str, params_model: type[BaseModel]) -> tuple[Any, type[BaseModel] | None]:
    """A run key's annotation and, for a nested mapping (``train``, ``params``), its model."""
    ann = _field_ann(RunConfig, key)
    return ann, params_model if key == "params" else _submodel(ann)


def _count(value: Any, ann: Any, sub: type[BaseModel] | None = None) -> int:
    """``len(_alternatives(value, ann, sub))`` without building the alternatives."""
    if isinstance(value, dict):
        return math.prod(_count(v, _field_ann(sub, k), _submodel(_field_ann(sub, k))) for k, v in value.items())
    if isinstance(value, list):
        if _is_list_type(ann):
            return len(value) if value and all(isinstance(v, list) for v in value) else 1
        return sum(_count(v, ann, sub) for v in value)
    return 1


def _expand_run(run: dict[str, Any], params_model: type[BaseModel], where: str) -> list[dict[str, Any]]:
    keys = list(run)
    alts = []
    for k in keys:
        ann, sub = _field_types(k, params_model)
        if k == "params" and run[k] is not None and not isinstance(run[k], (dict, list)):
            raise ConfigError(f"{where}: 'params' must be a mapping of method parameters, got {run[k]!r}", "e.g. params: {r: 8}")
        try:
            alts.append(_alternatives(run[k], ann, sub))
        except ConfigError as e:
            raise ConfigError(f"{where}: '{k}': {e.message}", e.hint) from None
    return [dict(zip(keys, combo)) for combo in itertools.product(*alts)]


# --------------------------------------------------------------------------------------------
# execution


@contextmanager
def study_lock(out_dir: Path) -> Iterator[None]:
    """One process per study directory. An OS file lock (flock) is released by the kernel when
    the holder dies — even by ``kill -9`` — so a crashed study never blocks its own resumption."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(f"another fewtune study is running in {out_dir} (pid {holder})",
                              "wait for it to finish, or use another --out directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _clean_leftovers(runs_dir: Path) -> int:
    """Temporary run directories of a run killed mid-write (the runner renames them into place
    only when complete). Safe to delete: we hold the study lock."""
    removed = 0
    if runs_dir.is_dir():
        for p in runs_dir.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
    return removed


@dataclass
class StudyOutcome:
    """What a call of ``run_study`` did, and where the study stands."""

    out_dir: Path
    planned: int
    ran: int = 0  # runs executed in this call (successful or not)
    succeeded: int = 0
    failed_now: int = 0
    adopted: int = 0  # finished on disk but not yet recorded (crash between write and commit)
    skipped_done: int = 0
    skipped_failed: int = 0
    missing: list[str] = field(default_factory=list)  # recorded done, directory deleted: run again
    counts: dict[str, int] = field(default_factory=dict)  # over the study's runs, after this call
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (run id, label, error)

    @property
    def complete(self) -> bool:
        return self.counts.get("done", 0) == self.planned


def _metrics_line(metrics: dict[str, Any]) -> str:
    parts = []
    for name, ev in (metrics.get("eval") or {}).items():
        acc = ev.get("accuracy")
        parts.append(f"{name} {acc:.3f}" if isinstance(acc, (int, float)) else f"{name} –")
    return ", ".join(parts)


def run_study(
    study: StudyConfig,
    out_dir: Path | str,
    *,
    retry_failed: bool = False,
    limit: int | None = None,
    data_dir: Path | None = None,
    console: Any = None,
    show_progress: bool = True,
    executor: Executor | None = None,
    planned: list[PlannedRun] | None = None,
) -> StudyOutcome:
    """Run every missing run of ``study`` into ``out_dir``; safe to call again after any crash.

    ``executor`` decides where each run happens: by default ``SubprocessExecutor`` (a fresh
    process per run, so each run's peak memory is its own); ``InProcessExecutor(runner)`` for
    tests and debugging. ``limit`` caps how many runs this call executes. Failed runs are recorded
    with their error and skipped on the next call unless ``retry_failed``. A run recorded done
    whose directory was deleted runs again.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    out = Path(out_dir)
    console = console or Console(stderr=True)
    planned = planned if planned is not None else expand(study)
    outcome = StudyOutcome(out, len(planned))
    with study_lock(out), (executor or SubprocessExecutor()) as ex:
        write_atomic(out / STUDY_FILE, study.to_yaml())
        with Store(out) as store:
            if store.quarantined:
                console.print(f"[yellow]warning:[/yellow] {escape(str(store.path))} was damaged; set aside as "
                              f"{escape(store.quarantined.name)} and rebuilt from the finished runs in {escape(str(out / RUNS_DIR))}")
            store.set_meta("study", json.dumps({"name": study.name, "description": study.description, "source": study.source,
                                                "overrides": [o.text() for o in study.overrides]}))
            store.set_meta("study_run_ids", json.dumps([p.run_id for p in planned]))
            store.register((p.run_id, p.config.model_dump(mode="json")) for p in planned)
            store.reset_stale()
            _clean_leftovers(out / RUNS_DIR)
            todo = _select(planned, store, out, retry_failed, outcome, console)
            if limit is not None:
                todo = todo[:limit]
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("elapsed"),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            with Progress(*columns, console=console, disable=not show_progress, transient=False) as progress:
                overall = progress.add_task(f"study {study.name}", total=len(todo))
                for i, p in enumerate(todo, 1):
                    progress.update(overall, description=escape(f"study {study.name} · run {i}/{len(todo)}: {p.label()}"))
                    _execute(p, store, out, ex, data_dir, progress, outcome, console)
                    for t in list(progress.task_ids):  # drop bars a run left behind
                        if t != overall:
                            progress.remove_task(t)
                    progress.advance(overall)
                progress.update(overall, description=f"study {study.name}")
            outcome.counts = _counts(store, [p.run_id for p in planned])
    return outcome


def _select(planned: list[PlannedRun], store: Store, out: Path, retry_failed: bool, outcome: StudyOutcome,
            console: Any) -> list[PlannedRun]:
    """The runs to execute, in order. A run recorded done whose ``metrics.json`` is gone (its
    directory deleted by hand) goes back to pending and runs again: reports read the files."""
    from rich.markup import escape

    records = {r.run_id: r for r in store.runs(run_ids=[p.run_id for p in planned])}
    todo = []
    for p in planned:
        rec = records[p.run_id]
        if rec.status == "done" and not (out / (rec.run_dir or f"{RUNS_DIR}/{p.run_id}") / "metrics.json").is_file():
            store.requeue_missing(p.run_id)
            outcome.missing.append(p.run_id)
            console.print(f"[yellow]![/yellow] {escape(p.label())} {escape(f'[{p.run_id}]')}: recorded done but its "
                          f"directory is missing; running it again")
            todo.append(p)
        elif rec.status == "done":
            outcome.skipped_done += 1
        elif rec.status == "failed" and not retry_failed:
            outcome.skipped_failed += 1
        else:
            todo.append(p)
    return todo


def _counts(store: Store, run_ids: list[str]) -> dict[str, int]:
    counts = {"pending": 0, "running": 0, "done": 0, "failed": 0}
    for r in store.runs(run_ids=run_ids):
        counts[r.status] += 1
    return counts


def _adopt(p: PlannedRun, store: Store, run_dir: Path, rel: str) -> bool:
    """A run directory written completely (the runner renames a finished directory into place)
    but not recorded, because the process died in between: record it rather than run it twice.
    Anything else in its place is removed. True when adopted."""
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError):
            metrics = None
        # (The directory name is the run id; metrics["run_id"] is the runner's own hash, which may
        # differ, e.g. after it clips max_context to the model's positions.)
        if isinstance(metrics, dict) and metrics.get("status", "ok") == "ok" and isinstance(metrics.get("eval"), dict):
            store.mark_done(p.run_id, metrics, rel)
            return True
    if run_dir.exists():
        shutil.rmtree(run_dir)  # not a finished run: never produced by the atomic runner, but be safe
    return False


def _execute(p: PlannedRun, store: Store, out: Path, executor: Executor, data_dir: Path | None, progress: Any,
             outcome: StudyOutcome, console: Any) -> None:
    from rich.markup import escape

    rel = f"{RUNS_DIR}/{p.run_id}"
    run_dir = out / rel
    if _adopt(p, store, run_dir, rel):
        outcome.adopted += 1
        return
    store.mark_running(p.run_id)
    outcome.ran += 1
    t0 = time.time()
    try:
        result: RunOutcome = executor.run(p, run_dir, data_dir=data_dir, progress=progress)
        if result.error_type == OutputError.__name__:  # raised where the run executed, reported as data
            message, _, hint = (result.error or "").split(": ", 1)[-1].partition("\n  hint: ")
            raise OutputError(message, hint or None)
    except (KeyboardInterrupt, OutputError):
        # Not the run's fault (Ctrl-C, a full or read-only disk): stop the study, keep the run
        # pending so that re-running resumes it (if even that cannot be written, the run stays
        # "running", which the next call's reset_stale turns back into pending).
        with suppress(sqlite3.Error):
            store.mark_pending(p.run_id)
        raise
    if not result.ok:
        msg = result.error or ""
        store.mark_failed(p.run_id, msg)
        outcome.failed_now += 1
        outcome.failures.append((p.run_id, p.label(), msg.splitlines()[0]))
        console.print(f"[red]✗ failed[/red] {escape(p.label())} {escape(f'[{p.run_id}]')}: {escape(msg.splitlines()[0])}")
        return
    metrics = result.metrics or {}
    store.mark_done(p.run_id, metrics, rel)
    outcome.succeeded += 1
    console.print(f"[green]✓[/green] {escape(p.label())} {escape(f'[{p.run_id}]')}: {escape(_metrics_line(metrics))} ({time.time() - t0:.0f} s)")
