"""Data-parallel runs: one run trained by several processes (``accelerate launch`` / ``torchrun``).

``fewtune run`` needs no code of its own to be launched this way: ``training.train`` splits each
global batch across the processes (see its docstring), and this module answers the questions the
runner asks around it — am I launched at all, which process am I, which device is mine — and
refuses the combinations fewtune does not support, before any work (exit 2).

What is supported, and why:

- **DDP** on several GPUs (NCCL) or CPU processes (gloo): ``accelerate launch --num_processes N``
  (also with ``--config_file`` of ``distributed_type: MULTI_GPU`` / ``MULTI_CPU``) or ``torchrun
  --nproc_per_node N``. ``train.batch_size`` stays the *global* batch, so without dropout a run
  gives the same results (up to float rounding) whatever N is — tested for ``vanilla`` on a
  dropout-free model, 1 vs 2 gloo processes: losses within 1e-5, the same predictions. With
  dropout (LoRA's ``lora_dropout`` 0.1, a model's own dropout) it does not: each process draws
  its own masks, so 1 and 2 processes give different losses. The process count is therefore in
  the run's identity when it is more than 1 (``identity.processes``, see ``fewtune.run.identity``):
  N processes and one process never share a run id.
- **Evaluation on process 0 only**, the others leave once training ends: the predictions are then
  exactly those of a single-process run (same batches, same padding, same seeded tie coins),
  which sharded evaluation would not guarantee, and evaluation is a small share of a few-shot
  run's time. While process 0 evaluates a learning-curve point the others wait in the next
  gradient all-reduce, hence the long process-group timeout below.
- **Only process 0 writes** the run directory (and logs to trackers); the others return nothing.
- **Refused** (``ConfigError``): a method that trains nothing (zero-shot, ICL: there is nothing to
  split, run one process); ``device_map`` (the model split across devices) together with a
  data-parallel launch; FSDP, DeepSpeed, Megatron-LM and TPU launches — rank-0 evaluation needs
  the whole model on process 0, which sharded training does not leave there; for models too big
  for one device use ``device_map`` with a method that trains nothing or adapters only, in one
  process; and mixed precision set in the accelerate config that disagrees with the run's
  ``precision`` (the run config decides, it is part of the run's identity).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from fewtune.errors import ConfigError

PROCESS_GROUP_TIMEOUT = timedelta(hours=3)  # others wait this long while process 0 evaluates
_UNSUPPORTED = {  # accelerate launch's environment flags → what to say
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


def process_count() -> int:
    """How many processes train this run, from the launcher's environment (1 when not launched);
    read without starting accelerate, so that resolving a run's identity stays cheap."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def launched() -> bool:
    """Whether this process is one of several of a data-parallel launch (env set by torchrun and
    ``accelerate launch``). A plain single process never touches ``torch.distributed``."""
    return process_count() > 1


def _state():
    """accelerate's process state; ``cpu`` where there is no GPU, else accelerate would not see a
    multi-CPU (gloo) launch and every process would train alone."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=PROCESS_GROUP_TIMEOUT)


def world_size() -> int:
    return _state().num_processes if launched() else 1


def is_main() -> bool:
    return _state().is_main_process if launched() else True


def device():
    """This process's device: its own GPU (``cuda:LOCAL_RANK``) in a launch, else the default."""
    if launched():
        return _state().device
    from fewtune.models.loading import device as default_device

    return default_device()


@contextmanager
def main_first() -> Iterator[None]:
    """Process 0 first, then the others: one process fills download and model caches."""
    if not launched():
        yield
        return
    with _state().main_process_first():
        yield


def from_main(compute) -> Any:
    """``compute()`` on process 0, its value (or its ``FewtuneError``) on every process, so a
    decision such as "this run is already done" or "OUT is not usable" is the same everywhere."""
    if not launched():
        return compute()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", compute())
        except ConfigError as e:  # a usage error: every process exits 2 with it
            box[0] = ("error", e)
    broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def check_supported(method: str, trains: bool, device_map: Any, precision: str) -> None:
    """Refuse, before any work, a launch fewtune does not support (see the module docstring)."""
    for flag, name in _UNSUPPORTED.items():
        if os.environ.get(flag, "").lower() in ("1", "true", "yes"):
            raise ConfigError(f"{name} launches are not supported by fewtune",
                              "use DDP (accelerate launch --num_processes N, or a config with distributed_type "
                              "MULTI_GPU/MULTI_CPU); for a model too big for one device use device_map in one process")
    if os.environ.get("ACCELERATE_USE_XLA", "").lower() in ("1", "true") or os.environ.get("ACCELERATE_DISTRIBUTED_TYPE") == "XLA":
        raise ConfigError("TPU/XLA launches are not supported by fewtune", "use GPUs or CPUs")
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed not in ("no", precision):
        raise ConfigError(f"the accelerate config sets mixed_precision={mixed} but this run's precision is {precision}",
                          f"set the precision in fewtune (--precision {mixed}) and mixed_precision: no in the accelerate config")
    if not launched():
        return
    if not trains:
        raise ConfigError(f"method '{method}' trains nothing, so a data-parallel launch has nothing to split",
                          "run it as one process: fewtune run ... (without accelerate launch / torchrun)")
    if device_map not in (None, "none"):
        raise ConfigError("device_map (one model split across devices) cannot be combined with a data-parallel launch",
                          "run a device_map run as one process, or drop device_map to train data-parallel")
