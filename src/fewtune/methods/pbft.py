"""Pattern-based fine-tuning (PBFT), and the study's released variant.

``pbft`` — Mosbach et al.'s definition (llmft ``OPTWithLMClassifier``): the pattern query goes
through the model and its own LM head; the loss is cross-entropy over the *full vocabulary* at the
answer position with the gold label's verbalizer token as target, so the model also learns to
put its mass on the verbalizer. ``params.restrict_to_verbalizer`` trains CE over the verbalizer
logits only (llmft's ``--target_tokens_logits_only`` applies this at prediction). Predictions:
accuracy among the verbalizer tokens, plus the fraction of full-vocabulary argmaxes outside the
verbalizer and llmft's full-vocabulary accuracy (reported by the runner).

``pbft-released`` — what produced the study's "PBFT" numbers: the released notebooks never use the
LM head or a verbalizer; they train the same random classification head as vanilla FT, and only
the input text changes to a prompt (CoLA ``"Yes or No?" + sentence``, MNLI ``"{premise} Question:
{hypothesis} Yes or No?"`` — the tasks' ``released`` pattern). Kept, under its own name, so the
study's numbers can be compared like for like. It reads ``params.pattern`` (default
``released``), not the run's ``--pattern``, so that ``--method pbft-released`` alone reproduces it.
"""

from __future__ import annotations

from pydantic import Field

from fewtune.methods._trainable import HeadParams, LMParams, TrainableMethod
from fewtune.methods.base import register
from fewtune.tasks.base import Example


class PBFTParams(LMParams):
    """Options of PBFT (LM head + verbalizer)."""


@register
class PBFT(TrainableMethod):
    name = "pbft"
    summary = "LM head + verbalizer: CE over the full vocabulary at the answer position (Mosbach et al.)"
    Params = PBFTParams
    default_objective = "lm"


class PBFTReleasedParams(HeadParams):
    pattern: str = Field("released", description="the prompt the classifier reads (the study's: 'released')")


@register
class PBFTReleased(TrainableMethod):
    name = "pbft-released"
    summary = "the study's released 'PBFT': random classification head + prompt text, no verbalizer (parity only)"
    Params = PBFTReleasedParams
    default_objective = "classifier"

    def input_text(self, example: Example) -> str:
        return self.ctx.task.pattern(self.params.pattern).query(example.fields)

    def extra_summary(self) -> dict:
        return {"prompt_pattern": self.params.pattern}
