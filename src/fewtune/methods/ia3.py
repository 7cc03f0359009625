"""(IA)³ (Liu et al. 2022, "Few-shot parameter-efficient fine-tuning is better and cheaper than
in-context learning"): learned vectors that rescale the keys, values and the feed-forward
activations, initialised to 1 (the adapted model starts as the base model). peft's ``IA3Config``
with its default targets for the architecture (Llama: ``k_proj``, ``v_proj``, ``down_proj``, the
last one rescaling its input). The vectors are injected in place, so the backbone our nets run and
``score_prompts`` both run the adapted model; saved/reloaded like a LoRA adapter (``lora.save_adapter``).

Learning rate: (IA)³ vectors need large rates (the paper: 3e-3); the run's ``train.lr`` applies.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fewtune.errors import ConfigError
from fewtune.methods._peft_saving import SavesAdapter
from fewtune.methods._trainable import ObjectiveParams, TrainableMethod
from fewtune.methods.base import register


class IA3Options(ObjectiveParams):
    target_modules: list[str] | None = Field(None, description="modules whose output (or input, if feed-forward) is rescaled (default: peft's mapping)")
    feedforward_modules: list[str] | None = Field(None, description="of those, the ones rescaled at their input (default: peft's mapping)")
    save_dir: str | None = Field(None, description="write the trained vectors (and head) here after training")


@register
class IA3(SavesAdapter, TrainableMethod):
    name = "ia3"
    trains_base_weights = False  # the scaling vectors (and the head) train; the model stays frozen
    summary = "peft (IA)³: learned rescaling of keys, values and FFN activations + head (or the PBFT objective)"
    Params = IA3Options

    def adapt_model(self) -> None:
        from peft import IA3Config, get_peft_model

        p = self.params
        if (p.target_modules is None) != (p.feedforward_modules is None):
            raise ConfigError("params.target_modules and params.feedforward_modules go together",
                              "set both (feedforward_modules ⊆ target_modules) or neither (peft's defaults)")
        torch.manual_seed(self.ctx.cfg.model_seed)
        try:
            cfg = IA3Config(target_modules=p.target_modules, feedforward_modules=p.feedforward_modules)
            self.peft_model = get_peft_model(self.ctx.lm.model, cfg)
        except ValueError as e:
            raise ConfigError(f"cannot apply (IA)³: {str(e).splitlines()[0]}",
                              "set params.target_modules/feedforward_modules to the model's module names") from None
        c = self.peft_model.peft_config["default"]
        self._info.update(target_modules=sorted(c.target_modules), feedforward_modules=sorted(c.feedforward_modules))
