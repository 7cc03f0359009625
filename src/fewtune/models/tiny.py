"""Tiny random causal LMs of several families (``--model tiny-random:<family>``), for tests and
for checking that every method runs on an architecture, with no download.

Each is built from a small config (4 layers, d=64) and the embedded model's tokenizer; weights
are drawn at ``initializer_range`` 0.3 instead of the usual 0.02. Why: at 0.02 a random model
hardly reads its input (the " No"−" Yes" margin varies by ~0.2 nats across queries), so a scoring
bug — wrong positions, a misplaced mask, a bf16 head, missing logit post-processing — changes
log-probs by less than a test's tolerance. At 0.3 the margins vary by several nats between
queries and such bugs show far above tolerance, while training stays stable at test learning rates.

``tiny-random`` alone is the Llama one (its name before families existed).
"""

from __future__ import annotations

from typing import Any

import torch

from fewtune.errors import ConfigError

TINY_PREFIX = "tiny-random"
DEFAULT_FAMILY = "llama"

_SIZES = {"hidden": 64, "layers": 4, "heads": 4, "kv_heads": 2, "ffn": 128, "positions": 2048}

# Per family: the config keys for the shared sizes (families name them differently), and any
# fixed settings. Keys: hidden, layers, heads, ffn, positions, init, kv_heads (optional).
_KEYS: dict[str, dict[str, str]] = {
    "llama": {"kv_heads": "num_key_value_heads"},
    "qwen2": {"kv_heads": "num_key_value_heads"},
    "gemma2": {"kv_heads": "num_key_value_heads"},
    "gemma3": {"kv_heads": "num_key_value_heads"},
    "opt": {"ffn": "ffn_dim", "init": "init_std"},
    "gpt2": {"hidden": "n_embd", "layers": "n_layer", "heads": "n_head", "ffn": "n_inner", "positions": "n_positions"},
    "gpt_neox": {},
    "phi": {},
}
_STANDARD = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
             "ffn": "intermediate_size", "positions": "max_position_embeddings", "init": "initializer_range"}
_FIXED: dict[str, dict[str, Any]] = {
    # Gemma's attention scale is query_pre_attn_scalar**-0.5 (256 by default, for head_dim 256).
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16},
    "gemma3": {"head_dim": 16, "query_pre_attn_scalar": 16},
}
# transformers' model_type for a family name where they differ (Gemma-3's text-only model).
_MODEL_TYPE = {"gemma3": "gemma3_text"}

FAMILIES: tuple[str, ...] = tuple(_KEYS)


def is_tiny(spec: str) -> bool:
    return spec == TINY_PREFIX or spec.startswith(TINY_PREFIX + ":")


def canonical_name(spec: str) -> str:
    """One name per tiny model, so that one model never runs under two run ids: ``tiny-random:``
    and ``tiny-random:llama`` are ``tiny-random`` (its name before families existed)."""
    if is_tiny(spec) and (spec.partition(":")[2] or DEFAULT_FAMILY) == DEFAULT_FAMILY:
        return TINY_PREFIX
    return spec


def family_of(spec: str) -> str:
    """``tiny-random[:family]`` → the family; a ConfigError naming the choices if unknown."""
    family = spec.partition(":")[2] or DEFAULT_FAMILY
    if family not in _KEYS:
        raise ConfigError(f"unknown tiny model family '{family}'",
                          f"use tiny-random:<family> with one of: {', '.join(FAMILIES)}")
    return family


def tiny_config(tokenizer, family: str = DEFAULT_FAMILY, *, layers: int = _SIZES["layers"],
                hidden: int = _SIZES["hidden"], initializer_range: float = 0.3, **overrides: Any):
    """A small random config of ``family`` for ``tokenizer`` (``overrides`` are config keys)."""
    from transformers import AutoConfig

    keys = {**_STANDARD, **_KEYS[family]}
    sizes = {**_SIZES, "hidden": hidden, "layers": layers, "ffn": hidden * 2, "init": initializer_range}
    kwargs: dict[str, Any] = {keys[k]: v for k, v in sizes.items() if k in keys}
    kwargs.update(_FIXED.get(family, {}))
    if family == "opt":  # OPT projects embeddings to/from this width; no projection when equal
        kwargs["word_embed_proj_dim"] = hidden
    kwargs.update(vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    kwargs.update(overrides)
    return AutoConfig.for_model(_MODEL_TYPE.get(family, family), **kwargs)


def build_tiny(spec: str, tokenizer, seed: int = 0, *, load_kw: dict[str, Any] | None = None,
               **overrides: Any) -> tuple[torch.nn.Module, str]:
    """(random model, human-readable name) for ``tiny-random[:family]``; seeded, so reproducible.
    ``load_kw``: ``from_config`` options (dtype, attn_implementation); ``overrides``: config fields."""
    from transformers import AutoModelForCausalLM

    family = family_of(spec)
    config = tiny_config(tokenizer, family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **(load_kw or {}))
    return model, f"tiny random {family} ({config.num_hidden_layers} layers, d={config.hidden_size})"
