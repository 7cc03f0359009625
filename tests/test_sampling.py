"""Few-shot sampling, eval subsampling and ICL demonstrations: determinism, balance, errors."""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import numpy as np
import pytest

from fewtune.errors import ConfigError
from fewtune.tasks import load_eval, load_train
from fewtune.tasks.base import Example
from fewtune.tasks.sampling import balanced_demonstrations, few_shot_sample, stratified_subsample


def pool(sizes: list[int]) -> list[Example]:
    """Examples with ``sizes[label]`` of each label, grouped by label (like a sorted file)."""
    return [Example(f"e{lab}-{i}", {"text": f"t{lab}-{i}"}, lab) for lab, size in enumerate(sizes) for i in range(size)]


def counts(examples: list[Example]) -> dict[int, int]:
    return dict(collections.Counter(e.label for e in examples))


def ids(examples: list[Example]) -> list[str]:
    return [e.id for e in examples]


# --- few_shot_sample ---------------------------------------------------------------------------


def test_same_seed_same_sample_regardless_of_global_rng() -> None:
    p = pool([50, 80])
    np.random.seed(1)
    random.seed(1)
    a = few_shot_sample(p, 8, seed=3, num_labels=2)
    np.random.seed(999)
    random.seed(999)
    np.random.rand(10)
    b = few_shot_sample(p, 8, seed=3, num_labels=2)
    assert ids(a.examples) == ids(b.examples)


def test_different_seeds_give_different_samples() -> None:
    p = pool([50, 80])
    samples = [frozenset(ids(few_shot_sample(p, 8, seed=s, num_labels=2).examples)) for s in range(10)]
    assert len(set(samples)) == 10


def test_per_class_balance_and_shuffle() -> None:
    p = pool([40, 100])
    s = few_shot_sample(p, 16, seed=0, num_labels=2)
    assert counts(s.examples) == {0: 16, 1: 16} and len(set(ids(s.examples))) == 32
    labels = [e.label for e in s.examples]
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)  # not grouped by label
    assert all(e in p for e in s.examples)


def test_total_n_is_as_balanced_as_possible() -> None:
    p = pool([30, 30, 30])
    seen = set()
    for seed in range(20):
        s = few_shot_sample(p, 7, seed=seed, num_labels=3, per_class=False)
        c = counts(s.examples)
        assert len(s.examples) == 7 and sorted(c.values()) == [2, 2, 3]
        seen.add(max(c, key=c.get))
    assert seen == {0, 1, 2}  # the extra example goes to a seeded-random label


def test_total_n_remainder_goes_to_labels_with_room() -> None:
    s = few_shot_sample(pool([3, 10]), 7, seed=0, num_labels=2, per_class=False)
    assert counts(s.examples) == {0: 3, 1: 4}


def test_n_too_large_names_class_size_and_max() -> None:
    with pytest.raises(ConfigError) as err:
        few_shot_sample(pool([5, 9]), 6, seed=0, num_labels=2, label_names=("neg", "pos"), task="toy")
    text = str(err.value)
    assert "n=6 per class" in text and "label 0 ('neg') has only 5" in text and "largest n per class is 5" in text
    with pytest.raises(ConfigError, match="largest balanced total n is 11"):
        few_shot_sample(pool([5, 9]), 12, seed=0, num_labels=2, per_class=False)
    assert len(few_shot_sample(pool([5, 9]), 11, seed=0, num_labels=2, per_class=False).examples) == 11
    with pytest.raises(ConfigError, match="at least 1"):
        few_shot_sample(pool([5, 9]), 0, seed=0, num_labels=2)
    with pytest.raises(ConfigError, match="outside 0..1"):
        few_shot_sample(pool([5, 5, 5]), 1, seed=0, num_labels=2)


def test_manifest() -> None:
    s = few_shot_sample(pool([20, 20]), 4, seed=7, num_labels=2, task="toy")
    m = s.manifest()
    assert json.loads(json.dumps(m)) == m
    assert m["task"] == "toy" and m["seed"] == 7 and m["n"] == 4 and m["per_class"] is True
    assert m["ids"] == ids(s.examples) and m["label_counts"] == {"0": 4, "1": 4}
    again = few_shot_sample(pool([20, 20]), 4, seed=7, num_labels=2)
    assert again.manifest()["sha256"] == m["sha256"] and "task" not in again.manifest()
    assert few_shot_sample(pool([20, 20]), 4, seed=8, num_labels=2).manifest()["sha256"] != m["sha256"]


def test_real_mnli_pool_supports_128_per_class_but_not_578(data_dir: Path) -> None:
    train = load_train("mnli", data_dir)
    s = few_shot_sample(train, 128, seed=0, num_labels=2)
    assert counts(s.examples) == {0: 128, 1: 128}
    assert len(few_shot_sample(train, 577, seed=0, num_labels=2).examples) == 1154
    with pytest.raises(ConfigError, match="has only 577 examples"):
        few_shot_sample(train, 578, seed=0, num_labels=2)


# --- stratified_subsample --------------------------------------------------------------------------


def test_stratified_subsample_proportions_and_order() -> None:
    p = pool([70, 30])
    sub = stratified_subsample(p, 10, seed=0)
    assert counts(sub) == {0: 7, 1: 3}
    positions = [p.index(e) for e in sub]
    assert positions == sorted(positions)  # original order kept
    assert ids(stratified_subsample(p, 10, seed=0)) == ids(sub)
    assert ids(stratified_subsample(p, 10, seed=1)) != ids(sub)


def test_stratified_subsample_largest_remainder() -> None:
    # exact quotas 2.0, 1.2, 0.8 → floors 2, 1, 0; the one left over goes to the largest remainder (label 2)
    assert counts(stratified_subsample(pool([5, 3, 2]), 4, seed=0)) == {0: 2, 1: 1, 2: 1}


def test_stratified_subsample_limit_edge_cases() -> None:
    p = pool([3, 2])
    assert stratified_subsample(p, 5, seed=0) == p and stratified_subsample(p, 50, seed=0) == p
    assert stratified_subsample(p, None, seed=0) == p
    with pytest.raises(ConfigError):
        stratified_subsample(p, 0, seed=0)


def test_stratified_subsample_real_hans(data_dir: Path) -> None:
    sub = stratified_subsample(load_eval("mnli", "hans", data_dir), 1000, seed=0)
    assert counts(sub) == {0: 500, 1: 500}


# --- balanced_demonstrations -------------------------------------------------------------------------


def test_balanced_demonstrations() -> None:
    sample = few_shot_sample(pool([30, 30]), 8, seed=0, num_labels=2).examples
    demos = balanced_demonstrations(sample, 4, seed=1, num_labels=2)
    assert counts(demos) == {0: 2, 1: 2} and set(ids(demos)) <= set(ids(sample))
    assert ids(balanced_demonstrations(sample, 4, seed=1, num_labels=2)) == ids(demos)
    assert sorted(counts(balanced_demonstrations(sample, 5, seed=1, num_labels=2)).values()) == [2, 3]
    orders = {tuple(ids(balanced_demonstrations(sample, 16, seed=s, num_labels=2))) for s in range(5)}
    assert len(orders) == 5  # all 16 used, in seed-dependent orders
    assert balanced_demonstrations(sample, 0, seed=0, num_labels=2) == []


def test_balanced_demonstrations_impossible() -> None:
    with pytest.raises(ConfigError, match=r"examples per label are \[1, 5\]"):
        balanced_demonstrations(pool([1, 5]), 4, seed=0, num_labels=2)
