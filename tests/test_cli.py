"""The CLI turns every bad input into a clear message, exit code 2, and no output left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.usefixtures("data_dir"), pytest.mark.slow]  # the real CLI in subprocesses: not in the fast tier


def fewtune(*args: str, data_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FEWTUNE_DATA_DIR=str(data_dir), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "fewtune", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


BASE = ["run", "--model", "tiny-random", "--eval-limit", "8", "--n", "2"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "colla"], "unknown task 'colla'"),
        (["--method", "icll"], "unknown method 'icll'"),
        (["--pattern", "gpt3"], "unknown pattern 'gpt3'"),
        (["--model", "/no/such/model"], "cannot load model"),
        (["--set", "train.learning_rate=1"], "unknown key 'train.learning_rate'"),
        (["--set", "params.kk=2"], "kk"),
        (["--n", "3000"], "n=3000"),
        (["--set", "max_context=40"], "context"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path, data_dir, extra, message):
    out = tmp_path / "out"
    res = fewtune(*BASE, "--task", "cola", "--method", "icl", *extra, "--out", str(out), data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr.replace("\n", " ")
    assert "Traceback" not in res.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dirs either


def test_corrupted_data_file_is_reported(tmp_path, data_dir):
    bad = tmp_path / "data"
    (bad / "cola").mkdir(parents=True)
    for f in (data_dir / "cola").iterdir():
        (bad / "cola" / f.name).write_bytes(f.read_bytes())
    p = bad / "cola" / "in_domain_dev.tsv"
    p.write_bytes(p.read_bytes().replace(b"\t1\t", b"\t0\t", 1))
    res = fewtune(*BASE, "--task", "cola", "--method", "zero-shot", "--out", str(tmp_path / "o"), data_dir=bad, cwd=tmp_path)
    assert res.returncode == 2 and "in_domain_dev.tsv" in res.stderr and "sha256" in res.stderr.lower()
    assert not (tmp_path / "o").exists()


def test_run_writes_the_four_files_and_a_summary(tmp_path, data_dir):
    out = tmp_path / "run"
    res = fewtune(*BASE, "--task", "mnli", "--method", "zero-shot", "--eval-sets", "mnli-m,hans", "--out", str(out),
                  data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.json", "predictions.jsonl", "sample.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"mnli-m", "hans"}
    assert metrics["eval"]["hans"]["domain"] == "ood" and metrics["eval"]["mnli-m"]["domain"] == "id"
    assert set(metrics["eval"]["hans"]["groups"]["heuristic"]) <= {"lexical_overlap", "subsequence", "constituent"}
    assert metrics["resources"]["trainable_params"] == 0 and metrics["resources"]["total_params"] > 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 16
    assert "mnli-m" in res.stdout and "accuracy" in res.stdout


def test_listing_commands(tmp_path, data_dir):
    res = fewtune("methods", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0 and "icl" in res.stdout and "zero-shot" in res.stdout
    res = fewtune("tasks", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0 and "hans" in res.stdout and "cola-ood" in res.stdout


def _write_custom_task(tmp_path: Path, verbalizer: str) -> Path:
    rows = ["text,label"] + [f"\"sample {i} is {'good' if i % 2 else 'bad'}\",{i % 2}" for i in range(12)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps({"text": f"item {i}", "label": i % 2}) for i in range(6)) + "\n")
    task = tmp_path / "toy.yaml"
    task.write_text(
        "name: toy\nlabel_names: [bad, good]\ntext_fields: [text]\n"
        "train: {path: train.csv}\neval_sets: {dev: {path: dev.jsonl, in_domain: true}}\n"
        f"patterns: {{minimal: {{template: '{{text}} ?', target_prefix: '', verbalizer: [' No', '{verbalizer}']}}}}\n"
    )
    return task


def test_custom_task_yaml_runs_through_the_cli(tmp_path, data_dir):
    task = _write_custom_task(tmp_path, " Yes")
    out = tmp_path / "run"
    res = fewtune("run", "--model", "tiny-random", "--n", "2", "--task", str(task), "--method", "icl", "--out", str(out),
                  data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "toy" and metrics["eval"]["dev"]["n"] == 6


def test_custom_task_with_multi_token_verbalizer_is_refused(tmp_path, data_dir):
    task = _write_custom_task(tmp_path, " Supercalifragilistic")
    res = fewtune("run", "--model", "tiny-random", "--n", "2", "--task", str(task), "--method", "zero-shot",
                  "--out", str(tmp_path / "o"), data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2 and "not one" in res.stderr and "Supercalifragilistic" in res.stderr
    assert not (tmp_path / "o").exists()


def test_zero_shot_summary_says_n_is_not_applicable(tmp_path, data_dir):
    """Zero-shot reads no few-shot sample: its n and seed are not shown as if they mattered."""
    common = ("--model", "tiny-random", "--eval-limit", "8")
    res = fewtune("run", *common, "--method", "zero-shot", "--out", "z", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    title = next(line for line in res.stdout.splitlines() if "zero-shot ·" in line)
    assert "n n/a" in title and "n=" not in title
    res = fewtune("run", *common, "--method", "icl", "--n", "2", "--out", "i", data_dir=data_dir, cwd=tmp_path)
    assert "n=2" in next(line for line in res.stdout.splitlines() if "icl ·" in line)
