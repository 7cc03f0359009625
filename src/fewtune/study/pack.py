"""Which pending runs of a study execute together as one pack (``fewtune study --pack K``).

Packing, like an executor, decides *how* runs are computed, never *what*: run ids, run
directories and results are those of the runs alone (``fewtune.run.pack``, ``docs/packing.md``).
The planner groups runs with the same ``pack_key`` (method, model, task, precision, …) in study
order into packs of up to K; a run that cannot be packed, or is alone in its group, stays a run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fewtune.errors import ConfigError
from fewtune.run.packable import PackSpec, pack_key
from fewtune.study.executor import RunOutcome
from fewtune.study.expand import PlannedRun

PACK_EXECUTORS = ("inprocess", "subprocess", "ray")  # executors that run a pack as one unit


@dataclass(frozen=True)
class PackPlan:
    """Several planned runs executed as one unit; ``run_id``/``config`` are what an executor reads."""

    members: tuple[PlannedRun, ...]
    out_dirs: tuple[Path, ...]

    @property
    def run_id(self) -> str:
        return f"pack-{self.members[0].run_id}"

    @property
    def config(self) -> PackSpec:
        return PackSpec(tuple(m.config for m in self.members), self.out_dirs)

    def label(self) -> str:
        return f"pack of {len(self.members)}: " + ", ".join(m.label() for m in self.members)


def check_pack(pack: object, executor_name: str) -> int:
    """``--pack``/``pack:`` as a number of runs per pack (1: off); a usage error otherwise."""
    if pack is None:
        return 1
    if isinstance(pack, bool) or not isinstance(pack, int) or pack < 1:
        raise ConfigError(f"pack must be a whole number of runs at least 1, got {pack!r}", "e.g. --pack 4 (1: no packing)")
    if pack > 1 and executor_name not in PACK_EXECUTORS:
        raise ConfigError(f"--executor {executor_name} does not run packs (yet)",
                          f"use --executor {' or '.join(PACK_EXECUTORS)} with --pack, or drop --pack")
    return pack


def group(todo: list[PlannedRun], k: int) -> list[list[PlannedRun]]:
    """The runs in study order, packable ones gathered by key into groups of up to ``k`` (a group
    takes the place of its first run); every other run is a group of one."""
    if k <= 1:
        return [[p] for p in todo]
    units: list[list[PlannedRun]] = []
    open_by_key: dict[tuple, list[PlannedRun]] = {}
    for p in todo:
        key = pack_key(p.config)
        if key is None:
            units.append([p])
            continue
        unit = open_by_key.get(key)
        if unit is None or len(unit) >= k:
            unit = open_by_key[key] = []
            units.append(unit)
        unit.append(p)
    return units


def pack_summary(todo: list[PlannedRun], k: int) -> str:
    """What ``--pack k`` would do with these runs (``--dry-run``): how many packs, and which runs
    run alone because their method or settings cannot be packed (``pack_key``)."""
    units = group(todo, k)
    packs = [u for u in units if len(u) > 1]
    alone = [u[0] for u in units if len(u) == 1]
    unpackable = Counter(p.config.method for p in alone if pack_key(p.config) is None)
    text = f"--pack {k}: {sum(map(len, packs))} runs in {len(packs)} pack(s), {len(alone)} run(s) alone"
    if unpackable:
        text += " (not packable: " + ", ".join(f"{n} {m}" for m, n in sorted(unpackable.items())) + "; see docs/packing.md)"
    return text


def member_outcomes(plan: PackPlan, result: RunOutcome) -> list[tuple[PlannedRun, RunOutcome]]:
    """Each member's outcome from its pack's: its own, or the pack's error where the pack as a
    whole failed (its process died)."""
    if not result.ok:
        return [(m, result) for m in plan.members]
    members = (result.metrics or {}).get("pack_members", {})
    out = []
    for m in plan.members:
        got = members.get(m.run_id) or {"error": "ProcessDied: the pack returned no result for this run", "error_type": "ProcessDied"}
        out.append((m, RunOutcome(metrics=got["metrics"]) if "metrics" in got else RunOutcome(error=got["error"], error_type=got["error_type"])))
    return out
