"""Benchmark 7: the same slice of the ``quick`` preset through each executor — total wall time,
ratio to the baseline (the first executor listed, ``inprocess`` by default) and per-run overhead.

The slice is the first ``--runs`` K runs of ``fewtune study quick --seeds 0`` (the study's order:
every method on CoLA, then on MNLI), with ``--eval-limit`` examples per eval set. Each executor is
``name`` or ``name:N`` (``--parallel N``), any name ``fewtune study --executor`` accepts — so a
``ray`` executor, once registered in ``fewtune.study.executors.EXECUTORS``, is benchmarked by
adding ``ray`` or ``ray:2`` to ``--executors``. Every study runs in a fresh ``fewtune study``
process with the same ``--threads`` (default: all cores); with ``--parallel N`` the study gives
each run threads/N of them. Repetitions alternate the order (A B C, then C B A) so load drift
hits all alike. Also checked: every executor gives the same metrics per run id.

Goals (issue 10): ``subprocess`` ≤ 1.15 × ``inprocess``; ``--parallel 2`` on 2 cores no slower
than sequential.

    python bench/bench_executors.py                          # 12 runs per executor
    python bench/bench_executors.py --quick                  # 2 runs, 2 steps: a smoke run
    python bench/bench_executors.py --quick --model tiny-random --no-write   # does the bench work?
    python bench/bench_executors.py --executors inprocess,subprocess:2 --runs 6
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


def parse_executors(text: str) -> list[tuple[str, int]]:
    """``inprocess,subprocess,subprocess:2`` → [(name, parallel), …], names checked up front."""
    from fewtune.study import EXECUTORS

    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, par = item.partition(":")
        if name not in EXECUTORS:
            raise SystemExit(f"unknown executor '{name}' in --executors (known: {', '.join(EXECUTORS)})")
        specs.append((name, int(par or 1)))
    if not specs:
        raise SystemExit("--executors lists no executor")
    return specs


def label(spec: tuple[str, int]) -> str:
    return spec[0] if spec[1] == 1 else f"{spec[0]} --parallel {spec[1]}"


def run_study(spec: tuple[str, int], out: Path, args, threads: int) -> float:
    """One ``fewtune study`` process over the slice; its wall time in seconds."""
    cmd = [sys.executable, "-m", "fewtune", "study", "quick", "--seeds", "0", "--limit", str(args.runs), "--no-report",
           "--set", f"eval_limit={args.eval_limit}", "--out", str(out), "--executor", spec[0], "--parallel", str(spec[1]),
           "--threads", str(threads)]
    cmd += ["--set", "train.max_steps=2"] if args.quick else []
    cmd += ["--set", f"model={args.model}"] if args.model else []
    env = {**os.environ, "FEWTUNE_DATA_DIR": str(data_dir()), "OMP_NUM_THREADS": str(threads), "FEWTUNE_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def run_metrics(out: Path) -> dict[str, dict]:
    """Per run (keyed by what it computes, not its id: the id also covers the git commit, which a
    commit during a long benchmark would change): its metrics.json."""
    out_runs = {}
    for p in sorted((out / "runs").glob("*/metrics.json")):
        m = json.loads(p.read_text())
        params = json.loads(json.dumps(yaml.safe_load((p.parent / "config.yaml").read_text()).get("params"), sort_keys=True))
        out_runs[f"{m['method']}|{m['task']}|n={m['n']}|seed={m['seed']}|{json.dumps(params, sort_keys=True)}"] = m
    return out_runs


def measure(specs: list[tuple[str, int]], args, threads: int, tmp: Path) -> tuple[dict, dict, dict]:
    """Wall times, the runs' own wall_seconds summed, and per executor the eval metrics per run id."""
    times: dict[tuple, list[float]] = {s: [] for s in specs}
    own: dict[tuple, list[float]] = {s: [] for s in specs}
    evals: dict[tuple, dict] = {}
    for r in range(args.repeats):
        for spec in (specs if r % 2 == 0 else specs[::-1]):
            out = tmp / f"{spec[0]}-{spec[1]}-{r}"
            times[spec].append(run_study(spec, out, args, threads))
            ms = run_metrics(out)
            own[spec].append(sum(m["wall_seconds"] for m in ms.values()))
            evals[spec] = {key: json.dumps(m["eval"], sort_keys=True) for key, m in ms.items()}
            print(f"{label(spec)} (repetition {r + 1}): {times[spec][-1]:.1f} s, {len(ms)} runs", flush=True)
    return times, own, evals


