"""Classification heads on the hidden state of the last real token, and the modules that pair a
backbone with a head so that one ``forward(ids, mask, last)`` gives what a loss needs.

Why a module per objective: the shared training loop (``fewtune.training.loop``) hands exactly one
``nn.Module`` to ``accelerate`` (device placement, autocast, and — on several GPUs — DDP, which
only synchronises gradients correctly when every trainable parameter is used inside *that*
module's ``forward``). So backbone + head + "which position, which logits" live in one module.

Heads:
- ``linear``: a bias-free ``Linear(d, C)`` — Hugging Face's ``*ForSequenceClassification.score``,
  which is what the study's released code trained (``AutoModelForSequenceClassification``).
- ``mlp``: llmft's ``ClassificationHead`` (Mosbach et al.): ``dense(d, d)`` → ReLU → dropout →
  ``Linear(d, C)``, both with bias.
Both initialise weights N(0, std) (std = the model's ``initializer_range``, 0.02 for Llama/OPT)
and biases 0, from a ``torch.Generator`` seeded by the run's ``model_seed`` — so the head does not
depend on how much global RNG state model loading consumed.

Only one position per example is ever projected: the last real token's hidden state [B, d]. We
never build a [B, L, vocab] tensor (vocab is 49k for the embedded model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from fewtune.models.adapter import LogitTransform
from fewtune.scoring.scorer import head_logits, last_hidden

HeadKind = Literal["linear", "mlp"]


class LinearHead(nn.Module):
    """Bias-free linear layer (HF ``score``)."""

    def __init__(self, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.out = nn.Linear(hidden, num_labels, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(h)


class MLPHead(nn.Module):
    """llmft's fully-connected head: dense → ReLU → dropout → linear."""

    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(torch.relu(self.dense(h))))


def make_head(kind: HeadKind, hidden: int, num_labels: int, *, seed: int, std: float = 0.02,
              dropout: float = 0.1) -> nn.Module:
    """A freshly initialised head; identical for identical (kind, sizes, seed, std)."""
    head: nn.Module = LinearHead(hidden, num_labels) if kind == "linear" else MLPHead(hidden, num_labels, dropout)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.zero_()
    return head


def init_std(model: nn.Module) -> float:
    """The model's own weight-init std (``initializer_range``/``init_std``), 0.02 if absent."""
    cfg = getattr(model, "config", None)
    for key in ("initializer_range", "init_std"):
        v = getattr(cfg, key, None)
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    return 0.02


class ClassifierNet(nn.Module):
    """Backbone + classification head → class logits [B, C] at the last real token; the head runs
    in fp32 whatever the body's precision (``scoring.head_logits``: no bf16 ties or coarse losses)."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return head_logits(self.head, last_hidden(self.body, ids, mask, last))


class LMNet(nn.Module):
    """Backbone + LM head → next-token logits at the last real token, the head in fp32
    (``scoring.head_logits``), so PBFT's full-vocabulary CE and distillation's KL see fp32 logits.

    With ``restrict_ids`` only those vocabulary rows are computed ([B, k]); otherwise the full
    vocabulary ([B, V]). Restricting is exact (a subset of rows of the same matmul) and saves the
    49k-row projection when the loss only looks at the verbalizer.
    """

    def __init__(self, body: nn.Module, lm_head: nn.Module, restrict_ids: Sequence[int] | None = None,
                 transform: LogitTransform | None = None) -> None:
        super().__init__()
        self.body = body
        self.lm_head = lm_head
        self.transform = transform  # the family's logit post-processing (ModelAdapter.logit_transform)
        self.register_buffer(
            "restrict_ids", torch.tensor(list(restrict_ids), dtype=torch.long) if restrict_ids is not None else None,
            persistent=False,
        )

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return head_logits(self.lm_head, last_hidden(self.body, ids, mask, last), self.restrict_ids, self.transform)
