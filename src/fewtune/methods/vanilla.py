"""Vanilla fine-tuning: a new classification head on the last real token, every weight trained.

The study's released code (``AutoModelForSequenceClassification``) trains a fresh bias-free
linear ``score`` head on the hidden state of the last non-pad token, on the bare text (CoLA: the
sentence; MNLI: the tokenizer pair encoding). llmft (Mosbach et al.) feeds the same head family
the *minimal pattern* (``"{sentence} ?"``) and uses a dense → ReLU → dropout → linear head.
Defaults here: linear head (the study) on the task's pattern query (llmft; the run's
``--pattern``), both switchable: ``params.head=mlp``, ``params.input=raw``.
"""

from __future__ import annotations

from fewtune.methods._trainable import HeadParams, InputParams, TrainableMethod
from fewtune.methods.base import register


class VanillaParams(HeadParams, InputParams):
    """Head and input options of vanilla fine-tuning."""


@register
class Vanilla(TrainableMethod):
    name = "vanilla"
    summary = "new classification head on the last token, all weights trained (input: pattern or raw text)"
    Params = VanillaParams
    default_objective = "classifier"
