"""Resource accounting for a run: peak memory, parameters, wall time, throughput, machine.

Peak memory on CPU is the process's resident-set high-water mark (VmHWM). Linux lets a process
reset it (``echo 5 > /proc/self/clear_refs``), so each run in a long-lived study process gets its
own peak rather than the largest of all runs so far — but memory the allocator kept from earlier
runs still counts, which is why studies run each run in a fresh process (``fewtune.study.executors``).
On GPU it is ``max_memory_allocated`` (tensors), and the caching allocator's reserved peak
(``max_memory_reserved``: what the device really had to provide) is recorded beside it; both are
reset when the meter starts.
"""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


def _read_status_kb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    hwm = _read_status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak (macOS: bytes)


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting tied weights once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


@dataclass
class ResourceMeter:
    """Accumulates timings and token counts; ``peak`` starts at the meter's creation."""

    dev: torch.device
    timings: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    baseline_mb: float = 0.0
    exact_peak: bool = False

    def __post_init__(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.exact_peak = True
        else:
            self.exact_peak = reset_peak_rss()
        self.baseline_mb = self._current_mb()

    def _current_mb(self) -> float:
        if self.dev.type == "cuda":
            return torch.cuda.memory_allocated(self.dev) / 2**20
        rss = _read_status_kb("VmRSS")
        return rss / 1024 if rss is not None else 0.0

    @contextmanager
    def phase(self, name: str):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.dev.type == "cuda":
                torch.cuda.synchronize(self.dev)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def add_tokens(self, name: str, n: int) -> None:
        self.tokens[name] = self.tokens.get(name, 0) + n

    def peak_mb(self) -> float:
        if self.dev.type == "cuda":
            return torch.cuda.max_memory_allocated(self.dev) / 2**20
        return peak_rss_mb()

    def peak_reserved_mb(self) -> float | None:
        """The CUDA caching allocator's reserved peak (≥ ``peak_mb``: fragmentation and cached
        blocks); None off CUDA, where RSS already is what the system provided."""
        if self.dev.type == "cuda":
            return torch.cuda.max_memory_reserved(self.dev) / 2**20
        return None

    def report(self, model: torch.nn.Module, precision: str, optimizer_steps: int, trains: bool = True) -> dict:
        trainable, total = count_parameters(model)
        trainable = trainable if trains else 0

        def rate(name: str) -> float | None:
            t = self.timings.get(name)
            return self.tokens.get(name, 0) / t if t and self.tokens.get(name) else None

        return {
            "peak_memory_mb": round(self.peak_mb(), 1),
            "memory_kind": "cuda_max_allocated" if self.dev.type == "cuda" else "rss",
            "peak_reserved_mb": None if (r := self.peak_reserved_mb()) is None else round(r, 1),
            "memory_at_start_mb": round(self.baseline_mb, 1),
            "peak_is_per_run": self.exact_peak,
            "trainable_params": trainable,
            "total_params": total,
            "train_seconds": round(self.timings.get("train", 0.0), 3),
            "eval_seconds": round(self.timings.get("eval", 0.0), 3),
            "prepare_seconds": round(self.timings.get("prepare", 0.0), 3),
            # k-fold selection of hyper-parameters on the few-shot sample (``select:``), if any
            "select_seconds": round(self.timings.get("select", 0.0), 3),
            "train_tokens_per_s": rate("train"),
            "eval_tokens_per_s": rate("eval"),
            "optimizer_steps": optimizer_steps,
            "precision": precision,
            "device": str(self.dev),
            "machine": machine_info(),
        }
