"""The report on a synthetic study directory: sections, table rows, plots, CSVs, warnings, claims."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from test_stats import make_run

from fewtune import report as rp
from fewtune.errors import ConfigError
from fewtune.study.store import Store

SECTIONS = ["Which method", "Warnings", "Claims of the study", "Results", "Plots", "Paired comparisons with vanilla fine-tuning",
            "ID vs OOD gap", "Resources", "Failed runs", "Study config", "Statistical method", "How to read this report"]
METHODS = ("icl", "vanilla", "pbft", "adaptive", "lora", "distill")


def _write_hans_predictions(run_dir: Path, ent_acc: float, non_acc: float, per: int = 20) -> None:
    """predictions.jsonl with 'per' examples per heuristic × label and the given accuracies."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for h in ("lexical_overlap", "subsequence", "constituent"):
        for gold, acc in ((0, ent_acc), (1, non_acc)):
            for i in range(per):
                pred = gold if i < round(acc * per) else 1 - gold
                lines.append(json.dumps({"eval_set": "hans", "id": f"hans:{h}{gold}{i}", "gold": gold, "pred": pred, "skipped": False,
                                         "groups": {"heuristic": h, "subcase": "x", "template": "t"}}))
    (run_dir / "predictions.jsonl").write_text("\n".join(lines) + "\n")


def write_predictions(run_dir: Path, metrics: dict) -> None:
    """predictions.jsonl consistent with metrics.json for every eval set but HANS (whose per-heuristic
    file ``_write_hans_predictions`` writes): the first round(accuracy · n) examples are correct,
    the last ``n_skipped`` examples are skipped."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, ev in metrics["eval"].items():
        if name == "hans":
            continue
        skip = ev.get("n_skipped", 0)
        n, k = ev["n"] + skip, round(ev["accuracy"] * ev["n"])
        for i in range(n):
            gold = i % 2
            pred = gold if i < k else 1 - gold
            lines.append(json.dumps({"eval_set": name, "id": f"{name}:{i}", "gold": gold, "pred": pred, "skipped": i >= n - skip}))
    with open(run_dir / "predictions.jsonl", "a") as f:
        f.write("\n".join(lines) + "\n")


def write_run_files(run_dir: Path, cfg: dict, metrics: dict) -> None:
    """config.yaml and metrics.json as the runner writes them (what fewtune.results reads)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def build_study(root: Path, runs, failed=(), pending=(), claims=("srinivasan2024",)) -> Path:
    """A study directory as run_study leaves it, from synthetic (run id, config, metrics) triples."""
    root.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(cfg["method"] for _, cfg, _ in [*runs, *failed, *pending]))
    (root / "study.yaml").write_text(yaml.safe_dump({"name": "synthetic", "methods": methods[::-1], "claims": list(claims)}))
    with Store(root) as s:
        s.set_meta("study", json.dumps({"name": "synthetic", "description": "a test study", "source": "test"}))
        all_runs = [*runs, *failed, *pending]
        s.register((rid, cfg) for rid, cfg, _ in all_runs)
        s.set_meta("study_run_ids", json.dumps([rid for rid, _, _ in all_runs]))
        for rid, cfg, m in runs:
            s.mark_running(rid)
            if cfg["task"] == "mnli":
                _write_hans_predictions(root / "runs" / rid, 0.95 if cfg["method"] == "vanilla" else 0.6, 0.1 if cfg["method"] == "vanilla" else 0.4)
            write_predictions(root / "runs" / rid, m)
            write_run_files(root / "runs" / rid, cfg, m)
            s.mark_done(rid, m, f"runs/{rid}")
        for rid, _, _ in failed:
            s.mark_running(rid)
            s.mark_failed(rid, "TrainingDiverged: training loss became NaN at step 3")
    return root


def _full_runs():
    """Runs in the reverse of METHODS: the report must follow the study config's order (METHODS)."""
    runs = []
    for task in ("cola", "mnli"):
        for mi, method in reversed(list(enumerate(METHODS))):
            for n in (2, 16):
                for seed in range(3):
                    # methods differ by 0.02 per rank, plus a seed-dependent wobble so paired
                    # differences vary (vanilla, mi=1, keeps 0.57/0.58/0.59 at n=2 for table checks)
                    base = 0.55 + 0.02 * mi + 0.01 * seed + (0.03 if n == 16 else 0) + 0.004 * (mi - 1) * (seed % 2)
                    runs.append(make_run(task, method, n, seed, (base, base - 0.05),
                                         memory=400 + 50 * mi, trainable=0 if method == "icl" else 10 ** (mi + 2),
                                         n_skipped=3 if method == "icl" and n == 16 else 0))
    return runs


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    failed = [make_run("cola", "lora", 64, 0, (0.5, 0.5))]
    pending = [make_run("cola", "lora", 64, 1, (0.5, 0.5))]
    build_study(root, _full_runs(), failed, pending)
    return root, rp.write_report(root)


