"""Benchmark 10: a pack of K LoRA runs (``fewtune study --pack K``) vs the same K runs one by one
through the subprocess executor — study wall time and peak memory, ratios measured in one run.

The runs: ``lora`` on MNLI, n = 16 per class, data seeds 0..K-1, with the ``quick`` preset's
training and evaluation settings (12 steps of batch 8, lr 1e-4, 128 eval examples per set,
precision auto) on the embedded model. Both ways run in a fresh ``fewtune study`` process with
the same torch threads (one run at a time, so every run has those threads; the pack's members
share them). Repetitions alternate the order (A B, then B A). Also checked: every run gets the
same eval metrics packed as alone (packing decides how runs are computed, never what).

Goals (issue 20): pack wall time ≤ 0.75 × the runs one by one; the pack's peak memory ≤ 1.5 × one
lone run's (the K lone runs' peaks summed are shown too: what K runs at once would need).

    python bench/bench_pack.py                         # 8 runs, embedded model, CPU
    python bench/bench_pack.py --smoke                 # seconds: tiny-random, 2 runs, 2 steps (no RESULTS.md)
    python bench/bench_pack.py --device cuda --model /path/to/random-1b --json out.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_executors import run_metrics  # noqa: E402
from common import REPO, base_parser, data_dir, load_average, machine_lines, md_table, median, write_section  # noqa: E402

QUICK_KEYS = ("n", "eval_limit", "eval_batch_size", "precision", "train")


def study_config(args) -> dict:
    """The ``quick`` preset's run settings, LoRA on MNLI, ``args.runs`` data seeds."""
    quick = yaml.safe_load((resources.files("fewtune") / "presets" / "quick.yaml").read_text())
    cfg = {"name": "bench-pack", "model": args.model, "task": "mnli", "method": "lora", "seed": list(range(args.runs)),
           **{k: quick[k] for k in QUICK_KEYS}}
    if args.smoke:
        cfg.update(n=2, eval_limit=8, eval_batch_size=8, train={**cfg["train"], "max_steps": 2, "batch_size": 4})
    if args.eval_limit is not None:
        cfg["eval_limit"] = args.eval_limit
    return cfg


