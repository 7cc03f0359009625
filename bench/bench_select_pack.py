"""Benchmark 10b: one LoRA run's ``select:`` trials trained as one pack vs one by one — the
selection phase's wall time and the run's peak memory, ratios measured in one bench.

The run: ``paper-tuned``'s LoRA selection (lr ∈ {1e-5, 1e-4, 1e-3} × 4 folds = 12 trials) on
MNLI, n = 16 per class, on the embedded model, with ``train.max_steps`` small so a CPU finishes
(the trials take the share of those steps their folds train on). Each way is one ``fewtune run``
process (``FEWTUNE_SELECT_PACK=1``: one by one; ``=12``: one pack), same threads, alternated when
repeated. Checked too: the same fold scores, choice and eval metrics both ways (packing decides
how, never what). The selection time is ``resources.select_seconds``; the peak memory is the
whole run's (the final fit is one lone training either way: the packed peak is the trials').

    python bench/bench_select_pack.py                 # embedded model, CPU, 1 thread
    python bench/bench_select_pack.py --smoke         # seconds: tiny-random, 2 steps
    python bench/bench_select_pack.py --device cuda --steps 40
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, base_parser, data_dir, load_average, machine_lines, md_table, median, write_section  # noqa: E402

LRS = [1.0e-5, 1.0e-4, 1.0e-3]


def run_config(args) -> dict:
    return {"model": args.model, "task": "mnli", "method": "lora", "n": 2 if args.smoke else 16, "seed": 0,
            "eval_limit": args.eval_limit, "eval_batch_size": 16, "params": {"r": 8}, "precision": args.precision,
            "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": 1.0e-5, "warmup_ratio": 0.1, "schedule": "linear"},
            "select": {"candidates": {"train.lr": LRS}, "folds": 4}}


def run_once(cfg_path: Path, out: Path, packed: bool, args) -> tuple[float, dict]:
    """One ``fewtune run`` process: its wall time and metrics.json."""
    cmd = [sys.executable, "-m", "fewtune", "run", "--config", str(cfg_path), "--out", str(out), "--threads", str(args.threads)]
    env = {**os.environ, "FEWTUNE_DATA_DIR": str(data_dir()), "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env["FEWTUNE_SELECT_PACK"] = str(len(LRS) * 4) if packed else "1"  # forced either way (unset: packed on CUDA only)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0, json.loads((out / "metrics.json").read_text())


def measure(args, tmp: Path) -> dict:
    cfg_path = tmp / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(args)))
    ways = {"one by one": False, "packed": True}
    res: dict[str, list] = {w: [] for w in ways}
    for r in range(args.repeats):
        for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            wall, m = run_once(cfg_path, tmp / f"{way.replace(' ', '-')}-{r}", ways[way], args)
            res[way].append((wall, m))
            print(f"{way} (repetition {r + 1}): selection {m['resources']['select_seconds']:.1f} s, run {wall:.1f} s", flush=True)
    return res


def summarise(res: dict) -> dict:
    last = {w: runs[-1][1] for w, runs in res.items()}
    drop = lambda sel: {k: v for k, v in sel.items() if k != "seconds"}  # noqa: E731
    a, p = last["one by one"], last["packed"]
    out = {"same_selection": drop(a["selection"]) == drop(p["selection"]), "same_eval": a["eval"] == p["eval"],
           "same_run_id": a["run_id"] == p["run_id"], "chosen": p["selection"]["chosen"],
           "scores": {json.dumps(c["values"]): c["fold_scores"] for c in p["selection"]["candidates"]},
           "packs": p["resources"].get("select_packs"), "memory_kind": p["resources"]["memory_kind"],
           "precision": p["resources"].get("precision")}
    for w, runs in res.items():
        out[w] = {"select_s": median([m["resources"]["select_seconds"] for _, m in runs]),
                  "run_s": median([wall for wall, _ in runs]),
                  "peak_mb": max(m["resources"]["peak_memory_mb"] for _, m in runs)}
    return out


def report(s: dict, args, load_before: str, load_after: str) -> str:
    a, p = s["one by one"], s["packed"]
    rows = [["one by one (FEWTUNE_SELECT_PACK=1)", f"{a['select_s']:.1f}", f"{a['run_s']:.1f}", f"{a['peak_mb']:.0f}", "1"],
            [f"packed (FEWTUNE_SELECT_PACK=12: packs {s['packs']})", f"{p['select_s']:.1f}", f"{p['run_s']:.1f}", f"{p['peak_mb']:.0f}",
             f"{p['select_s'] / a['select_s']:.3f}× selection, {p['run_s'] / a['run_s']:.3f}× run, {p['peak_mb'] / a['peak_mb']:.2f}× memory"]]
    table = md_table(["way", "selection, s", "whole run (process), s", f"peak memory, MB ({s['memory_kind']})", "packed vs one by one"], rows)
    same = all(s[k] for k in ("same_selection", "same_eval", "same_run_id"))
    return f"""One `lora` run (r 8) with `paper-tuned`'s selection, lr ∈ {{1e-5, 1e-4, 1e-3}} × 4 folds = 12 trials: MNLI,
n = {2 if args.smoke else 16} per class, seed 0, train.max_steps = {args.steps} (trials: 3/4 of it), batch {args.batch_size},
{args.eval_limit} eval examples per set, precision {args.precision} ({s['precision']}), model `{args.model}`, device {args.device}, {args.threads} torch thread(s);
{args.repeats} repetition(s) per way, alternated.

{table}

Same fold scores, choice ({s['chosen']}), eval metrics and run id packed and one by one: **{'yes' if same else 'NO'}**
(selection {s['same_selection']}, eval {s['same_eval']}, run id {s['same_run_id']}).

{machine_lines(load_before, load_after)}"""


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model spec (default: embedded; --smoke: tiny-random)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu hides any GPU from the runs")
    p.add_argument("--steps", type=int, default=4, help="train.max_steps of the final fit (trials: 3/4 of it)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="auto", help="auto (paper-tuned's; bf16 on this CPU) | fp32 | bf16")
    p.add_argument("--eval-limit", type=int, default=32, help="eval examples per eval set")
    p.add_argument("--repeats", type=int, default=1, help="repetitions per way (alternating order)")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny-random, n = 2, 2 steps; writes no RESULTS.md")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = p.parse_args()
    args.model = args.model or ("tiny-random" if args.smoke else "embedded")
    args.steps = 2 if args.smoke else args.steps
    args.threads = args.threads or 1
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-select-pack-") as d:
        s = summarise(measure(args, Path(d)))
    load_after = load_average()
    body = report(s, args, load_before, load_after)
    print(body)
    if args.json:
        args.json.write_text(json.dumps({**s, "load_before": load_before, "load_after": load_after}, indent=1))
    if not (args.no_write or args.smoke):
        write_section("select-pack", "10b. Packing a run's select: trials vs one by one", body)
    if not (s["same_selection"] and s["same_eval"] and s["same_run_id"]):
        raise SystemExit("packed trials gave other results than one by one")


if __name__ == "__main__":
    main()
