"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024), peft's ``LoraConfig(use_dora=True)``.

Each adapted weight is split into a magnitude vector (trained) and a direction that LoRA updates;
everything else — targets, rank, alpha, objective, head, saving/reloading — is LoRA's (``lora.py``),
so this file only switches the option on. DoRA costs more per step than LoRA (the direction's
column norms are recomputed every forward), which the run's resources record.
"""

from __future__ import annotations

from fewtune.methods.base import register
from fewtune.methods.lora import LoRA, LoRAOptions


class DoRAOptions(LoRAOptions):
    """LoRA's options; DoRA adds a trained magnitude per output row of each adapted weight."""


@register
class DoRA(LoRA):
    name = "dora"
    summary = "peft DoRA (LoRA with use_dora: trained magnitude + low-rank direction) + head (or the PBFT objective)"
    Params = DoRAOptions

    def lora_options(self) -> dict:
        return {**super().lora_options(), "use_dora": True}

    def extra_summary(self) -> dict:
        return {**super().extra_summary(), "use_dora": True}
