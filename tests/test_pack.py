"""Packs (``--pack K``): runs trained together give every member exactly its lone results, in its
own run directory; a member fails alone; finished members are never run again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from fewtune.config import RunConfig, TrainConfig
from fewtune.errors import TrainingDiverged
from fewtune.run.pack import run_pack
from fewtune.run.packable import pack_key
from fewtune.study import expand, parse_study, run_study
from fewtune.study.executors import InProcessExecutor
from fewtune.study.pack import group, pack_summary
from fewtune.study.store import Store

# 4 LoRA seeds (data seeds), a rank-4 rsLoRA run with more steps (alone in its group with --pack 4;
# with seed 3 at --pack 3, so members leave a pack at different steps) and a vanilla run, which
# cannot be packed and runs as usual.
STUDY = {"name": "packed", "model": "tiny-random", "task": "cola", "n": 2, "seed": [0, 1, 2, 3], "eval_limit": 16,
         "eval_batch_size": 8, "train": {"max_steps": 3, "batch_size": 4, "lr": 1.0e-2},
         "methods": [{"method": "lora", "params": {"r": 2}},
                     {"method": "lora", "seed": [0], "params": {"r": 4, "rslora": True}, "train": {"max_steps": 5}},
                     {"method": "vanilla", "seed": [0]}]}


def results(out: Path) -> dict[str, tuple]:
    with Store(out) as s:
        rows = s.runs()
    assert rows and all(r.status == "done" for r in rows), [(r.status, r.error) for r in rows]
    return {r.run_id: (r.metrics["run_id"], json.dumps(r.metrics["eval"], sort_keys=True), r.metrics["train"]["loss_history"],
                       (out / r.run_dir / "predictions.jsonl").read_text()) for r in rows}


def packed_counts(out: Path) -> dict[str, int | None]:
    with Store(out) as s:
        return {r.run_id: json.loads((out / r.run_dir / "metrics.json").read_text())["resources"].get("packed") for r in s.runs()}


@pytest.fixture(scope="module")
def alone(tmp_path_factory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("alone")
    run_study(parse_study(STUDY, "test"), out, data_dir=data_dir, show_progress=False, executor=InProcessExecutor())
    return out


def test_pack_cli_study_gives_every_run_its_lone_results(alone: Path, tmp_path: Path, data_dir: Path) -> None:
    """``--pack 4`` through the real CLI (subprocess executor): same run ids, eval metrics,
    predictions and losses as the study without packing; one run directory per member."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps(STUDY))
    env = {**os.environ, "FEWTUNE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "fewtune", "study", str(cfg), "--out", str(tmp_path / "out"), "--no-report",
                          "--pack", "4"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert results(tmp_path / "out") == results(alone)
    packed = packed_counts(tmp_path / "out")
    assert sorted(packed.values(), key=str) == [4, 4, 4, 4, None, None]  # 4 + (1 lora, 1 vanilla) alone
    assert packed_counts(alone) == dict.fromkeys(packed)


def test_study_key_pack_inprocess_and_resume_runs_only_unfinished(alone: Path, tmp_path: Path, data_dir: Path) -> None:
    """``pack: 4`` in the study; a member already finished on disk but never recorded (a pack
    killed after writing it) is adopted, the others run packed."""
    study = parse_study({**STUDY, "pack": 4}, "test")
    planned = [p for p in expand(study) if p.config.method == "lora" and p.config.params.get("r") == 2]
    from fewtune.run.runner import run_experiment

    run_experiment(planned[0].config, tmp_path / "runs" / planned[0].run_id, data_dir=data_dir)
    outcome = run_study(study, tmp_path, data_dir=data_dir, show_progress=False, executor=InProcessExecutor())
    assert outcome.adopted == 1 and outcome.complete
    assert results(tmp_path) == results(alone)
    assert [v for v in packed_counts(tmp_path).values() if v] == [3, 3, 3]
    _packed_costs_left_out_of_the_report(tmp_path)


def _packed_costs_left_out_of_the_report(out: Path) -> None:
    """A packed run's peak memory and training time are the pack's: the report's cost figures
    leave them out and say so; its results and own eval time stay (also through the results API)."""
    from fewtune.report import write_report
    from fewtune.report.data import load_study_data
    from fewtune.results import load_runs, to_eval_rows

    for rows in (load_study_data(out).rows, to_eval_rows(load_runs(out))):
        packed = [r for r in rows if r.packed]
        assert {r.packed for r in packed} == {3} and len({r.run_id for r in packed}) == 3
        assert all(r.peak_memory_mb is None and r.train_seconds is None and r.eval_seconds for r in packed)
        assert all(r.peak_memory_mb and r.train_seconds is not None for r in rows if not r.packed)
    text = write_report(out).markdown.read_text()
    assert "3 runs were trained in packs (--pack)" in text


def test_grouping_by_key_in_order() -> None:
    planned = expand(parse_study(STUDY, "test"))
    units = group(planned, 3)
    assert [len(u) for u in units if pack_key(u[0].config)] == [3, 2]  # r=2 seeds 0-2; seed 3 + rsLoRA (steps, rank: same key)
    assert sum(len(u) for u in units) == len(planned) and group(planned, 1) == [[p] for p in planned]
    assert pack_summary(planned, 4).startswith("--pack 4: 4 runs in 1 pack(s), 2 run(s) alone (not packable: 1 vanilla;")
    assert pack_summary(planned, 3).startswith("--pack 3: 5 runs in 2 pack(s), 1 run(s) alone (not packable: 1 vanilla;")


def _cfg(seed: int, **train) -> RunConfig:
    return RunConfig(task="cola", method="lora", model="tiny-random", n=4, seed=seed, eval_limit=16, params={"r": 2, "dropout": 0.5},
                     train=TrainConfig(**{"max_steps": 4, "batch_size": 4, "lr": 1e-2, **train}))


def _eval(out: Path) -> tuple:
    m = json.loads((out / "metrics.json").read_text())
    return m["train"]["loss_history"], (out / "predictions.jsonl").read_text()


def test_dropout_masks_are_each_members_own(tmp_path: Path, data_dir: Path) -> None:
    """At dropout 0.5, member 0 trained with either partner (all members through the base in one
    pass, or one member per pass as on a CPU), or in a pack of one, gets the same masks, hence
    the same losses and predictions; the masks do matter (dropout 0 differs)."""
    a, b, c = _cfg(0), _cfg(1), _cfg(2, max_steps=2)
    run_pack([a, b], [tmp_path / "ab0", tmp_path / "ab1"], data_dir=data_dir, members_per_pass=None)
    run_pack([c, a], [tmp_path / "ca0", tmp_path / "ca1"], data_dir=data_dir, members_per_pass=1)
    run_pack([a], [tmp_path / "a"], data_dir=data_dir)
    assert _eval(tmp_path / "ab0") == _eval(tmp_path / "ca1") == _eval(tmp_path / "a")
    no_drop = a.model_copy(update={"params": {"r": 2, "dropout": 0.0}})
    run_pack([no_drop], [tmp_path / "nd"], data_dir=data_dir)
    assert _eval(tmp_path / "nd")[0] != _eval(tmp_path / "a")[0]


def test_a_diverging_member_fails_alone(tmp_path: Path, data_dir: Path) -> None:
    good, bad = _cfg(0), _cfg(1, lr=1e38, max_grad_norm=None)
    res = run_pack([bad, good], [tmp_path / "bad", tmp_path / "good"], data_dir=data_dir)
    assert isinstance(res[0], TrainingDiverged) and isinstance(res[1], dict)
    assert json.loads((tmp_path / "bad" / "metrics.json").read_text())["status"] == "diverged"
    run_pack([good], [tmp_path / "alone"], data_dir=data_dir)
    assert _eval(tmp_path / "good") == _eval(tmp_path / "alone")


def test_pack_usage_errors_exit_2(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "fewtune", "study", "quick", "--out", str(tmp_path / "o"), "--pack", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "pack must be a whole number" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


# Per packable method: members with different seeds and settings (rank, dropout, steps), packed,
# equal the same runs alone (losses, eval metrics, predictions, what trained). DoRA with dropout
# takes peft's dropout path (base part recomputed from the dropped input), without it the base
# output's; its second member adapts other layers than its mates (q/k vs q/v). BitFit members
# each add their own zero biases (the next member's preparation finds the base as loaded).
METHOD_MEMBERS = {
    "dora": [{"r": 2, "dropout": 0.5}, {"r": 4, "dropout": 0.0, "target_modules": ["q_proj", "k_proj"]},
             {"r": 2, "dropout": 0.3, "rslora": True}],
    "ia3": [{}, {}, {"objective": "lm"}],
    "bitfit": [{}, {"norms": True}, {"objective": "lm"}],
}


@pytest.mark.parametrize("method", sorted(METHOD_MEMBERS))
def test_packed_method_members_equal_their_lone_runs(method: str, tmp_path: Path, data_dir: Path) -> None:
    from fewtune.run.runner import run_experiment

    cfgs = [_cfg(seed, max_steps=steps).model_copy(update={"method": method, "params": params})
            for seed, steps, params in zip((0, 1, 2), (4, 4, 2), METHOD_MEMBERS[method])]
    assert all(pack_key(c) == pack_key(cfgs[0]) is not None for c in cfgs)
    # all members through the base in one pass (an accelerator's way): where rows can be mis-routed
    res = run_pack(cfgs, [tmp_path / f"p{i}" for i in range(3)], data_dir=data_dir, members_per_pass=None)
    assert all(isinstance(r, dict) and r["resources"]["packed"] == 3 for r in res), res
    for i, c in enumerate(cfgs):
        lone = run_experiment(c, tmp_path / f"a{i}", data_dir=data_dir).metrics
        assert _eval(tmp_path / f"p{i}") == _eval(tmp_path / f"a{i}")
        for key in ("eval", "train", "method_info"):  # train: losses, trainable parameters, steps, …
            assert res[i][key] == lone[key], key
    losses = _eval(tmp_path / "p0")[0]
    assert len(set(losses)) > 1  # training moved the member's own parameters


def test_a_member_failing_after_its_preparation_leaves_the_base_as_loaded(tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    """A BitFit member that fails once its zero biases are added (here: copying its pieces) fails
    alone, and the next member still finds the base its lone run finds."""
    import fewtune.run.pack_engine as pack_mod
    from fewtune.run.runner import run_experiment

    real, calls = pack_mod.member_pieces, []

    def failing_first(method):
        calls.append(method)
        if len(calls) == 1:
            raise RuntimeError("copying the first member's pieces failed")
        return real(method)

    monkeypatch.setattr(pack_mod, "member_pieces", failing_first)
    cfgs = [_cfg(seed).model_copy(update={"method": "bitfit", "params": {}}) for seed in (0, 1)]
    res = run_pack(cfgs, [tmp_path / "p0", tmp_path / "p1"], data_dir=data_dir, members_per_pass=None)
    assert isinstance(res[0], RuntimeError) and isinstance(res[1], dict)
    lone = run_experiment(cfgs[1], tmp_path / "a1", data_dir=data_dir).metrics
    assert res[1]["method_info"] == lone["method_info"] and _eval(tmp_path / "p1") == _eval(tmp_path / "a1")


def test_members_share_the_eval_sets_they_have_in_common_only(tmp_path: Path, data_dir: Path) -> None:
    """Eval sets are read once per pack and shared by members that ask for the same ones; a
    member with another eval limit or eval seed gets its own, as alone."""
    from fewtune.run.runner import run_experiment

    a, b, c = _cfg(0), _cfg(1).model_copy(update={"eval_limit": 8}), _cfg(2).model_copy(update={"eval_seed": 7})
    run_pack([a, b, c], [tmp_path / "p0", tmp_path / "p1", tmp_path / "p2"], data_dir=data_dir)
    for i, cfg in enumerate((a, b, c)):
        run_experiment(cfg, tmp_path / f"a{i}", data_dir=data_dir)
        assert _eval(tmp_path / f"p{i}") == _eval(tmp_path / f"a{i}")
