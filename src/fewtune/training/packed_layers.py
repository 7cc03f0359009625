"""The layers of a pack: one frozen base layer, each member's own trained piece applied to its rows.

A method kind plugs in with two things: a ``Piece`` subclass (the member's trained tensors on one
layer and what they do to that layer's input and/or output, mirroring the lone run's forward
operation by operation, so a member's rows get the very numbers its lone run gets) and a capture
(``CAPTURES``: a peft layer of that kind → the member's piece, holding copies of the start values
peft initialised for the member alone; ``module_pieces`` for base tensors a method trains in
place). ``member_pieces`` captures a prepared member's pieces, ``install`` puts them into the
shared base's ``PackedLayer`` layers; a member without a piece in a layer gets the base layer.

Kinds: LoRA (incl. rsLoRA), DoRA (LoRA plus a magnitude vector; the weight norm of
W + scale·B·A is recomputed per member and detached, as peft does), (IA)³ (a scaling vector on
the layer's input — feed-forward modules — or on its output) and BitFit (the member's own biases
and norm gains: the layer runs per member with them in place). Dropout masks come from each
member's own generator (``member_generator``), which its lone run uses too (``seed_lora_dropout``).

Exactness, measured on the tiny model in fp32: each piece computes on the member's rows cut to
the member's own padded width and made contiguous (``_own``) — DoRA's and BitFit's gradient sums
over a wider or strided batch round differently from the lone run's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DROPOUT_STREAM = 0x5EED  # the dropout generator's seed is model_seed offset by this (its own stream)


def member_generator(seed: int, device: torch.device) -> torch.Generator:
    """A run's LoRA-dropout generator: the same for the run alone and inside any pack."""
    return torch.Generator(device=device).manual_seed(seed + DROPOUT_STREAM)


