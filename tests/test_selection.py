"""k-fold selection inside the few-shot sample: the split, the choice, that the chosen values are
the ones trained, that the eval sets are never read, and the study/CLI surface."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fewtune.config import RunConfig
from fewtune.errors import ConfigError
from fewtune.run.selection import candidate_grid, folds, select_values
from fewtune.tasks.base import Example

pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(per_class: int, labels: int = 2) -> list[Example]:
    return [Example(id=f"{c}-{i}", fields={"sentence": f"s{c}{i}"}, label=c) for c in range(labels) for i in range(per_class)]


def test_folds_are_stratified_disjoint_cover_the_sample_and_follow_the_seed():
    sample = _sample(8)
    splits = folds(sample, 4, seed=3)
    assert len(splits) == 4
    held = [e.id for _, ho in splits for e in ho]
    assert sorted(held) == sorted(e.id for e in sample)  # every example held out exactly once
    for train, ho in splits:
        assert sorted(e.label for e in ho) == [0, 0, 1, 1]  # each fold holds out the classes equally
        assert not {e.id for e in train} & {e.id for e in ho}
    assert [[e.id for e in ho] for _, ho in folds(sample, 4, seed=3)] == [[e.id for e in ho] for _, ho in splits]
    assert [[e.id for e in ho] for _, ho in folds(sample, 4, seed=4)] != [[e.id for e in ho] for _, ho in splits]


def test_folds_shrink_to_the_smallest_class_and_need_two():
    assert len(folds(_sample(2), 4, seed=0)) == 2
    with pytest.raises(ConfigError):
        folds(_sample(1), 4, seed=0)


def _cfg(select) -> RunConfig:
    return RunConfig(method="lora", task="cola", n=8, select=select)


def test_the_best_mean_wins_and_the_first_listed_wins_a_tie():
    cfg = _cfg({"train.lr": [1e-5, 1e-3, 1e-4], "params.r": [2, 4]})
    assert [tuple(v.values()) for v in candidate_grid(cfg)][:2] == [(1e-5, 2), (1e-5, 4)]
    score = {1e-5: 0.5, 1e-3: 0.8, 1e-4: 0.8}
    seen = []

    def scorer(trial, train, held_out):
        seen.append((trial.train.lr, trial.params["r"], len(train), len(held_out)))
        return score[trial.train.lr] + (0.01 if trial.params["r"] == 4 else 0)

    chosen, record = select_values(cfg, _sample(8), scorer)
    assert chosen == {"train.lr": 1e-3, "params.r": 4}  # 1e-4 ties with 1e-3 but is listed later
    assert record["k"] == 4 and len(record["candidates"]) == 6 and len(seen) == 24
    assert all(t == 12 and h == 4 for *_, t, h in seen)
    assert record["candidates"][0]["cv_score"] == pytest.approx(0.5)


def test_a_diverging_candidate_is_not_chosen():
    from fewtune.errors import TrainingDiverged

    def scorer(trial, train, held_out):
        if trial.train.lr == 1e-3:
            raise TrainingDiverged("nan", None)
        return 0.1

    chosen, record = select_values(_cfg({"train.lr": [1e-3, 1e-5]}), _sample(4), scorer)
    assert chosen == {"train.lr": 1e-5}
    assert record["candidates"][0]["diverged_folds"] == 4 and record["candidates"][0]["cv_score"] is None


def test_a_run_selects_on_its_sample_only_and_trains_with_the_choice(monkeypatch, tmp_path, data_dir):
    from fewtune.run import runner

    calls = []
    real = runner._fold_score

    def spy(build, metric, cfg, train, held_out):
        calls.append((cfg.train.lr, {e.id for e in train} | {e.id for e in held_out}))
        return real(build, metric, cfg, train, held_out) + (1.0 if cfg.train.lr == 3e-3 else 0.0)

    monkeypatch.setattr(runner, "_fold_score", spy)
    built = []
    make = runner.make_method
    monkeypatch.setattr(runner, "make_method", lambda c, *a, **k: built.append(c.train.lr) or make(c, *a, **k))
    cfg = RunConfig(model="tiny-random", task="cola", method="vanilla", n=4, eval_limit=16, eval_sets=["cola-id"],
                    train={"max_steps": 2, "batch_size": 4}, select={"candidates": {"train.lr": [1e-5, 3e-3]}, "folds": 2})
    metrics = runner.run_experiment(cfg, tmp_path / "run", data_dir=data_dir).metrics
    sample_ids = set(json.loads((tmp_path / "run" / "sample.json").read_text())["ids"])
    assert len(calls) == 4 and all(ids <= sample_ids for _, ids in calls)  # never an eval example
    assert metrics["selection"]["chosen"] == {"train.lr": 3e-3}
    assert built[-1] == 3e-3 and len(built) == 5  # 2 candidates × 2 folds, then the final model with the choice
    assert metrics["resources"]["select_seconds"] > 0


def test_a_study_does_not_sweep_the_candidates(tmp_path):
    from fewtune.study import count_runs, expand, load_study

    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nmodel: tiny-random\nn: 4\nseed: [0, 1]\ntasks: [cola]\n"
                    "methods:\n  - icl\n  - {method: lora, params: {r: [2, 4]}, select: {train.lr: [1.0e-5, 1.0e-3]}}\n")
    study = load_study(spec)
    planned = expand(study)
    assert count_runs(study) == len(planned) == 2 + 4
    lora = [p.config for p in planned if p.config.method == "lora"]
    assert all(c.select.candidates == {"train.lr": [1e-5, 1e-3]} for c in lora)
    assert load_study("paper-tuned") and count_runs(load_study("paper-tuned")) == 960


@pytest.mark.parametrize("select, needle", [
    ("{n: [2, 4]}", "cannot be selected"),
    ("{params.r: [-1, 4]}", "candidate"),
    ("{train.lr: []}", "no candidate values"),
])
@pytest.mark.slow  # starts processes: not in the fast tier
def test_bad_selection_is_a_usage_error_before_any_work(tmp_path, select, needle):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fewtune", "run", "--model", "tiny-random", "--method", "lora",
                           "--out", str(out), "--set", f"select={select}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_indistinguishable_candidates_are_recorded_as_undecided_with_fold_spread():
    cfg = _cfg({"train.lr": [1e-5, 1e-3, 1e-4]})
    tie = {1e-5: [0.5, 0.75, 0.25, 0.75], 1e-3: [0.75, 0.25, 0.75, 0.5], 1e-4: [0.25, 0.5, 0.5, 0.25]}
    fold = iter(range(10**6))

    def scorer(table):
        return lambda trial, train, held_out: table[trial.train.lr][next(fold) % 4]

    chosen, record = select_values(cfg, _sample(8), scorer(tie))
    assert chosen == {"train.lr": 1e-5} and record["decided"] is False  # equal means: the first listed, undecided
    assert record["margin"] == pytest.approx(0.0) and record["held_out_per_fold"] == 4
    assert record["candidates"][0]["fold_sd"] == pytest.approx(np.std(tie[1e-5], ddof=1), abs=1e-6)
    clear = {1e-5: [0.5, 0.5, 0.25, 0.5], 1e-3: [0.75, 0.75, 0.5, 1.0], 1e-4: [0.25, 0.5, 0.5, 0.25]}
    chosen, record = select_values(cfg, _sample(8), scorer(clear))
    assert chosen == {"train.lr": 1e-3} and record["decided"] is True and record["margin"] == pytest.approx(0.375)
    noisy = {1e-5: [1.0, 0.0, 1.0, 0.0], 1e-3: [0.0, 1.0, 0.5, 1.0], 1e-4: [0.0, 0.0, 0.0, 0.0]}
    assert select_values(cfg, _sample(8), scorer(noisy))[1]["decided"] is False  # best by .125, fold noise larger


def test_trials_take_the_final_fits_optimizer_steps_per_example():
    seen = []
    cfg = RunConfig(method="vanilla", task="cola", n=8, train={"max_steps": 12}, select={"train.lr": [1e-5]})
    select_values(cfg, _sample(8), lambda trial, train, held_out: seen.append((trial.train.max_steps, len(train))) or 0.5)
    assert seen == [(9, 12)] * 4  # 12 steps on 16 examples → 9 on the 12 a fold trains on
    cfg = RunConfig(method="vanilla", task="cola", n=8, train={"epochs": 3}, select={"train.lr": [1e-5]})
    select_values(cfg, _sample(8), lambda trial, train, held_out: seen.append(trial.train.max_steps) or 0.5)
    assert seen[-1] is None  # epochs scale with the training set by themselves
    cfg = RunConfig(method="distill", task="cola", n=8, params={"pool": "train"}, train={"max_steps": 12},
                    select={"train.lr": [1e-5]})
    select_values(cfg, _sample(8), lambda trial, train, held_out: seen.append(trial.train.max_steps) or 0.5)
    assert seen[-1] == 12  # trains on the pool, whose size does not depend on the fold


def test_cv_never_trains_on_the_held_out_fold(monkeypatch, tmp_path, data_dir):
    """The ids ``fit`` sees and the train pool a trial can draw from are disjoint from its
    held-out fold (distillation from the pool included)."""
    from fewtune.run import runner

    held, fitted = [], []
    real_score, real_make = runner._fold_score, runner.make_method

    def spy_score(build, metric, cfg, train, held_out):
        held.append({e.id for e in held_out})
        return real_score(build, metric, cfg, train, held_out)

    def spy_make(c, *a, **k):
        method = real_make(c, *a, **k)
        fit = method.fit

        def recording_fit(sample):
            fitted.append(({e.id for e in sample}, {e.id for e in method.ctx.train_pool}))
            return fit(sample)

        method.fit = recording_fit
        return method

    monkeypatch.setattr(runner, "_fold_score", spy_score)
    monkeypatch.setattr(runner, "make_method", spy_make)
    cfg = RunConfig(model="tiny-random", task="cola", method="distill", n=4, eval_limit=4, eval_sets=["cola-id"],
                    params={"pool": "train", "pool_size": 4, "k": 2}, train={"max_steps": 1, "batch_size": 4},
                    select={"candidates": {"train.lr": [1e-3, 1e-3]}, "folds": 2})
    metrics = runner.run_experiment(cfg, data_dir=data_dir).metrics
    assert len(held) == 4 and len(fitted) == 5  # 2 candidates × 2 folds, then the final fit
    for ho, (fit_ids, pool_ids) in zip(held, fitted):
        assert ho and not (ho & fit_ids) and not (ho & pool_ids)
    assert held[0] | held[1] <= fitted[4][0] | fitted[4][1]  # the final fit sees the whole sample
    # two identical candidates cannot be told apart: recorded, and said in the run's warnings
    assert metrics["selection"]["decided"] is False and any("decided: false" in w for w in metrics["warnings"])


def test_the_report_column_of_chosen_values_says_when_the_choice_was_undecided():
    from fewtune.results import _selection_cell

    assert json.loads(_selection_cell({"chosen": {"train.lr": 1e-3}, "decided": False})) == {"train.lr": 1e-3, "decided": False}
    assert json.loads(_selection_cell({"chosen": {"train.lr": 1e-3}, "decided": True})) == {"train.lr": 1e-3}
    assert _selection_cell(None) is None


def _select_run(tmp_path, data_dir, monkeypatch, pack: str, name: str) -> tuple[dict, list]:
    """A LoRA run with select (3 lrs × 2 folds, one of them diverging) and every trial's
    held-out log-probs, with ``FEWTUNE_SELECT_PACK`` = ``pack``."""
    from fewtune.run import runner, trial_pack

    seen = []
    real = runner.held_out_score

    def spy(method, held_out, metric):
        seen.append((method.ctx.cfg.train.lr, tuple(e.id for e in held_out), method.predict(held_out).label_scores.tolist()))
        return real(method, held_out, metric)

    monkeypatch.setattr(runner, "held_out_score", spy)
    monkeypatch.setattr(trial_pack, "held_out_score", spy)
    monkeypatch.setenv("FEWTUNE_SELECT_PACK", pack)
    cfg = RunConfig(model="tiny-random", task="cola", method="lora", n=6, eval_limit=16, eval_sets=["cola-id"], params={"r": 2},
                    train={"max_steps": 8, "batch_size": 4, "max_grad_norm": None},
                    select={"candidates": {"train.lr": [1e-3, 3e-2, 1e38]}, "folds": 2})
    metrics = runner.run_experiment(cfg, tmp_path / name, data_dir=data_dir).metrics
    return metrics, sorted(seen)


def test_packed_trials_score_choose_and_evaluate_exactly_as_one_by_one(tmp_path, data_dir, monkeypatch):
    """The trials of a LoRA run's select, trained as one pack, give every trial's
    held-out log-probs, the fold scores, the choice and the final run's metrics of the trials run
    one by one; a trial that diverges in the pack scores nothing, as alone. Packing is recorded
    under resources only; the run id is the same."""
    alone, seen_alone = _select_run(tmp_path, data_dir, monkeypatch, "1", "alone")
    packed, seen_packed = _select_run(tmp_path, data_dir, monkeypatch, "6", "packed")
    assert "select_packs" not in alone["resources"] and packed["resources"]["select_packs"] == [6]
    assert len(seen_alone) == 4 and seen_packed == seen_alone  # 2 lrs × 2 folds scored (1e38 diverges), bit-identical
    drop = lambda sel: {k: v for k, v in sel.items() if k != "seconds"}  # noqa: E731
    assert drop(packed["selection"]) == drop(alone["selection"])
    assert [c["diverged_folds"] for c in alone["selection"]["candidates"]] == [0, 0, 2]
    assert seen_alone[0][2] != seen_alone[2][2] and seen_alone[0][2] != seen_alone[1][2]  # the lrs and the folds score apart
    assert packed["eval"] == alone["eval"] and packed["run_id"] == alone["run_id"]
    assert packed["train"]["loss_history"] == alone["train"]["loss_history"]
    chunked, seen_chunked = _select_run(tmp_path, data_dir, monkeypatch, "4", "chunked")
    assert chunked["resources"]["select_packs"] == [4, 2] and seen_chunked == seen_alone


def test_a_pack_of_trials_out_of_gpu_memory_falls_back_to_one_by_one(tmp_path, data_dir, monkeypatch):
    import torch

    from fewtune.run import trial_pack

    alone, seen_alone = _select_run(tmp_path, data_dir, monkeypatch, "1", "alone")

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trial_pack, "train_members", oom)
    fell_back, seen = _select_run(tmp_path, data_dir, monkeypatch, "8", "oom")
    assert fell_back["resources"]["select_packs"] == [1] * 6 and seen == seen_alone
    assert fell_back["selection"]["candidates"] == alone["selection"]["candidates"] and fell_back["eval"] == alone["eval"]


def test_which_selections_are_packed(monkeypatch):
    """Automatic on a GPU, one by one on a CPU unless asked; only where every trial is packable."""
    import torch

    from fewtune.run.trial_pack import max_trials, trials_packable

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("FEWTUNE_SELECT_PACK", raising=False)
    lora = RunConfig(method="lora", task="cola", n=8, select={"train.lr": [1e-5, 1e-3]})
    assert trials_packable(lora, gpu) and max_trials(gpu) is None and not trials_packable(lora, cpu)
    monkeypatch.setenv("FEWTUNE_SELECT_PACK", "12")
    assert trials_packable(lora, cpu) and max_trials(cpu) == 12
    assert trials_packable(lora.model_copy(update={"log_to": ["tensorboard"]}), cpu)  # trials log nothing
    assert not trials_packable(RunConfig(method="vanilla", task="cola", n=8, select={"train.lr": [1e-5]}), gpu)
    assert not trials_packable(RunConfig(method="lora", task="cola", n=8, select={"train.grad_accum": [1, 2]}), gpu)
    monkeypatch.setenv("FEWTUNE_SELECT_PACK", "off")
    assert not trials_packable(lora, gpu)
    monkeypatch.setenv("FEWTUNE_SELECT_PACK", "many")
    with pytest.raises(ConfigError):
        max_trials(gpu)
