"""A run's eval sets: loaded (stratified, seeded subsamples where asked) and predicted by a method.
Shared by the runner, pack members (``run.pack``) and the feasibility checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fewtune.config import RunConfig
from fewtune.methods import Method, Predictions
from fewtune.tasks import load_eval
from fewtune.tasks.base import Example, Task
from fewtune.tasks.sampling import stratified_subsample


@dataclass
class EvalData:
    name: str
    examples: list[Example]
    domain: str
    warning: str | None
    group_fields: tuple[str, ...]
    full_size: int


def load_eval_sets(task: Task, cfg: RunConfig, data_dir: Path | None) -> list[EvalData]:
    out = []
    for name in cfg.eval_sets or []:
        split = task.eval_split(name)
        full = load_eval(task, name, data_dir)
        exs = stratified_subsample(full, cfg.eval_limit, cfg.eval_seed) if cfg.eval_limit else full
        domain = "id" if name in task.in_domain else "ood"
        out.append(EvalData(name, exs, domain, split.warning, split.group_fields, len(full)))
    return out


def _progress_task(progress, description: str, total: int):
    if progress is None:
        return None, None
    tid = progress.add_task(description, total=total)
    return tid, (lambda k: progress.advance(tid, k))


def predict_eval_sets(method: Method, evals: list[EvalData], progress=None) -> dict[str, Predictions]:
    preds = {}
    for ev in evals:
        tid, advance = _progress_task(progress, f"  eval {ev.name}", len(ev.examples))
        preds[ev.name] = method.predict(ev.examples, on_batch=advance).keyed([e.id for e in ev.examples])
        if tid is not None:
            progress.remove_task(tid)
    return preds
