"""Studies: a grid of runs (models × tasks × methods with their parameters × n × data seeds),
expanded from one YAML file, executed with progress, stored durably and resumable after any crash.

A study config is a YAML mapping. Top-level keys are either study keys (``name``, ``description``,
``tasks``, ``methods``, ``claims``, ``resources``, ``threads``) or run parameters — any field of ``RunConfig`` (``model``, ``n``, ``seed``,
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

``threads`` (one value for the whole study, default 1) is the torch thread count every run computes
with, whatever executes it and however many run at once; on CPU it is part of each run's identity,
so it is recorded in ``study.db`` and a resume with another value is refused (docs/identity.md).

Each run's identity is the content hash of its *resolved* config (every default filled in), so the
same run reached from two entries is run once, and re-running a study skips what is done
(``fewtune.study.expand`` builds the grid; ``fewtune.study.execute`` runs it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fewtune.config import RunConfig, TrainConfig
from fewtune.errors import ConfigError
from fewtune.overrides import Override, check_flag_conflicts, load_yaml_text, parse_overrides
from fewtune.registry import closest, unknown_hint

STUDY_KEYS = ("name", "description", "tasks", "methods", "claims", "resources", "pack", "threads")
DEFAULT_THREADS = 1  # torch threads per run when neither the study nor --threads says (see StudyConfig.threads)
RESOURCE_KEYS = ("cpus", "gpus")  # per run, for executors that schedule them (ray)
RUN_KEYS = tuple(RunConfig.model_fields)
TASK_ENTRY_EXTRA = ("task",)
METHOD_ENTRY_EXTRA = ("method", "tasks")
PRESETS = ("quick", "paper", "paper-released", "paper-tuned", "beyond", "sizes")
MAX_RUNS = 100_000  # a larger grid is almost surely a typo (--seeds 0-99999999), and would not fit in memory


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
    claims: list[dict[str, Any]] = field(default_factory=list)  # validated specs (fewtune.stats.claims), tested by the report
    resources: dict[str, float] | None = None  # per run, e.g. {"cpus": 2, "gpus": 0.25}: where runs go, not what they compute
    pack: int | None = None  # runs per pack (study.pack; --pack wins): how runs are computed, not what
    # torch threads of every run, whatever executes it and however many at once: on CPU the thread
    # count changes the numbers (it is in each run's identity), so it is fixed per study and
    # recorded; None: --threads, else what the study recorded, else DEFAULT_THREADS (1: the same
    # numbers on every machine whatever its core count, and no oversubscription with --parallel).
    threads: int | None = None

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
        if self.resources:
            out["resources"] = self.resources
        if self.pack is not None:
            out["pack"] = self.pack
        if self.threads is not None:
            out["threads"] = self.threads
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
        from fewtune.stats.claims import load_claims  # lazily: scipy/statsmodels are needed only when claims are declared

        claims = load_claims(data["claims"], where)
    return StudyConfig(name=name, description=desc, base=base, tasks=tasks, methods=methods, source=source, claims=claims,
                       resources=_resources(data.get("resources"), where), pack=_pack(data.get("pack"), where),
                       threads=_threads(data.get("threads"), where))


def _pack(value: Any, where: str) -> int | None:
    """``pack: K``: up to K packable runs train together (``fewtune.study.pack``); 1 is off."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{where}: 'pack' must be a whole number of runs at least 1, got {value!r}", "e.g. pack: 4 (1: no packing)")
    return value


def _threads(value: Any, where: str) -> int | None:
    """``threads: 1``: the torch threads every run computes with (``StudyConfig.threads``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: 'threads' must be a whole number ≥ 1 (torch threads per run), got {value!r}",
                          "e.g. threads: 1 (one value for the whole study: it is part of every run's identity)")
    return value


def _resources(value: Any, where: str) -> dict[str, float] | None:
    """``resources: {cpus: 2, gpus: 0.25}``: what each run asks of a cluster scheduler (Ray)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'resources' must be a mapping, got {value!r}", "e.g. resources: {cpus: 2, gpus: 0.25}")
    _check_keys(value, RESOURCE_KEYS, f"{where}, resources")
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{where}: resources.{k} must be a number ≥ 0, got {v!r}", "e.g. resources: {cpus: 2, gpus: 0.25}")
    return {k: float(v) for k, v in value.items()}


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
