"""Starting, joining and ending a Ray cluster from a study's driver, so that a wrong address, a
Ctrl-C or the end of a study leaves nothing hanging: an address is probed with a deadline, a
Ctrl-C is held out of Ray's own code, and the processes of a local cluster that ``ray.shutdown``
leaves behind are ended. Nothing here imports Ray."""

from __future__ import annotations

import os
import signal
import socket
import time
from contextlib import suppress
from pathlib import Path

from fewtune.errors import ConfigError

CONNECT_TIMEOUT_S = 10.0  # a cluster address that accepts no connection in this time is a user error


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse an address nothing listens at, within ``timeout``: Ray itself retries a dead GCS
    address for minutes (``host:port``) or fails after 30 s with a connection error
    (``ray://``). ``auto`` and ``local`` are Ray's to resolve."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rstrip("/").rpartition(":")
    hint = "check --ray-address (ray://HEAD:10001 for Ray Client, HEAD:6379 for the GCS), or leave it out to start a local cluster"
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address} is not HOST:PORT, ray://HOST:PORT or auto", hint)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, OverflowError) as e:
        reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {reason} (within {timeout:g} s)", hint) from None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``; empty elsewhere): a local Ray cluster's
    processes are the driver's children and grandchildren."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def reap(pids: list[int], grace_s: float = 3.0) -> None:
    """End the processes ``ray.shutdown`` left behind (its agents outlive it by minutes):
    SIGTERM, then SIGKILL after ``grace_s``. Only pids that were our own descendants."""
    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in pids if alive(p)]
        for pid in left:
            with suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [p for p in left if alive(p)]
        if not left:
            return
