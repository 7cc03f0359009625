"""Benchmark 3: peak memory per method, training on the same batch.

Each method trains in a fresh subprocess (so no method inherits another's allocator high-water
mark) on the same CoLA sample (n = 16 per class → one batch of 32), for ``--steps`` optimizer
steps, through its real ``fit``. Measured:

- CPU: the process's resident-set high-water mark (VmHWM, reset with ``/proc/self/clear_refs``
  just before ``fit``), and the memory the run itself adds: peak RSS during ``fit`` minus the RSS
  before the model was loaded (the Python/torch/transformers baseline, identical for all
  methods). The goals are checked on the latter — the interpreter's few hundred MB are not the
  method's.
- GPU: ``torch.cuda.max_memory_allocated`` during ``fit`` (tensors only, so no baseline).

The children run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB (unless already set).
glibc's default threshold is dynamic: once a large tensor is freed, blocks up to 32 MB are served
from the heap, and freed memory stays resident. The peak RSS then depends on the order of
allocations rather than on what a method needs. Without the fixed threshold, vanilla's peak moved
by 1.3 GB between 1 and 2 steps. With it, repeated runs agree to the MB.

Goals: ``distill`` ≤ 1.1 × ``vanilla`` (the teacher is the same weights, scored before training,
not a second model copy) and ``lora`` ≤ 0.6 × full fine-tuning (``vanilla``).

    python bench/bench_memory.py            # vanilla pbft adaptive lora distill, ~2-4 min on 2 cores
    python bench/bench_memory.py --quick    # 1 step each
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, load_average, machine_lines, md_table, setup, write_section  # noqa: E402

METHODS = ["vanilla", "pbft", "adaptive", "lora", "distill"]
GOALS = {"distill": ("vanilla", 1.1), "lora": ("vanilla", 0.6)}


def _rss_mb(key: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024
    return float("nan")


def child(method: str, steps: int, precision: str) -> dict:
    """Runs in the subprocess: build the method, reset the peak, fit, report."""
    import peft  # noqa: F401  (imported before the baseline so every method's baseline is the same)
    import torch
    import transformers  # noqa: F401
    from common import build_method

    import fewtune.methods  # noqa: F401
    from fewtune.config import RunConfig
    from fewtune.models.loading import device
    from fewtune.run.resources import count_parameters, reset_peak_rss

    dev = device()
    rss_start = _rss_mb()
    cfg = RunConfig(task="cola", method=method, n=16, precision=precision,
                    train={"max_steps": steps, "batch_size": 32, "warmup_ratio": 0.0})
    m, sample = build_method(cfg)
    rss_loaded = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated() / 2**20
    exact = reset_peak_rss()
    summary = m.fit(sample)
    out = {
        "method": method, "precision": m.ctx.precision, "steps": summary["steps"],
        "trainable_params": count_parameters(m.model)[0], "total_params": count_parameters(m.model)[1],
        "rss_start_mb": rss_start, "rss_after_load_mb": rss_loaded,
        "peak_rss_fit_mb": _rss_mb("VmHWM"), "peak_is_exact": exact,
    }
    if dev.type == "cuda":
        torch.cuda.synchronize()
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_before_fit_mb"] = base_gpu
    return out


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--child", default=None, help=argparse_hidden())
    args = p.parse_args()
    setup(args)
    if args.quick:
        args.steps = 1
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.precision)))
        return

    load_before = load_average()
    results = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method, "--steps", str(args.steps), "--precision", args.precision]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{method}: child failed (exit {proc.returncode})")
        results[method] = r = json.loads(line[len("RESULT "):])
        r["run_mb"] = r.get("gpu_peak_mb", r["peak_rss_fit_mb"] - r["rss_start_mb"])
        print(f"  {method}: peak {r['peak_rss_fit_mb']:.0f} MB RSS, run {r['run_mb']:.0f} MB", flush=True)

    gpu = "gpu_peak_mb" in next(iter(results.values()))
    ref = results.get("vanilla")
    first = next(iter(results.values()))
    rows = []
    for method, r in results.items():
        rel = r["run_mb"] / ref["run_mb"] if ref else float("nan")
        goal = ""
        if method in GOALS and GOALS[method][0] in results:
            limit = GOALS[method][1]
            goal = f"≤ {limit}×: {'met' if rel <= limit else 'NOT met'}"
        state = (r["total_params"] * 4 + r["trainable_params"] * 12) / 2**20  # fp32 weights + grads + 2 AdamW moments
        rows.append([method, f"{r['trainable_params']:,}", f"{state:.0f}",
                     f"{r['peak_rss_fit_mb']:.0f}" if not gpu else f"{r['gpu_peak_mb']:.0f}",
                     f"{r['run_mb']:.0f}", f"**{rel:.2f}×**", goal])
    what = "GPU max_memory_allocated during fit, MB" if gpu else "peak RSS during fit, MB"
    table = md_table(["method", "trainable params", "weights+grads+AdamW, MB (theory)", what, "run's own memory, MB",
                      "÷ vanilla", "goal"], rows)
    notes = []
    if "distill" in results and "pbft" in results and ref:
        notes.append(f"`distill` trains the student through the LM head (PBFT's objective), so its like-for-like reference "
                     f"is `pbft`: distill ÷ pbft = **{results['distill']['run_mb'] / results['pbft']['run_mb']:.2f}×**; "
                     f"pbft ÷ vanilla = {results['pbft']['run_mb'] / ref['run_mb']:.2f}× (the full-vocabulary head at "
                     f"the answer position and the gradient of the tied embedding/LM-head matrix). A second model "
                     f"copy would add ≥ {ref['total_params'] * 4 / 2**20:.0f} MB.")
    prec = first["precision"]
    body = f"""CoLA, n = 16 per class (one batch of 32), {args.steps} optimizer steps through each method's own `fit`,
default parameters, precision {prec}, one fresh process per method. "Run's own memory" = peak RSS during `fit`
minus the RSS of the process before the model was loaded ({first['rss_start_mb']:.0f} MB here: Python, torch,
transformers) on CPU; on GPU the tensor peak itself. Peaks were reset just before `fit`
(exact: {all(r['peak_is_exact'] for r in results.values())}).

{table}

{chr(10).join(notes)}

{machine_lines(load_before, load_average())}"""
    print(body)
    if not args.no_write:
        write_section("memory", "3. Peak memory per method (same batch)", body)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
