"""Shared helpers for the benchmarks: machine description, timing, markdown, RESULTS.md.

Every benchmark measures the two things it compares *in the same process, side by side*, and
reports their ratio: absolute times on a shared 2-core machine swing with whatever else runs, a
ratio measured back to back much less. The load average before and after each benchmark goes
into RESULTS.md so a reader can judge how quiet the machine was.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"
REPO = BENCH_DIR.parent

RESULTS_HEADER = """# Benchmark results

Written by the scripts in `bench/` (see `bench/README.md`); each section is replaced when its
benchmark runs again. Ratios are measured side by side in one process; absolute times depend on
the machine and on its load (shown per section).
"""


def data_dir() -> Path:
    """Real task data: $FEWTUNE_DATA_DIR, else ../shared/data beside the repository."""
    return Path(os.environ.get("FEWTUNE_DATA_DIR") or REPO.parent / "shared" / "data")


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import transformers

    from fewtune.models.loading import device, resolve_precision
    from fewtune.run.resources import machine_info as base_info

    info = base_info()
    info["transformers"] = transformers.__version__
    info["auto precision"] = resolve_precision("auto", device())
    info["platform"] = platform.platform()
    return info


def machine_lines(load_before: str, load_after: str) -> str:
    info = machine_info()
    parts = [f"{k}: {v}" for k, v in info.items() if v is not None]
    return (f"Machine: {'; '.join(parts)}.  \nLoad average (1/5/15 min) before: {load_before}; "
            f"after: {load_after} (this machine has {info['cores']} cores; load above that means other "
            f"processes competed for them).")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md, under a lock (benches may overlap)."""
    start, end = f"<!-- bench:{name} start -->", f"<!-- bench:{name} end -->"
    block = f"{start}\n## {title}\n\n{body.strip()}\n\n_Command: `{' '.join(['python', *sys.argv])}`; " \
            f"written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}._\n{end}"
    with open(RESULTS, "a+") as f:  # the lock is on RESULTS.md itself: no stray lock file
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read() or RESULTS_HEADER
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
        f.seek(0)
        f.truncate()
        f.write(_ordered(text))


def _ordered(text: str) -> str:
    """Sections sorted by their title's number ("## 2. ..."), whatever order the benches ran in."""
    blocks = list(re.finditer(r"<!-- bench:(\S+) start -->.*?<!-- bench:\1 end -->", text, re.S))
    if not blocks:
        return text

    def number(m: re.Match) -> float:
        title = re.search(r"^## (\d+)\.", m.group(0), re.M)
        return float(title.group(1)) if title else float("inf")

    head = text[: blocks[0].start()].rstrip()
    return head + "\n\n" + "\n\n".join(m.group(0) for m in sorted(blocks, key=number)) + "\n"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def stopwatch() -> Any:
    """``with stopwatch() as t: ...`` then ``t()`` is the elapsed seconds (GPU work included)."""
    sync()
    t0 = time.perf_counter()
    box: list[float] = []
    try:
        yield lambda: box[0] if box else time.perf_counter() - t0
    finally:
        sync()
        box.append(time.perf_counter() - t0)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, alternating A, B, A, B, … so drift in machine load
    hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with stopwatch() as t:
                fn()
            times[name].append(t())
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run in well under a minute")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-write", action="store_true", help="print only; do not update bench/RESULTS.md")
    return p


def setup(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def build_method(cfg, lm=None):
    """A method ready to ``fit``, prepared exactly as ``runner.run_experiment`` prepares it
    (resolved config, few-shot sample, model, verbalizer, precision); returns (method, sample
    examples). Lets a benchmark time ``fit`` alone, without evaluation or file writing."""
    from fewtune.methods import METHODS, RunContext
    from fewtune.models.loading import device, load_model, resolve_precision
    from fewtune.run.resolve import resolve
    from fewtune.run.resources import ResourceMeter
    from fewtune.tasks import get_task, load_train
    from fewtune.tasks.prompts import verbalizer_token_ids
    from fewtune.tasks.sampling import few_shot_sample

    cfg = resolve(cfg)
    task = get_task(cfg.task)
    pattern = task.pattern(cfg.pattern)
    dev = device()
    pool = load_train(task, data_dir())
    sample = few_shot_sample(pool, cfg.n, cfg.seed, task.num_labels, per_class=not cfg.n_is_total)
    torch.manual_seed(cfg.model_seed)
    lm = lm or load_model(cfg.model, seed=cfg.model_seed, dev=dev)
    verbalizer = verbalizer_token_ids(lm.tokenizer, pattern.verbalizer)
    precision = resolve_precision(cfg.precision, dev)
    ctx = RunContext(cfg, task, pattern, lm, verbalizer, precision, dev, ResourceMeter(dev), train_pool=pool,
                     data_dir=data_dir())
    cls = METHODS.get(cfg.method)
    method = cls(ctx, cls.Params.model_validate(cfg.params))
    torch.manual_seed(cfg.model_seed)
    return method, sample.examples
