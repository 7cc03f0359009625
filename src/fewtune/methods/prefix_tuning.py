"""Prefix tuning (Li & Liang 2021): learned keys/values for ``num_virtual_tokens`` positions in
every attention layer, which every real token attends to; the model frozen. peft's
``PrefixTuningConfig`` (grouped-query attention handled by peft: the prefix has the model's
key/value heads). Runs through ``_prompted.PromptedLM``, which passes the prefix as the body's
``past_key_values`` exactly as peft's forward does.

``projection=true`` reparameterises the prefix through a two-layer MLP (``prefix_projection``,
Li & Liang's stabiliser; many more trained parameters); off by default, as in peft.
"""

from __future__ import annotations

from pydantic import Field

from fewtune.methods._prompted import PromptLearningMethod, PromptParams
from fewtune.methods.base import register


class PrefixTuningParams(PromptParams):
    num_virtual_tokens: int = Field(10, ge=1, le=512, description="prefix positions per layer (Li & Liang: 10 for generation)")
    projection: bool = Field(False, description="reparameterise the prefix through an MLP (prefix_projection)")


@register
class PrefixTuning(PromptLearningMethod):
    name = "prefix-tuning"
    summary = "peft prefix tuning: learned per-layer key/value prefix, model frozen; head or PBFT"
    Params = PrefixTuningParams
    peft_name = "prefix tuning"
    supports_gradient_checkpointing = False  # the prefix cache would be appended to twice (recomputation)

    def prompt_config(self):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.params.num_virtual_tokens,
                                  prefix_projection=self.params.projection)
