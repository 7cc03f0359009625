"""Which runs can be packed together (``pack_key``) and what a pack is for an executor (``PackSpec``
in, ``PackResult`` out). Apart from ``run.pack`` (the pack's runner) so that the study's planner
needs neither the runner nor the training code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewtune.config import RunConfig
from fewtune.methods import METHODS
from fewtune.models.tiny import is_tiny

# methods whose members share a frozen base and differ only in their adapters (one ``Piece`` kind
# each in ``training.packed_layers``: LoRA incl. rsLoRA, DoRA, (IA)³; BitFit's biases and norm gains)
PACKABLE = ("lora", "dora", "ia3", "bitfit")


def pack_key(cfg: RunConfig) -> tuple | None:
    """What runs must share to be packed together, or None where this run cannot be packed (it
    then runs as today). Packable: ``lora`` (incl. rsLoRA), ``dora``, ``ia3``, ``bitfit``; one
    process, no ``select:`` (its trials pack among themselves: ``run.trial_pack``), no learning
    curve, no gradient accumulation or checkpointing, no fp16, no saved adapter, no tracker, a
    head without dropout."""
    if cfg.method not in PACKABLE or cfg.select is not None or cfg.device_map or cfg.log_to:
        return None
    t = cfg.train
    if t.grad_accum != 1 or t.gradient_checkpointing or t.eval_every_epoch or cfg.precision == "fp16":
        return None
    p = METHODS.get(cfg.method).Params.model_validate(cfg.params)
    if p.save_dir or (p.objective == "classifier" and p.head != "linear" and p.head_dropout > 0):
        return None
    dtype = cfg.identity.model_dtype if cfg.identity else "fp32"
    return (cfg.model, cfg.model_seed if is_tiny(cfg.model) else None, dtype, cfg.attn_implementation, cfg.task, cfg.precision)


@dataclass(frozen=True)
class PackSpec:
    """What an executor hands the runner for a pack: the members' configs and run directories."""

    configs: tuple[RunConfig, ...]
    out_dirs: tuple[Path, ...]


@dataclass
class PackResult:
    """A pack's outcome as the executors carry a run's (``.metrics``): per member run directory
    name, ``{"metrics": …}`` or ``{"error": "<Type>: message", "error_type": …}``."""

    metrics: dict[str, Any]
