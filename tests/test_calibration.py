"""Calibration of LM-head label scores: the arithmetic, and that each method estimates its bias
from its own prompt (contextual) or its own eval set (batch)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fewtune.scoring.calibration import CONTENT_FREE, apply, calibrate, mean_distribution

pytestmark = pytest.mark.usefixtures("one_thread")


def test_apply_divides_label_probabilities_by_the_bias_and_renormalises():
    # Unnormalised verbalizer log-probs (full-vocabulary softmax): 0.03 and 0.07 → 0.3 / 0.7 over labels.
    scores = np.log(np.array([[0.03, 0.07], [0.09, 0.01]]))
    bias = np.array([0.2, 0.8])
    expected = np.array([[0.3 / 0.2, 0.7 / 0.8], [0.9 / 0.2, 0.1 / 0.8]])
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.exp(apply(scores, bias)), expected, rtol=1e-9)


def test_batch_bias_is_the_mean_label_distribution_of_scored_rows_only():
    scores = np.log(np.array([[0.2, 0.8], [0.4, 0.6], [np.nan, np.nan], [0.999, 0.001]]))
    skipped = np.array([False, False, True, True])
    np.testing.assert_allclose(mean_distribution(scores, skipped), [0.3, 0.7], rtol=1e-9)


def test_batch_calibration_undoes_a_prior_shared_by_every_example():
    # Every example prefers label 1, but the evidence for label 0 varies: a shared prior.
    rng = np.random.default_rng(0)
    p0 = rng.uniform(0.05, 0.45, size=200)
    scores = np.log(np.stack([p0, 1 - p0], axis=1))
    skipped = np.zeros(200, dtype=bool)
    assert (scores.argmax(axis=1) == 1).all()
    cal = calibrate("batch", scores, skipped)
    pred = cal.label_scores.argmax(axis=1)
    assert 0.3 < (pred == 0).mean() < 0.7
    assert cal.record["transductive"] is True
    np.testing.assert_allclose(cal.record["bias"], [p0.mean(), 1 - p0.mean()], atol=1e-6)


def test_contextual_uses_the_content_free_scores_and_keeps_skipped_rows_skipped():
    scores = np.log(np.array([[0.5, 0.5], [np.nan, np.nan]]))
    cal = calibrate("contextual", scores, np.array([False, True]), lambda: np.log(np.array([[0.25, 0.75]] * 3)))
    assert np.isnan(cal.label_scores[1]).all()
    np.testing.assert_allclose(np.exp(cal.label_scores[0]), [0.75, 0.25], rtol=1e-9)
    assert cal.record["content_free"] == list(CONTENT_FREE) and cal.record["transductive"] is False
    assert calibrate("none", scores, np.array([False, True])) is None


def _run(tmp_path, name, method, calibration, *extra):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "fewtune", "run", "--model", "tiny-random", "--task", "cola", "--method", method,
           "--n", "4", "--out", str(out), "--set", "eval_limit=24", "--set", "eval_sets=[cola-id]",
           "--set", "precision=fp32", "--set", f"params.calibration={calibration}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc, out


def _preds(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def icl_runs(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("calib")
    runs = {}
    for mode in ("none", "contextual", "batch"):
        proc, out = _run(tmp, mode, "icl", mode)
        assert proc.returncode == 0, proc.stderr
        runs[mode] = out
    return runs


@pytest.mark.slow  # starts processes: not in the fast tier
def test_icl_contextual_bias_is_measured_in_the_runs_own_prompt(icl_runs, data_dir):
    """Recompute the bias independently: the same demonstrations, then each content-free query."""
    import torch

    from fewtune.models.loading import load_model
    from fewtune.scoring.calibration import mean_distribution
    from fewtune.scoring.scorer import score_prompts
    from fewtune.tasks import get_task, load_train
    from fewtune.tasks.prompts import verbalizer_token_ids

    metrics = json.loads((icl_runs["contextual"] / "metrics.json").read_text())
    record = metrics["eval"]["cola-id"]["calibration"]
    task = get_task("cola")
    pattern = task.pattern(metrics["pattern"])
    pool = {e.id: e for e in load_train(task, data_dir)}
    demos = [pool[i] for i in metrics["method_info"]["demonstration_ids"]]
    prefix = task.icl_separator.join(pattern.demonstration(e.fields, e.label) for e in demos)
    queries = [task.icl_separator + pattern.query({f: cf for f in pattern.fields()}) for cf in CONTENT_FREE]
    torch.manual_seed(0)
    lm = load_model("tiny-random", seed=0)
    ids = verbalizer_token_ids(lm.tokenizer, pattern.verbalizer).token_ids
    scores = score_prompts(lm.model, lm.tokenizer, queries, ids, prefix=prefix, precision="fp32", use_prefix_cache=False)
    np.testing.assert_allclose(record["bias"], mean_distribution(scores.label_logprobs), atol=2e-5)


@pytest.mark.slow  # starts processes: not in the fast tier
def test_calibrated_predictions_follow_the_recorded_bias(icl_runs):
    raw = {r["id"]: r for r in _preds(icl_runs["none"])}
    for mode in ("contextual", "batch"):
        bias = np.array(json.loads((icl_runs[mode] / "metrics.json").read_text())["eval"]["cola-id"]["calibration"]["bias"])
        rows = _preds(icl_runs[mode])
        expected = [int(np.argmax(apply(np.array([raw[r["id"]]["label_logprobs"]]), bias)[0])) for r in rows]
        assert [r["pred"] for r in rows] == expected
        # the stored label scores are the calibrated ones (a distribution over the labels)
        assert all(abs(sum(np.exp(r["label_logprobs"])) - 1) < 1e-4 for r in rows)


@pytest.mark.slow  # starts processes: not in the fast tier
def test_batch_calibration_is_recorded_as_transductive(icl_runs):
    metrics = json.loads((icl_runs["batch"] / "metrics.json").read_text())
    record = metrics["eval"]["cola-id"]["calibration"]
    raw = np.array([r["label_logprobs"] for r in _preds(icl_runs["none"])])
    assert record["transductive"] is True
    np.testing.assert_allclose(record["bias"], mean_distribution(raw), atol=1e-5)
    assert "calibration" not in json.loads((icl_runs["none"] / "metrics.json").read_text())["eval"]["cola-id"]


@pytest.mark.slow  # starts processes: not in the fast tier
def test_zero_shot_and_pbft_calibrate_too(tmp_path, data_dir):
    for method, extra in (("zero-shot", ()), ("pbft", ("--set", "train.max_steps=1", "--set", "train.batch_size=4"))):
        proc, out = _run(tmp_path, method, method, "contextual", *extra)
        assert proc.returncode == 0, proc.stderr
        record = json.loads((out / "metrics.json").read_text())["eval"]["cola-id"]["calibration"]
        assert record["mode"] == "contextual" and abs(sum(record["bias"]) - 1) < 1e-5


@pytest.mark.parametrize("method, extra, needle", [
    ("lora", (), "needs objective 'lm'"),
    ("vanilla", (), "unknown key"),
    ("icl", (), "Input should be"),
])
@pytest.mark.slow  # starts processes: not in the fast tier
def test_calibration_where_it_cannot_apply_is_a_usage_error(tmp_path, method, extra, needle):
    value = "sideways" if method == "icl" else "batch"
    out = tmp_path / method
    cmd = [sys.executable, "-m", "fewtune", "run", "--model", "tiny-random", "--method", method, "--out", str(out),
           "--set", f"params.calibration={value}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("method, params", [("pbft", {}), ("lora", {"objective": "lm", "r": 2})])
def test_lm_objective_contextual_bias_is_the_content_free_scores_of_the_trained_model(method, params):
    """The recorded bias equals the mean label distribution of the content-free inputs in the
    method's own pattern, scored by the trained model — not of the eval texts."""
    from test_methods_train import make, toy_examples

    from fewtune.scoring.scorer import score_prompts

    m = make(method, {**params, "calibration": "contextual"}, lr=1e-2, max_steps=3, batch_size=8, warmup_ratio=0.0)
    m.fit(toy_examples(16))
    evals = toy_examples(12, seed=5, prefix="e")
    preds = m.predict(evals)
    ctx = m.ctx

    def label_logprobs(texts):
        return score_prompts(m.scoring_model(), ctx.lm.tokenizer, texts, ctx.verbalizer.token_ids,
                             batch_size=8, precision="fp32").label_logprobs

    content_free = [ctx.pattern.query({"sentence": filler}) for filler in CONTENT_FREE]
    want = mean_distribution(label_logprobs(content_free))
    from_evals = mean_distribution(label_logprobs([ctx.pattern.query(e.fields) for e in evals]))
    assert preds.calibration["mode"] == "contextual"
    assert preds.calibration["bias"] == pytest.approx(want.tolist(), abs=1e-5)
    assert not np.allclose(want, from_evals, atol=1e-3)  # the two estimates differ: the test can tell them apart
