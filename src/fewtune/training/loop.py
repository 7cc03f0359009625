"""The one training loop every trainable method uses.

Plain PyTorch driven by ``accelerate`` — device placement, bf16/fp16 autocast and gradient
scaling, gradient accumulation, data-parallel DDP — rather than the Hugging Face ``Trainer``: the
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
  incomplete accumulation of an epoch still steps (accelerate syncs at the end of the loader),
  with the full mean gradient of its micro-batches (``batches.accumulation_scale``; accelerate
  alone would scale it by the fraction of the window that was filled).
- **Stability:** gradients are clipped to ``max_grad_norm``. A NaN/inf loss or gradient norm stops
  training with ``TrainingDiverged`` naming the optimizer step and epoch, so the run's result
  records why it failed instead of evaluating a broken model.
- **Curves:** ``on_epoch_end(epoch)`` is called after every epoch (and after a final partial one)
  and its return value is recorded with the epoch's mean training loss.
- **Host syncs:** losses and gradient norms stay on the device (accumulated in float64, so the
  numbers are exactly those a per-step ``float(loss)`` gave) and are copied to the host in one
  transfer every ``SYNC_EVERY`` optimizer steps and at every epoch end — not once or twice per
  micro-step, which on a GPU stalls the queue. A NaN/inf is therefore noticed at the next sync
  point; the step it first appeared at is still the one reported.
- **Mixed precision:** ``bf16`` autocast, or ``fp16`` autocast with accelerate's gradient scaler
  (a skipped step after an overflow is the scaler's normal business, so the inf-norm divergence
  check is off for fp16; a non-finite loss still stops training).
- **Data-parallel** (``accelerate launch`` / ``torchrun``, see ``fewtune.training.distributed``):
  ``batch_size`` is the *global* micro-batch. Every process draws the same seeded sequence of
  global batches and takes its contiguous share (``shard_batch``); each process's mean loss is
  weighted by its share so that DDP's gradient average is exactly the gradient of the global
  batch's mean loss, even for a short last batch (a process left without an example runs one
  with weight 0, so the gradient all-reduce still sees every process). The recorded losses are
  the global means; results match one process with the same batch up to float rounding.

``accelerate``'s state is a process-wide singleton; a study runs many runs in one process with
possibly different precisions or accumulation, so the loop resets it before and after each run.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fewtune.config import TrainConfig
from fewtune.errors import ConfigError, TrainingDiverged
from fewtune.training.batches import LengthGroupedBatches, ShardedBatches, _collate, _Keys, accumulation_scale, shard_batch

__all__ = ["Batch", "LengthGroupedBatches", "ShardedBatches", "TrainResult", "shard_batch", "train"]

LOSS_HISTORY_MAX = 2000  # longer histories are averaged into this many windows
SYNC_EVERY = 25  # optimizer steps between two copies of the losses to the host


@dataclass
class Batch:
    """One padded micro-batch; ``idx`` are positions in the training set (for per-example targets)."""

    ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    idx: torch.Tensor
    weight: float = 1.0  # this process's share of the global batch × processes (1.0 on one process)
    tokens: int = 0  # real tokens of the examples this process trains on (counted on the host)
    accum_scale: float = 1.0  # grad_accum / micro-batches of a short last accumulation window (``accumulation_scale``)


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


def enable_gradient_checkpointing(model: nn.Module, generators: Sequence[torch.Generator] = ()) -> None:
    """Recompute each decoder layer's activations during backward instead of storing them.

    Non-reentrant checkpointing (``use_reentrant=False``, PyTorch's recommendation) needs no input
    that requires grad; we still hook the embeddings' output when they are frozen (LoRA, adaptive
    FT) so that a model forcing the reentrant variant gets gradients through the layers too.
    Checkpointing replays the global RNG on recomputation; ``generators`` (a run's own dropout
    generators, ``methods.lora``) are replayed too, so the recomputed masks are the forward's.
    """
    if not getattr(model, "supports_gradient_checkpointing", False) or not hasattr(model, "gradient_checkpointing_enable"):
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing",
                          "set train.gradient_checkpointing=false for this model")
    kwargs: dict = {"use_reentrant": False}
    if generators:
        kwargs["context_fn"] = functools.partial(_replaying, tuple(generators))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    emb = model.get_input_embeddings()
    if emb is not None and not emb.weight.requires_grad:
        model.enable_input_require_grads()


def _replaying(generators: tuple[torch.Generator, ...]) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` of one checkpointed call: (forward context, recompute context). Called as the
    layer's forward starts, so it snapshots the generators there; recomputation runs from that
    snapshot and leaves them where they were."""
    saved = [g.get_state() for g in generators]

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        now = [g.get_state() for g in generators]
        for g, s in zip(generators, saved):
            g.set_state(s)
        try:
            yield
        finally:
            for g, s in zip(generators, now):
                g.set_state(s)

    return contextlib.nullcontext(), recompute()


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


