"""One place that knows a model family: what fewtune needs to know about a causal LM beyond
"it has a body and an LM head", chosen from ``config.model_type`` with a generic default.

Why: scoring, PBFT's loss and distillation's targets apply the LM head to one hidden state per
example (never a ``[B, L, vocab]`` tensor), so they bypass ``*ForCausalLM.forward`` — and with
it whatever that forward does to the logits after the head: Gemma-2/3's
``final_logit_softcapping`` (``cap·tanh(x/cap)``), Cohere's ``logit_scale`` (``x·s``), Granite's
``logits_scaling`` (``x/s``). Without the adapter, fewtune's log-probs differ from the model's own
output on those families. Likewise adaptive FT needs the decoder stack and the final norm, LoRA
its default target modules, and scoring whether the shared-prefix attention kernel can run.

Everything here is derived from the loaded model and its config; a family entry only states what
the config cannot tell (e.g. that its attention uses sliding windows the prefix kernel lacks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fewtune.errors import ConfigError

LogitTransform = Callable[[torch.Tensor], torch.Tensor]

# Families whose attention the shared-prefix kernel cannot reproduce (sliding-window layers,
# attention soft-capping, ALiBi, non-standard caches): scoring goes straight to the naive path
# instead of running the prefix and discovering it (the runtime check stays as the safety net).
_NO_PREFIX_CACHE = {
    "gemma2": "Gemma-2 uses sliding-window layers and attention soft-capping",
    "gemma3": "Gemma-3 uses sliding-window layers",
    "gemma3_text": "Gemma-3 uses sliding-window layers",
    "bloom": "BLOOM uses ALiBi attention",
    "falcon": "Falcon's attention does not use transformers' attention interface",
}
# Families that multiply their logits by ``config.logit_scale`` (other models use that name for
# unrelated things, e.g. CLIP, so it is not read generically).
_LOGIT_SCALE_FAMILIES = {"cohere", "cohere2"}


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass(frozen=True)
class ModelAdapter:
    """What fewtune needs to know about one model family (``family`` is ``config.model_type``)."""

    family: str
    softcap: float | None = None  # final_logit_softcapping
    scale: float | None = None  # logits are multiplied by this (Cohere)
    divide: float | None = None  # logits are divided by this (Granite)
    prefix_cache_reason: str | None = None  # why the shared-prefix cache is unsupported, or None

    # -- body and head ---------------------------------------------------------------------------

    @staticmethod
    def body(model: nn.Module) -> nn.Module:
        """The transformer body (hidden states), peft-wrapped or not."""
        inner = _unwrap(model)
        return getattr(inner, inner.base_model_prefix)

    @staticmethod
    def lm_head(model: nn.Module) -> nn.Module:
        return _unwrap(model).get_output_embeddings()

    # -- logits ----------------------------------------------------------------------------------

    @property
    def logit_transform(self) -> LogitTransform | None:
        """What the family's ``forward`` does to ``lm_head``'s output, as a function of fp32 logits
        (elementwise, so it commutes with computing only some vocabulary rows); None if nothing."""
        if self.softcap is None and self.scale is None and self.divide is None:
            return None
        return self.postprocess

    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the family's logit post-processing, in the same order as transformers does."""
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    # -- structure (adaptive FT, LoRA, scoring) -------------------------------------------------------

    @staticmethod
    def decoder_layers(model: nn.Module) -> nn.ModuleList:
        """The stack of decoder blocks: the largest ``ModuleList`` of the body (``layers``,
        ``decoder.layers``, ``h``, …), which must have ``num_hidden_layers`` entries."""
        body = ModelAdapter.body(model)
        lists = [m for m in body.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        if not lists:
            raise ConfigError("cannot find the decoder layers of this model",
                              "use a Hugging Face decoder-only model (Llama, OPT, GPT-NeoX, GPT-2 …)")
        best = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
        num_layers = getattr(_unwrap(model).config, "num_hidden_layers", None)
        if num_layers is not None and len(best) != num_layers:
            raise ConfigError(f"found {len(best)} decoder blocks, the config says {num_layers}",
                              "this architecture is not supported by adaptive fine-tuning")
        return best

    @staticmethod
    def final_norm(model: nn.Module) -> nn.Module | None:
        """The norm applied after the last decoder block (``norm``, ``ln_f``, ``final_layer_norm``,
        ``final_layernorm``), or None for a model without one (e.g. OPT-350m)."""
        body = ModelAdapter.body(model)
        for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm"):
            for holder in (body, getattr(body, "decoder", None)):
                mod = getattr(holder, name, None) if holder is not None else None
                if isinstance(mod, nn.Module):
                    return mod
        return None

    def lora_targets(self) -> list[str]:
        """peft's default LoRA target modules for this family."""
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

        targets = MAPPING.get(self.family)
        if not targets:
            raise ConfigError(f"peft has no default LoRA target modules for model type '{self.family}'",
                              "set params.target_modules, e.g. [q_proj, v_proj]")
        return list(targets)

    @property
    def prefix_cache_supported(self) -> bool:
        return self.prefix_cache_reason is None


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of a loaded model (peft-wrapped or not), from its config."""
    config = getattr(_unwrap(model), "config", None)
    family = str(getattr(config, "model_type", None) or "generic")
    scale = getattr(config, "logit_scale", None) if family in _LOGIT_SCALE_FAMILIES else None
    return ModelAdapter(
        family=family,
        softcap=_positive(getattr(config, "final_logit_softcapping", None)),
        scale=float(scale) if isinstance(scale, (int, float)) and scale != 1 else None,
        divide=_positive(getattr(config, "logits_scaling", None), skip_one=True),
        prefix_cache_reason=_NO_PREFIX_CACHE.get(family),
    )


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token one it already has: EOS, else UNK, else BOS.

    Padding is on the right and masked, and pads' outputs are never read, so any existing token
    serves; adding a new token would change the vocabulary and need resized embeddings. A
    tokenizer with none of these is rejected with a clear error rather than failing in a batch."""
    if tokenizer.pad_token is not None:
        return
    for name in ("eos_token", "unk_token", "bos_token"):
        if getattr(tokenizer, name, None) is not None:
            tokenizer.pad_token = getattr(tokenizer, name)
            return
    raise ConfigError("the model's tokenizer defines no pad, eos, unk or bos token, so batches cannot be padded",
                      "add a pad_token (or eos_token) to the model's tokenizer_config.json / special_tokens_map.json")


def _positive(v, skip_one: bool = False) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and not (skip_one and v == 1):
        return float(v)
    return None


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body and the LM head (``ModelAdapter.body`` / ``lm_head``)."""
    return ModelAdapter.body(model), ModelAdapter.lm_head(model)
