"""The report's first section, ``## Which method``: Pareto marks, the recommendation per budget and
its honesty (not significant, at the majority baseline), n/a for zero-shot, selections, model sweeps."""

from __future__ import annotations

from pathlib import Path

from test_report import _md_table_after, build_study
from test_stats import make_run

from fewtune.report import load_study_data
from fewtune.report.context import build_context
from fewtune.report.doc import render_markdown
from fewtune.report.which import which_method

WOBBLE = (-0.02, 0.02, -0.02, 0.02)  # lora − vanilla per seed around −0.005: a difference the seeds cannot confirm


def _which(root: Path) -> str:
    return render_markdown(which_method(build_context(load_study_data(root), root)))


def _rows(md: str, caption: str = "cola: methods at a glance") -> dict[str, list[str]]:
    table = _md_table_after(md, caption)
    return {f"{r[0]}@{r[1]}": dict(zip(table[0], r)) for r in table[1:]}


def _tradeoff_study(root: Path, model: str = "tiny-random") -> list:
    runs = []
    for s in range(4):
        v = 0.80 + 0.005 * s
        runs += [make_run("cola", "vanilla", 16, s, (v, v - 0.02), memory=1000, trainable=10**6, n_eval=1000, model=model),
                 make_run("cola", "lora", 16, s, (v - 0.005 + WOBBLE[s], v - 0.025 + WOBBLE[s]), memory=500, trainable=10**4,
                          n_eval=1000, model=model),
                 make_run("cola", "pbft", 16, s, (v - 0.08, v - 0.10 + 0.001 * s), memory=1200, trainable=10**6, n_eval=1000, model=model)]
    return runs


def test_pareto_marks_and_least_memory_within_one_point_not_significant(tmp_path: Path) -> None:
    md = _which(build_study(tmp_path, _tradeoff_study(tmp_path), claims=()))
    rows = _rows(md)
    assert rows["lora@16"]["Pareto"] == "★" and rows["vanilla@16"]["Pareto"] == "★"
    assert rows["pbft@16"]["Pareto"] == ""  # more memory and less accuracy than vanilla: dominated
    assert rows["lora@16"]["peak memory MB"] == "500" and rows["vanilla@16"]["trainable params"] == "1,000,000"
    assert "ID MCC (cola-id)" in rows["lora@16"]  # cola declares MCC among its report metrics
    lines = [l for l in md.splitlines() if l.startswith("- n=16")]
    best = next(l for l in lines if "Best OOD accuracy" in l)
    assert "**vanilla**" in best and "**not significantly different** from lora" in best and "cannot tell them apart" in best
    cheap = next(l for l in lines if "Least memory within 1 point" in l)
    assert "**lora**" in cheap and "500 MB vs 1,000 MB" in cheap and "not significantly different" in cheap
    assert "None of these beats" not in md


def test_a_clear_winner_is_called_significant(tmp_path: Path) -> None:
    runs = [r for r in _tradeoff_study(tmp_path) if r[1]["method"] != "lora"]
    md = _which(build_study(tmp_path, runs, claims=()))
    best = next(l for l in md.splitlines() if "Best OOD accuracy" in l)
    assert "**vanilla**" in best and "significantly different from pbft" in best and "not significantly" not in best


def test_all_at_the_majority_baseline_recommends_more_data_or_a_larger_model(tmp_path: Path) -> None:
    runs = [make_run("cola", m, 16, s, (0.69 + 0.002 * s, 0.686), memory=500 + 100 * i) for i, m in enumerate(("vanilla", "lora"))
            for s in range(3)]
    # significantly *below* the baseline (a collapsed fine-tuning, say) does not beat it either
    runs += [make_run("cola", "pbft", 16, s, (0.30 + 0.01 * s, 0.31), n_eval=1000) for s in range(3)]
    md = _which(build_study(tmp_path, runs, claims=()))
    assert "n=16: None of these beats the majority baseline at this n and model (tiny-random)" in md
    assert "More examples or a larger model." in md and "Best OOD accuracy" not in md


def test_zero_shot_n_is_na_and_selection_is_shown(tmp_path: Path) -> None:
    from fewtune.report.sections import results

    runs = [make_run("cola", m, 16, s, (0.8, 0.7), n_eval=1000) for m in ("zero-shot", "vanilla") for s in range(2)]
    for _, cfg, metrics in runs:
        if cfg["method"] == "vanilla":
            metrics["selection"] = {"rule": "kfold", "k": 2, "metric": "accuracy",
                                    "candidates": [{"values": {"train.lr": 1e-5}, "cv_score": 0.6}, {"values": {"train.lr": 1e-4}, "cv_score": 0.7}],
                                    "chosen": {"train.lr": 1e-4}}
    root = build_study(tmp_path, runs, claims=())
    rows = _rows(_which(root))
    per_n = render_markdown(results(build_context(load_study_data(root), root)))
    assert {r[0] for r in _md_table_after(per_n, "cola-id (ID) accuracy")[2:]} == {"zero-shot (n/a: no sample used)", "vanilla"}
    assert set(rows) == {"zero-shot@n/a", "vanilla@16"}
    assert rows["vanilla@16"]["chosen (selection)"] == "train.lr=0.0001" and rows["zero-shot@n/a"]["chosen (selection)"] == "–"


def test_models_of_different_sizes_in_the_study_order(tmp_path: Path) -> None:
    runs = _tradeoff_study(tmp_path, model="smollm2-135m") + _tradeoff_study(tmp_path, model="gemma3-270m")
    md = _which(build_study(tmp_path, runs, claims=()))
    heads = [l for l in md.splitlines() if l.startswith("### ")]
    assert heads == ["### smollm2-135m · cola", "### gemma3-270m · cola", "### Models side by side · cola"]
    side = _rows(md, "cola: OOD accuracy · peak memory, per model")
    assert list(side["lora@16"])[2:] == ["smollm2-135m", "gemma3-270m"]
    assert side["lora@16"]["gemma3-270m"].endswith("· 500 MB") and side["pbft@16"]["smollm2-135m"].endswith("· 1200 MB")
    assert md.count("Best OOD accuracy") == 2


def test_the_report_opens_with_which_method(tmp_path: Path) -> None:
    from fewtune.report import write_report

    paths = write_report(build_study(tmp_path, _tradeoff_study(tmp_path)[:6], claims=()))
    md = paths.markdown.read_text()
    assert [l for l in md.splitlines() if l.startswith("## ")][0] == "## Which method"
    assert md.count("*How to read it:*") == md.count("](figures/") > 0  # a reading aid under every figure
    page = paths.html.read_text()
    assert page.index("<h2>Which method</h2>") < page.index("<h2>Claims of the study</h2>")
    assert "<td>★</td>" in page  # the same table, rendered from the same Markdown
