"""Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` learned input embeddings prepended to
every input, the model frozen; peft's ``PromptTuningConfig``. Runs through ``_prompted.PromptedLM``
(peft injects the prompt in its wrapper's forward, which fewtune does not call).

Initialisation (``params.init``):
- ``text`` (default): the embeddings of the task's instruction (``Task.instruction``, or
  ``params.init_text``), tokenised and repeated/cut to ``num_virtual_tokens`` — what peft's
  ``PromptTuningInit.TEXT`` does, done here with the run's own tokenizer (peft would reload a
  tokenizer by hub name, which the embedded model does not have).
- ``random``: embeddings of tokens drawn uniformly from the vocabulary (seeded by the model seed),
  Lester et al.'s sampled-vocabulary init; peft's ``RANDOM`` draws N(0, 1), orders of magnitude
  off the embedding scale of small models.

Learning rate: prompt tuning wants large rates (Lester et al.: 0.3 with Adafactor; peft's
examples 3e-2 with AdamW); the run's ``train.lr`` applies.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fewtune.errors import ConfigError
from fewtune.methods._prompted import PromptLearningMethod, PromptParams
from fewtune.methods.base import register


class PromptTuningParams(PromptParams):
    init: Literal["text", "random"] = Field("text", description="text: embeddings of the task instruction (or init_text); random: random vocabulary tokens")
    init_text: str | None = Field(None, description="text for init=text (default: the task's instruction)")


@register
class PromptTuning(PromptLearningMethod):
    name = "prompt-tuning"
    summary = "peft prompt tuning: learned virtual input tokens (init: task instruction or random), model frozen; head or PBFT"
    Params = PromptTuningParams
    peft_name = "prompt tuning"

    def prompt_config(self):
        from peft import PromptTuningConfig, PromptTuningInit

        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.params.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.RANDOM)

    def init_ids(self) -> list[int]:
        """The token ids whose embeddings start the virtual tokens."""
        n, tok = self.params.num_virtual_tokens, self.ctx.lm.tokenizer
        if self.params.init == "random":
            gen = torch.Generator().manual_seed(self.ctx.cfg.model_seed)
            return torch.randint(len(tok), (n,), generator=gen).tolist()
        text = self.params.init_text or self.ctx.task.instruction
        if not text:
            raise ConfigError(f"task '{self.ctx.task.name}' has no instruction to initialise the prompt from",
                              "set params.init_text or params.init=random")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return (ids * (n // len(ids) + 1))[:n]

    def init_prompt(self) -> None:
        ids = self.init_ids()
        emb = self.ctx.lm.model.get_input_embeddings()
        enc = self.peft_model.prompt_encoder[self.peft_model.active_adapter].embedding
        with torch.no_grad():
            enc.weight.copy_(emb.weight[torch.tensor(ids, device=emb.weight.device)].to(enc.weight.dtype))
        self._info.update(init=self.params.init, init_tokens=len(ids),
                          init_text=(self.params.init_text or self.ctx.task.instruction) if self.params.init == "text" else None)
