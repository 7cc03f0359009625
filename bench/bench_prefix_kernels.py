"""Benchmark 9: the shared-prefix attention kernels (fp32, SDPA, split) against naive scoring.

16-shot MNLI ICL prompts (as benchmark 1), the embedded model, on whatever device is present.
The ``fp32`` kernel reads the cached prefix once per batch and materialises fp32 scores for every
head; the ``sdpa`` kernel copies the prefix keys/values per batch and runs PyTorch's fused
``scaled_dot_product_attention``; the ``split`` kernel (CPU) runs two fused attentions (all queries
against the one prefix, each query against its own tokens) merged by their log-sum-exp
(``fewtune.scoring.shared_prefix``). ``auto`` picks ``split`` on CPU and ``sdpa`` on CUDA. Each kernel is timed interleaved (median of ``--repeats``) and compared with
naive full-prompt scoring in fp32 on the same queries (largest |Δ log-prob|).

    python bench/bench_prefix_kernels.py            # 64 queries
    python bench/bench_prefix_kernels.py --quick    # 16 queries
    python bench/bench_prefix_kernels.py --model DIR --json out.json   # any local model; rows as JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_icl_prefix_cache import build_prompts  # noqa: E402
from common import base_parser, interleaved, load_average, machine_lines, md_table, median, setup, write_section  # noqa: E402

KERNELS = ("fp32", "sdpa", "split")


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="embedded", help="a model spec or a local model directory")
    p.add_argument("--json", help="also write the rows and the device as JSON here (bench/gpu_check.sh)")
    args = p.parse_args()
    if args.quick:
        args.queries, args.repeats = 16, 1
    setup(args)
    load_before = load_average()

    from fewtune.models.loading import device, load_model, resolve_precision
    from fewtune.scoring.scorer import score_prompts
    from fewtune.scoring.shared_prefix import prefix_kernel

    dev = device()
    lm = load_model(args.model, dev=dev)
    prefix, queries, label_ids = build_prompts(lm.tokenizer, args.shots, args.queries)
    default = resolve_precision("auto", dev)

    def score(kernel: str | None, precision: str):
        if kernel is None:
            return score_prompts(lm.model, lm.tokenizer, queries, label_ids, prefix=prefix, batch_size=args.batch_size,
                                 precision=precision, use_prefix_cache=False)
        with prefix_kernel(kernel):
            return score_prompts(lm.model, lm.tokenizer, queries, label_ids, prefix=prefix, batch_size=args.batch_size,
                                 precision=precision)

    naive = score(None, "fp32")
    rows, records = [], []
    for precision in dict.fromkeys([default, "fp32"]):
        times = interleaved({k: (lambda k=k: score(k, precision)) for k in KERNELS}, args.repeats)
        for k in KERNELS:
            s = score(k, precision)
            assert s.path == "prefix_cache", s.note
            diff = float(np.nanmax(np.abs(s.label_logprobs - naive.label_logprobs)))
            agree = float((s.predictions() == naive.predictions()).mean())
            rows.append([k, precision, f"{median(times[k]):.2f}", f"{median(times[k]) / median(times['fp32']):.2f}×",
                         f"{diff:.1e}", f"{agree:.3f}"])
            records.append({"kernel": k, "precision": precision, "seconds": median(times[k]),
                            "vs_fp32_kernel": median(times[k]) / median(times["fp32"]), "max_abs_diff": diff,
                            "agreement": agree})
            print(*rows[-1], sep=" | ", flush=True)
    body = (f"{args.model}, {args.shots}-shot MNLI ICL, {args.queries} queries, batch {args.batch_size}, device "
            f"{dev.type}; median of {args.repeats} interleaved repeats. Δ and agreement against naive scoring in fp32.\n\n"
            + md_table(["kernel", "precision", "seconds", "÷ fp32 kernel", "max |Δ log-prob|", "agreement"], rows)
            + "\n\n" + machine_lines(load_before, load_average()))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(dev), "model": args.model, "queries": args.queries,
                                               "load_before": load_before, "rows": records}, indent=1))
    if not args.no_write:
        write_section("prefix-kernels", "9. Shared-prefix attention kernels: fp32, SDPA, split", body)
    print(body)


if __name__ == "__main__":
    main()
