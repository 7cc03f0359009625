"""The common interface of all adaptation methods.

A method receives a ``RunContext`` (resolved config, task, pattern, model, verbalizer, precision,
resource meter) and its own validated ``Params``; ``fit`` adapts the model on the few-shot sample
(a no-op for ICL), ``predict`` scores eval examples. The runner does everything else — data,
sampling, metrics, storage — so a method file holds only what makes the method different.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fewtune.config import RunConfig, StrictModel
from fewtune.models.loading import LoadedModel
from fewtune.registry import Registry
from fewtune.run.resources import ResourceMeter
from fewtune.scoring.calibration import calibrate, content_free_fields
from fewtune.scoring.scorer import Scores, argmax_breaking_ties
from fewtune.tasks.base import Example, Task
from fewtune.tasks.prompts import Pattern, VerbalizerTokens


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

    def content_free_queries(self) -> list[str]:
        """The pattern's query with every text field content-free (contextual calibration)."""
        return [self.pattern.query(f) for f in content_free_fields(self.pattern.fields())]


@dataclass
class Predictions:
    """Per eval example: label scores (log-probs or log-softmaxed head logits) and prediction."""

    label_scores: np.ndarray  # [N, num_labels]
    pred: np.ndarray  # [N], -1 where skipped
    skipped: np.ndarray  # [N] bool
    tokens: int = 0
    full_argmax_token: np.ndarray | None = None  # LM-head methods only
    outside_verbalizer: np.ndarray | None = None  # LM-head methods only
    tie: np.ndarray | None = None  # [N] bool: the best label score was shared exactly
    calibration: dict | None = None  # what calibration estimated (``fewtune.scoring.calibration``), if any

    @classmethod
    def from_scores(cls, scores: Scores, verbalizer_ids: Sequence[int]) -> Predictions:
        outside = ~np.isin(scores.full_argmax, list(verbalizer_ids))
        pred, tie = argmax_breaking_ties(scores.label_logprobs, scores.skipped)
        return cls(scores.label_logprobs, pred, scores.skipped, scores.tokens_scored,
                   scores.full_argmax, outside & ~scores.skipped, tie)

    def calibrated(self, mode: str, content_free: Callable[[], np.ndarray] | None = None) -> Predictions:
        """These predictions with the label scores calibrated (``mode`` none: unchanged).
        ``content_free`` returns the label log-probs of the content-free inputs (contextual)."""
        cal = calibrate(mode, self.label_scores, self.skipped, content_free)
        if cal is None:
            return self
        pred, tie = argmax_breaking_ties(cal.label_scores, self.skipped)
        return replace(self, label_scores=cal.label_scores, pred=pred, tie=tie, calibration=cal.record)

    def keyed(self, keys: Sequence[str]) -> Predictions:
        """The same scores with ties broken by a coin seeded by each example's id (stable under
        subsampling and reordering) instead of its position (``scoring.argmax_breaking_ties``)."""
        pred, tie = argmax_breaking_ties(self.label_scores, self.skipped, keys)
        return replace(self, pred=pred, tie=tie)


class Method(ABC):
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[StrictModel]] = NoParams
    # Whether ``fit`` updates weights; a method that trains nothing reports 0 trainable parameters.
    trains: ClassVar[bool] = True
    # Whether training updates the pretrained weights (False: adapters/new heads only). Methods
    # that keep them frozen may load them in bf16 and spread them with a device_map.
    trains_base_weights: ClassVar[bool] = True
    # Whether train.gradient_checkpointing works with it (prefix tuning: the layers append to the
    # prefix's key/value cache, so recomputing a layer in backward would append a second time).
    supports_gradient_checkpointing: ClassVar[bool] = True
    # Whether predictions depend on the few-shot sample (zero-shot: no, so its n is reported as n/a).
    uses_sample: ClassVar[bool] = True

    @classmethod
    def keeps_base_frozen(cls) -> bool:
        """Whether the pretrained weights stay untouched (trains nothing, or adapters only)."""
        return not cls.trains or not cls.trains_base_weights

    @classmethod
    def trains_on_sample(cls, params: dict) -> bool:
        """Whether its training set is the few-shot sample (so a CV fold trains on a share of it);
        distillation from the train pool trains on the pool instead."""
        return cls.trains

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