def _md_table_after(md: str, caption: str) -> list[list[str]]:
    """Rows (cells) of the Markdown table right after '*caption*'."""
    block = md.split(f"*{caption}*\n", 1)[1].strip().split("\n\n", 1)[0]
    lines = [l for l in block.splitlines() if l.startswith("|")]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines if not l.startswith("|---")]


def test_report_has_every_section(full_report) -> None:
    root, paths = full_report
    md = paths.markdown.read_text()
    headings = re.findall(r"^#+ (.+)$", md, flags=re.M)
    for s in SECTIONS:
        assert s in headings, s
    assert "mnli per heuristic and gold label (tiny-random)" in headings
    assert headings[0] == "Study report: synthetic"
    page = paths.html.read_text()
    for s in SECTIONS:
        assert f">{s}</h2>" in page


def test_results_tables_hold_expected_rows(full_report) -> None:
    _, paths = full_report
    md = paths.markdown.read_text()
    table = _md_table_after(md, "cola-id (ID) accuracy")
    assert table[0] == ["method", "n=2", "n=16", "n=64"]  # n=64: only a failed run, shown as such
    assert [r[0] for r in table[1:]] == ["majority baseline", *METHODS]
    assert table[1][1:] == ["0.690", "0.690", "0.690"]
    lora = next(r for r in table if r[0] == "lora")
    assert lora[3] == "– [1 failed]"  # the failed run is counted in its cell, not silently dropped
    vanilla = table[2 + 1]
    # vanilla (mi=1), n=2: 0.57, 0.58, 0.59 → mean 0.580, CI half-width t(.975,2)·0.01/√3 = 0.025
    assert vanilla[1] == "0.580 ± 0.025 (3)"
    assert _md_table_after(md, "cola-id (ID) MCC")[1][0] == "majority baseline"
    assert _md_table_after(md, "cola-ood (OOD) accuracy")
    assert [r[0] for r in _md_table_after(md, "hans (OOD) accuracy")][:2] == ["method", "majority baseline"]
    assert "mnli-m (ID) MCC" not in md  # MCC tables only for CoLA


def test_plots_are_nonempty_pngs_and_embedded(full_report) -> None:
    root, paths = full_report
    names = sorted(p.name for p in paths.figures)
    assert "acc_vs_n_tiny-random_cola.png" in names and "id_vs_ood_tiny-random_mnli.png" in names
    assert "pareto_tiny-random_cola_cola-id.png" in names and "breakdown_tiny-random_mnli.png" in names
    import matplotlib.image as mpimg

    for p in paths.figures:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p
        img = mpimg.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01  # not a blank canvas
    page = paths.html.read_text()
    assert len(re.findall(r"src=['\"]data:image/png;base64,", page)) == len(paths.figures)
    assert not re.search(r"src=['\"](?!data:)", page)  # nothing external
    md = paths.markdown.read_text()
    assert md.count("](figures/") == len(paths.figures)


