"""The one training loop every trainable method uses.

Plain PyTorch driven by ``accelerate`` — device placement, bf16 autocast, gradient accumulation
(and, later, multi-GPU through the same calls) — rather than the Hugging Face ``Trainer``: the
methods differ only in *what* is computed (inputs, trainable parameters, head, loss), so each
supplies a module whose ``forward(ids, mask, last)`` returns logits at the last real token and a
``loss_fn(logits, batch)``; everything about *how* to optimise lives here, once.

What the loop does, and why:

- **Optimizer:** AdamW (β 0.9/0.999, ε 1e-8 as HF; PyTorch's fused kernel where available).
  Weight decay, when non-zero, skips biases and
  norm weights (every 1-D parameter), as HF does.
- **Schedule:** warmup for ``ceil(warmup_ratio × total optimizer steps)`` steps, then linear decay
  to 0 (the study's HF default) or constant (Mosbach et al.'s DeepSpeed ``WarmupLR``). The
  released study code computed ``int(0.1 · (len(train) // 32) · 40)``, which is 0 for n ≤ 15 per
  class (no warmup at all); we count the real number of optimizer steps, so n=2 gets 4 warmup
  steps out of 40. ``summary["released_warmup_steps"]`` records what the study's formula gives.
- **Batches:** ``batch_size`` examples per forward pass (HF's per-device batch size); with
  ``grad_accum`` > 1 one optimizer step sees ``batch_size × grad_accum`` examples. Padding is
  dynamic (to the longest sequence of the batch, right-padded, ``scoring.pad_batch``). With
  ``group_by_length`` the examples are shuffled, cut into windows of ``4 × batch_size``, sorted by
  length inside a window and batched, and the batch order is shuffled — similar lengths share a
  batch (less padding) while batch composition still changes every epoch (HF's variant uses
  windows of 50 batches, which for few-shot data means the same batches every epoch).
  All shuffling uses a ``torch.Generator`` seeded by ``model_seed``; dropout uses the global
  torch RNG, seeded by ``model_seed`` at the start of training. The data seed (which examples)
  never touches these, so the two seeds stay separate and training is deterministic on CPU.
- **Length:** ``epochs`` (may be fractional) or ``max_steps`` optimizer steps, whichever is given
  (``max_steps`` wins). Steps per epoch = ``ceil(batches / grad_accum)``: the last, possibly
  incomplete accumulation of an epoch still steps (accelerate syncs at the end of the loader).
- **Stability:** gradients are clipped to ``max_grad_norm``. A NaN/inf loss or gradient norm stops
  training with ``TrainingDiverged`` naming the optimizer step and epoch, so the run's result
  records why it failed instead of evaluating a broken model.
- **Curves:** ``on_epoch_end(epoch)`` is called after every epoch (and after a final partial one)
  and its return value is recorded with the epoch's mean training loss.

``accelerate``'s state is a process-wide singleton; a study runs many runs in one process with
possibly different precisions or accumulation, so the loop resets it before and after each run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .config import TrainConfig
from .errors import TrainingDiverged
from .batching import pad_batch

LOSS_HISTORY_MAX = 2000  # longer histories are averaged into this many windows
GROUP_WINDOW = 4  # length-grouping window, in batches


@dataclass
class Batch:
    """One padded micro-batch; ``idx`` are positions in the training set (for per-example targets)."""

    ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    idx: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


@dataclass
class TrainResult:
    steps: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    epochs_run: float = 0.0
    loss_history: list[float] = field(default_factory=list)  # mean loss per optimizer step
    epoch_losses: list[float] = field(default_factory=list)  # mean micro-batch loss per epoch
    curve: list[dict] = field(default_factory=list)
    train_tokens: int = 0
    examples: int = 0
    effective_batch_size: int = 0

    def summary(self, cfg: TrainConfig) -> dict:
        """The ``fit`` summary the runner stores (``metrics["train"]`` + ``curve``)."""
        history, every = _compress(self.loss_history)
        return {
            "final_loss": self.loss_history[-1] if self.loss_history else None,
            "steps": self.steps,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "released_warmup_steps": int(0.1 * (self.examples // 32) * cfg.epochs) if cfg.max_steps is None else None,
            "epochs_run": round(self.epochs_run, 4),
            "examples": self.examples,
            "effective_batch_size": self.effective_batch_size,
            "loss_history": history,
            "loss_history_every": every,
            "epoch_losses": [round(x, 6) for x in self.epoch_losses],
            "curve": self.curve,
            "train_tokens": self.train_tokens,
        }


def _compress(history: list[float]) -> tuple[list[float], int]:
    if len(history) <= LOSS_HISTORY_MAX:
        return [round(x, 6) for x in history], 1
    every = math.ceil(len(history) / LOSS_HISTORY_MAX)
    return [round(sum(history[i : i + every]) / len(history[i : i + every]), 6) for i in range(0, len(history), every)], every


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of indices; a new seeded shuffle on every pass (see module docstring)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group = group_by_length
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        bs = self.batch_size
        if not self.group:
            yield from (perm[i : i + bs] for i in range(0, len(perm), bs))
            return
        window = bs * GROUP_WINDOW
        batches: list[list[int]] = []
        for w in range(0, len(perm), window):
            chunk = sorted(perm[w : w + window], key=lambda i: -self.lengths[i])
            batches.extend(chunk[i : i + bs] for i in range(0, len(chunk), bs))
        # Only the final batch of the data may be short; keep every other batch full.
        full = [b for b in batches if len(b) == bs]
        short = [i for b in batches if len(b) < bs for i in b]
        order = torch.randperm(len(full), generator=self.generator).tolist()
        out = [full[j] for j in order]
        for i in range(0, len(short), bs):
            out.append(short[i : i + bs])
        yield from out


def _collate(seqs: Sequence[Sequence[int]], pad_id: int) -> Callable[[list[int]], dict]:
    def collate(idx: list[int]) -> dict:
        ids, mask, last = pad_batch([seqs[i] for i in idx], pad_id, torch.device("cpu"))
        return {"ids": ids, "mask": mask, "last": last, "idx": torch.tensor(idx, dtype=torch.long)}

    return collate


def _optimizer_groups(param_groups: Sequence[dict], weight_decay: float) -> list[dict]:
    """Split every group into decayed (≥2-D) and non-decayed (1-D) parameters, keeping its lr."""
    out: list[dict] = []
    for g in param_groups:
        params = [p for p in g["params"] if p.requires_grad]
        extra = {k: v for k, v in g.items() if k != "params"}
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        if decay:
            out.append({**extra, "params": decay, "weight_decay": weight_decay})
        if no_decay:
            out.append({**extra, "params": no_decay, "weight_decay": 0.0})
    return out


def make_optimizer(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused where PyTorch supports it (CPU and CUDA since 2.4): same update rule, one
    kernel over all parameters — 4–5× faster steps for a 135M model on CPU."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def reset_accelerate_state() -> None:
    """Forget the process-wide accelerate singletons (not the distributed PartialState)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> tuple[object, int]:
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if cfg.schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps), warmup
    return get_constant_schedule_with_warmup(optimizer, warmup), warmup


