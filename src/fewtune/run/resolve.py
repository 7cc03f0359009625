"""Resolving a run config: every default that depends on the task or the method filled in, and
the identity block computed.

Apart from ``fewtune.config`` so that the config module stays a leaf (it imports only errors and
the registry): resolving needs the methods, the tasks and the identity, which import the config.
"""

from __future__ import annotations

from fewtune.config import RunConfig, validate
from fewtune.errors import ConfigError
from fewtune.methods import METHODS, Method
from fewtune.models.loading import check_load_options, device
from fewtune.models.tiny import canonical_name
from fewtune.run.identity import compute_identity
from fewtune.run.selection import check_selection
from fewtune.tasks import get_task

EVAL_BATCH_AUTO = {"cpu": 16, "cuda": 64}


def resolve(cfg: RunConfig, threads: int | None = None) -> RunConfig:
    """Fill every default that depends on the task or method, validating both by name, and the
    identity block (what else the result depends on: code, libraries, task/model digests, device,
    ``threads``: the torch threads the run will use, by default this process's)."""
    task = get_task(cfg.task)
    method_cls = METHODS.get(cfg.method)
    pattern = task.pattern(cfg.pattern).name
    eval_sets = list(cfg.eval_sets or task.default_eval_sets or task.eval_sets)
    for name in eval_sets:
        task.eval_split(name)
    params = validate(method_cls.Params, cfg.params, where=f"params of method '{cfg.method}'")
    check_load_options(cfg.method, method_cls.keeps_base_frozen(), cfg.attn_implementation, cfg.device_map)
    check_method_options(cfg, method_cls)
    eval_batch = cfg.eval_batch_size if cfg.eval_batch_size != "auto" else EVAL_BATCH_AUTO.get(device().type, 16)
    out = cfg.model_copy(update={"model": canonical_name(cfg.model), "pattern": pattern, "eval_sets": eval_sets, "params": params.model_dump(mode="json"),
                                 "eval_batch_size": eval_batch})
    check_selection(out)  # candidates valid and selectable, before anything runs
    return out.model_copy(update={"identity": compute_identity(out, threads)})


def check_method_options(cfg: RunConfig, method_cls: type[Method]) -> None:
    """Refuse options the method cannot honour, before any run: they would crash mid-run, silently
    do nothing (yet change the run id), or silently lose the training."""
    name = cfg.method
    if cfg.train.gradient_checkpointing and not method_cls.trains:
        raise ConfigError(f"train.gradient_checkpointing=true: method '{name}' trains nothing, so there is nothing to checkpoint",
                          "drop the option for this method (in a study, set it in the train: of the methods that train)")
    if cfg.train.gradient_checkpointing and not method_cls.supports_gradient_checkpointing:
        raise ConfigError(f"train.gradient_checkpointing=true does not work with method '{name}' (the layers append to "
                          "its learned key/value prefix, and recomputing them in backward would append a second time)",
                          "drop train.gradient_checkpointing for this method, or use prompt-tuning or lora")
    if cfg.model_dtype in ("fp16", "bf16") and not method_cls.keeps_base_frozen():
        raise ConfigError(f"model_dtype={cfg.model_dtype}: method '{name}' updates the pretrained weights, and AdamW "
                          f"updates of {cfg.model_dtype} weights mostly round away",
                          "use model_dtype=auto or fp32 (precision=bf16 autocasts while keeping fp32 weights), "
                          "or a method that keeps the base frozen (lora, dora, ia3, prompt-tuning, prefix-tuning)")
