"""fewtune.results (runs and predictions as data frames) and ``fewtune export`` through the real CLI."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_report import build_study
from test_stats import make_run

from fewtune.errors import ConfigError
from fewtune.results import load_predictions, load_runs

REQUIRED = ["run_id", "model", "task", "method", "arm", "params", "n", "seed", "eval_set", "domain", "accuracy", "mcc",
            "majority_baseline", "n_eval", "n_skipped", "peak_memory_mb", "trainable_params", "train_seconds", "eval_seconds", "status"]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    runs = [make_run("cola", m, 16, s, (0.6 + 0.01 * s, 0.55), memory=300.0 + s) for m in ("vanilla", "zero-shot") for s in range(2)]
    failed = [make_run("cola", "lora", 16, 0, (0.5, 0.5))]
    pending = [make_run("cola", "lora", 16, 1, (0.5, 0.5))]
    return build_study(tmp_path_factory.mktemp("study"), runs, failed, pending, claims=())


def test_load_runs_one_row_per_run_and_eval_set_with_failed_runs(study: Path) -> None:
    db = (study / "study.db").read_bytes()
    f = load_runs(study)
    assert set(REQUIRED) <= set(f.columns)
    assert len(f) == 6 * 2 and not f.duplicated(["run_id", "eval_set"]).any()  # 6 runs × 2 eval sets
    assert f["status"].value_counts().to_dict() == {"done": 8, "failed": 2, "pending": 2}
    failed = f[f["status"] == "failed"]
    assert failed["accuracy"].isna().all() and failed["error"].str.contains("TrainingDiverged").all()
    assert set(failed["eval_set"]) == {"cola-id", "cola-ood"}
    v = f[(f["method"] == "vanilla") & (f["seed"] == 1) & (f["eval_set"] == "cola-id")].iloc[0]
    assert v["accuracy"] == pytest.approx(0.61) and v["majority_baseline"] == pytest.approx(0.69) and v["n_eval"] == 100
    assert v["peak_memory_mb"] == 301.0 and v["domain"] == "id" and v["n"] == 16 and f["n_eval"].dtype == "Int64"
    assert (study / "study.db").read_bytes() == db  # read-only


def test_load_runs_reads_the_run_files_not_the_database_copy(study: Path, tmp_path: Path) -> None:
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    run_dir = next(p for p in (copy / "runs").iterdir() if "vanilla" in p.name and p.name.endswith("-0-tiny-random"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["eval"]["cola-id"]["accuracy"] = 0.123
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    f = load_runs(copy)
    rid = metrics["run_id"]
    assert f.loc[(f["run_id"] == rid) & (f["eval_set"] == "cola-id"), "accuracy"].tolist() == [0.123]
    alone = load_runs([run_dir])  # a run directory on its own
    assert alone.loc[alone["eval_set"] == "cola-id", "accuracy"].tolist() == [0.123] and set(alone["status"]) == {"done"}


def test_zero_shot_n_is_not_applicable(study: Path) -> None:
    f = load_runs(study)
    assert not f.loc[f["method"] == "zero-shot", "n_applies"].any()
    assert f.loc[f["method"] == "vanilla", "n_applies"].all()


def test_load_predictions_per_example(study: Path) -> None:
    p = load_predictions(study)
    assert len(p) == 4 * 2 * 100  # finished runs × eval sets × examples (as test_report writes them)
    assert {"run_id", "method", "seed", "eval_set", "id", "gold", "pred", "skipped"} <= set(p.columns)
    assert p.groupby("run_id").size().eq(200).all()
    acc = (p[~p["skipped"]].assign(ok=lambda d: d["gold"] == d["pred"]).groupby(["run_id", "eval_set"])["ok"].mean())
    f = load_runs(study).set_index(["run_id", "eval_set"])
    assert acc.to_dict() == pytest.approx(f.loc[acc.index, "accuracy"].to_dict())  # the rows are the scored examples


def test_load_runs_refuses_what_is_not_a_study(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a study directory nor a run directory"):
        load_runs([tmp_path])
    with pytest.raises(ConfigError, match="not a study directory"):
        load_runs(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fewtune", "export", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # starts processes: not in the fast tier
def test_export_csv_and_jsonl_through_the_cli(study: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs.csv"
    r = _cli(str(study), "--out", str(out))
    assert r.returncode == 0, r.stderr
    got = pd.read_csv(out)
    want = load_runs(study)
    assert len(got) == len(want) and list(got.columns) == list(want.columns)
    assert got["accuracy"].sum() == pytest.approx(want["accuracy"].sum())
    r = _cli(str(study), "--format", "jsonl", "--out", str(tmp_path / "runs.jsonl"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == len(want) and {r["status"] for r in rows} == {"done", "failed", "pending"}


@pytest.mark.slow  # starts processes: not in the fast tier
def test_export_never_overwrites_silently(study: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine.csv"
    out.write_text("my own notes\n")
    r = _cli(str(study), "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert out.read_text() == "my own notes\n"
    assert _cli(str(study), "--out", str(out), "--overwrite").returncode == 0
    assert out.read_text().startswith("run_id,")


@pytest.mark.slow  # starts processes: not in the fast tier
def test_export_parquet(study: Path, tmp_path: Path) -> None:
    r = _cli(str(study), "--format", "parquet", "--out", str(tmp_path / "runs.parquet"))
    if importlib.util.find_spec("pyarrow") is None:
        assert r.returncode == 2 and "pyarrow" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "runs.parquet").exists()
    else:
        assert r.returncode == 0, r.stderr
        assert len(pd.read_parquet(tmp_path / "runs.parquet")) == len(load_runs(study))


def test_arm_labels_ignore_keys_that_compute_nothing():
    """One arm, whether a run's config comes from config.yaml (no log_to) or from study.db
    (log_to: []); a key that does compute something still tells arms apart."""
    from fewtune.stats import arm_labels

    base = {"method": "icl", "task": "cola", "model": "tiny-random", "n": 2, "params": {"k": 4}}
    configs = {"a": {**base, "seed": 0}, "b": {**base, "seed": 1, "log_to": []}, "c": {**base, "seed": 2, "log_to": ["tensorboard"],
                                                                                    "log_dir": "x"}}
    assert set(arm_labels(configs).values()) == {"icl"}
    configs["d"] = {**base, "seed": 3, "params": {"k": 8}}
    assert arm_labels(configs)["d"] == "icl k=8" and arm_labels(configs)["a"] == "icl k=4"
