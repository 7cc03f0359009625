"""The runner records failures honestly and writes results atomically."""

from __future__ import annotations

import json
import math

import pytest

from fewtune.config import RunConfig, TrainConfig
from fewtune.errors import TrainingDiverged
from fewtune.run.runner import run_experiment


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
    assert res.metrics["collapsed"] is None and res.metrics["train"]["chance_loss"] == pytest.approx(math.log(2))
    for m in res.metrics["eval"].values():
        assert m["n_ties"] == 0 and m["collapsed"] is False


def test_collapsed_training_completes_but_is_flagged(tmp_path, data_dir):
    """lr=1e6 blows the weights up until every input gets the same (uniform) output: the run is
    complete (status ok) but says so, and its tied predictions are coin flips, not all label 0."""
    cfg = RunConfig(task="cola", method="vanilla", model="tiny-random", n=2, eval_limit=8,
                    train=TrainConfig(lr=1e6, max_steps=4, batch_size=4))
    res = run_experiment(cfg, tmp_path / "run", data_dir=data_dir)
    m = res.metrics
    assert m["status"] == "ok" and "chance loss" in m["collapsed"] and m["collapsed"] in m["warnings"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["tie"] is True for r in rows) and {r["pred"] for r in rows} == {0, 1}
    for name, ev in m["eval"].items():
        assert ev["n_ties"] == ev["n"] == 8 and ev["collapsed"] is True
        assert any(w.startswith(f"{name}: collapsed") for w in m["warnings"])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["collapsed"] == m["collapsed"] and saved["eval"]["cola-id"]["n_ties"] == 8
