"""The pack engine: several trainings (LoRA, DoRA, IA³, BitFit) on one loaded base, prepared as each would be alone
and trained together (``training.packed``), each handed back the moment it finishes.

What a member is for is the caller's: ``run.pack`` packs whole runs (each written to its own run
directory), the runner's selection step packs a run's ``select:`` trials (``run.trial_pack``:
each scored on its held-out fold). Both give the engine a *build* step that makes a member's
method on the shared base and says what it trains on; the engine does the rest: peft's adapter
initialisation on the shared base, copied into the pack's layers and removed again, the packed
training, and the routing of a finished member's rows through its own adapter alone, ready to
evaluate. No run directory, no phase timing: the callers account for those.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fewtune.config import RunConfig
from fewtune.errors import TrainingDiverged
from fewtune.models.adapter import backbone_and_head
from fewtune.models.loading import LoadedModel
from fewtune.run.build import load_base
from fewtune.run.resources import ResourceMeter
from fewtune.training.packed import Member, MemberRun, Routing, default_members_per_pass, has_dropout, train_pack, use_packed_attention
from fewtune.training.packed_layers import give_back_base, install, member_generator, member_pieces


@dataclass
class Slot:
    """One member while the pack runs; ``build`` sets ``method`` and ``examples``."""

    cfg: RunConfig
    examples: list = field(default_factory=list)  # what it trains on: a run's sample, a trial's training part
    method: Any = None
    meter: ResourceMeter | None = None
    result: Any = None  # the caller's outcome, or the exception preparing it failed with


Build = Callable[[Slot], None]
OnDone = Callable[[Slot, MemberRun, "TrainingDiverged | None"], None]


def pack_base(cfg: RunConfig, dev: torch.device) -> LoadedModel | None:
    """The base, loaded once for the pack, its attention run per member; None where the base
    drops anything itself (rows would not be independent of their batch-mates: train alone)."""
    lm = load_base(cfg, dev)
    if has_dropout(lm.model):
        return None
    use_packed_attention(lm.model)
    return lm


def prepare_members(slots: list[Slot], lm: LoadedModel, meter: ResourceMeter, routing: Routing, dev: torch.device,
                    build: Build) -> list[Member | None]:
    """Each member prepared as its lone run would be; peft initialises its adapter on the shared
    base, which is copied into the pack's layers and removed again. A member that fails to
    prepare keeps its exception in ``result`` (None in the list); the others go on."""
    layers = []
    for s in slots:
        s.meter = copy.copy(meter)  # its own timings and tokens; the pack's (process-wide) peak
        s.meter.timings, s.meter.tokens = {}, {}
        try:
            build(s)
            seqs = s.method.prepare_training(s.examples)
            layers.append((seqs, member_pieces(s.method)))
        except Exception as e:  # noqa: BLE001 — this member fails, the others run
            s.result = e
            layers.append(None)
        finally:
            if s.method is not None:
                give_back_base(s.method)  # the base as loaded, for the next member
    for p in lm.model.parameters():
        p.requires_grad_(False)
    members: list[Member | None] = []
    for slot, (s, got) in enumerate(zip(slots, layers)):
        if got is None:
            members.append(None)
            continue
        seqs, lay = got
        params = install(lm.model, slot, lay, routing, member_generator(s.cfg.model_seed, dev))
        head = list(s.method.head.parameters()) if s.method.head is not None else []
        members.append(Member(slot, s.method.net, seqs, s.method.loss, params + head, s.method.ctx.cfg.train, s.cfg.model_seed))
    return members


def train_members(slots: list[Slot], members: list[Member | None], lm: LoadedModel, routing: Routing, dev: torch.device,
                  on_done: OnDone, members_per_pass: int | None | str = "auto") -> None:
    """Train the prepared members together; ``on_done(slot, run, error)`` as each finishes
    (``error``: it diverged), with every row routed through that member's adapter alone.
    ``members_per_pass``: members through the base at once (``train_pack``; "auto": by device)."""
    live = [(m, slots[m.slot]) for m in members if m is not None]
    if not live:  # every member failed to prepare
        return
    precision = live[0][1].method.ctx.precision  # the same for all: part of the pack key
    runs = [MemberRun(m, lm.tokenizer.pad_token_id, precision, dev) for m, _ in live]

    def done(run: MemberRun, error: TrainingDiverged | None) -> None:
        if error is None:
            routing.solo(run.m.slot)
        on_done(slots[run.m.slot], run, error)

    body = backbone_and_head(lm.model)[0]
    per_pass = default_members_per_pass(dev) if members_per_pass == "auto" else members_per_pass
    train_pack(runs, body, routing, pad_id=lm.tokenizer.pad_token_id, precision=precision, device=dev, on_done=done,
               members_per_pass=per_pass)