class _LossLog:
    """Losses and gradient norms kept on the device, copied to the host at sync points only.

    Sums are float64 so that the host values equal what summing ``float(loss)`` per micro-step
    gave before. Across processes the per-step losses are averaged (each process's loss is
    already weighted by its share, so the average is the global batch's mean loss)."""

    def __init__(self, accelerator, check_norm: bool) -> None:
        self.acc, self.check_norm = accelerator, check_norm
        self.dev = accelerator.device
        self.zero = torch.zeros((), dtype=torch.float64, device=self.dev)
        self.step_sum, self.step_batches = self.zero.clone(), 0
        self.epoch_sum, self.epoch_batches = self.zero.clone(), 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []  # (loss, norm, step, epoch)

    def micro(self, loss: torch.Tensor) -> None:
        v = loss.detach().double()
        self.step_sum, self.epoch_sum = self.step_sum + v, self.epoch_sum + v
        self.step_batches, self.epoch_batches = self.step_batches + 1, self.epoch_batches + 1

    def end_step(self, norm: torch.Tensor | None, step: int, epoch: int) -> None:
        norm_t = norm.detach().double() if norm is not None and self.check_norm else self.zero
        self.pending.append((self.step_sum / self.step_batches, norm_t, step, epoch))
        self.step_sum, self.step_batches = self.zero.clone(), 0

    def sync(self, res: TrainResult, epoch_end: bool) -> None:
        """Copy what is pending to ``res`` in one transfer; raise at the first non-finite value."""
        losses = [p[0] for p in self.pending] + ([self.epoch_sum / max(self.epoch_batches, 1)] if epoch_end else [])
        if not losses:
            return
        vals = torch.stack(losses)
        if self.acc.num_processes > 1:
            vals = self.acc.reduce(vals, "mean")
        host = torch.cat([vals, torch.stack([p[1] for p in self.pending] or [self.zero])]).tolist()
        k = len(self.pending)
        for (_, _, step, epoch), loss, norm in zip(self.pending, host[:k], host[len(losses):]):
            if not math.isfinite(loss):
                raise _diverged("loss", loss, step, epoch)
            if not math.isfinite(norm):
                raise _diverged("gradient norm", norm, step, epoch)
            res.loss_history.append(loss)
        if epoch_end:
            res.epoch_losses.append(host[k])
            self.epoch_sum, self.epoch_batches = self.zero.clone(), 0
        self.pending = []


def make_accelerator(precision: str, cfg: TrainConfig, device: torch.device):
    """One run's Accelerator. ``split_batches``: ``batch_size`` is global (split across processes),
    so the scheduler steps once per optimizer step whatever the number of processes."""
    from accelerate import Accelerator, DataLoaderConfiguration

    return Accelerator(
        mixed_precision=precision if precision in ("bf16", "fp16") else "no",
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=device.type == "cpu",
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def _make_loader(accelerator, seqs: Sequence[Sequence[int]], cfg: TrainConfig, pad_id: int, model_seed: int):
    """The seeded global batches, this process's share of each, wrapped by accelerate (device
    placement; end-of-loader signal for gradient accumulation) but not re-sharded by it."""
    from accelerate.data_loader import prepare_data_loader

    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is the global batch and must be divisible by the "
                          f"{world} processes of this launch", f"use a multiple of {world}, or another --num_processes")
    global_batches = LengthGroupedBatches([len(s) for s in seqs], cfg.batch_size, model_seed, cfg.group_by_length)
    mine = ShardedBatches(global_batches, accelerator.process_index, world)
    loader = DataLoader(_Keys(), batch_sampler=mine, collate_fn=_collate(seqs, pad_id))  # type: ignore[arg-type]
    return prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0, put_on_device=True), len(mine)


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
    if not seqs:
        raise ValueError("train() needs at least one training sequence")
    reset_accelerate_state()
    torch.manual_seed(model_seed)
    run = _prepare(net, seqs, param_groups, cfg, pad_id=pad_id, precision=precision, model_seed=model_seed, device=device)
    acc, res = run.accelerator, run.res
    shown = _Shown(progress, progress.add_task(description, total=run.total_steps) if progress is not None else None, description)
    log = _LossLog(acc, check_norm=precision != "fp16")
    step_fn = _optimizer_step(acc, run.model, run.optimizer, run.scheduler, loss_fn, run.trainable, cfg)
    try:
        epoch = 0
        while res.steps < run.total_steps:
            _epoch(run, step_fn, log, shown, epoch, cfg.grad_accum)
            epoch += 1
            _end_epoch(run, log, shown, on_epoch_end)
        if acc.num_processes > 1:  # every process counted its own share of the tokens
            res.train_tokens = int(acc.reduce(torch.tensor(res.train_tokens, device=acc.device), "sum"))
    finally:
        if shown.task_id is not None:
            progress.remove_task(shown.task_id)
        acc.unwrap_model(run.model, keep_fp32_wrapper=False)
        acc.free_memory()
        reset_accelerate_state()
    net.eval()
    return res