def run_study(study: Path, out: Path, pack: int, args) -> float:
    """One ``fewtune study`` process; its wall time in seconds."""
    cmd = [sys.executable, "-m", "fewtune", "study", str(study), "--out", str(out), "--no-report", "--executor", "subprocess",
           "--threads", str(args.threads), "--pack", str(pack)]
    env = {**os.environ, "FEWTUNE_DATA_DIR": str(data_dir()), "OMP_NUM_THREADS": str(args.threads),
           "FEWTUNE_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def measure(args, tmp: Path) -> dict:
    study = tmp / "study.yaml"
    study.write_text(json.dumps(study_config(args)))
    ways = {"alone": 1, "packed": args.runs}
    times: dict[str, list[float]] = {w: [] for w in ways}
    metrics: dict[str, dict] = {}
    for r in range(args.repeats):
        for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            out = tmp / f"{way}-{r}"
            times[way].append(run_study(study, out, ways[way], args))
            metrics[way] = run_metrics(out)
            print(f"{way} (repetition {r + 1}): {times[way][-1]:.1f} s, {len(metrics[way])} runs", flush=True)
    return {"times": times, "metrics": metrics}


def summarise(res: dict, args) -> dict:
    alone, packed = res["metrics"]["alone"], res["metrics"]["packed"]
    lone_peaks = [m["resources"]["peak_memory_mb"] for m in alone.values()]
    pack_info = next(iter(packed.values()))["resources"].get("pack") or {}
    pack_peak = pack_info.get("peak_memory_mb", next(iter(packed.values()))["resources"]["peak_memory_mb"])
    t_alone, t_packed = median(res["times"]["alone"]), median(res["times"]["packed"])
    same = {k: json.dumps(m["eval"], sort_keys=True) for k, m in alone.items()} == \
           {k: json.dumps(m["eval"], sort_keys=True) for k, m in packed.items()}
    return {"runs": args.runs, "threads": args.threads, "device": args.device, "model": args.model,
            "wall_alone_s": t_alone, "wall_packed_s": t_packed, "wall_ratio": t_packed / t_alone,
            "runs_own_wall_alone_s": sum(m["wall_seconds"] for m in alone.values()),
            "pack_wall_s": pack_info.get("wall_seconds"),
            "peak_lone_max_mb": max(lone_peaks), "peak_lone_sum_mb": sum(lone_peaks), "peak_pack_mb": pack_peak,
            "memory_ratio": pack_peak / max(lone_peaks), "memory_kind": next(iter(alone.values()))["resources"]["memory_kind"],
            "all_packed": all((m["resources"].get("packed") == args.runs) for m in packed.values()),
            "same_metrics": same, "times": res["times"]}


def report(s: dict, args, load_before: str, load_after: str) -> str:
    rows = [["alone (subprocess, one by one)", f"{s['wall_alone_s']:.1f}", f"{s['peak_lone_max_mb']:.0f} (one run; "
             f"{s['peak_lone_sum_mb']:.0f} summed)", "1"],
            [f"packed (--pack {args.runs})", f"{s['wall_packed_s']:.1f}", f"{s['peak_pack_mb']:.0f}",
             f"{s['wall_ratio']:.3f}× wall, {s['memory_ratio']:.2f}× memory"]]
    table = md_table(["way", "study wall, s (median)", f"peak memory, MB ({s['memory_kind']})", "packed vs alone"], rows)
    goal_t = "met" if s["wall_ratio"] <= 0.75 else "NOT met"
    goal_m = "met" if s["memory_ratio"] <= 1.5 else "NOT met"
    detail = "; ".join(f"{w}: {', '.join(f'{t:.1f}' for t in ts)} s" for w, ts in s["times"].items())
    limit = f"{args.eval_limit} eval examples per set" if args.eval_limit is not None else "quick's 128 eval examples per set"
    return f"""{args.runs} `lora` runs: MNLI, n = {16 if not args.smoke else 2} per class, seeds 0–{args.runs - 1}, the `quick`
preset's training settings, {limit}, model `{args.model}`, device {args.device}, {args.threads} torch thread(s)
per study process; {args.repeats} repetition(s), alternated ({detail}).

{table}

Wall time ≤ 0.75 × alone: **{goal_t}** ({s['wall_ratio']:.3f}×). Peak memory ≤ 1.5 × one lone run: **{goal_m}**
({s['memory_ratio']:.2f}×; the {args.runs} lone runs' peaks summed: {s['peak_lone_sum_mb']:.0f} MB).
Every run packed: **{'yes' if s['all_packed'] else 'NO'}**. Same eval metrics per run packed and alone: **{'yes' if s['same_metrics'] else 'NO'}**.

{machine_lines(load_before, load_after)}"""


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=None, help="runs in the pack (default 8; --smoke: 2)")
    p.add_argument("--model", default=None, help="model spec (default: embedded; --smoke: tiny-random); e.g. a directory "
                                                  "holding a random-weights 1B-class model for a GPU run")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu hides any GPU from the runs")
    p.add_argument("--eval-limit", type=int, default=None, help="eval examples per eval set (default: quick's 128)")
    p.add_argument("--repeats", type=int, default=1, help="repetitions per way (alternating order)")
    p.add_argument("--smoke", action="store_true", help="seconds on a CPU: tiny-random, 2 runs, 2 steps; writes no RESULTS.md")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = p.parse_args()
    args.runs = args.runs or (2 if args.smoke else 8)
    args.model = args.model or ("tiny-random" if args.smoke else "embedded")
    args.threads = args.threads or os.cpu_count() or 1
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as d:
        s = summarise(measure(args, Path(d)), args)
    load_after = load_average()
    body = report(s, args, load_before, load_after)
    print(body)
    if args.json:
        args.json.write_text(json.dumps({**s, "load_before": load_before, "load_after": load_after}, indent=1))
    if not (args.no_write or args.smoke):
        write_section("pack", f"10. Packing: {args.runs} LoRA runs on one base vs one by one", body)
    if not s["same_metrics"]:
        raise SystemExit("packed runs gave other metrics than alone")


if __name__ == "__main__":
    main()
