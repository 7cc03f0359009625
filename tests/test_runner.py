"""The runner records failures honestly and writes results atomically."""

from __future__ import annotations

import json

import pytest

from fewtune.config import RunConfig, TrainConfig
from fewtune.errors import TrainingDiverged
from fewtune.runner import run_experiment


def test_diverged_training_leaves_a_record_with_the_reason(tmp_path, data_dir, monkeypatch):
    from fewtune.methods import vanilla

    def explode(self, sample):
        raise TrainingDiverged("training diverged: the loss became nan at optimizer step 3 (epoch 1)")

    monkeypatch.setattr(vanilla.Vanilla, "fit", explode)
    cfg = RunConfig(task="cola", method="vanilla", model="tiny-random", n=2, eval_limit=8)
    with pytest.raises(TrainingDiverged):
        run_experiment(cfg, tmp_path / "run", data_dir=data_dir)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and "optimizer step 3" in metrics["error"]
    assert "eval" not in metrics
    assert (tmp_path / "run" / "predictions.jsonl").read_text() == ""


def test_successful_run_is_ok_and_ids_match_sample(tmp_path, data_dir):
    cfg = RunConfig(task="cola", method="vanilla", model="tiny-random", n=2, eval_limit=8,
                    train=TrainConfig(max_steps=1, batch_size=4))
    res = run_experiment(cfg, tmp_path / "run", data_dir=data_dir)
    assert res.metrics["status"] == "ok"
    sample = json.loads((tmp_path / "run" / "sample.json").read_text())
    assert len(sample["ids"]) == 4
    assert res.metrics["resources"]["optimizer_steps"] == 1
    assert 0 < res.metrics["resources"]["trainable_params"] <= res.metrics["resources"]["total_params"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
