"""The common interface of all adaptation methods.

A method receives a ``RunContext`` (resolved config, task, pattern, model, verbalizer, precision,
resource meter) and its own validated ``Params``; ``fit`` adapts the model on the few-shot sample
(a no-op for ICL), ``predict`` scores eval examples. The runner does everything else — data,
sampling, metrics, storage — so a method file holds only what makes the method different.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..config import RunConfig, StrictModel
from ..models import LoadedModel
from ..prompts import Pattern, VerbalizerTokens
from ..registry import Registry
from ..resources import ResourceMeter
from ..scoring import Scores
from ..tasks.base import Example, Task


class NoParams(StrictModel):
    """A method without parameters of its own."""


@dataclass
class RunContext:
    cfg: RunConfig
    task: Task
    pattern: Pattern
    lm: LoadedModel
    verbalizer: VerbalizerTokens
    precision: str
    device: torch.device
    meter: ResourceMeter
    train_pool: list[Example] = field(default_factory=list)
    data_dir: Path | None = None
    progress: Any = None  # rich.progress.Progress or None
    # For learning curves: evaluates the current model on the run's eval sets.
    evaluate: Callable[[], dict] | None = None

    def queries(self, examples: Sequence[Example]) -> list[str]:
        return [self.pattern.query(e.fields) for e in examples]


@dataclass
class Predictions:
    """Per eval example: label scores (log-probs or log-softmaxed head logits) and prediction."""

    label_scores: np.ndarray  # [N, num_labels]
    pred: np.ndarray  # [N], -1 where skipped
    skipped: np.ndarray  # [N] bool
    tokens: int = 0
    full_argmax_token: np.ndarray | None = None  # LM-head methods only
    outside_verbalizer: np.ndarray | None = None  # LM-head methods only

    @classmethod
    def from_scores(cls, scores: Scores, verbalizer_ids: Sequence[int]) -> Predictions:
        outside = ~np.isin(scores.full_argmax, list(verbalizer_ids))
        return cls(scores.label_logprobs, scores.predictions(), scores.skipped, scores.tokens_scored,
                   scores.full_argmax, outside & ~scores.skipped)


class Method(ABC):
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[StrictModel]] = NoParams
    # Whether ``fit`` updates weights; a method that trains nothing reports 0 trainable parameters.
    trains: ClassVar[bool] = True

    def __init__(self, ctx: RunContext, params: StrictModel) -> None:
        self.ctx = ctx
        self.params = params
        self.optimizer_steps = 0

    @property
    def model(self) -> torch.nn.Module:
        """The model whose parameters count as this method's (for trainable/total parameters)."""
        return self.ctx.lm.model

    def fit(self, sample: list[Example]) -> dict | None:
        """Adapt to the few-shot sample; return a training summary (or None if nothing trains)."""
        return None

    @abstractmethod
    def predict(self, examples: list[Example], on_batch: Callable[[int], None] | None = None) -> Predictions:
        ...

    def warnings(self) -> list[str]:
        return []


METHODS: Registry[type[Method]] = Registry("method")


def register(cls: type[Method]) -> type[Method]:
    METHODS.add(cls.name, cls)
    return cls
