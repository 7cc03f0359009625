"""Expanding a study into its grid of runs: every swept value crossed, every run resolved and
validated, deduplicated by run id, in execution order — before anything runs."""

from __future__ import annotations

import itertools
import math
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from fewtune.config import RunConfig, validate
from fewtune.errors import ConfigError
from fewtune.overrides import check_scopes, deep_merge, set_path
from fewtune.study.config import DEFAULT_THREADS, MAX_RUNS, StudyConfig


def _method_names() -> list[str]:
    from fewtune.methods import METHODS

    return METHODS.names()


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
    A mapping (``train``, ``params``) is expanded key by key (cartesian product), unless its model
    says it does not sweep (``select``: its lists are one run's candidates)."""
    if sub is not None and not getattr(sub, "sweeps", True):
        return [value]
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
    """The config model behind an annotation (``Selection | None`` → ``Selection``)."""
    for a in (ann, *typing.get_args(ann)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _params_model(method: str) -> type[BaseModel]:
    from fewtune.methods import METHODS

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
    from fewtune.tasks import TASKS

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


def expand(study: StudyConfig, resolver: Callable[[RunConfig], RunConfig] | None = None) -> list[PlannedRun]:
    """Every run of the study, resolved and validated, deduplicated by run id, in execution order.

    Order: data seed, then n, then task, then method entry — so that a study cut short (``--limit``,
    a crash) has covered every method on the first samples rather than every sample of one method.
    The grid is counted first: one that is too large is refused before it fills the memory.
    """
    if resolver is None:
        from fewtune.run.resolve import resolve  # lazily: it imports the methods (and torch)

        threads = study.threads or DEFAULT_THREADS  # what every executor gives each run

        def resolver(cfg: RunConfig) -> RunConfig:
            return resolve(cfg, threads)
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
    from fewtune.tasks import get_task

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
    if sub is not None and not getattr(sub, "sweeps", True):
        return 1
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
