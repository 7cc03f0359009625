"""`fewtune study --dry-run` finds the runs that cannot work, says why and how to fix them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fewtune.run.feasibility import check_study
from fewtune.study import expand, load_study, parse_study

pytestmark = pytest.mark.usefixtures("data_dir")


def _check(data_dir: Path, **study):
    base = {"model": "tiny-random", "task": "cola", "n": 16, "seed": 0, "eval_limit": 32}
    return check_study(expand(parse_study({**base, **study})), data_dir)


def test_feasible_runs_pass(data_dir):
    res = _check(data_dir, methods=["zero-shot", "icl", "vanilla", {"method": "distill", "params": {"k": 4}}])
    assert res.ok and not res.warnings and res.runs == 4


def test_icl_demonstrations_longer_than_the_context_are_infeasible_and_the_fix_is_exact(data_dir):
    res = _check(data_dir, method="icl", max_context=128)
    assert not res.ok and {f.label.split(" · ")[0] for f in res.errors} == {"icl"}
    err = res.errors[0]
    assert "demonstrations alone are" in err.problem and "the context limit is 128" in err.problem
    needed = int(re.search(r"set max_context ≥ (\d+)", err.fix).group(1))
    # the suggested context is exactly what the run's own encoding needs: all prompts fit with it,
    # the longest one is skipped with one token less
    assert _check(data_dir, method="icl", max_context=needed).warnings == []
    short = _check(data_dir, method="icl", max_context=needed - 1)
    assert short.ok and len(short.warnings) == 1 and "1 of 32 prompts are longer" in short.warnings[0].problem


def test_max_context_beyond_the_model_window_is_clipped_with_a_warning(data_dir):
    res = _check(data_dir, method="zero-shot", max_context=4096)  # tiny-random: 2048 positions
    assert res.ok and any("exceeds the model's window of 2048" in w.problem for w in res.warnings)
    # 2 × 128 CoLA demonstrations (≈3k tokens) fit 4096 but not the window the run really gets
    icl = _check(data_dir, method="icl", n=128, max_context=4096)
    assert not icl.ok and "the context limit is 2048" in icl.errors[0].problem
    k = int(re.search(r"at most params.k=(\d+)", icl.errors[0].fix).group(1))
    assert 64 < k < 256 and _check(data_dir, method="icl", n=128, max_context=4096, params={"k": k - k % 2 - 16}).ok


def test_distillation_teacher_prompt_longer_than_the_context_is_infeasible(data_dir):
    res = _check(data_dir, method="distill", params={"k": 16}, max_context=200)
    assert any(f.problem.startswith("distillation teacher:") for f in res.errors), res.errors
    assert _check(data_dir, method="distill", params={"k": 2}, max_context=200).ok


def test_multi_token_verbalizer_is_infeasible(tmp_path, data_dir):
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(8)))
    (tmp_path / "t.yaml").write_text(
        "name: multitok\nlabel_names: [neg, pos]\ntext_fields: [text]\ntrain: {path: train.csv}\n"
        "eval_sets:\n  dev: {path: train.csv, in_domain: true}\n"
        "patterns:\n  minimal: {template: \"{text} ?\", verbalizer: [\" No\", \" Absolutelyyy\"]}\n")
    res = check_study(expand(parse_study({"model": "tiny-random", "task": str(tmp_path / "t.yaml"), "n": 2, "method": "zero-shot"})))
    assert not res.ok and "not one" in res.errors[0].problem and "single token" in res.errors[0].fix


def test_too_large_sample_is_infeasible(data_dir):
    res = _check(data_dir, method="vanilla", n=10**6)
    assert not res.ok and "n=1000000" in res.errors[0].problem


def test_paper_preset_icl_fits_its_context(data_dir):
    """The paper's heaviest ICL prompts (MNLI, 32 per class, 10 seeds) fit its max_context."""
    planned = [p for p in expand(load_study("paper")) if p.config.method == "icl" and p.config.task == "mnli" and p.config.n == 32]
    assert len(planned) == 10
    res = check_study(planned, data_dir)
    assert res.ok, [f.problem for f in res.errors]


@pytest.mark.slow  # starts processes: not in the fast tier
def test_dry_run_exits_2_and_lists_infeasible_runs(tmp_path, data_dir):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\nmodel: tiny-random\ntask: cola\nmethods: [icl, zero-shot]\nn: 16\neval_limit: 8\nmax_context: 100\n")
    env = dict(os.environ, FEWTUNE_DATA_DIR=str(data_dir), COLUMNS="200")
    res = subprocess.run([sys.executable, "-m", "fewtune", "study", str(cfg), "--out", str(tmp_path / "o"), "--dry-run"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "infeasible:" in res.stdout and "icl · cola · n=16 · seed=0" in res.stdout and "fix: set max_context ≥" in res.stdout
    assert "1 of 2 runs cannot work" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_selection_folds_too_small_to_choose_are_a_dry_run_warning(data_dir):
    small = _check(data_dir, n=2, method="vanilla", select={"train.lr": [1.0e-5, 1.0e-3]})
    assert small.ok and any("2 held-out examples" in w.problem and "decided: false" in w.problem for w in small.warnings)
    large = _check(data_dir, n=16, method="vanilla", select={"candidates": {"train.lr": [1.0e-5, 1.0e-3]}, "folds": 4})
    assert not any("held-out" in w.problem for w in large.warnings)
