"""Experiment trackers (log_to): outside the run id, and read back from the local stores."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fewtune.config import RunConfig, validate
from fewtune.errors import ConfigError
from fewtune.overrides import run_data
from fewtune.training import tracking


def test_log_to_changes_neither_the_run_id_nor_config_yaml():
    plain = RunConfig(method="vanilla")
    logged = RunConfig(method="vanilla", log_to=["tensorboard", "mlflow"], log_dir="/tmp/x")
    assert plain.content_hash() == logged.content_hash()
    assert "log_to" not in logged.result_dump() and "log_dir" not in logged.result_dump()
    assert RunConfig(method="vanilla", n=4).content_hash() != plain.content_hash()  # the hash still sees results


def test_log_to_through_set_and_unknown_tracker_refused():
    cfg = validate(RunConfig, run_data({}, {}, ["log_to=[tensorboard]"]), where="run config")
    assert cfg.log_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="log_to"):
        validate(RunConfig, {"log_to": ["neptune"]}, where="run config")


def test_missing_tracker_package_is_a_config_error_with_an_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match="needs the 'mlflow-skinny' package") as exc:
        tracking.check_available(["tensorboard", "mlflow"])
    assert "fewtune[trackers]" in exc.value.hint


def test_missing_tracker_stops_a_run_before_any_work(monkeypatch, tmp_path):
    from fewtune.run.runner import run_experiment

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="log_to 'wandb'"):
        run_experiment(RunConfig(method="icl", model="tiny-random", log_to=["wandb"]), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_curve_points_put_epoch_points_on_the_step_axis():
    metrics = {"train": {"loss_history": [1.0, 0.5, 0.25, 0.2], "loss_history_every": 1, "steps": 4, "epochs_run": 2.0},
               "curve": [{"epoch": 1.0, "train_loss": 0.75, "eval": {"dev": {"accuracy": 0.5, "mcc": None}}}]}
    points = list(tracking.curve_points(metrics))
    assert points[:4] == [(1, {"train/loss": 1.0}), (2, {"train/loss": 0.5}), (3, {"train/loss": 0.25}), (4, {"train/loss": 0.2})]
    assert points[4] == (2, {"curve/train_loss": 0.75, "curve/dev/accuracy": 0.5})


def _tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow  # starts processes: not in the fast tier
def test_a_run_logged_to_tensorboard_and_mlflow_reads_back(tmp_path, data_dir, monkeypatch):
    """Through the CLI: the learning curve and final metrics, under the run id, in both stores;
    the run id and config.yaml as without trackers."""
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install 'fewtune[trackers]')")
    with_mlflow = importlib.util.find_spec("mlflow") is not None
    trackers = "tensorboard,mlflow" if with_mlflow else "tensorboard"
    if not with_mlflow:
        print("MLflow not installed: its part of this test is skipped (pip install mlflow-skinny)")
    env = {**os.environ, "FEWTUNE_DATA_DIR": str(data_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "fewtune", "run", "--task", "cola", "--method", "vanilla", "--model", "tiny-random",
                        "--n", "4", "--eval-limit", "20", "--set", "train.epochs=2", "--set", "train.batch_size=4",
                        "--set", "train.eval_every_epoch=true", "--log-to", trackers, "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "warning: logging run" not in r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    run_id = metrics["run_id"]
    assert "log_to" not in (out / "config.yaml").read_text()

    scalars = _tb_scalars(out / "trackers" / "tensorboard" / run_id)
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(metrics["train"]["loss_history"], rel=1e-6)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, metrics["train"]["steps"] + 1))
    assert len(scalars["curve/cola-id/accuracy"]) == 2
    assert scalars["eval/cola-id/accuracy"][0][1] == pytest.approx(metrics["eval"]["cola-id"]["accuracy"])
    assert scalars["resources/peak_memory_mb"][0][1] == pytest.approx(metrics["resources"]["peak_memory_mb"], rel=1e-6)

    if with_mlflow:
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

        client = MlflowClient(tracking_uri=(out / "trackers" / "mlruns").resolve().as_uri())
        runs = client.search_runs([client.get_experiment_by_name("fewtune").experiment_id])
        assert [x.info.run_name for x in runs] == [run_id]
        run = runs[0]
        assert run.data.params["method"] == "vanilla" and run.data.params["train.epochs"] == "2.0"
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(metrics["train"]["loss_history"], rel=1e-6)
        assert run.data.metrics["eval/cola-id/accuracy"] == pytest.approx(metrics["eval"]["cola-id"]["accuracy"])