def table(specs: list[tuple[str, int]], times: dict, own: dict, runs: int) -> str:
    base = median(times[specs[0]])
    rows = []
    for spec in specs:
        total, inside = median(times[spec]), median(own[spec])
        # Overhead per run: wall time not spent inside a run, per run (runs in parallel share it).
        rows.append([label(spec), runs, f"{total:.1f}", f"{inside:.1f}", f"{(total - inside / spec[1]) / runs:.2f}",
                     f"{total / base:.3f}×"])
    headers = ["executor", "runs", "study wall, s (median)", "sum of runs' own wall_seconds, s",
               "overhead per run, s", f"vs {label(specs[0])}"]
    detail = "; ".join(f"{label(s)}: {', '.join(f'{t:.1f}' for t in times[s])} s" for s in specs)
    return md_table(headers, rows) + f"\n\nEach repetition: {detail}."


def goals(specs: list[tuple[str, int]], times: dict) -> str:
    m = {s: median(ts) for s, ts in times.items()}
    lines = []
    if ("inprocess", 1) in m and ("subprocess", 1) in m:
        r = m[("subprocess", 1)] / m[("inprocess", 1)]
        lines.append(f"subprocess ≤ 1.15 × inprocess: **{'met' if r <= 1.15 else 'NOT met'}** ({r:.3f}×).")
    for (name, par), t in m.items():
        if par > 1 and (name, 1) in m:
            r = t / m[(name, 1)]
            lines.append(f"{name} --parallel {par} no slower than sequential {name}: **{'met' if r <= 1.0 else 'NOT met'}** ({r:.3f}×).")
    return "\n".join(lines) or "(no pair of executors that a goal compares was measured)"


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--executors", default="inprocess,subprocess,subprocess:2",
                   help="comma-separated name[:parallel]; the first is the baseline of the ratios")
    p.add_argument("--runs", type=int, default=None, help="the first K runs of quick --seeds 0 (default 12; --quick: 2)")
    p.add_argument("--eval-limit", type=int, default=32, help="eval examples per eval set (preset: 128)")
    p.add_argument("--repeats", type=int, default=1, help="repetitions per executor (alternating order)")
    p.add_argument("--model", default=None, help="replace the preset's model (e.g. tiny-random: a check that the bench works)")
    args = p.parse_args()
    args.runs = args.runs or (2 if args.quick else 12)
    specs = parse_executors(args.executors)
    threads = args.threads or os.cpu_count() or 1
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-executors-") as d:
        times, own, evals = measure(specs, args, threads, Path(d))
    load_after = load_average()
    same = all(evals[s] == evals[specs[0]] for s in specs)
    model = f" --set model={args.model}" if args.model else ""
    body = f"""Slice: the first {args.runs} runs of `fewtune study quick --seeds 0 --set eval_limit={args.eval_limit}{model}`
({'2 training steps (`--quick`)' if args.quick else "the preset's 12 steps"}); each executor in a fresh `fewtune study`
process with {threads} torch thread(s) (with `--parallel N`, each run gets {threads}/N); {args.repeats} repetition(s),
alternated.

{table(specs, times, own, args.runs)}

Same metrics per run through every executor: **{'yes' if same else 'NO'}**.

{goals(specs, times)}

{machine_lines(load_before, load_after)}"""
    print(body)
    if not args.no_write:
        write_section("executors", "7. Executors: a quick slice through inprocess, subprocess and --parallel", body)


if __name__ == "__main__":
    main()
