"""Tasks and their data: the registry, built-in tasks (cola, mnli), custom YAML tasks, loading.

``load_train`` / ``load_eval`` fetch and verify the split's file (see ``files`` for where data is
looked for) and parse it. Parsed examples are memoised in-process per split and file state, so
several runs in one process do not re-parse HANS; callers get a fresh list each time.
"""

from __future__ import annotations

import os
from pathlib import Path

from fewtune.tasks import builtin  # noqa: F401  (registers the built-in tasks)
from fewtune.tasks.base import TASKS, DataFile, Example, Split, Task
from fewtune.tasks.custom import is_hub_split, load_custom_task, register_custom_task
from fewtune.tasks.files import fetch, resolve_data_dir

__all__ = [
    "TASKS", "Task", "Example", "Split", "DataFile", "get_task", "load_train", "load_eval", "load_split",
    "register_custom_task", "load_custom_task", "fetch", "resolve_data_dir",
]

_MAX_MEMO = 16
_EXAMPLES_MEMO: dict[tuple[object, ...], list[Example]] = {}


def get_task(name: str | Task) -> Task:
    """The registered task called ``name`` (a ConfigError naming the closest one if unknown), or
    the custom task defined by the YAML file ``name`` (``--task my_task.yaml``), registered on use."""
    if isinstance(name, Task):
        return name
    if name.endswith((".yaml", ".yml")) and name not in TASKS:
        if not Path(name).is_file():
            from fewtune.errors import ConfigError

            raise ConfigError(f"custom task file not found: {name}", "give the path to a task YAML (see docs/custom-tasks.md)")
        return register_custom_task(name)
    return TASKS.get(name)


def load_split(split: Split, data_dir: str | os.PathLike[str] | None = None) -> list[Example]:
    """Fetch, verify and parse one split."""
    if is_hub_split(split):  # a hub dataset: the loader fetches it itself, nothing to verify
        return split.loader(Path(split.file.relpath))
    path = fetch(split.file, data_dir)
    st = path.stat()
    key = (split, str(path), st.st_size, st.st_mtime_ns)
    if key not in _EXAMPLES_MEMO:
        if len(_EXAMPLES_MEMO) >= _MAX_MEMO:
            _EXAMPLES_MEMO.pop(next(iter(_EXAMPLES_MEMO)))
        _EXAMPLES_MEMO[key] = split.loader(path)
    return list(_EXAMPLES_MEMO[key])


def load_train(task: str | Task, data_dir: str | os.PathLike[str] | None = None) -> list[Example]:
    """The task's whole train pool (few-shot samples are drawn from it by ``fewtune.tasks.sampling``)."""
    return load_split(get_task(task).train, data_dir)


def load_eval(task: str | Task, name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Example]:
    """All examples of the task's eval set ``name`` (an unknown name is a ConfigError)."""
    return load_split(get_task(task).eval_split(name), data_dir)
