"""What prompt tuning and prefix tuning share: a view of the causal LM that injects the learned
virtual tokens, so the rest of fewtune (classifier/LM nets, ``score_prompts``) runs it unchanged.

Why a view: peft injects soft prompts in ``PeftModelForCausalLM.forward`` — the *wrapper* — not in
the transformer body. fewtune never calls that forward (it would project every position onto
the 49k vocabulary); it runs the body and applies a head at one position
(``scoring.last_hidden``). Running the bare body would silently drop the virtual tokens, so
``PromptedBody`` does what peft's forward does, on the body:

- prompt tuning: ``[virtual embeddings ; token embeddings]`` with the mask extended by ones; the
  virtual positions are cut from the output, so the caller's last-real-token indices still hold.
- prefix tuning: the learned per-layer keys/values as ``past_key_values`` (peft's ``get_prompt``),
  the mask extended by ones; positions continue after the prefix, as in peft.

The shared-prefix KV cache of ICL scoring (``scoring._score_cached``) is never used with this
view: the trainable methods score without a shared prefix (the naive path), and should a prefix
be scored through the view, ``PromptedBody`` returns no KV cache, so ``score_prompts`` falls back
to the naive path and says so in ``Scores.note`` (tested) — the cached path's attention would
otherwise bypass the virtual tokens.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from fewtune.errors import ConfigError
from fewtune.methods._peft_saving import SavesAdapter
from fewtune.methods._trainable import ObjectiveParams, TrainableMethod
from fewtune.models.loading import backbone_and_head


class PromptedBody(nn.Module):
    """The transformer body of a prompt-learning ``PeftModel``, with its virtual tokens injected."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        from peft import PeftType

        self.peft_model = peft_model
        self.body = backbone_and_head(peft_model)[0]
        cfg = peft_model.active_peft_config
        self.n_virtual = int(cfg.num_virtual_tokens)
        self.is_prefix = cfg.peft_type == PeftType.PREFIX_TUNING
        # transformers ≥ 5.2x renamed the body's ``past_key_values`` to ``cache`` (the old name warns)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.body.forward).parameters else "past_key_values"

    def get_input_embeddings(self) -> nn.Module:
        return self.body.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False, **kw) -> BaseModelOutput:
        b, n = input_ids.shape[0], self.n_virtual
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)
        if self.is_prefix:
            past = self.peft_model.get_prompt(b, max_cache_len=input_ids.shape[1] + n)
            kw[self._cache_kw] = past
            out = self.body(input_ids=input_ids, attention_mask=mask, use_cache=True, **kw)
            return BaseModelOutput(last_hidden_state=out.last_hidden_state)
        emb = self.body.get_input_embeddings()(input_ids)
        prompts = self.peft_model.get_prompt(b).to(emb.dtype)
        out = self.body(inputs_embeds=torch.cat([prompts, emb], dim=1), attention_mask=mask, use_cache=False, **kw)
        return BaseModelOutput(last_hidden_state=out.last_hidden_state[:, n:])


class PromptedLM(nn.Module):
    """A causal LM as ``models.backbone_and_head`` sees it: body = ``PromptedBody``, head = the
    base model's (frozen) LM head. Holds the peft model, so its parameters are the run's."""

    base_model_prefix = "prompted"

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.prompted = PromptedBody(peft_model)
        base = peft_model.get_base_model()
        self.lm_head = base.get_output_embeddings()
        self.config = base.config

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


class PromptParams(ObjectiveParams):
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="learned virtual tokens")
    save_dir: str | None = Field(None, description="write the trained prompt (and head) here after training")


class PromptLearningMethod(SavesAdapter, TrainableMethod):
    """Template: a subclass gives the peft config (``prompt_config``) and may initialise it."""

    peft_name: ClassVar[str] = ""
    trains_base_weights = False  # the virtual tokens (and the head) train; the model stays frozen

    def prompt_config(self):
        raise NotImplementedError

    def init_prompt(self) -> None:
        """Initialise the virtual tokens after peft created them (default: peft's init)."""

    def adapt_model(self) -> None:
        from peft import get_peft_model

        torch.manual_seed(self.ctx.cfg.model_seed)
        try:
            self.peft_model = get_peft_model(self.ctx.lm.model, self.prompt_config())
        except (ValueError, TypeError) as e:
            raise ConfigError(f"cannot apply {self.peft_name}: {str(e).splitlines()[0]}",
                              "prompt learning needs a Hugging Face decoder-only model") from None
        self.init_prompt()
        self.view = PromptedLM(self.peft_model)
        self._info.update(num_virtual_tokens=self.params.num_virtual_tokens, shared_prefix_cache="not used")

    def scoring_model(self) -> nn.Module:
        return getattr(self, "view", None) or self.ctx.lm.model


def load_prompted(base_model: nn.Module, path: Path) -> tuple[PromptedLM, nn.Module | None]:
    """A saved prompt/prefix (and head) on a freshly loaded base model: (view, head or None)."""
    from fewtune.methods.lora import load_adapter

    peft_model, head = load_adapter(base_model, path)
    return PromptedLM(peft_model).eval(), head
