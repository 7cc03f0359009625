"""What a run's result depends on beyond its config: the run's *identity* inputs.

The run id hashes the resolved config. The same config can still give different numbers when the
code, the libraries, the data, the hardware or the way the run was computed change, so
``resolve`` adds an ``identity`` block to the config — and therefore to the hash and to
``config.yaml``. docs/identity.md is the user's account of it; in short:

- ``code_digest``: sha256 over the relative path and the bytes of every file of the imported
  ``fewtune`` package (``src/fewtune/**``: its ``.py`` files, the built-in task and preset YAML,
  templates — whatever ships in the package), skipping only ``__pycache__``, compiled ``.pyc``,
  hidden files and editor backups (``name~``). Any edit under ``src/fewtune`` — committed or not —
  changes it; a README, test, benchmark or ``pyproject.toml`` change does not. Computed once per
  process (about 1 MB read).
- ``libraries``: the installed versions of torch, transformers, peft and accelerate (the
  libraries that compute a result; ``pip install -U transformers`` changes every id).
- ``task_digest``: for a custom task given as a YAML path, sha256 over the YAML's bytes and each
  local data file's sha256 (memoised per path/size/mtime). Hub splits enter by name. Built-in
  tasks: ``None`` — their files are pinned by checksums in the code, which ``code_digest`` covers.
- ``model_digest``: for a local model directory, sha256 over ``config.json``'s bytes and the
  name, size and modification time of every file (no weights are read; copying without keeping
  mtimes makes its runs look new). The embedded model (and ``tiny-random``, which uses its
  tokenizer): the installed package versions. A hub id: ``None`` (identified by its name).
- ``device`` (``cpu``/``cuda``), ``precision`` and ``model_dtype``: what ``auto`` resolves to here.
- ``threads`` (CPU only): the torch intra-op thread count the run computes with; float sums are
  split by thread, so 1 and 2 threads give different numbers. A study fixes it per study (the
  ``threads`` study key, see ``fewtune.study.config``); a lone ``fewtune run`` records its own.
- ``processes``: the number of data-parallel processes when more than one (omitted at 1, so the
  ids of single-process runs do not carry it): dropout masks are drawn per process.

Metadata — recorded in ``metrics.json`` (``provenance``), never hashed: the fewtune version, the
git commit of the checkout and whether ``src/fewtune`` had uncommitted changes. They say where
the code came from; ``code_digest`` says what it was.

Model names are normalised before hashing (``tiny-random:`` and ``tiny-random:llama`` are
``tiny-random``), so one model never runs under two ids.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from fewtune.config import EMBEDDED_MODEL, RunConfig, RunIdentity
from fewtune.models.tiny import is_tiny
from fewtune.training.distributed import process_count

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the imported fewtune package (src/fewtune)
IDENTITY_LIBRARIES = ("torch", "transformers", "peft", "accelerate")
_SKIPPED_SUFFIXES = (".pyc", ".pyo", "~")


def fewtune_version() -> str:
    try:
        return importlib.metadata.version("fewtune")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        from fewtune import __version__

        return __version__


def package_files(root: Path) -> Iterator[Path]:
    """The files of a package tree that ``code_digest`` covers, in a stable order."""
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if (p.is_file() and not any(s.startswith(".") or s == "__pycache__" for s in rel)
                and not p.name.endswith(_SKIPPED_SUFFIXES)):
            yield p


def package_digest(root: Path) -> str:
    """sha256 over the relative path and content of every file ``package_files`` lists."""
    h = hashlib.sha256()
    for p in package_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def code_digest() -> str:
    """``package_digest`` of the imported fewtune package, once per process."""
    return package_digest(PACKAGE_DIR)


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that compute results (``"absent"`` if one is missing)."""
    out = {}
    for name in IDENTITY_LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _checkout_root() -> Path | None:
    """The git checkout fewtune is imported from (``<root>/src/fewtune``), or None (a wheel)."""
    root = PACKAGE_DIR.parent.parent
    if PACKAGE_DIR.parent.name != "src" or not (root / "pyproject.toml").is_file():
        return None
    return root


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the git checkout fewtune is imported from, or None (an installed wheel)."""
    root = _checkout_root()
    return None if root is None else read_git_head(root / ".git")


@lru_cache(maxsize=1)
def git_dirty() -> bool | None:
    """Whether ``src/fewtune`` differs from the checkout's HEAD (None: no checkout, or no git)."""
    root = _checkout_root()
    if root is None or git_commit() is None:
        return None
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "src/fewtune"], cwd=root, capture_output=True,
                             text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip())


