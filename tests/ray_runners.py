"""Stand-in runners for the Ray executor tests. Ray workers receive them pickled by value (this
module is not installed), so they only use their arguments and the file system."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from executor_runners import write_fake


def dies_once(cfg, out_dir: Path, *, data_dir=None, progress=None, marker_dir: Path):
    """The first attempt of each run is killed by SIGKILL (as by the OOM killer); the retry works."""
    marker = Path(marker_dir) / f"{cfg.content_hash()}.attempt"
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return write_fake(cfg, out_dir)


def writes_where(cfg, out_dir: Path, *, data_dir=None, progress=None):
    """A fake run that also records where it wrote, in a nested file."""
    result = write_fake(cfg, out_dir)
    (out_dir / "extra").mkdir()
    (out_dir / "extra" / "where.txt").write_text(str(out_dir))
    return result


def hangs(cfg, out_dir: Path, *, data_dir=None, progress=None, pid_dir: Path):
    """Records its pid, then works until stopped."""
    (Path(pid_dir) / f"{os.getpid()}.pid").write_text("")
    while True:
        time.sleep(0.1)
