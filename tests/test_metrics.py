import math

import numpy as np
import pytest

from fewtune.metrics import accuracy, eval_set_metrics, mcc


def test_mcc_matches_hand_computed_binary():
    gold = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    pred = np.array([1, 1, 0, 0, 0, 1, 1, 1])
    tp, tn, fp, fn = 3, 2, 2, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert mcc(gold, pred, 2) == pytest.approx(expected)


def test_mcc_constant_predictor_is_zero_and_perfect_is_one():
    gold = np.array([0, 1, 1, 0, 1])
    assert mcc(gold, np.ones(5, dtype=int), 2) == 0.0
    assert mcc(gold, gold, 2) == pytest.approx(1.0)
    assert mcc(gold, 1 - gold, 2) == pytest.approx(-1.0)


def test_eval_set_metrics_skips_and_breakdowns():
    gold = np.array([0, 0, 1, 1, 1, 1])
    pred = np.array([0, 1, 1, 1, -1, 0])
    skipped = np.array([False, False, False, False, True, False])
    m = eval_set_metrics(gold, pred, skipped, ("entailment", "non-entailment"),
                         groups={"heuristic": ["a", "a", "b", "b", "b", "a"]},
                         outside_verbalizer=np.array([False, False, True, False, False, False]))
    assert m["n"] == 5 and m["n_skipped"] == 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["majority_label"] == "non-entailment" and m["majority_baseline"] == pytest.approx(4 / 6)
    assert m["per_label"]["entailment"] == {"n": 2, "accuracy": 0.5}
    assert m["per_label"]["non-entailment"]["accuracy"] == pytest.approx(2 / 3)
    assert m["groups"]["heuristic"]["a"] == {"n": 3, "accuracy": pytest.approx(1 / 3)}
    assert m["groups"]["heuristic"]["b"] == {"n": 2, "accuracy": 1.0}
    assert m["frac_outside_verbalizer"] == pytest.approx(1 / 5)
    # the one outside-verbalizer example was correct when restricted, wrong over the full vocabulary
    assert m["full_vocab_accuracy"] == pytest.approx(2 / 5)
    assert accuracy(np.array([]), np.array([])) != accuracy(np.array([]), np.array([]))  # NaN for empty