def provenance() -> dict[str, Any]:
    """Where the code came from: metadata beside the identity, never part of the run id."""
    return {"fewtune_version": fewtune_version(), "git_commit": git_commit(), "git_dirty": git_dirty(),
            "code_digest": code_digest()}


def read_git_head(dot_git: Path) -> str | None:
    """The commit HEAD points at, read from the files (no ``git`` process): handles a detached
    HEAD, loose and packed refs, and worktrees (``.git`` is a file ``gitdir: …``)."""
    try:
        if dot_git.is_file():
            dot_git = (dot_git.parent / dot_git.read_text().split("gitdir:", 1)[1].strip()).resolve()
        head = (dot_git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.split(":", 1)[1].strip()
        common = dot_git
        if (dot_git / "commondir").is_file():
            common = (dot_git / (dot_git / "commondir").read_text().strip()).resolve()
        for base in (dot_git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except (OSError, IndexError):
        return None
    return None


def _sha(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def task_digest(task: str) -> str | None:
    """Digest of a custom task file and its data (see module docstring); None for built-ins."""
    if not task.endswith((".yaml", ".yml")) or not Path(task).is_file():
        return None
    from fewtune.tasks import get_task
    from fewtune.tasks.custom import is_hub_split
    from fewtune.tasks.files import sha256_of

    t = get_task(task)
    parts = [hashlib.sha256(Path(task).read_bytes()).hexdigest()]
    for split in (t.train, *t.eval_sets.values()):
        path = Path(split.file.relpath)
        if is_hub_split(split) or not path.is_file():
            parts.append(f"{split.name}:{split.file.relpath}")  # missing files fail at load time
        else:
            parts.append(f"{split.name}:{sha256_of(path)}")
    return _sha(parts)


def model_digest(model: str) -> str | None:
    """Digest of a local model directory or of the embedded model's package (module docstring)."""
    from fewtune.models import embedded

    # tiny-random[:family] uses the embedded tokenizer
    emb = embedded.lookup(EMBEDDED_MODEL if is_tiny(model) else model)
    if emb is not None:
        return emb.digest()
    root = Path(model).expanduser()
    if not root.is_dir():
        return None
    config = root / "config.json"
    parts = [hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else "no config.json"]
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(s.startswith(".") for s in rel.parts):
            st = p.stat()
            parts.append(f"{rel.as_posix()}:{st.st_size}:{st.st_mtime_ns}")
    return _sha(parts)


@lru_cache(maxsize=8)
def _device_precision(requested: str) -> tuple[str, str]:
    from fewtune.models.loading import device, resolve_precision

    dev = device()
    return dev.type, resolve_precision(requested, dev)


@lru_cache(maxsize=32)
def _model_dtype(requested: str, method: str) -> str:
    from fewtune.methods import METHODS
    from fewtune.models.loading import resolve_model_dtype

    return resolve_model_dtype(requested, METHODS.get(method).keeps_base_frozen())


def run_threads() -> int:
    """The torch intra-op thread count this process computes with."""
    import torch

    return torch.get_num_threads()


def compute_identity(cfg: RunConfig, threads: int | None = None) -> RunIdentity:
    """The identity block of ``cfg`` on this machine, with this code and these files. ``threads``:
    the thread count the run will compute with (a study's ``threads``); default: this process's."""
    dev, precision = _device_precision(cfg.precision)
    procs = process_count()
    return RunIdentity(
        code_digest=code_digest(), libraries=library_versions(), task_digest=task_digest(cfg.task),
        model_digest=model_digest(cfg.model), device=dev, precision=precision,
        model_dtype=_model_dtype(cfg.model_dtype, cfg.method),
        threads=(threads or run_threads()) if dev == "cpu" else None, processes=procs if procs > 1 else None,
    )
