"""Context distillation: a student learns, without the context, what the model does with it.

``distill`` — canonical context distillation (Snell et al. 2022; the study's §8 recommendation):

- **Teacher** = the frozen base model prompted like ICL: the task's instruction, then ``k``
  balanced labelled demonstrations (``icl.demonstration_prefix``, the same text ICL uses), then
  the input in its pattern. It reads the next-token distribution at the answer position.
- **Student** = the same initial weights, reading only the input in its pattern (no instruction,
  no demonstrations), trained through its LM head at its own answer position.
- **Loss** = ``α · T² · KL(p_T ‖ q_T) + (1 − α) · CE``, where ``p_T``/``q_T`` are teacher and student
  distributions over the *verbalizer tokens*, renormalised among them, at temperature ``T``
  (``softmax(z_v / T)``; KL over the full vocabulary is not offered: storing 49k-way teacher
  distributions for a large pool is what the renormalised form avoids). CE is PBFT's loss on the
  gold label (full vocabulary, or the verbalizer with ``restrict_to_verbalizer``); with
  ``labels=false`` the loss is the KL alone (α is then ignored).
- The teacher is frozen, so its distributions are computed **once, before training**, from the
  very weights the student starts at — no second model copy in memory. With ``student=lora`` the
  teacher is by construction "the same model with the adapter disabled" (a fresh LoRA adapter is
  the identity, and the teacher pass runs before it exists).
- The teacher's prompt is scored in full (up to ``max_context``, like ICL), never cut to the
  student's ``train.max_length`` — the pitfall of trainers that tokenize teacher and student
  inputs with one max length. Each side reads the last real token of its *own* sequence, which
  for both is the last token of the same pattern query (tested).
- **No label leakage:** in the few-shot setting the student trains on the sample the
  demonstrations come from; each example's teacher prompt then uses demonstrations drawn from the
  *other* examples (leave-one-out, seeded), so the teacher never sees the answer of the example it
  labels. Default ``k``: as many as that allows, at most 16.
- **Two settings**, as in the study: ``pool=few-shot`` (student trains on the n-per-class sample)
  and ``pool=train`` — "without few-shot": the student trains on ``pool_size`` examples (default:
  all) of the task's train pool minus the demonstrations, whose shared prefix comes from the
  few-shot sample. The study ran the latter on all 261,802 MNLI pairs for 3 epochs; that is a GPU
  job (set ``train.epochs=3``).

``distill-released`` — the study's released notebooks, for parity only: teacher and student are
two copies of the model with *separately initialised random classification heads*, both reading
the *same* text (instruction + input), no demonstrations, loss ``0.5 · kl_div(log_softmax(student),
teacher_logits, batchmean) + 0.5 · CE``. Its bugs, each named: (1) the teacher has no context the
student lacks, so nothing is distilled but a random head's preferences; (2) the KL target is the
teacher's *raw logits*, not probabilities (``released_logit_target=true``; ``false`` uses
``softmax`` as intended) — and PyTorch's ``kl_div`` of a negative target is NaN, which our loop
stops with ``TrainingDiverged`` rather than training on; (3) the teacher's head is random, so its
"knowledge" is noise. The frozen teacher's logits are again computed once before training
(identical to re-running a frozen copy, without the memory).
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from fewtune.config import StrictModel
from fewtune.errors import ConfigError, TrainingDiverged
from fewtune.methods._trainable import HeadParams, TrainableMethod, forward_seqs
from fewtune.methods.base import register
from fewtune.methods.icl import demonstration_prefix
from fewtune.methods.lora import apply_lora
from fewtune.models.adapter import backbone_and_head
from fewtune.scoring.heads import ClassifierNet, init_std, make_head
from fewtune.scoring.scorer import argmax_breaking_ties, score_prompts
from fewtune.tasks.base import Example
from fewtune.tasks.sampling import balanced_demonstrations
from fewtune.training.loop import Batch

MAX_DEFAULT_K = 16


class DistillParams(StrictModel):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KL term; 1 − alpha weights the CE term")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of both distributions (KL scaled by T²)")
    k: int | None = Field(None, ge=0, description="teacher demonstrations (balanced); default: as many as possible, ≤ 16")
    pool: Literal["few-shot", "train"] = Field("few-shot", description="student's training inputs: the few-shot sample or the train pool")
    pool_size: int | None = Field(None, ge=1, description="pool=train: how many pool examples (seeded; default all)")
    labels: bool = Field(True, description="add the CE term on gold labels (false: pure KL)")
    restrict_to_verbalizer: bool = Field(False, description="CE over the verbalizer logits only (default: full vocabulary)")
    student: Literal["full", "lora"] = Field("full", description="full fine-tuning or a LoRA adapter")
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(8, gt=0)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    lora_target_modules: list[str] | None = None


def distill_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-example ``T² · KL(p_T ‖ q_T)`` over the verbalizer, renormalised.

    ``student_logits`` [B, C]: the student's logits of the verbalizer tokens; ``teacher_logp``
    [B, C]: the teacher's log-probs of the same tokens (any per-row constant shift is irrelevant:
    both are renormalised among the C tokens after dividing by T)."""
    t = temperature
    p_log = torch.log_softmax(teacher_logp.float() / t, dim=-1)
    q_log = torch.log_softmax(student_logits.float() / t, dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(dim=-1) * t * t


def _seed_for(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


@register
class Distill(TrainableMethod):
    name = "distill"
    summary = "context distillation: student (pattern only) matches the frozen instruction+k-demo teacher on the verbalizer"
    Params = DistillParams
    default_objective = "lm"

    @classmethod
    def trains_on_sample(cls, params: dict) -> bool:
        return params.get("pool", "few-shot") == "few-shot"

    # ------------------------------------------------------------------ data

    def training_examples(self, sample: list[Example]) -> list[Example]:
        p, ctx = self.params, self.ctx
        self.sample = sample
        if p.pool == "few-shot":
            return sample
        self.shared_demos = balanced_demonstrations(sample, self._default_k(sample, leave_one_out=False), ctx.cfg.seed,
                                                    ctx.task.num_labels)
        demo_ids = {e.id for e in self.shared_demos}
        pool = [e for e in ctx.train_pool if e.id not in demo_ids]
        if not pool:
            raise ConfigError("params.pool=train but the run has no train pool", "use params.pool=few-shot")
        if p.pool_size is not None and p.pool_size < len(pool):
            rng = np.random.default_rng(ctx.cfg.seed)
            pool = [pool[int(i)] for i in sorted(rng.choice(len(pool), size=p.pool_size, replace=False))]
        return pool

    def _default_k(self, sample: list[Example], leave_one_out: bool) -> int:
        if self.params.k is not None:
            return self.params.k
        counts = Counter(e.label for e in sample)
        per = min(counts.get(lab, 0) for lab in range(self.ctx.task.num_labels)) - (1 if leave_one_out else 0)
        return max(0, min(MAX_DEFAULT_K, per * self.ctx.task.num_labels))

    def demonstrations_for(self, i: int, example: Example) -> list[Example]:
        """The teacher's demonstrations for training example ``i`` (see module docstring)."""
        if self.params.pool == "train":
            return self.shared_demos
        others = [e for e in self.sample if e.id != example.id]
        k = self._default_k(self.sample, leave_one_out=True)
        return balanced_demonstrations(others, k, _seed_for(self.ctx.cfg.seed, i), self.ctx.task.num_labels)

    def teacher_prompt(self, demos: list[Example], example: Example) -> tuple[str, str]:
        """(prefix, query): instruction + demonstrations, then separator + the pattern query —
        the ICL prompt with the task's instruction in front."""
        ctx = self.ctx
        sep = ctx.task.icl_separator
        parts = [s for s in (ctx.task.instruction, demonstration_prefix(ctx, demos) if demos else "") if s]
        prefix = sep.join(parts)
        query = ctx.pattern.query(example.fields)
        return prefix, (sep + query if prefix else query)

    # ---------------------------------------------------------------- teacher

    def before_build(self, examples: list[Example], seqs: list[list[int]]) -> None:
        """Teacher log-probs of the verbalizer tokens for every training example, once."""
        ctx = self.ctx
        groups: dict[str, list[int]] = {}
        queries: list[str] = []
        demo_sets = []
        for i, ex in enumerate(examples):
            demos = self.demonstrations_for(i, ex)
            prefix, query = self.teacher_prompt(demos, ex)
            groups.setdefault(prefix, []).append(i)
            queries.append(query)
            demo_sets.append(len(demos))
        logp = np.full((len(examples), ctx.task.num_labels), np.nan)
        tokens = 0
        task_id = ctx.progress.add_task("  teacher", total=len(examples)) if ctx.progress is not None else None
        advance = (lambda k: ctx.progress.advance(task_id, k)) if task_id is not None else None
        try:
            for prefix, idx in groups.items():
                sc = score_prompts(ctx.lm.model, ctx.lm.tokenizer, [queries[i] for i in idx], ctx.verbalizer.token_ids,
                                   prefix=prefix, batch_size=ctx.cfg.eval_batch_size, max_context=ctx.cfg.max_context,
                                   precision=ctx.precision, on_batch=advance)
                logp[idx] = sc.label_logprobs
                tokens += sc.tokens_scored
        finally:
            if task_id is not None:
                ctx.progress.remove_task(task_id)
        skipped = np.isnan(logp).any(axis=1)
        if skipped.all():
            raise ConfigError("every teacher prompt is longer than max_context", "use fewer demonstrations (params.k)")
        if skipped.any():
            self._warnings.append(f"{int(skipped.sum())} teacher prompts exceed max_context={ctx.cfg.max_context} tokens; "
                                  "those examples train on the CE term only (their KL term is 0)")
        self.teacher_logp = torch.tensor(np.nan_to_num(logp, nan=0.0), dtype=torch.float32)
        self.teacher_valid = torch.tensor(~skipped)
        self.teacher_tokens = tokens
        gold = np.array([e.label for e in examples])
        teacher_pred = argmax_breaking_ties(logp, skipped, [e.id for e in examples])[0]
        self._info.update(
            teacher_k=int(np.median(demo_sets)) if demo_sets else 0,
            teacher_prompts_skipped=int(skipped.sum()),
            teacher_train_accuracy=float((teacher_pred[~skipped] == gold[~skipped]).mean()),
            student_examples=len(examples), pool=self.params.pool,
            leave_one_out=self.params.pool == "few-shot",
        )
        if self.params.pool == "train":
            self._info["demonstration_ids"] = [e.id for e in self.shared_demos]

    def adapt_model(self) -> None:
        p = self.params
        if p.student == "lora":
            self.peft_model = apply_lora(self.ctx.lm.model, r=p.lora_r, alpha=p.lora_alpha, dropout=p.lora_dropout,
                                         target_modules=p.lora_target_modules, seed=self.ctx.cfg.model_seed)

    # ------------------------------------------------------------------- loss

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        p = self.params
        verb = logits if p.restrict_to_verbalizer else logits[:, list(self.ctx.verbalizer.token_ids)]
        valid = self.teacher_valid.to(logits.device)[batch.idx]
        kl_rows = distill_kl(verb, self.teacher_logp.to(logits.device)[batch.idx], p.temperature)
        # A mean of per-example terms (0 where the teacher's prompt was skipped), not a mean over
        # the valid rows: the data-parallel loop weights each process's mean by its share of the
        # global batch, which gives the global batch's mean only for a per-example mean.
        kl = (kl_rows * valid).sum() / len(kl_rows)
        if not p.labels:
            return kl
        return p.alpha * kl + (1 - p.alpha) * self.supervised_loss(logits, batch)

    def extra_summary(self) -> dict:
        return {"teacher_tokens": self.teacher_tokens, "train_tokens": self.train_result.train_tokens + self.teacher_tokens,
                "effective_alpha": 1.0 if not self.params.labels else self.params.alpha}

    def chance_loss(self) -> None:
        """The KL + CE mixture has no single uniform-prediction value; collapse shows in the
        predictions instead (``metrics.prediction_collapse``)."""
        return None


class DistillReleasedParams(HeadParams):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KL term (released: 0.5)")
    released_logit_target: bool = Field(True, description="KL target = the teacher's raw logits (the released bug); false: probabilities")
    pool: Literal["few-shot", "train"] = Field("few-shot", description="few-shot sample, or the train pool (the released full-data CD)")
    pool_size: int | None = Field(None, ge=1, description="pool=train: how many pool examples (seeded; default all)")


@register
class DistillReleased(TrainableMethod):
    name = "distill-released"
    summary = "the study's released 'context distillation': same input for teacher and student, random heads (parity only)"
    Params = DistillReleasedParams
    default_objective = "classifier"

    @classmethod
    def trains_on_sample(cls, params: dict) -> bool:
        return params.get("pool", "few-shot") == "few-shot"

    def input_text(self, example: Example) -> str:
        """Instruction + input for both teacher and student (the released code's setup)."""
        instr = self.ctx.task.instruction
        query = self.ctx.pattern.query(example.fields)
        return f"{instr} {query}" if instr else query

    def training_examples(self, sample: list[Example]) -> list[Example]:
        p, ctx = self.params, self.ctx
        if p.pool == "few-shot":
            return sample
        pool = list(ctx.train_pool)
        if p.pool_size is not None and p.pool_size < len(pool):
            rng = np.random.default_rng(ctx.cfg.seed)
            pool = [pool[int(i)] for i in sorted(rng.choice(len(pool), size=p.pool_size, replace=False))]
        return pool

    def before_build(self, examples: list[Example], seqs: list[list[int]]) -> None:
        """The frozen teacher — base model + its own random head — on the same inputs, once."""
        ctx = self.ctx
        model = ctx.lm.model
        body, _ = backbone_and_head(model)
        teacher_head = make_head(self.params.head, model.config.hidden_size, ctx.task.num_labels,
                                 seed=ctx.cfg.model_seed + 1, std=init_std(model),
                                 dropout=self.params.head_dropout).to(ctx.device)
        self.teacher_logits, self.teacher_tokens = forward_seqs(
            ClassifierNet(body, teacher_head), seqs, pad_id=ctx.lm.tokenizer.pad_token_id,
            batch_size=ctx.cfg.eval_batch_size, precision=ctx.precision, device=ctx.device)
        self._info.update(teacher="base model + separately initialised random head (frozen)",
                          released_logit_target=self.params.released_logit_target, student_examples=len(examples))

    def fit(self, sample: list[Example]) -> dict:
        try:
            return super().fit(sample)
        except TrainingDiverged as e:
            negative = int((self.teacher_logits < 0).sum()) if hasattr(self, "teacher_logits") else 0
            if self.params.released_logit_target and negative:
                raise TrainingDiverged(
                    f"{e.message}: {negative} of the teacher's {self.teacher_logits.numel()} logits are negative, and the "
                    "released loss uses raw logits as the KL target (PyTorch's kl_div of a negative target is NaN)",
                    "this is the released code's bug reproduced; set params.released_logit_target=false for the "
                    "intended probabilities",
                ) from None
            raise

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        t = self.teacher_logits.to(logits.device)[batch.idx]
        target = t if self.params.released_logit_target else torch.softmax(t, dim=-1)
        kl = F.kl_div(torch.log_softmax(logits, dim=-1), target, reduction="batchmean")
        return self.params.alpha * kl + (1 - self.params.alpha) * self.supervised_loss(logits, batch)

    def extra_summary(self) -> dict:
        return {"teacher_tokens": self.teacher_tokens, "train_tokens": self.train_result.train_tokens + self.teacher_tokens}

    def chance_loss(self) -> None:
        return None  # KL to a frozen random teacher + CE: no single uniform-prediction value
