"""Zero-shot and in-context learning: no training, the prompt carries the task.

Demonstrations come from the run's few-shot sample (so ICL sees exactly the labelled examples the
fine-tuning methods see), balanced across labels and ordered by the data seed, joined with the
task's separator (llmft: " " for CoLA, "\\n\\n" for MNLI). An eval example whose prompt exceeds the
context is skipped and counted, never truncated. No calibration by default (as llmft);
``params.calibration`` applies contextual or batch calibration (``fewtune.scoring.calibration``).

All queries of a run share the same demonstrations, so by default they are scored on top of one
KV cache of the demonstrations (``scoring``'s prefix cache): only the query tokens run through
the model, ≈17× less work at 16-shot MNLI, with the same predictions as scoring every full
prompt (``prefix_cache: false``; the tests check both agree).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import Field

from fewtune.config import StrictModel
from fewtune.methods.base import Method, Predictions, register
from fewtune.scoring.calibration import CALIBRATION_HELP, Calibration
from fewtune.scoring.scorer import Scores, score_prompts
from fewtune.tasks.base import Example
from fewtune.tasks.sampling import balanced_demonstrations


class ZeroShotParams(StrictModel):
    calibration: Calibration = Field("none", description=CALIBRATION_HELP)

    omit_when: ClassVar[dict[str, Any]] = {"calibration": "none"}  # run ids from before the option


class ICLParams(ZeroShotParams):
    k: int | None = Field(None, ge=1, description="demonstrations (balanced); default: the whole few-shot sample")
    prefix_cache: bool = Field(True, description="encode the shared demonstrations once (KV cache)")


@register
class ZeroShot(Method):
    name = "zero-shot"
    summary = "the pattern alone, no demonstrations, no training"
    Params = ZeroShotParams
    trains = False
    uses_sample = False

    def predict(self, examples: list[Example], on_batch: Callable[[int], None] | None = None) -> Predictions:
        preds = Predictions.from_scores(self._score(self.ctx.queries(examples), on_batch), self.ctx.verbalizer.token_ids)
        return preds.calibrated(self.params.calibration, lambda: self._score(self.ctx.content_free_queries()).label_logprobs)

    def _score(self, queries: list[str], on_batch: Callable[[int], None] | None = None) -> Scores:
        ctx = self.ctx
        return score_prompts(ctx.lm.model, ctx.lm.tokenizer, queries, ctx.verbalizer.token_ids,
                             batch_size=ctx.cfg.eval_batch_size, max_context=ctx.cfg.max_context,
                             precision=ctx.precision, on_batch=on_batch)


def demonstration_prefix(ctx, demos: list[Example]) -> str:
    """The demonstrations, joined by the task's separator; queries are appended after a separator."""
    sep = ctx.task.icl_separator
    return sep.join(ctx.pattern.demonstration(e.fields, e.label) for e in demos)


@register
class ICL(Method):
    name = "icl"
    summary = "k labelled demonstrations in the prompt (from the few-shot sample), no training"
    Params = ICLParams
    trains = False

    demos: list[Example]
    scoring_paths: set[str]
    scoring_notes: list[str]

    def fit(self, sample: list[Example]) -> None:
        k = self.params.k or len(sample)
        self.demos = balanced_demonstrations(sample, k, self.ctx.cfg.seed, self.ctx.task.num_labels)
        self.scoring_paths, self.scoring_notes = set(), []
        return None

    def prompts(self, examples: list[Example]) -> tuple[str, list[str]]:
        """(shared prefix, per-example queries) as scored; also what ``--dry-run`` measures."""
        ctx = self.ctx
        return demonstration_prefix(ctx, self.demos), [ctx.task.icl_separator + q for q in ctx.queries(examples)]

    def predict(self, examples: list[Example], on_batch: Callable[[int], None] | None = None) -> Predictions:
        prefix, queries = self.prompts(examples)
        preds = Predictions.from_scores(self._score(prefix, queries, on_batch), self.ctx.verbalizer.token_ids)
        # Content-free inputs read the same demonstrations: the bias is that of this very prompt.
        sep = self.ctx.task.icl_separator
        return preds.calibrated(self.params.calibration, lambda: self._score(
            prefix, [sep + q for q in self.ctx.content_free_queries()]).label_logprobs)

    def _score(self, prefix: str, queries: list[str], on_batch: Callable[[int], None] | None = None) -> Scores:
        ctx = self.ctx
        scores = score_prompts(
            ctx.lm.model, ctx.lm.tokenizer, queries, ctx.verbalizer.token_ids,
            prefix=prefix, batch_size=ctx.cfg.eval_batch_size, max_context=ctx.cfg.max_context,
            precision=ctx.precision, on_batch=on_batch, use_prefix_cache=self.params.prefix_cache,
        )
        # Recorded so a run says how it was scored, and a silent fallback cannot hide.
        self.scoring_paths.add(scores.path)
        if scores.note and scores.note not in self.scoring_notes:
            self.scoring_notes.append(scores.note)
        return scores

    def describe(self) -> dict:
        return {"demonstration_ids": [e.id for e in self.demos], "scoring": sorted(self.scoring_paths)}

    def warnings(self) -> list[str]:
        return list(self.scoring_notes)
