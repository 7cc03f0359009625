"""Atomic file writes and temporary output directories.

Readers (and a resumed study after ``kill -9``) see the old or the new content, never a partial
file. Everything is created with the permissions the user's umask allows (like ``open``/``mkdir``
do), not ``tempfile``'s private 0600/0700: results are meant to be read by colleagues and web
servers.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from fewtune.errors import ConfigError, OutputError


def current_umask() -> int:
    """The process umask (there is no way to read it without setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: str | bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600 whatever the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_error(e: OSError, path: Path, doing: str) -> OutputError:
    """A clear message for an OS refusal to write (full disk, read-only, not a directory…)."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    hint = ("free some space there, or choose another output location" if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check the path and its permissions, or choose another output location")
    return OutputError(f"cannot {doing} {path}: {reason}", hint)


def ensure_writable_dir(directory: Path) -> None:
    """Create ``directory`` (and parents) and prove it can be written, by creating and removing
    a probe file — before hours of work, not after. A path through a regular file is a
    ``ConfigError`` (exit 2); an OS refusal (read-only, full, …) an ``OutputError`` (exit 1)."""
    directory = Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():  # the user's path is wrong: an input error
        where = f"{existing} is a file" if existing == directory else f"cannot create {directory}: {existing} is a file"
        raise ConfigError(f"{where}, not a directory", "choose another output location (the file was left untouched)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".fewtune-probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as e:
        raise output_error(e, directory, "write to") from None


def check_replaceable(target: Path) -> None:
    """Before any work: ``target`` is written as a sibling directory renamed into its place,
    which a mount point (even an empty, writable one) refuses with "Device or resource busy" —
    after the run, not before. A ``ConfigError`` (exit 2) pointing inside it instead."""
    target = Path(target)
    if target.is_dir() and os.path.ismount(target):
        raise ConfigError(f"--out {target} is a mount point, which a finished run directory cannot be moved onto",
                          f"give a directory inside it, e.g. --out {target / 'run'}")


# --- temporary sibling directories of a run's output directory ----------------------------------


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def make_tmp_dir(target: Path) -> Path:
    """A fresh hidden sibling ``.NAME.tmp-<pid>-<random>`` of ``target``. The pid lets a later
    run tell an abandoned directory (its writer is dead) from one being written right now."""
    tmp = target.parent / f"{_tmp_prefix(target)}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # mode 0777 & ~umask
    return tmp


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename the finished directory ``tmp`` to ``target``. An old ``target`` is first renamed
    aside (to a temporary name a later writer cleans up if we die here), so it is never
    half-deleted and readers see the old directory or the new one."""
    if target.exists():
        old = make_tmp_dir(target)
        try:
            os.replace(target, old)
        except BaseException:  # the target cannot be moved (a mount point, a read-only parent): leave no temporary
            old.rmdir()
            raise
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    except OverflowError:
        return False  # not a pid at all
    return True


def clean_stale_tmp_dirs(target: Path) -> list[Path]:
    """Remove the temporary directories that killed writers of ``target`` left behind: only
    those of this same name whose writer process is gone (never another name's, never a live
    writer's). Returns what was removed."""
    removed = []
    prefix = _tmp_prefix(target)
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid_text = p.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
