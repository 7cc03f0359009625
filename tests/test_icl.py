"""ICL end to end through the runner, on the tiny random model and the real CoLA data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fewtune.config import RunConfig
from fewtune.errors import ContextLengthError
from fewtune.run.runner import run_experiment
from fewtune.tasks import get_task, load_train

RUN_FILES = {"config.yaml", "sample.json", "predictions.jsonl", "metrics.json"}


def _cfg(**kw) -> RunConfig:
    base = dict(task="cola", method="icl", model="tiny-random", n=2, eval_limit=20, precision="fp32")
    base.update(kw)
    return RunConfig(**base)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cached_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("icl") / "cached"
    return run_experiment(_cfg(), out_dir=out, data_dir=data_dir)


def test_run_writes_its_files_with_one_row_per_eval_example(cached_run):
    out = cached_run.out_dir
    assert {p.name for p in out.iterdir()} == RUN_FILES
    rows = _rows(out)
    sets = cached_run.config.eval_sets
    assert sets == list(get_task("cola").default_eval_sets)
    for name in sets:
        mine = [r for r in rows if r["eval_set"] == name]
        assert len(mine) == 20
        assert cached_run.metrics["eval"][name]["n"] == 20 and cached_run.metrics["eval"][name]["n_skipped"] == 0
        assert len({r["id"] for r in mine}) == 20
        assert all(r["pred"] in (0, 1) and not r["skipped"] for r in mine)
    assert len(rows) == 20 * len(sets)
    assert cached_run.metrics["method_info"]["scoring"] == ["prefix_cache"]
    assert cached_run.metrics["resources"]["precision"] == "fp32"


def test_prefix_cache_off_gives_the_same_predictions(cached_run, data_dir, tmp_path):
    naive = run_experiment(_cfg(params={"prefix_cache": False}), out_dir=tmp_path / "naive", data_dir=data_dir)
    assert naive.metrics["method_info"]["scoring"] == ["naive"]
    a, b = _rows(cached_run.out_dir), _rows(naive.out_dir)
    assert [(r["eval_set"], r["id"], r["pred"]) for r in a] == [(r["eval_set"], r["id"], r["pred"]) for r in b]
    np.testing.assert_allclose([r["label_logprobs"] for r in a], [r["label_logprobs"] for r in b], atol=1e-3, rtol=0)
    # Same demonstrations; the cache only changes how much runs through the model (speed: bench/).
    assert cached_run.metrics["method_info"]["demonstration_ids"] == naive.metrics["method_info"]["demonstration_ids"]


def test_demonstrations_are_balanced_and_from_the_sample(data_dir):
    labels = {e.id: e.label for e in load_train(get_task("cola"), data_dir)}
    for k, n in [(2, 2), (4, 2), (6, 4)]:
        r = run_experiment(_cfg(n=n, eval_limit=2, params={"k": k}), data_dir=data_dir)
        demo_ids = r.metrics["method_info"]["demonstration_ids"]
        assert len(demo_ids) == k == len(set(demo_ids))
        assert sorted(labels[i] for i in demo_ids) == [0] * (k // 2) + [1] * (k // 2)


def test_prompt_longer_than_context_is_a_clear_error(data_dir, tmp_path):
    out = tmp_path / "too-long"
    with pytest.raises(ContextLengthError) as err:
        run_experiment(_cfg(max_context=16, eval_limit=2), out_dir=out, data_dir=data_dir)
    assert "context limit is 16" in str(err.value) and err.value.hint
    assert not out.exists()  # nothing half-written