def train(
    net: nn.Module,
    seqs: Sequence[Sequence[int]],
    loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor],
    param_groups: Sequence[dict],
    cfg: TrainConfig,
    *,
    pad_id: int,
    precision: str,
    model_seed: int,
    device: torch.device,
    progress=None,
    on_epoch_end: Callable[[float], dict | None] | None = None,
    description: str = "  train",
) -> TrainResult:
    """Optimise ``net`` on ``seqs`` (token ids, already truncated) with ``loss_fn``.

    ``param_groups``: torch-style groups (``params`` + optional ``lr``; a group without ``lr``
    uses ``cfg.lr``). Only parameters with ``requires_grad`` are optimised.
    """
    from accelerate import Accelerator

    if not seqs:
        raise ValueError("train() needs at least one training sequence")
    reset_accelerate_state()
    torch.manual_seed(model_seed)
    accelerator = Accelerator(
        mixed_precision="bf16" if precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=device.type == "cpu",
    )
    sampler = LengthGroupedBatches([len(s) for s in seqs], cfg.batch_size, model_seed, cfg.group_by_length)
    loader = DataLoader(range(len(seqs)), batch_sampler=sampler, collate_fn=_collate(seqs, pad_id))
    groups = _optimizer_groups(param_groups, cfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters")
    optimizer = make_optimizer(groups, cfg.lr)
    steps_per_epoch = math.ceil(len(sampler) / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler, warmup = make_scheduler(optimizer, cfg, total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(net, optimizer, loader, scheduler)
    trainable = [p for g in groups for p in g["params"]]

    res = TrainResult(total_steps=total_steps, warmup_steps=warmup, examples=len(seqs),
                      effective_batch_size=cfg.batch_size * cfg.grad_accum * accelerator.num_processes)
    task_id = progress.add_task(description, total=total_steps) if progress is not None else None
    epoch = 0
    try:
        while res.steps < total_steps:
            model.train()
            epoch_loss, epoch_batches, step_loss, step_batches = 0.0, 0, 0.0, 0
            for raw in loader:
                batch = Batch(raw["ids"], raw["mask"], raw["last"], raw["idx"])
                with accelerator.accumulate(model):
                    logits = model(batch.ids, batch.mask, batch.last)
                    loss = loss_fn(logits, batch)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise _diverged("loss", value, res.steps + 1, epoch + 1)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                        norm = float(accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm))
                        if not math.isfinite(norm):
                            raise _diverged("gradient norm", norm, res.steps + 1, epoch + 1)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                res.train_tokens += batch.tokens
                epoch_loss, epoch_batches = epoch_loss + value, epoch_batches + 1
                step_loss, step_batches = step_loss + value, step_batches + 1
                if accelerator.sync_gradients:
                    res.steps += 1
                    res.loss_history.append(step_loss / step_batches)
                    step_loss, step_batches = 0.0, 0
                    if task_id is not None:
                        progress.update(task_id, advance=1, description=f"{description} loss {res.loss_history[-1]:.4f}")
                    if res.steps >= total_steps:
                        break
            epoch += 1
            res.epochs_run = res.steps / steps_per_epoch  # fractional when max_steps ends mid-epoch
            res.epoch_losses.append(epoch_loss / max(epoch_batches, 1))
            point = on_epoch_end(res.epochs_run) if on_epoch_end is not None else None
            if point is not None:
                res.curve.append({"epoch": round(res.epochs_run, 4), "train_loss": res.epoch_losses[-1], "eval": point})
    finally:
        if task_id is not None:
            progress.remove_task(task_id)
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        accelerator.free_memory()
        reset_accelerate_state()
    net.eval()
    return res


def _diverged(what: str, value: float, step: int, epoch: int) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged: the {what} became {value} at optimizer step {step} (epoch {epoch})",
        "lower train.lr, use --precision fp32, or check the inputs; the run stopped and its model was not evaluated",
    )
