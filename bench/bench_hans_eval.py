"""Benchmark 4: wall time to evaluate all 30,000 HANS examples with the embedded model.

fewtune's evaluation path (``scoring.score_prompts``: MNLI minimal pattern, length-sorted
batches with dynamic padding, the LM head at the last real token only, bf16 autocast where the
hardware has it) over the whole of HANS. For the ratio, the study's released evaluation
(``Trainer.predict`` on ``AutoModelForSequenceClassification``, pair encoding padded to 128, fp32,
batch 32; see ``released.py``) and fewtune's path are timed side by side on the same stratified
subset (interleaved: fewtune, released, fewtune; fewtune's time is the mean of its two runs).
The released pipeline's 30k time is extrapolated from that subset and marked as such; running it
on all 30k would take about an hour on 2 cores. With ``--shots k`` the full-set run is k-shot ICL
instead (prefix-cached).

    python bench/bench_hans_eval.py                 # all 30,000 + a 256-example side-by-side
    python bench/bench_hans_eval.py --quick         # 2,000 examples + 64 side-by-side
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, data_dir, load_average, machine_lines, md_table, setup, stopwatch, write_section  # noqa: E402


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="evaluate a stratified subset of this size instead of all")
    p.add_argument("--side-by-side", type=int, default=256, help="subset size for the released-vs-fewtune ratio")
    p.add_argument("--batch-size", type=int, default=16, help="fewtune eval batch size (RunConfig.eval_batch_size)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--shots", type=int, default=0, help="k-shot ICL for the full-set run (0: the pattern alone)")
    args = p.parse_args()
    if args.quick:
        args.limit, args.side_by_side = args.limit or 2000, 64
    setup(args)
    load_before = load_average()

    import bench_icl_prefix_cache as icl
    import released

    from fewtune.models.loading import device, load_model, resolve_precision
    from fewtune.scoring.scorer import score_prompts
    from fewtune.tasks import get_task, load_eval
    from fewtune.tasks.prompts import verbalizer_token_ids
    from fewtune.tasks.sampling import stratified_subsample

    dev = device()
    task = get_task("mnli")
    pattern = task.pattern(None)
    hans = load_eval(task, "hans", data_dir())
    full = stratified_subsample(hans, args.limit, 0) if args.limit and args.limit < len(hans) else hans
    lm = load_model("embedded", dev=dev)
    precision = resolve_precision(args.precision, dev)
    label_ids = verbalizer_token_ids(lm.tokenizer, pattern.verbalizer).token_ids
    prefix = icl.build_prompts(lm.tokenizer, args.shots, 1)[0] if args.shots else ""
    sep = task.icl_separator if prefix else ""

    def fewtune_eval(examples):
        qs = [sep + pattern.query(e.fields) for e in examples]
        return score_prompts(lm.model, lm.tokenizer, qs, label_ids, prefix=prefix, batch_size=args.batch_size,
                             precision=precision)

    # Side by side on a subset: the released evaluation vs fewtune's (zero-shot pattern, no prefix).
    sub = stratified_subsample(hans, args.side_by_side, 1)
    seqcls, tok = released.load_seqcls(dev=dev)
    data = released.DictDataset(released.tokenize(tok, [e.fields["premise"] for e in sub],
                                                  [e.fields["hypothesis"] for e in sub]))
    saved_prefix, prefix = prefix, ""
    fewtune_eval(sub[:8])  # warm-up
    released.predict(seqcls, released.DictDataset({k: v[:8] for k, v in data.enc.items()}))
    times = {"fewtune": [], "released": []}
    for who in ("fewtune", "released", "fewtune"):
        with stopwatch() as t:
            fewtune_eval(sub) if who == "fewtune" else released.predict(seqcls, data)
        times[who].append(t())
        print(f"  {who}, {len(sub)} examples: {t():.2f} s", flush=True)
    prefix = saved_prefix
    del seqcls
    f_sub, r_sub = float(np.mean(times["fewtune"])), times["released"][0]
    ratio = r_sub / f_sub

    with stopwatch() as t:
        scores = fewtune_eval(full)
    t_full = t()
    gold = np.array([e.label for e in full])
    acc = float((scores.predictions() == gold).mean())
    per_ex = t_full / len(full)
    rows = [
        ["released (Trainer, seq-cls, pad 128, fp32, bs 32)", len(sub), f"{r_sub:.1f}", f"{r_sub / len(sub) * 1e3:.1f}",
         f"{r_sub / len(sub) * 30000 / 60:.1f} (extrapolated)", "1.0×"],
        [f"fewtune (LM head at last token, dynamic padding, {precision}, bs {args.batch_size})", len(sub), f"{f_sub:.1f}",
         f"{f_sub / len(sub) * 1e3:.1f}", "", f"**{ratio:.1f}×**"],
        [f"fewtune, {'%d-shot ICL (prefix cache)' % args.shots if args.shots else 'pattern only'}, full run",
         len(full), f"{t_full:.1f}", f"{per_ex * 1e3:.1f}",
         f"**{per_ex * 30000 / 60:.1f}**" + ("" if len(full) == 30000 else " (extrapolated)"), ""],
    ]
    table = md_table(["pipeline", "examples", "wall s", "ms / example", "30k HANS, minutes", "speed-up vs released"], rows)
    load_after = load_average()
    body = f"""Embedded model ({lm.name}), device {dev}. {scores.tokens_scored:,} tokens scored in the full run
(mean {scores.tokens_scored / max(1, len(full)):.1f} per example{', prefix once' if args.shots else ''}); the released pipeline
pads every example to 128. HANS accuracy of the untrained model with the pattern: {acc:.3f} (chance 0.5; a sanity
check, not a result). For scale: the study's own logs give ≈200 s for HANS-30k with OPT-125m on a Colab GPU.

{table}

{machine_lines(load_before, load_after)}"""
    print(body)
    if not args.no_write:
        write_section("hans-eval", "4. Evaluating all 30,000 HANS examples", body)


if __name__ == "__main__":
    main()
