"""Adaptive (partial) fine-tuning: freeze the lower decoder layers, train the top ``k``.

The study's released notebook (``vanilla_cola_adaptive_v2``) is vanilla FT on OPT-125m with every
parameter whose name holds a numeric layer index < 10 frozen: decoder layers 10–11 train, together
with the token/position embeddings, the final layer norm and the ``score`` head. It also meant to
apply a layer-wise learning-rate decay (``1e-5 · 0.95^(12 − idx)``), but its test
``'layer' in name.split('.')`` never matches OPT's ``layers`` — every group got the same lr, so the
decay was dead code.

Here, generalised to any depth: the top ``top_layers`` decoder layers (default 2), the final norm
(everything in the backbone that is neither a decoder layer nor an embedding) and the head train;
the embeddings train only with ``train_embeddings=true`` (the released code trained them — set it
for parity; the default leaves them frozen so "partial" fine-tuning stays partial: they are a
fifth of SmolLM2-135M's weights). With the ``lm`` objective the head is the LM head; when it is
tied to the input embeddings (SmolLM2, OPT) training it trains the embedding matrix too — this is
recorded in ``method_info``.

Layer-wise LR decay ``llrd = γ`` (off by default, as it was inert in the study): the head and the
final norm train at ``lr``; decoder layer ``i`` of ``L`` at ``lr · γ^(L − i)`` (the released
formula; the top layer gets ``γ·lr``); the embeddings, if trained, at ``lr · γ^(L + 1)``. The
rates are real optimizer parameter groups, so the schedule scales each of them.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from fewtune.errors import ConfigError
from fewtune.methods._trainable import ObjectiveParams, TrainableMethod
from fewtune.methods.base import register
from fewtune.models.adapter import ModelAdapter, backbone_and_head


class AdaptiveParams(ObjectiveParams):
    top_layers: int = Field(2, ge=0, description="decoder layers trained, counted from the top")
    train_embeddings: bool = Field(False, description="also train the token/position embeddings (the released code did)")
    llrd: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay γ (None: every trained group at train.lr)")


def partition(body: nn.Module, layers: nn.ModuleList, input_embeddings: nn.Module) -> dict[str, list]:
    """Backbone parameters by role: ``layer{i}``, ``embeddings`` and ``top`` (final norm etc.).

    Embeddings are the input embedding matrix plus any other parameter whose name marks it as an
    embedding or input projection (position embeddings, OPT-350m's ``project_in``)."""
    in_layer = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    emb_ids = {id(p) for p in input_embeddings.parameters()}
    out: dict[str, list] = {"embeddings": [], "top": []}
    out.update({f"layer{i}": [] for i in range(len(layers))})
    seen: set[int] = set()
    for name, p in body.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in in_layer:
            out[f"layer{in_layer[id(p)]}"].append(p)
        elif id(p) in emb_ids or any(k in name for k in ("embed", "wpe", "wte", "project_in")):
            out["embeddings"].append(p)
        else:
            out["top"].append(p)
    return out


@register
class Adaptive(TrainableMethod):
    name = "adaptive"
    summary = "partial FT: top-k decoder layers + final norm + head train, the rest frozen; optional layer-wise lr decay"
    Params = AdaptiveParams

    def adapt_model(self) -> None:
        model = self.ctx.lm.model
        body, lm_head = backbone_and_head(model)
        try:
            layers = ModelAdapter.decoder_layers(model)
        except ConfigError as e:
            raise ConfigError(f"adaptive fine-tuning: {e.message}", e.hint) from None
        L = len(layers)
        k = self.params.top_layers
        if k > L:
            raise ConfigError(f"params.top_layers={k} but the model has {L} decoder layers", f"use 0 ≤ top_layers ≤ {L}")
        self.parts = partition(body, layers, model.get_input_embeddings())
        norm = ModelAdapter.final_norm(model)
        self.num_layers = L
        self.trained_layers = list(range(L - k, L))
        for p in model.parameters():
            p.requires_grad_(False)
        for i in self.trained_layers:
            for p in self.parts[f"layer{i}"]:
                p.requires_grad_(True)
        for p in self.parts["top"]:
            p.requires_grad_(True)
        if self.params.train_embeddings:
            for p in self.parts["embeddings"]:
                p.requires_grad_(True)
        tied = lm_head.weight is model.get_input_embeddings().weight
        if self.objective == "lm":
            for p in lm_head.parameters():
                p.requires_grad_(True)
        self._info.update(
            num_layers=L, trained_layers=self.trained_layers, train_embeddings=self.params.train_embeddings,
            lm_head_tied_to_embeddings=bool(tied), final_norm=type(norm).__name__ if norm is not None else None,
            embeddings_trained=bool(self.params.train_embeddings or (self.objective == "lm" and tied)),
        )

    def layer_lrs(self) -> dict[str, float]:
        """The learning rate of every trained group (before the schedule's factor)."""
        lr, g, L = self.ctx.cfg.train.lr, self.params.llrd, self.num_layers
        rates = {"head": lr, "top": lr}
        for i in self.trained_layers:
            rates[f"layer{i}"] = lr * g ** (L - i) if g else lr
        if self.params.train_embeddings:
            rates["embeddings"] = lr * g ** (L + 1) if g else lr
        return rates

    def param_groups(self) -> list[dict]:
        assert self.net is not None
        rates = self.layer_lrs()
        groups, placed = [], set()
        for role, lr in rates.items():
            if role == "head":
                continue
            params = [p for p in self.parts[role] if p.requires_grad and id(p) not in placed]
            placed.update(id(p) for p in params)
            if params:
                groups.append({"params": params, "lr": lr, "name": role})
        rest = [p for p in self.net.parameters() if p.requires_grad and id(p) not in placed]
        if rest:  # the head (classifier head or LM head)
            groups.append({"params": rest, "lr": rates["head"], "name": "head"})
        return groups

    def extra_summary(self) -> dict:
        return {"layer_lrs": self.layer_lrs(), "trained_layers": self.trained_layers}