def dropout_mask(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Inverted-dropout scale for ``x`` drawn from ``gen`` (in a pack ``x`` is the member's own
    rows at its own width, so the draw has the lone run's shape and stream)."""
    return (torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32) >= p).to(x.dtype) / (1 - p)


class SeededDropout(nn.Module):
    """Dropout whose masks come from a given generator rather than the global RNG."""

    def __init__(self, p: float, gen: torch.Generator) -> None:
        super().__init__()
        self.p, self.gen = p, gen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * dropout_mask(x, self.p, self.gen)


def seed_lora_dropout(model: nn.Module, seed: int, device: torch.device) -> torch.Generator | None:
    """Give a lone peft LoRA/DoRA model's dropout the run's own generator (``member_generator``),
    the one its masks come from in a pack. Returns that generator (None: no dropout to replace)."""
    gen = member_generator(seed, device)
    count = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for name, d in list(drops.items()):
                if isinstance(d, nn.Dropout) and d.p > 0:
                    drops[name] = SeededDropout(d.p, gen)
                    count += 1
    return gen if count else None


@dataclass
class Routing:
    """Which rows of the current batch belong to which member: ``(slot, rows, own length)``.
    Shared by every ``PackedLayer`` of one pack; set before each forward pass."""

    segments: list[tuple[int, slice, int | None, bool]] = field(default_factory=list)  # + whether unpadded

    def solo(self, slot: int) -> None:
        """Every row through member ``slot`` (evaluation of one member, whatever the batch)."""
        self.segments = [(slot, slice(None), None, False)]


class Piece:
    """One member's trained tensors on one layer. ``input`` maps the member's rows of the layer's
    input (only called where ``scales_input``), ``output`` gives the member's rows of the layer's
    output from its rows of the (unmapped) input and of the base layer's result."""

    scales_input = False
    replaces_base = False  # computes the layer itself (``result`` is then None)
    gen: torch.Generator | None = None  # the member's dropout generator, set by ``install``

    def params(self) -> list[nn.Parameter]:
        """The member's parameters of this layer, in the order peft lists them."""
        raise NotImplementedError

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def output(self, layer: PackedLayer, x: torch.Tensor, result: torch.Tensor | None) -> torch.Tensor:
        """Default (a member without a piece in this layer): the base layer's output."""
        return result if result is not None else layer.base(x)


NO_PIECE = Piece()


@dataclass(eq=False)
class LoRAPiece(Piece):
    """peft LoRA ``Linear.forward``: ``result + B(A(dropout(x))) · scale``."""

    A: nn.Parameter
    B: nn.Parameter
    scale: float
    p: float

    def params(self) -> list[nn.Parameter]:
        return [self.A, self.B]

    def dropped(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.dtype)
        if layer.training and self.p > 0:
            x = x * dropout_mask(x, self.p, self.gen)
        return x

    def output(self, layer: PackedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(self.dropped(layer, x), self.A), self.B) * self.scale
        return (result + delta).to(result.dtype)


@dataclass(eq=False)
class DoRAPiece(LoRAPiece):
    """peft ``DoraLinearVariant.forward`` / ``DoraLinearLayer.forward``: the magnitude over the
    (detached) row norms of W + scale·B·A rescales the base output and the LoRA update; with
    dropout in training the base part is recomputed from the dropped input, as peft does."""

    m: nn.Parameter = None  # type: ignore[assignment]  # the magnitude vector
    fan_in_fan_out: bool = False

    def params(self) -> list[nn.Parameter]:
        return [self.A, self.B, self.m]

    def output(self, layer: PackedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        x = self.dropped(layer, x)
        eye = torch.eye(self.A.shape[1], device=self.A.device, dtype=self.A.dtype)
        lora_weight = F.linear(F.linear(eye, self.A), self.B).T.to(x.dtype)
        weight = layer.base.weight.to(x.dtype)
        w = weight.T if self.fan_in_fan_out else weight
        norm = torch.linalg.norm(w + self.scale * lora_weight.detach(), dim=1).to(w.dtype).detach()
        mag = (self.m / norm).view(1, -1)
        lora_result = F.linear(F.linear(x, self.A), self.B)
        if layer.training and self.p > 0:
            base_result = F.linear(x, w)
        else:
            bias = getattr(layer.base, "bias", None)
            base_result = result - bias if bias is not None else result
        return (result + ((mag - 1) * base_result + mag * lora_result * self.scale)).to(result.dtype)


@dataclass(eq=False)
class IA3Piece(Piece):
    """peft (IA)³ ``Linear.forward``: a feed-forward module scales its input, others their output."""

    scale: nn.Parameter
    feedforward: bool

    def __post_init__(self) -> None:
        self.scales_input = self.feedforward

    def params(self) -> list[nn.Parameter]:
        return [self.scale]

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.scale.dtype) * self.scale.flatten()).to(x.dtype)

    def output(self, layer: PackedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result if self.feedforward else (result * self.scale.flatten()).to(result.dtype)


@dataclass(eq=False)
class ModulePiece(Piece):
    """Tensors of the base layer that the method trains in place (BitFit's biases, zero-added
    where the base has none, and norm gains): the layer runs on the member's rows with the
    member's own copies in their place (``torch.func.functional_call``: the very forward, hence
    the very kernels, of the lone run's layer)."""

    tensors: dict[str, nn.Parameter]
    replaces_base = True

    def params(self) -> list[nn.Parameter]:
        return list(self.tensors.values())

    def output(self, layer: PackedLayer, x: torch.Tensor, result: torch.Tensor | None) -> torch.Tensor:
        return torch.func.functional_call(layer.base, self.tensors, (x,))


class PackedLayer(nn.Module):
    """A frozen layer plus each member's piece, each applied to that member's rows."""

    def __init__(self, base: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.base, self.routing = base, routing
        self.pieces: dict[int, Piece] = {}
        self.scales_input = self.replaces_base = False
        self.params = nn.ParameterList()  # registered, so .to()/state see them

    def add(self, slot: int, piece: Piece) -> None:
        self.pieces[slot] = piece
        self.scales_input |= piece.scales_input
        self.replaces_base |= piece.replaces_base
        self.params.extend(piece.params())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments, piece = self.routing.segments, lambda slot: self.pieces.get(slot, NO_PIECE)
        x_in = x
        if self.scales_input:
            x_in = _cat([_own(piece(slot).input, length, (x[rows],), x[rows]) for slot, rows, length, _ in segments])
        if self.replaces_base:  # each member's rows through the layer with its own tensors
            return _cat([_own(functools.partial(piece(slot).output, self, result=None), length, (x[rows],), None)
                         for slot, rows, length, _ in segments])
        result = self.base(x_in)
        return _cat([_own(functools.partial(piece(slot).output, self), length, (x[rows], result[rows]), result[rows])
                     for slot, rows, length, _ in segments])


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _own(fn: Callable[..., torch.Tensor], length: int | None, args: tuple[torch.Tensor, ...], rest: torch.Tensor | None) -> torch.Tensor:
    """``fn(*args)`` on a member's rows cut to its own padded width ``length`` (the pack's may be
    wider), so every product and gradient sum has the shapes of the member's lone batch
    (reductions round differently over more elements, even zeros); the positions beyond
    (padding in the pack, never read by the member's real positions) take ``rest``'s values, or 0."""
    width = args[0].shape[1] if args[0].dim() == 3 else None
    if length is None or width is None or length >= width:
        return fn(*args)
    own = fn(*(t[:, :length].contiguous() for t in args))
    tail = rest[:, length:].to(own.dtype) if rest is not None else own.new_zeros((own.shape[0], width - length, *own.shape[2:]))
    return torch.cat([own, tail], dim=1)


def _start(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone())


def capture_lora(module: nn.Module) -> Piece | None:
    """A peft LoRA layer's adapter ``default`` (a DoRA piece where it has a magnitude vector)."""
    if "default" not in getattr(module, "lora_A", {}):
        return None
    args = (_start(module.lora_A["default"].weight), _start(module.lora_B["default"].weight), float(module.scaling["default"]),
            float(getattr(module.lora_dropout["default"], "p", 0.0)))
    dora = getattr(module, "lora_magnitude_vector", {})
    if "default" in dora:
        return DoRAPiece(*args, m=_start(dora["default"].weight), fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)))
    return LoRAPiece(*args)