def test_csv_exports(full_report) -> None:
    _, paths = full_report
    with open(paths.csv_dir / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len([r for r in runs if r["status"] == "done"]) == 2 * 6 * 2 * 3 * 2  # tasks × methods × n × seeds × eval sets
    assert sorted(r["status"] for r in runs if r["status"] != "done") == ["failed", "failed", "pending", "pending"]  # × 2 eval sets
    with open(paths.csv_dir / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    cola_id_acc = [r for r in summary if r["task"] == "cola" and r["eval_set"] == "cola-id" and r["metric"] == "accuracy"]
    assert len(cola_id_acc) == 1 + 6 * 2  # majority row + arms × n
    with open(paths.csv_dir / "paired.csv") as f:
        paired = list(csv.DictReader(f))
    assert len(paired) == 2 * 2 * 2 * 15  # tasks × n × eval sets × pairs of the 6 methods
    pv = [r for r in paired if r["arm_a"] == "pbft" and r["arm_b"] == "vanilla" and r["eval_set"] == "cola-id" and r["n"] == "2"]
    assert len(pv) == 1 and float(pv[0]["mean_diff"]) == pytest.approx(0.02 + 0.004 / 3) and pv[0]["pairs"] == "3"
    assert not [r for r in paired if r["arm_a"] == "icl"]  # icl is first in the method order: always B
    md = paths.markdown.read_text()
    vs_vanilla = md.split("## Paired comparisons with vanilla fine-tuning", 1)[1].split("## ", 1)[0]
    assert vs_vanilla.count("| vanilla |") == 2 * 2 * 2 * 5  # tasks × n × eval sets × other methods
    with open(paths.csv_dir / "claims.csv") as f:
        assert {r["claim"] for r in csv.DictReader(f)} == {"cd-beats-ft", "pbft-worse-ood", "efficient-comparable", "ft-icl-similar"}
    hans = paths.csv_dir / "breakdown_tiny-random_mnli.csv"
    with open(hans) as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "vanilla" and r["n"] == "2"]
    by_col = {r["column"]: float(r["mean"]) for r in rows}
    assert by_col["lexical_overlap / entailment"] == pytest.approx(0.95)
    assert by_col["constituent / non-entailment"] == pytest.approx(0.10)


def test_claims_and_warnings(full_report) -> None:
    _, paths = full_report
    md = paths.markdown.read_text()
    claims = md.split("## Claims of the study", 1)[1].split("## Results", 1)[0]
    verdicts = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[3] for line in claims.splitlines() if line.startswith("| ") and " | " in line}
    # distill (mi=5) is 0.08–0.096 above vanilla on every ID sample
    assert verdicts["Context distillation beats standard (vanilla) fine-tuning."] == "supported"
    assert "Holm p=" in claims and "seed-only t [" in claims
    # both sources of variance are reported per comparison
    table = _md_table_after(md, "the claims' comparisons: both sources of variance (bootstrap standard errors)")
    assert table[0][5:8] == ["SE seeds", "SE eval", "SE both"]
    assert all(float(r[6]) > 0 for r in table[1:])  # eval sets with predictions: eval-sampling error is in
    # the failed LoRA run is named in the claim that compares LoRA
    assert "efficient-comparable: failed runs are not in this comparison: lora 1" in claims
    method = md.split("## Statistical method", 1)[1].split("## ", 1)[0]
    assert "Holm" in method and "non-inferiority, 90 % CI of A − B > −0.10" in method and "intersection" in method
    warnings = md.split("## Warnings", 1)[1].split("## Claims", 1)[0]
    assert "incomplete" in warnings and "1 failed" in warnings
    assert "indistinguishable from the majority baseline" in warnings
    assert "eval examples skipped" in warnings
    failed = md.split("## Failed runs", 1)[1].split("##", 1)[0]
    assert "TrainingDiverged" in failed


def test_eval_set_overlap_warning_and_single_runs(tmp_path: Path) -> None:
    runs = []
    for m in ("vanilla", "pbft"):
        rid, cfg, met = make_run("cola", m, 16, 0, (0.7, 0.6))
        met["eval"]["cola-glue-dev"] = {**met["eval"].pop("cola-id"), "warning": "cola-glue-dev contains the 516 out-of-domain sentences"}
        met["eval"] = dict(sorted(met["eval"].items()))
        runs.append((rid, cfg, met))
    paths = rp.write_report(build_study(tmp_path, runs))
    md = paths.markdown.read_text()
    assert "Eval set `cola-glue-dev`: cola-glue-dev contains the 516 out-of-domain sentences" in md
    assert "single run" in md
    assert "0.700 (1 run)" in md
    claims = md.split("## Claims of the study", 1)[1].split("## Results", 1)[0]
    verdict_rows = [l for l in claims.splitlines() if l.startswith("| ") and ("Holm-corrected" in l or "CI of" in l)]
    assert len(verdict_rows) == 4 and all("| not enough data |" in l for l in verdict_rows)


def test_report_on_empty_and_missing_study(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a study directory"):
        rp.write_report(tmp_path / "nothing")
    paths = rp.write_report(build_study(tmp_path, [], pending=[make_run("cola", "icl", 2, 0, (0.5, 0.5))]))
    md = paths.markdown.read_text()
    assert "0 done" in md and "not enough data" in md


def test_collapsed_runs_are_marked_in_their_cells(tmp_path: Path) -> None:
    runs = [make_run("cola", m, 16, s, (0.7 + 0.01 * s, 0.6)) for m in ("vanilla", "pbft") for s in range(2)]
    runs[0][2]["eval"]["cola-id"]["pred_distribution"] = {"unacceptable": 0, "acceptable": 100}
    md = rp.write_report(build_study(tmp_path, runs)).markdown.read_text()
    table = {r[0]: r[1:] for r in _md_table_after(md, "cola-id (ID) accuracy")}
    assert table["vanilla"] == ["0.705 ± 0.064 (2) ≈ [⚠ 1 collapsed]"]
    assert "collapsed" not in table["pbft"][0]
    assert "collapsed" not in _md_table_after(md, "cola-ood (OOD) accuracy")[2][1]


def test_margin_override_replaces_interval_margins_only() -> None:
    from types import SimpleNamespace

    from fewtune.stats.claims import ClaimSpec, load_claims

    data = SimpleNamespace(claims=[ClaimSpec.model_validate(c) for c in load_claims("srinivasan2024")])
    specs = {s.key: s for s in rp.claim_specs(data, 0.2)}
    assert specs["efficient-comparable"].margin == 0.2 and specs["ft-icl-similar"].margin == 0.2
    assert specs["cd-beats-ft"].margin is None  # direction claims have no margin
    assert rp.claim_specs(data, None) == data.claims
