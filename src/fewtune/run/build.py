"""A run's model and method: the base as its config asks, wrapped in the run's method.

Apart from ``run.runner`` so that the pack engine (``run.pack_engine``), which the runner's
selection step uses to train ``select:`` trials together, builds members exactly as a lone run
builds its method, without importing the runner."""

from __future__ import annotations

from pathlib import Path

import torch

from fewtune.config import RunConfig
from fewtune.methods import METHODS, Method, RunContext
from fewtune.models.loading import LoadedModel, load_model, resolve_precision
from fewtune.run.resources import ResourceMeter
from fewtune.tasks.base import Example, Task
from fewtune.tasks.prompts import verbalizer_token_ids


def make_method(cfg: RunConfig, task: Task, pattern, dev: torch.device, meter: ResourceMeter, pool: list[Example],
                data_dir: Path | None, progress=None, lm: LoadedModel | None = None) -> Method:
    """A fresh model (seeded by ``model_seed``) wrapped in the run's method, ready to ``fit``;
    ``lm``: a base already loaded for this config (the members of a pack share one)."""
    torch.manual_seed(cfg.model_seed)
    lm = lm or load_base(cfg, dev)
    dev = lm.input_device if cfg.device_map else dev  # a model placed by device_map takes its inputs there
    verbalizer = verbalizer_token_ids(lm.tokenizer, pattern.verbalizer)
    precision = resolve_precision(cfg.precision, dev)
    # The methods see the context clipped to the model's window; config.yaml keeps the value as
    # requested (it is what the run id hashes) and metrics.json records the effective one.
    ctx = RunContext(clip_context(cfg, lm.max_positions), task, pattern, lm, verbalizer, precision, dev, meter,
                     train_pool=pool, data_dir=data_dir, progress=progress)
    method_cls = METHODS.get(cfg.method)
    return method_cls(ctx, method_cls.Params.model_validate(cfg.params))


def load_base(cfg: RunConfig, dev: torch.device) -> LoadedModel:
    """The run's model, as its config asks (seeded by ``model_seed``: tiny random models)."""
    torch.manual_seed(cfg.model_seed)
    return load_model(cfg.model, seed=cfg.model_seed, dev=dev, dtype=cfg.identity.model_dtype if cfg.identity else "fp32",
                      attn_implementation=cfg.attn_implementation, device_map=cfg.device_map)


def clip_context(cfg: RunConfig, max_positions: int | None) -> RunConfig:
    if max_positions and cfg.max_context > max_positions:
        return cfg.model_copy(update={"max_context": max_positions})
    return cfg