def capture_ia3(module: nn.Module) -> Piece | None:
    """A peft (IA)³ layer's vector ``default``."""
    if "default" not in getattr(module, "ia3_l", {}):
        return None
    return IA3Piece(_start(module.ia3_l["default"]), bool(module.is_feedforward))


CAPTURES: tuple[Callable[[nn.Module], Piece | None], ...] = (capture_lora, capture_ia3)


def adapter_pieces(peft_model: nn.Module) -> dict[str, Piece]:
    """name → the member's piece of every adapted layer of its peft model, in module order (the
    start values peft initialised, copied: the peft model may be unloaded afterwards)."""
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        for capture in CAPTURES:
            piece = capture(module)
            if piece is not None:
                out[name] = piece
                break
    return out


def module_pieces(model: nn.Module, trained: list[nn.Parameter]) -> dict[str, Piece]:
    """name → the member's copies of the ``trained`` tensors each module of ``model`` owns (a
    method that trains base tensors in place: BitFit), in module order."""
    ids = {id(p) for p in trained}
    out: dict[str, Piece] = {}
    for name, module in model.named_modules():
        own = {n: _start(p) for n, p in module.named_parameters(recurse=False) if id(p) in ids}
        if own:
            out[name] = ModulePiece(own)
    return out


def member_pieces(method: Any) -> dict[str, Piece]:
    """A prepared member's pieces: its peft adapter's or, for a method that trains base tensors in
    place (``base_tensors``: BitFit), copies of those. The caller then gives the base back
    (``give_back_base``), whether this succeeded or not."""
    if getattr(method, "peft_model", None) is not None:
        return adapter_pieces(method.peft_model)
    return module_pieces(method.ctx.lm.model, method.base_tensors())


def give_back_base(method: Any) -> None:
    """The shared base as loaded again after a member's preparation — peft's adapter unloaded,
    BitFit's added biases removed (``restore_base``) — so the next member's preparation finds
    what its lone run finds, also where this member failed half-way."""
    if getattr(method, "peft_model", None) is not None:
        method.peft_model.unload()
    elif hasattr(method, "restore_base"):
        method.restore_base()


def install(model: nn.Module, slot: int, pieces: dict[str, Piece], routing: Routing, gen: torch.Generator) -> list[nn.Parameter]:
    """Add member ``slot``'s pieces to ``model`` (wrapping each adapted layer once); returns the
    member's parameters in module order, as peft lists them."""
    params = []
    for name, piece in pieces.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, attr)
        if not isinstance(layer, PackedLayer):
            layer = PackedLayer(layer, routing)
            setattr(parent, attr, layer)
        piece.gen = gen
        layer.add(slot, piece)
        params += piece.params()
    return params
