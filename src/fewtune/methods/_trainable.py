"""The shared base of the training-based methods (vanilla, pbft, adaptive, lora, distill, and the
``-released`` variants).

A trainable method only says what makes it different — which text the model reads, which
parameters train (and at which learning rates), which head, which loss — through the hooks of
``TrainableMethod``. Tokenisation, the single training loop (``fewtune.training.loop.train``),
learning curves, prediction and the training summary are shared here.

Two objectives, both read at the last real token of the input (the position right before the
answer word; inputs are right-padded, ``scoring.pad_batch`` gives the index):

- ``classifier``: a new head (``heads.make_head``) on the hidden state → C class logits; CE on the
  gold label; prediction = argmax, label scores = log-softmax of the head logits.
- ``lm``: the model's own LM head → next-token logits. Mosbach et al.'s PBFT semantics: CE over
  the *full vocabulary* with the gold label's verbalizer token as target (or, with
  ``restrict_to_verbalizer``, CE over the verbalizer tokens' logits only). Prediction through
  ``scoring.score_prompts``, exactly as zero-shot/ICL: label scores are full-vocabulary
  log-probs of the verbalizer tokens, prediction = argmax among them (verbalizer-restricted
  accuracy), and the full-vocabulary argmax is kept so the runner reports the fraction of
  predictions outside the verbalizer and llmft's full-vocabulary accuracy.

Lengths — one rule for all methods:
- *Training* inputs are truncated to ``train.max_length`` tokens (the study's 128) from the
  **left**, keeping the end of the input — the answer position the loss reads — and the leading
  BOS token if the tokenizer adds one. The released code truncated from the right (HF default),
  which for long inputs moves the pooled "last token" into the middle of the text; for CoLA
  nothing is that long, for MNLI a handful of pairs are. Truncations are counted in ``warnings()``.
- *Eval* inputs are never truncated, for every method: an input longer than ``max_context`` is
  skipped and counted, the same rule as zero-shot/ICL, so every method is scored on the same
  examples. (The released code truncated eval inputs to 128 too; for CoLA this changes nothing.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from fewtune.config import StrictModel
from fewtune.errors import ConfigError
from fewtune.methods.base import Method, Predictions
from fewtune.models.adapter import adapter_for, backbone_and_head
from fewtune.models.loading import autocast
from fewtune.scoring.batching import encode_prompts, length_sorted_batches, pad_batch
from fewtune.scoring.calibration import CALIBRATION_HELP, Calibration
from fewtune.scoring.heads import ClassifierNet, HeadKind, LMNet, init_std, make_head
from fewtune.scoring.scorer import Scores, argmax_breaking_ties, score_prompts
from fewtune.tasks.base import Example
from fewtune.training.loop import Batch, TrainResult, enable_gradient_checkpointing, train

Objective = Literal["classifier", "lm"]


class HeadParams(StrictModel):
    """Options of the classification-head objective (shared by several methods' Params)."""

    head: HeadKind = Field("linear", description="linear (HF score, the study) | mlp (llmft: dense→ReLU→dropout→linear)")
    head_dropout: float = Field(0.1, ge=0, lt=1, description="dropout inside the mlp head")


class InputParams(StrictModel):
    """What a classifier reads."""

    input: Literal["pattern", "raw"] = Field("pattern", description="pattern: the task's pattern query; raw: text fields joined by a space")


class LMParams(StrictModel):
    """Options of the LM-head (PBFT) objective."""

    restrict_to_verbalizer: bool = Field(False, description="CE over the verbalizer logits only (default: full vocabulary, Mosbach)")
    calibration: Calibration = Field("none", description="of the LM-head scores at prediction: " + CALIBRATION_HELP)

    omit_when: ClassVar[dict[str, Any]] = {"calibration": "none"}  # run ids from before the option


class ObjectiveParams(HeadParams, InputParams, LMParams):
    """For methods that can train either objective (adaptive, lora)."""

    objective: Objective = Field("classifier", description="classifier (new head) | lm (LM head + verbalizer, PBFT)")

    @model_validator(mode="after")
    def _consistent(self) -> ObjectiveParams:
        if self.objective == "lm" and self.input == "raw":
            raise ValueError("input 'raw' needs objective 'classifier' (the LM objective reads the answer position the pattern ends in)")
        if self.objective == "classifier" and self.calibration != "none":
            raise ValueError("calibration applies to the LM head's verbalizer scores: it needs objective 'lm'")
        return self


def raw_text(example: Example) -> str:
    """The example's text fields joined by a space, in field order.

    The released code fed MNLI as a tokenizer *pair* (premise, hypothesis); decoder-only
    tokenizers (GPT-2/OPT/Llama BPE) have no pair template beyond concatenation, so joining with
    a space is what that pair encoding amounts to, minus OPT's extra separator token.
    """
    return " ".join(str(v) for v in example.fields.values())


def truncate_left(ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    """Keep the last ``max_length`` tokens (and a leading BOS, if present)."""
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:
        return ids[:1] + ids[len(ids) - (max_length - 1):]
    return ids[len(ids) - max_length:]


@torch.no_grad()
def forward_seqs(net: nn.Module, seqs: Sequence[Sequence[int]], *, pad_id: int, batch_size: int, precision: str,
                 device: torch.device, on_batch: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int]:
    """``net``'s outputs for every sequence, in eval mode: ([N, C] fp32 on CPU, real tokens run).

    Batches group similar lengths (less padding); results are put back in input order."""
    out: torch.Tensor | None = None
    tokens = 0
    was_training = net.training
    net.eval()
    try:
        for idx in length_sorted_batches([len(s) for s in seqs], batch_size):
            ids, mask, last = pad_batch([seqs[i] for i in idx], pad_id, device)
            with autocast(precision, device):
                logits = net(ids, mask, last).float().cpu()
            if out is None:
                out = torch.empty((len(seqs), logits.shape[1]), dtype=torch.float32)
            out[idx] = logits
            tokens += int(mask.sum())
            if on_batch:
                on_batch(len(idx))
    finally:
        net.train(was_training)
    return (out if out is not None else torch.empty((0, 0))), tokens


def classify(net: nn.Module, tokenizer, texts: Sequence[str], *, num_labels: int, batch_size: int,
             max_context: int | None, precision: str, device: torch.device,
             on_batch: Callable[[int], None] | None = None) -> Predictions:
    """Class log-probs from a classifier net; inputs longer than ``max_context`` are skipped."""
    enc = encode_prompts(tokenizer, texts, max_context=max_context)
    keep = [i for i, q in enumerate(enc.query_ids) if q is not None]
    scores = np.full((len(texts), num_labels), np.nan)
    tokens = 0
    if keep:
        logits, tokens = forward_seqs(net, [enc.query_ids[i] for i in keep], pad_id=tokenizer.pad_token_id,
                                      batch_size=batch_size, precision=precision, device=device, on_batch=on_batch)
        scores[keep] = torch.log_softmax(logits.double(), dim=-1).numpy()
    pred, tie = argmax_breaking_ties(scores, enc.skipped)
    return Predictions(scores, pred, enc.skipped, tokens, tie=tie)


class TrainableMethod(Method):
    """Template for a method that trains: override the hooks, not ``fit``/``predict``."""

    #: objective when the Params have no ``objective`` field
    default_objective: ClassVar[Objective] = "classifier"

    def __init__(self, ctx, params) -> None:
        super().__init__(ctx, params)
        self.net: nn.Module | None = None
        self.head: nn.Module | None = None
        self.labels: torch.Tensor | None = None
        self.train_result: TrainResult | None = None
        self._warnings: list[str] = []
        self._info: dict[str, Any] = {}
        # the run's own dropout generators (LoRA's), replayed by gradient checkpointing
        self.dropout_generators: list[torch.Generator] = []

    # ------------------------------------------------------------------ hooks

    @property
    def objective(self) -> Objective:
        return getattr(self.params, "objective", self.default_objective)

    def input_text(self, example: Example) -> str:
        """What the trained model reads, for training and for prediction."""
        if getattr(self.params, "input", "pattern") == "raw" and self.objective == "classifier":
            return raw_text(example)
        return self.ctx.pattern.query(example.fields)

    def training_examples(self, sample: list[Example]) -> list[Example]:
        """The examples to train on (default: the few-shot sample)."""
        return sample

    def before_build(self, examples: list[Example], seqs: list[list[int]]) -> None:
        """Runs before the model is modified, with the encoded training inputs (distillation
        computes its frozen teacher's outputs here, from the very weights the student starts at)."""

    def adapt_model(self) -> None:
        """Freeze parameters / inject adapters into ``self.ctx.lm.model`` (default: train all)."""

    def scoring_model(self) -> nn.Module:
        """The causal LM that training and prediction run (default: ``ctx.lm.model``, adapted in
        place). Prompt/prefix tuning return a view that injects their virtual tokens."""
        return self.ctx.lm.model

    def build_net(self) -> nn.Module:
        """The module the loop trains: backbone + head of the chosen objective."""
        model = self.scoring_model()
        body, lm_head = backbone_and_head(model)
        if self.objective == "classifier":
            hidden = model.config.hidden_size
            self.head = make_head(getattr(self.params, "head", "linear"), hidden, self.ctx.task.num_labels,
                                  seed=self.ctx.cfg.model_seed, std=init_std(model),
                                  dropout=getattr(self.params, "head_dropout", 0.1)).to(self.ctx.device)
            return ClassifierNet(body, self.head)
        restrict = self.ctx.verbalizer.token_ids if getattr(self.params, "restrict_to_verbalizer", False) else None
        return LMNet(body, lm_head, restrict, adapter_for(model).logit_transform)

    def param_groups(self) -> list[dict]:
        """Optimizer groups (default: every trainable parameter at ``train.lr``)."""
        assert self.net is not None
        return [{"params": [p for p in self.net.parameters() if p.requires_grad]}]

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The objective's supervised loss (see module docstring)."""
        return self.supervised_loss(logits, batch)

    def extra_summary(self) -> dict:
        return {}

    # ---------------------------------------------------------- shared pieces

    def supervised_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        assert self.labels is not None
        gold = self.labels.to(logits.device)[batch.idx]
        if self.objective == "classifier" or getattr(self.params, "restrict_to_verbalizer", False):
            return F.cross_entropy(logits, gold)  # logits are [B, C] (head) or [B, k] (verbalizer rows)
        targets = torch.tensor(self.ctx.verbalizer.token_ids, device=logits.device)[gold]
        return F.cross_entropy(logits, targets)

    def encode_training(self, texts: Sequence[str]) -> list[list[int]]:
        """The training inputs, tokenized by the very path scoring uses (``encode_prompts``: a
        leading BOS where the model uses one, never an appended EOS), so the loss reads the
        position prediction reads; then cut to ``train.max_length`` from the left."""
        tok = self.ctx.lm.tokenizer
        max_len = self.ctx.cfg.train.max_length
        bos = tok.bos_token_id if _adds_bos(tok) else None
        seqs = [list(q or []) for q in encode_prompts(tok, list(texts)).query_ids]  # no max_context: none skipped
        out = [truncate_left(list(s), max_len, bos) for s in seqs]
        cut = sum(len(a) != len(b) for a, b in zip(seqs, out))
        if cut:
            self._warnings.append(f"{cut} of {len(seqs)} training inputs were longer than train.max_length={max_len} "
                                  "tokens and were truncated from the left (the answer position is kept)")
        self._info["train_truncated"] = cut
        return out

    def trainable_summary(self) -> dict:
        assert self.net is not None
        n_train = sum(p.numel() for p in {id(p): p for p in self.net.parameters() if p.requires_grad}.values())
        return {"objective": self.objective, "trainable_params": n_train, "chance_loss": self.chance_loss()}

    def chance_loss(self) -> float | None:
        """The loss of a uniform prediction over the classes the loss normalises over: ln(#labels)
        for a classifier head or verbalizer-restricted CE, ln|V| for full-vocabulary CE. A run that
        ends there collapsed (``metrics.loss_collapse``). None where the loss has no such value."""
        if self.objective == "classifier":
            return math.log(self.ctx.task.num_labels)
        if getattr(self.params, "restrict_to_verbalizer", False):
            return math.log(len(self.ctx.verbalizer.token_ids))
        return math.log(backbone_and_head(self.ctx.lm.model)[1].weight.shape[0])

    # -------------------------------------------------------------- Method API

    @property
    def model(self) -> nn.Module:
        return self.net if self.net is not None else self.ctx.lm.model

    def prepare_training(self, sample: list[Example]) -> list[list[int]]:
        """Everything before the loop: the encoded training inputs and labels, the adapted model
        and ``self.net``. A pack (``fewtune.training.packed``) calls it for each member."""
        ctx = self.ctx
        examples = self.training_examples(sample)
        if not examples:
            raise ConfigError(f"method '{self.name}' has no training examples", "use a larger n")
        seqs = self.encode_training([self.input_text(e) for e in examples])
        self.labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        self.before_build(examples, seqs)
        torch.manual_seed(ctx.cfg.model_seed)  # adapter init (LoRA) and anything else drawn from the global RNG
        self.adapt_model()
        if ctx.cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(ctx.lm.model, self.dropout_generators)
        self.net = self.build_net()
        return seqs

    def fit_summary(self, result: TrainResult) -> dict:
        """The ``fit`` summary of a finished training."""
        self.train_result = result
        self.optimizer_steps = result.steps
        summary = result.summary(self.ctx.cfg.train)
        summary.update(self.trainable_summary())
        summary.update(self.extra_summary())
        return summary

    def fit(self, sample: list[Example]) -> dict:
        ctx = self.ctx
        seqs = self.prepare_training(sample)
        curve_fn = None
        if ctx.cfg.train.eval_every_epoch and ctx.evaluate is not None:
            curve_fn = lambda _epoch: ctx.evaluate()
        result = train(
            self.net, seqs, self.loss, self.param_groups(), ctx.cfg.train,
            pad_id=ctx.lm.tokenizer.pad_token_id, precision=ctx.precision, model_seed=ctx.cfg.model_seed,
            device=ctx.device, progress=ctx.progress, on_epoch_end=curve_fn, description=f"  train {self.name}",
        )
        return self.fit_summary(result)

    def predict(self, examples: list[Example], on_batch: Callable[[int], None] | None = None) -> Predictions:
        ctx = self.ctx
        texts = [self.input_text(e) for e in examples]
        if self.objective == "classifier":
            if self.net is None:
                raise RuntimeError("predict() before fit(): the classification head does not exist yet")
            return classify(self.net, ctx.lm.tokenizer, texts, num_labels=ctx.task.num_labels, batch_size=ctx.cfg.eval_batch_size,
                            max_context=ctx.cfg.max_context, precision=ctx.precision, device=ctx.device, on_batch=on_batch)
        preds = Predictions.from_scores(self._lm_scores(texts, on_batch), ctx.verbalizer.token_ids)
        return preds.calibrated(getattr(self.params, "calibration", "none"), lambda: self._lm_scores(ctx.content_free_queries()).label_logprobs)

    def _lm_scores(self, texts: Sequence[str], on_batch: Callable[[int], None] | None = None) -> Scores:
        ctx = self.ctx
        return score_prompts(self.scoring_model(), ctx.lm.tokenizer, texts, ctx.verbalizer.token_ids,
                             batch_size=ctx.cfg.eval_batch_size, max_context=ctx.cfg.max_context,
                             precision=ctx.precision, on_batch=on_batch)

    def warnings(self) -> list[str]:
        return list(self._warnings)

    def describe(self) -> dict:
        return dict(self._info)


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends its BOS token to every encoded text."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos
