"""Many runs, one model: train several adapter runs (LoRA, DoRA, (IA)³, BitFit) that share a frozen base in one forward pass.

A *pack* holds up to K members (runs) on one loaded base. Every adapted layer of the base
becomes a ``PackedLayer`` (``training.packed_layers``) holding each member's own trained piece
(copied from the adapter peft initialises for that member, so the start is the lone run's) and
computing, for each member's rows of the batch, exactly peft's forward for that member — e.g.
``base(x) + scale_k · B_k(A_k(dropout_k(x)))`` for LoRA. Each
Each
optimizer step takes every active member's next micro-batch (the member's own seeded batches,
``training.batches``), concatenates them (right-padded to the longest), runs the base once, reads
each member's logits from its own rows through its own head, and steps each member's own AdamW
and schedule (``training.loop``'s pieces: optimizer groups, schedule, loss log, divergence
check). Members are disjoint: a member's loss only reaches its own parameters, so the sum of the
members' losses has each member's own gradient. A member leaves when its steps are done (or when
it diverges: it fails alone).

Why the results equal a lone run's: the base is frozen and right-padded rows never see padding
(causal attention), so a row's activations do not depend on its batch-mates; dropout masks come
from each member's own generator (``member_generator``), drawn with the shape the member's own
batch has — the lone LoRA/DoRA run draws its masks from the same generator (``seed_lora_dropout``) —
so a pack of K equals K packs of one and equals the lone run, up to float rounding of the
differently shaped matrix products. The base must have no dropout of its own (``has_dropout``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fewtune.config import TrainConfig
from fewtune.errors import TrainingDiverged
from fewtune.models.loading import autocast
from fewtune.scoring.scorer import head_logits, last_hidden
from fewtune.training.batches import LengthGroupedBatches, _collate
from fewtune.training.loop import SYNC_EVERY, Batch, TrainResult, _LossLog, _optimizer_groups, make_optimizer, make_scheduler
from fewtune.training.packed_layers import Routing

PACKED_SDPA = "fewtune_packed_sdpa"


def has_dropout(model: nn.Module) -> bool:
    """Whether the base itself drops anything in training (then rows are not independent of the
    pack's global RNG draws, and it cannot be packed)."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    cfg = getattr(model, "config", None)
    keys = ("attention_dropout", "attention_probs_dropout_prob", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop")
    return any(isinstance(getattr(cfg, k, 0), (int, float)) and getattr(cfg, k, 0) > 0 for k in keys)


_ACTIVE: ContextVar[Routing | None] = ContextVar("fewtune_pack_routing", default=None)


def packed_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, **kw) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, run per member on the member's own width and mask.

    Why: SDPA kernels (CPU bf16 measured, likely GPU flash/efficient ones too) round differently
    for a different key length, so a member's rows padded to the pack's width would not give the
    lone run's numbers under bf16; the projections are row-wise and exact. Each member's rows
    attend over its own padded length T_k with the mask its own batch has (none when unpadded,
    as transformers then drops it), and the outputs are padded back to the pack's width."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    routing = _ACTIVE.get()
    if routing is None or not routing.segments or routing.segments[0][2] is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
    outs = []
    for _, rows, length, full in routing.segments:
        mask = None if full or attention_mask is None else attention_mask[rows, :, :length, :length]
        out, _ = sdpa_attention_forward(module, query[rows, :, :length], key[rows, :, :length], value[rows, :, :length], mask, **kw)
        outs.append(F.pad(out, (0, 0, 0, 0, 0, query.shape[2] - length)))
    return torch.cat(outs), None


def use_packed_attention(model: nn.Module) -> bool:
    """Route a model that runs transformers' SDPA through ``packed_sdpa`` (eager attention needs
    nothing: it is exact at any width). True if switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
            cfg._attn_implementation = PACKED_SDPA
    return True


@dataclass
class Member:
    """What the pack needs of one run: its slot, net (shared body + own head), training inputs,
    loss, trainable parameters and settings."""

    slot: int
    net: nn.Module
    seqs: Sequence[Sequence[int]]
    loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor]
    params: list[nn.Parameter]
    cfg: TrainConfig
    model_seed: int


class _OneProcess:
    """What ``_LossLog`` reads of an accelerator, for a pack (one process)."""

    num_processes = 1

    def __init__(self, device: torch.device) -> None:
        self.device = device


class MemberRun:
    """One member's training state: its batches, optimizer, schedule, loss log and result — the
    loop's pieces (``training.loop``) for one run, stepped by the pack."""

    def __init__(self, m: Member, pad_id: int, precision: str, device: torch.device) -> None:
        self.m = m
        cfg = m.cfg
        if cfg.grad_accum != 1:
            raise ValueError("a pack trains with train.grad_accum = 1")
        self.batches = LengthGroupedBatches([len(s) for s in m.seqs], cfg.batch_size, m.model_seed, cfg.group_by_length)
        self.collate = _collate(m.seqs, pad_id)
        groups = _optimizer_groups([{"params": m.params}], cfg.weight_decay)
        self.opt = make_optimizer(groups, cfg.lr)
        # clipped in the loop's order (decayed, then 1-D parameters): the norm's sum rounds by it
        self.trainable = [p for g in groups for p in g["params"]]
        self.steps_per_epoch = len(self.batches)
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.sched, warmup = make_scheduler(self.opt, cfg, total)
        self.res = TrainResult(total_steps=total, warmup_steps=warmup, examples=len(m.seqs), effective_batch_size=cfg.batch_size)
        self.log = _LossLog(_OneProcess(device), check_norm=precision != "fp16")
        self.epoch, self._it = 0, None
        self.batch: Batch | None = None

    @property
    def done(self) -> bool:
        return self.res.steps >= self.res.total_steps

    def next_batch(self) -> Batch:
        if self._it is None:
            self._it = iter(self.batches)
        keys = next(self._it, None)
        if keys is None:  # the epoch is over: as the loop does at the end of its loader
            self._end_epoch()
            self._it = iter(self.batches)
            keys = next(self._it)
        raw = self.collate([(i, 1.0) for i in keys])
        self.batch = Batch(raw["ids"], raw["mask"], raw["last"], raw["idx"], 1.0, raw["tokens"])
        return self.batch

    def step(self, loss: torch.Tensor) -> None:
        """After the pack's backward: clip, step, log; raises ``TrainingDiverged`` at a sync point."""
        self.log.micro(loss)
        norm = None
        if self.m.cfg.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.m.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.res.train_tokens += self.batch.tokens if self.batch is not None else 0
        self.res.steps += 1
        self.log.end_step(norm, self.res.steps, self.epoch + 1)
        if self.res.steps % SYNC_EVERY == 0:
            self.log.sync(self.res, epoch_end=False)
        if self.done:
            self._end_epoch()

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.log.sync(self.res, epoch_end=True)
        self.res.epochs_run = self.res.steps / self.steps_per_epoch


def net_logits(net: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The head part of a ``ClassifierNet``/``LMNet`` forward, on hidden states already computed."""
    if hasattr(net, "lm_head"):
        return head_logits(net.lm_head, h, net.restrict_ids, net.transform)
    return head_logits(net.head, h)


def _stack(batches: Sequence[Batch], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[slice, int]]]:
    """The members' micro-batches as one right-padded batch, and each member's rows and length."""
    width = max(b.ids.shape[1] for b in batches)
    ids, mask, spans, start = [], [], [], 0
    for b in batches:
        pad = width - b.ids.shape[1]
        ids.append(F.pad(b.ids, (0, pad), value=pad_id))
        mask.append(F.pad(b.mask, (0, pad), value=0))
        spans.append((slice(start, start + b.ids.shape[0]), b.ids.shape[1]))
        start += b.ids.shape[0]
    last = torch.cat([b.last for b in batches])
    return torch.cat(ids).to(device), torch.cat(mask).to(device), last.to(device), spans


def train_pack(runs: list[MemberRun], body: nn.Module, routing: Routing, *, pad_id: int, precision: str, device: torch.device,
               on_done: Callable[[MemberRun, TrainingDiverged | None], None], members_per_pass: int | None = None) -> None:
    """Step every active member once per pass until all are done; ``on_done(run, error)`` as each
    member finishes (``error``: it diverged) — the caller evaluates and writes it at once.

    ``members_per_pass``: how many members' micro-batches go through the base in one forward and
    backward (None: all). Fewer hold fewer activations at once; a member's gradient only depends
    on its own rows, so the step is the same either way (``default_members_per_pass``)."""
    active = list(runs)
    for r in active:
        r.m.net.train()
    token = _ACTIVE.set(routing)
    try:
        while active:
            batches = [r.next_batch() for r in active]
            chunk = members_per_pass or len(active)
            losses = []
            for i in range(0, len(active), chunk):
                losses += _forward_backward(active[i:i + chunk], batches[i:i + chunk], body, routing, pad_id, precision, device)
            active = _step_all(active, losses, on_done)
    finally:
        _ACTIVE.reset(token)


def default_members_per_pass(device: torch.device) -> int | None:
    """One member per pass on a CPU, all on an accelerator. A CPU is compute-bound: one forward
    over K members' rows costs what K forwards cost, so running them together gains nothing and
    holds K micro-batches' activations at once (and, under bf16, rounds the base's products
    differently for a different number of rows). An accelerator at small batches is far from
    busy: one pass over all members' rows is where packing gains."""
    return 1 if device.type == "cpu" else None


def _forward_backward(active: list[MemberRun], batches: list[Batch], body: nn.Module, routing: Routing, pad_id: int,
                      precision: str, device: torch.device) -> list[torch.Tensor]:
    """The members' micro-batches through the base together, each member's loss on its own rows,
    and the backward pass (the sum's gradient is each member's own: their parameters are disjoint)."""
    ids, mask, last, spans = _stack(batches, pad_id, device)
    routing.segments = [(r.m.slot, rows, length, bool(b.mask.all())) for r, (rows, length), b in zip(active, spans, batches)]
    with autocast(precision, device):
        h = last_hidden(body, ids, mask, last)
        logits = [net_logits(r.m.net, h[rows]) for r, (rows, _) in zip(active, spans)]
    losses = [r.m.loss_fn(lg, _on(b, device)) for r, lg, b in zip(active, logits, batches)]
    torch.stack(losses).sum().backward()
    return losses


def _step_all(active: list[MemberRun], losses: list[torch.Tensor],
              on_done: Callable[[MemberRun, TrainingDiverged | None], None]) -> list[MemberRun]:
    """Each member's optimizer step; the members still training."""
    still = []
    for r, loss in zip(active, losses):
        try:
            r.step(loss)
        except TrainingDiverged as e:
            on_done(r, e)
            continue
        if r.done:
            on_done(r, None)
        else:
            still.append(r)
    return still


def _on(b: Batch, device: torch.device) -> Batch:
    return Batch(b.ids.to(device), b.mask.to(device), b.last.to(device), b.idx.to(device), b.weight, b.tokens)


__all__ = ["Member", "MemberRun", "Routing", "default_members_per_pass", "has_dropout", "train_pack", "use_packed_attention"]
