"""What a run's result depends on beyond its config: the run's *identity* inputs.

The run id hashes the resolved config. The same config can still give different numbers when the
code, the data or the hardware change, so ``resolve`` adds an ``identity`` block to the config —
and therefore to the hash and to ``config.yaml`` — with:

- ``fewtune_version`` and, when fewtune runs from a git checkout (``<root>/src/fewtune`` with
  ``<root>/.git`` and ``<root>/pyproject.toml``), the checkout's HEAD ``git_commit``. Uncommitted
  edits are not detected (no "dirty" marker): commit before a study you want to tell apart.
- ``task_digest``: for a custom task given as a YAML path, sha256 over the YAML's bytes and each
  local data file's sha256 (memoised per path/size/mtime, so a study hashes each file once per
  process). Hub splits enter by name (dataset/config/split). Built-in tasks: ``None`` — their
  files are pinned by checksums in the code, which the version covers.
- ``model_digest``: for a local model directory, sha256 over ``config.json``'s bytes and the
  name, size and modification time of every file (recursively, hidden files excepted). Cheap — no
  weights are read — and honest in the direction that matters: any rewritten weight file changes
  its size or mtime, so a changed model is never mistaken for the old one. The price: copying
  the directory without keeping mtimes (``cp`` without ``-p``) makes its runs look new and they
  run again. The embedded model: the version of the package that ships it. A hub id: ``None``
  (identified by its name; pin a revision by downloading it to a local directory).
- ``device`` (``cpu``/``cuda``) and ``precision``: what ``auto`` resolves to on this machine, so a
  study moved to a GPU does not mix its numbers with the CPU's.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from fewtune.config import EMBEDDED_MODEL, RunConfig, RunIdentity
from fewtune.errors import ConfigError, DataError
from fewtune.models.tiny import is_tiny
from fewtune.study.store import DB_NAME, RunRecord, Store


def fewtune_version() -> str:
    try:
        return importlib.metadata.version("fewtune")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        from fewtune import __version__

        return __version__


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the git checkout fewtune is imported from, or None (an installed wheel)."""
    package = Path(__file__).resolve().parents[1]  # src/fewtune
    root = package.parent.parent
    if package.parent.name != "src" or not (root / "pyproject.toml").is_file():
        return None
    return read_git_head(root / ".git")


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


def compute_identity(cfg: RunConfig) -> RunIdentity:
    """The identity block of ``cfg`` on this machine, with this code and these files."""
    dev, precision = _device_precision(cfg.precision)
    return RunIdentity(
        fewtune_version=fewtune_version(), git_commit=git_commit(), task_digest=task_digest(cfg.task),
        model_digest=model_digest(cfg.model), device=dev, precision=precision,
        model_dtype=_model_dtype(cfg.model_dtype, cfg.method),
    )


def config_key(config: dict) -> str:
    """Canonical JSON of a config without its identity: equal for the same run under another
    version/task file/model/device (how a study recognises stale results)."""
    return json.dumps({k: v for k, v in config.items() if k != "identity"}, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- stale study runs


@dataclass
class StaleRuns:
    """Results in a study directory that the current plan would produce again under another id:
    the same config, but another identity (fewtune version, task file, model, device)."""

    records: list[RunRecord] = field(default_factory=list)
    changes: dict[str, set[tuple[Any, Any]]] = field(default_factory=dict)  # identity field → {(old, new)}

    def __len__(self) -> int:
        return len(self.records)

    def message(self) -> str:
        what = "; ".join(f"{k} {_short(a)} → {_short(b)}" for k, pairs in sorted(self.changes.items()) for a, b in sorted(pairs, key=str))
        return (f"{len(self)} runs are stale (results from another fewtune version/task file/model/device"
                + (f": {what}" if what else "") + ")")


def _short(value: Any) -> str:
    return "none" if value is None else str(value)[:12]


def stale_runs(records: Iterable[RunRecord], planned: Iterable[tuple[str, dict]]) -> StaleRuns:
    """Finished or failed ``records`` whose config equals a planned config except for the identity
    block, and whose id is not planned (the planned run is the same experiment under the current
    identity). ``planned``: (run id, resolved config as JSON) pairs. Runs of an older study config
    that the plan no longer has are not stale, just unlisted."""
    ids, by_key = set(), {}
    for run_id, cfg in planned:
        ids.add(run_id)
        by_key[config_key(cfg)] = cfg
    out = StaleRuns()
    for r in records:
        match = by_key.get(config_key(r.config))
        if r.status not in ("done", "failed") or r.run_id in ids or match is None:
            continue
        out.records.append(r)
        old, new = r.config.get("identity") or {}, match.get("identity") or {}
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                out.changes.setdefault(k, set()).add((old.get(k), new.get(k)))
    return out


def stale_in_study(study_dir: Path, planned: Iterable[tuple[str, dict]]) -> StaleRuns:
    """``stale_runs`` of a study directory (none if it holds no study yet)."""
    if not (Path(study_dir) / DB_NAME).is_file():
        return StaleRuns()
    try:
        with Store(study_dir, create=False) as store:
            return stale_runs(store.runs(), planned)
    except DataError:  # a damaged database: the study sets it aside and rebuilds it from runs/
        return StaleRuns()


def guard_stale(study_dir: Path, planned: Iterable[tuple[str, dict]], *, rerun_stale: bool) -> StaleRuns:
    """Refuse to resume a study whose results were made under another identity unless the user
    asks to re-run them: silently running the new ids would spend the study's compute again, and
    the user should know why (an upgrade, an edited task file, another device)."""
    stale = stale_in_study(study_dir, planned)
    if stale and not rerun_stale:
        raise ConfigError(
            f"{stale.message()}; the report leaves them out",
            "run them again under the current identity with --rerun-stale (the old results stay in the database, "
            "unreported), or use a new --out directory",
        )
    return stale
