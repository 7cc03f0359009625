"""Every training-based method, end to end through the runner: the embedded model, real CoLA,
n=2 per class, two optimizer steps, 10 examples per eval set. Checks the outputs, not accuracy."""

from __future__ import annotations

import json

import pytest

from fewtune.config import RunConfig, TrainConfig

pytestmark = pytest.mark.integration

CASES = [
    ("vanilla", {}),
    ("pbft", {}),
    ("pbft-released", {}),
    ("adaptive", {"llrd": 0.95}),
    ("lora", {"r": 2}),
    ("distill", {"k": 2}),
    ("distill", {"k": 2, "student": "lora"}),
    ("distill-released", {"released_logit_target": False}),
]


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}{'-lora' if p.get('student') == 'lora' else ''}" for m, p in CASES])
def test_method_runs_on_cola(method, params, data_dir, tmp_path):
    from fewtune.run.runner import run_experiment

    cfg = RunConfig(task="cola", method=method, params=params, n=2, seed=0, eval_limit=10,
                    train=TrainConfig(max_steps=2, lr=1e-4, eval_every_epoch=True))
    res = run_experiment(cfg, tmp_path / "run", data_dir=data_dir)
    m = res.metrics
    r = m["resources"]
    assert r["optimizer_steps"] == 2 and m["train"]["steps"] == 2
    assert 0 < r["trainable_params"] <= r["total_params"]
    assert r["train_tokens_per_s"] and r["train_seconds"] > 0 and r["eval_seconds"] > 0 and r["peak_memory_mb"] > 0
    assert len(m["curve"]) == 2 and set(m["curve"][0]["eval"]) == set(m["eval"])
    for ev in m["eval"].values():
        assert ev["n"] + ev["n_skipped"] == 10
        assert (ev["frac_outside_verbalizer"] is not None) == (method in ("pbft", "distill"))
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "sample.json", "metrics.json", "predictions.jsonl"} <= files
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(row["pred"] in (0, 1) for row in rows)
    if method == "lora":
        assert r["trainable_params"] < 0.05 * r["total_params"]
    if method == "adaptive":
        assert r["trainable_params"] < 0.5 * r["total_params"]
