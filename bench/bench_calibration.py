"""Benchmark 7: what calibration changes — zero-shot and ICL on real CoLA, none vs contextual vs batch.

The embedded model's ICL on CoLA answers "No" (unacceptable) to almost everything, far below the
majority baseline. This script runs zero-shot (one run: it has no data seed) and ICL (n per class
from the few-shot sample, ``--seeds`` data seeds) with each calibration mode, side by side in one
process on the same stratified eval subsamples, and reports per eval set the accuracy and MCC
(mean ± sd over seeds), the fraction of "acceptable" predictions against the gold fraction, and
the estimated bias. Batch calibration is transductive (it uses the eval set's own scores).

    python bench/bench_calibration.py            # 3 seeds, 300 examples per eval set
    python bench/bench_calibration.py --quick    # 1 seed, 64 examples
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, data_dir, load_average, machine_lines, md_table, setup, stopwatch, write_section  # noqa: E402

MODES = ("none", "contextual", "batch")


def run_one(method: str, mode: str, seed: int, args) -> dict:
    from fewtune.config import RunConfig
    from fewtune.run.runner import run_experiment

    cfg = RunConfig(task="cola", method=method, n=args.n, seed=seed, eval_limit=args.limit,
                    params={"calibration": mode})
    return run_experiment(cfg, None, data_dir=data_dir()).metrics


def _fmt(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def rows_for(method: str, mode: str, runs: list[dict]) -> list[list[str]]:
    rows = []
    for name in runs[0]["eval"]:
        evs = [r["eval"][name] for r in runs]
        # label 1 is "acceptable" on CoLA (the majority class)
        pos = [list(ev["pred_distribution"].values())[1] / max(1, sum(ev["pred_distribution"].values())) for ev in evs]
        biases = [ev["calibration"]["bias"][1] for ev in evs if ev.get("calibration", {}).get("bias")]
        rows.append([method, mode, name, _fmt([ev["accuracy"] for ev in evs]), _fmt([ev["mcc"] for ev in evs]),
                     f"{evs[0]['majority_baseline']:.3f}", _fmt(pos), _fmt(biases)])
    return rows


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=300, help="stratified subsample per eval set")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n", type=int, default=16, help="few-shot examples per class (ICL's demonstrations)")
    args = p.parse_args()
    if args.quick:
        args.limit, args.seeds = 64, 1
    setup(args)
    load_before = load_average()
    table = []
    with stopwatch() as t:
        for method, seeds in (("zero-shot", [0]), ("icl", list(range(args.seeds)))):
            for mode in MODES:
                runs = [run_one(method, mode, s, args) for s in seeds]
                table += rows_for(method, mode, runs)
                print(*table[-1], sep=" | ", flush=True)
    body = (f"Embedded model, CoLA, n = {args.n} per class, {args.limit} examples per eval set, "
            f"{args.seeds} data seed(s) for ICL (zero-shot has none); {t():.0f} s in all.\n\n"
            + md_table(["method", "calibration", "eval set", "accuracy", "MCC", "majority", "predicted acceptable",
                        "bias (acceptable)"], table)
            + "\n\nReading: calibration moves the *prediction distribution* (the \"predicted acceptable\" column) "
            "and accuracy with it; MCC, the ability to tell the classes apart, is what it cannot create. "
            "Compare accuracy against the majority baseline and MCC against 0.\n\n"
            + machine_lines(load_before, load_average()))
    write_section("calibration", "8. Calibration of zero-shot and ICL (CoLA)", body)
    print(body)


if __name__ == "__main__":
    main()