@dataclass
class _Prepared:
    """One run's accelerate-prepared pieces and its result so far (``train``)."""

    accelerator: Any  # accelerate.Accelerator
    loader: Any
    n_batches: int  # micro-batches per epoch (this process's, equal on every process)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list
    total_steps: int
    steps_per_epoch: int
    res: TrainResult


@dataclass
class _Shown:
    """The progress bar of a run (``task_id`` None: no progress display)."""

    progress: Any  # rich.progress.Progress or None
    task_id: Any
    description: str

    def update(self, res: TrainResult) -> None:
        _show(self.progress, self.task_id, self.description, res)


def _prepare(net: nn.Module, seqs: Sequence[Sequence[int]], param_groups: Sequence[dict], cfg: TrainConfig, *,
             pad_id: int, precision: str, model_seed: int, device: torch.device) -> _Prepared:
    """Accelerator, loader, optimizer and schedule; the number of optimizer steps to take."""
    accelerator = make_accelerator(precision, cfg, device)
    loader, n_batches = _make_loader(accelerator, seqs, cfg, pad_id, model_seed)
    groups = _optimizer_groups(param_groups, cfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters")
    optimizer = make_optimizer(groups, cfg.lr)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler, warmup = make_scheduler(optimizer, cfg, total_steps)
    model, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
    res = TrainResult(total_steps=total_steps, warmup_steps=warmup, examples=len(seqs),
                      effective_batch_size=cfg.batch_size * cfg.grad_accum)
    return _Prepared(accelerator, loader, n_batches, model, optimizer, scheduler, [p for g in groups for p in g["params"]],
                     total_steps, steps_per_epoch, res)


def _epoch(run: _Prepared, step_fn, log: _LossLog, shown: _Shown, epoch: int, grad_accum: int) -> None:
    """One pass over the loader, or its part until the last optimizer step."""
    res = run.res
    run.model.train()
    for i, raw in enumerate(run.loader):
        batch = Batch(raw["ids"], raw["mask"], raw["last"], raw["idx"], raw["weight"], raw["tokens"],
                      accum_scale=accumulation_scale(i, run.n_batches, grad_accum))
        norm = step_fn(batch, log)
        res.train_tokens += batch.tokens
        if run.accelerator.sync_gradients:
            res.steps += 1
            log.end_step(norm, res.steps, epoch + 1)
            if res.steps % SYNC_EVERY == 0:
                log.sync(res, epoch_end=False)
            shown.update(res)
            if res.steps >= run.total_steps:
                break


def _end_epoch(run: _Prepared, log: _LossLog, shown: _Shown, on_epoch_end: Callable[[float], dict | None] | None) -> None:
    """Losses to the host, the epochs run so far, and a learning-curve point if asked for."""
    res = run.res
    log.sync(res, epoch_end=True)
    shown.update(res)
    res.epochs_run = res.steps / run.steps_per_epoch  # fractional when max_steps ends mid-epoch
    point = on_epoch_end(res.epochs_run) if on_epoch_end is not None else None
    if point is not None:
        res.curve.append({"epoch": round(res.epochs_run, 4), "train_loss": res.epoch_losses[-1], "eval": point})


def _optimizer_step(accelerator, model, optimizer, scheduler, loss_fn, trainable: list, cfg: TrainConfig):
    """One micro-step (forward, backward, and on accumulation boundaries clip + step), with no
    host sync: returns the gradient norm as a device tensor (or None)."""

    def step(batch: Batch, log: _LossLog) -> torch.Tensor | None:
        norm = None
        with accelerator.accumulate(model):
            loss = loss_fn(model(batch.ids, batch.mask, batch.last), batch)
            if batch.weight != 1.0:
                loss = loss * batch.weight
            log.micro(loss)
            accelerator.backward(loss * batch.accum_scale if batch.accum_scale != 1.0 else loss)
            if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return norm

    return step


def _show(progress, task_id, description: str, res: TrainResult) -> None:
    if task_id is None:
        return
    latest = f" loss {res.loss_history[-1]:.4f}" if res.loss_history else ""
    progress.update(task_id, completed=res.steps, description=f"{description}{latest}")


def _diverged(what: str, value: float, step: int, epoch: int) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged: the {what} became {value} at optimizer step {step} (epoch {epoch})",
        "lower train.lr, use --precision fp32, or check the inputs; the run stopped and its model was not evaluated",
    )
