import math

import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef

from fewtune.scoring.scorer import argmax_breaking_ties
from fewtune.stats.metrics import accuracy, eval_set_metrics, loss_collapse, mcc, prediction_collapse


def test_mcc_matches_hand_computed_binary():
    gold = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    pred = np.array([1, 1, 0, 0, 0, 1, 1, 1])
    tp, tn, fp, fn = 3, 2, 2, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert mcc(gold, pred, 2) == pytest.approx(expected)


@pytest.mark.parametrize("num_labels", [2, 3])
def test_mcc_matches_scikit_learn(num_labels):
    rng = np.random.default_rng(num_labels)
    for _ in range(20):
        gold = rng.integers(0, num_labels, 40)
        pred = np.where(rng.random(40) < 0.6, gold, rng.integers(0, num_labels, 40))
        assert mcc(gold, pred, num_labels) == pytest.approx(matthews_corrcoef(gold, pred), abs=1e-12)


def test_mcc_is_undefined_for_a_single_gold_class():
    gold = np.ones(6, dtype=int)
    assert math.isnan(mcc(gold, np.array([1, 0, 1, 1, 0, 1]), 2))
    m = eval_set_metrics(gold, np.array([1, 0, 1, 1, 0, 1]), np.zeros(6, bool), ("a", "b"))
    assert math.isnan(m["mcc"]) and any("MCC undefined" in w for w in m["warnings"])
    assert not m["collapsed"]  # one gold class: predicting it everywhere is not a collapse


def test_constant_predictions_are_flagged_collapsed():
    gold = np.array([0, 1, 1, 0, 1])
    m = eval_set_metrics(gold, np.zeros(5, dtype=int), np.zeros(5, bool), ("no", "yes"))
    assert m["collapsed"] is True and m["mcc"] == 0.0 and any("collapsed" in w for w in m["warnings"])
    m = eval_set_metrics(gold, np.array([0, 0, 0, 0, 1]), np.zeros(5, bool), ("no", "yes"))
    assert m["collapsed"] is False and not m["warnings"]
    # the skipped example (-1) does not count as a second predicted label
    skipped = np.array([False, False, False, False, True])
    assert eval_set_metrics(gold, np.array([0, 0, 0, 0, -1]), skipped, ("no", "yes"))["collapsed"] is True
    assert not prediction_collapse(np.array([], dtype=int), np.array([], dtype=int))


def test_loss_collapse_at_chance_level_only():
    assert "collapsed" in loss_collapse(math.log(2) + 0.0005, math.log(2))
    assert "collapsed" in loss_collapse(math.log(49152), math.log(49152))
    assert loss_collapse(0.3, math.log(2)) is None
    assert loss_collapse(math.log(2) - 0.01, math.log(2)) is None  # near chance, still learning
    assert loss_collapse(None, math.log(2)) is None and loss_collapse(0.69, None) is None


def test_all_ties_is_a_collapse():
    gold = np.array([0, 1, 0, 1])
    m = eval_set_metrics(gold, np.array([0, 1, 1, 0]), np.zeros(4, bool), ("no", "yes"), tie=np.ones(4, bool))
    assert m["collapsed"] is True and any("exact tie" in w for w in m["warnings"])


def test_ties_are_counted_on_scored_examples():
    gold = np.array([0, 1, 0, 1])
    tie = np.array([True, False, True, True])
    skipped = np.array([False, False, False, True])
    m = eval_set_metrics(gold, np.array([0, 1, 1, -1]), skipped, ("no", "yes"), tie=tie)
    assert m["n_ties"] == 2


def test_ties_are_broken_by_a_fair_seeded_coin():
    scores = np.zeros((2000, 2))  # every row an exact tie
    keys = [f"ex{i}" for i in range(2000)]
    pred, tie = argmax_breaking_ties(scores, np.zeros(2000, bool), keys)
    assert tie.all() and 0.45 < (pred == 0).mean() < 0.55  # np.argmax would give label 0 every time
    again, _ = argmax_breaking_ties(scores, np.zeros(2000, bool), keys)
    assert (again == pred).all()  # deterministic
    perm = np.random.default_rng(0).permutation(2000)
    shuffled, _ = argmax_breaking_ties(scores[perm], np.zeros(2000, bool), [keys[i] for i in perm])
    assert (shuffled == pred[perm]).all()  # follows the example, not its position
    # three labels, two tied at the top: the coin never picks the lower third label
    three = np.tile([-1.0, -0.5, -0.5], (200, 1))
    p3, t3 = argmax_breaking_ties(three, np.zeros(200, bool), keys[:200])
    assert t3.all() and set(p3.tolist()) == {1, 2}


def test_argmax_without_ties_and_skipped_rows():
    scores = np.array([[-0.1, -2.0], [-3.0, -0.2], [np.nan, np.nan], [-1.0, -1.0 + 1e-12]])
    pred, tie = argmax_breaking_ties(scores, np.array([False, False, True, False]))
    assert pred.tolist() == [0, 1, -1, 1] and tie.tolist() == [False, False, False, False]


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
    # on the 5 scored examples (the skipped one is non-entailment too): 3/5, not 4/6
    assert m["majority_label"] == "non-entailment" and m["majority_baseline"] == pytest.approx(3 / 5)
    assert m["per_label"]["entailment"] == {"n": 2, "accuracy": 0.5}
    assert m["per_label"]["non-entailment"]["accuracy"] == pytest.approx(2 / 3)
    assert m["groups"]["heuristic"]["a"] == {"n": 3, "accuracy": pytest.approx(1 / 3)}
    assert m["groups"]["heuristic"]["b"] == {"n": 2, "accuracy": 1.0}
    assert m["frac_outside_verbalizer"] == pytest.approx(1 / 5)
    # the one outside-verbalizer example was correct when restricted, wrong over the full vocabulary
    assert m["full_vocab_accuracy"] == pytest.approx(2 / 5)
    assert accuracy(np.array([]), np.array([])) != accuracy(np.array([]), np.array([]))  # NaN for empty
