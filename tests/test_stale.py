"""A study resumed under another identity (a code change, a library upgrade, an edited task file,
another device) reports its stale runs naming what changed, refuses to mix them, and re-runs them
(--rerun-stale) or keeps them, marked (--keep-stale), on request."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from executor_runners import write_fake

from fewtune.errors import ConfigError
from fewtune.report import load_study_data
from fewtune.report.tables import warnings as _warnings
from fewtune.run import identity
from fewtune.study import expand, parse_study, run_study
from fewtune.study.executors import InProcessExecutor
from fewtune.study.stale import guard_stale, stale_in_study
from fewtune.study.store import Store

STUDY = {"name": "stale", "model": "tiny-random", "task": "cola", "seed": [0, 1], "methods": ["icl", "zero-shot"]}
NEW_CODE = "9" * 16


def fake_runner(cfg, out_dir: Path, *, data_dir=None, progress=None):
    """Results that say which code made them, so mixing would show in the report's rows."""
    return write_fake(cfg, out_dir, 0.9 if cfg.identity.code_digest == NEW_CODE else 0.5)


def _pairs(planned):
    return [(p.run_id, p.config.model_dump(mode="json")) for p in planned]


def _run(study, out: Path, plan, **kw):
    return run_study(study, out, executor=InProcessExecutor(fake_runner), show_progress=False, planned=plan, **kw)


@pytest.fixture()
def upgraded(tmp_path, monkeypatch):
    """A finished study, then a code change: (study, old plan, new plan)."""
    study = parse_study(STUDY, "test")
    old_plan = expand(study)
    _run(study, tmp_path, old_plan)
    assert not stale_in_study(tmp_path, _pairs(old_plan))  # same identity: nothing stale
    monkeypatch.setattr(identity, "code_digest", lambda: NEW_CODE)  # an edit under src/fewtune
    new_plan = expand(study)
    assert not {p.run_id for p in new_plan} & {p.run_id for p in old_plan}
    return study, old_plan, new_plan


def test_code_change_makes_runs_stale_and_the_message_names_the_code_version(tmp_path, upgraded):
    study, old_plan, new_plan = upgraded
    old_code = old_plan[0].config.identity.code_digest
    with pytest.raises(ConfigError) as e:
        guard_stale(tmp_path, _pairs(new_plan), rerun_stale=False)
    assert "4 runs are stale" in e.value.message
    assert f"another fewtune code version (code_digest {old_code[:12]} → {NEW_CODE[:12]})" in e.value.message
    assert "study config" not in e.value.message and "library" not in e.value.message
    assert "--rerun-stale" in e.value.hint and "--keep-stale" in e.value.hint

    guard_stale(tmp_path, _pairs(new_plan), rerun_stale=True)
    out = _run(study, tmp_path, new_plan, rerun_stale=True, limit=1)
    assert out.succeeded == 1
    data = load_study_data(tmp_path)
    assert {r.run_id for r in data.runs} == {p.run_id for p in new_plan}
    assert {r.accuracy for r in data.rows} == {0.9}  # only the current identity's results
    assert data.stale_runs == 4 and data.other_runs == 0
    assert any("4 runs in this directory are stale" in w for w in _warnings(data, []))


def test_library_upgrade_is_named(tmp_path, monkeypatch):
    study = parse_study(STUDY, "test")
    _run(study, tmp_path, expand(study))
    versions = identity.library_versions()
    monkeypatch.setattr(identity, "library_versions", lambda: {**versions, "transformers": "99.0"})  # pip install -U
    stale = stale_in_study(tmp_path, _pairs(expand(study)))
    assert len(stale) == 4 and stale.message().endswith(f"other library versions (transformers {versions['transformers']} → 99.0)")


def test_keep_stale_keeps_and_marks_the_old_results_until_rerun(tmp_path, upgraded):
    study, old_plan, new_plan = upgraded
    old_code = old_plan[0].config.identity.code_digest
    guard_stale(tmp_path, _pairs(new_plan), rerun_stale=False, keep_stale=True)
    kept = _run(study, tmp_path, new_plan, keep_stale=True)
    assert (kept.kept, kept.ran, kept.complete) == (4, 0, True)  # nothing recomputed
    assert not guard_stale(tmp_path, _pairs(new_plan), rerun_stale=False)  # the decision is recorded
    assert _run(study, tmp_path, new_plan).ran == 0  # and honoured on resume

    data = load_study_data(tmp_path)
    assert {r.accuracy for r in data.rows} == {0.5} and len(data.done) == 4  # the old results, reported
    marks = set(data.frame["kept_stale"])
    assert len(marks) == 1 and next(iter(marks)).startswith(f"code {old_code[:12]}")
    assert "transformers" in next(iter(marks))
    assert data.stale_runs == 0 and data.other_runs == 0
    assert any("Kept with --keep-stale" in w and f"4 runs by code {old_code[:12]}" in w for w in _warnings(data, []))

    rerun = _run(study, tmp_path, new_plan, rerun_stale=True)  # changed one's mind: recompute them
    assert rerun.succeeded == 4
    data = load_study_data(tmp_path)
    assert {r.accuracy for r in data.rows} == {0.9} and data.frame["kept_stale"].isna().all()


def test_runs_of_other_code_under_another_config_are_not_blamed_on_the_study_config(tmp_path):
    """A code change that changed a resolved default leaves runs no planned config matches: the
    report says another code version made them, not 'an earlier version of the study config'."""
    study = parse_study(STUDY, "test")
    plan = expand(study)
    _run(study, tmp_path, plan)
    with Store(tmp_path) as s:
        old = []
        for p in plan[:2]:
            c = p.config.model_dump(mode="json")
            c["identity"]["code_digest"] = "0" * 16
            c["params"] = {**c["params"], "a_default_since_removed": 1}
            old.append((f"old{p.config.seed}{p.config.method}", c))
        s.register(old)
        for run_id, _ in old:
            s.mark_running(run_id)
            s.mark_done(run_id, {"eval": {}}, f"runs/{run_id}")
    data = load_study_data(tmp_path)
    assert (data.other_code_runs, data.other_runs, data.stale_runs) == (2, 0, 0)
    text = " ".join(_warnings(data, []))
    assert "earlier version of the study config" not in text
    assert f"another fewtune code version (code_digest {'0' * 12} → {identity.code_digest()[:12]})" in text
    stale = stale_in_study(tmp_path, _pairs(plan))
    assert not stale.records and "2 runs in this directory were made by another fewtune code version" in stale.message()


def test_edited_task_file_makes_its_runs_stale_but_not_others(tmp_path):
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    (task_dir / "train.csv").write_text("text,label\ngood,positive\nbad,negative\n")
    (task_dir / "dev.csv").write_text("text,label\nok,positive\n")
    yaml_text = ("name: staletask\nlabel_names: [negative, positive]\ntext_fields: [text]\ntrain: {path: train.csv}\n"
                 "eval_sets:\n  dev: {path: dev.csv, in_domain: true}\n"
                 "patterns:\n  minimal: {template: \"{text} ?\", verbalizer: [\" No\", \" Yes\"]}\n")
    (task_dir / "t.yaml").write_text(yaml_text)
    study = parse_study({"model": "tiny-random", "tasks": [str(task_dir / "t.yaml"), "cola"], "methods": ["zero-shot"]}, "t")
    run_study(study, tmp_path / "s", executor=InProcessExecutor(fake_runner), show_progress=False)
    (task_dir / "t.yaml").write_text(yaml_text.replace("{text} ?", "{text} ?!"))
    stale = stale_in_study(tmp_path / "s", _pairs(expand(study)))
    assert len(stale) == 1 and set(stale.changes) == {"task_digest"} and "another task file" in stale.message()
    assert stale.records[0].task == str(task_dir / "t.yaml")


@pytest.mark.slow  # starts processes: not in the fast tier
def test_cli_refuses_to_resume_stale_study_keeps_on_request_and_dry_run_reports_it(tmp_path, data_dir):
    """Simulate runs finished by older code: their stored identity names another code_digest."""
    cfg = tmp_path / "study.yaml"
    cfg.write_text("name: s\nmodel: tiny-random\ntask: cola\nmethod: zero-shot\nseed: [0, 1]\neval_limit: 4\n")
    out = tmp_path / "out"
    plan = expand(parse_study({"model": "tiny-random", "task": "cola", "method": "zero-shot", "seed": [0, 1], "eval_limit": 4}))
    with Store(out) as s:
        old = []
        for p in plan:
            c = p.config.model_dump(mode="json")
            c["identity"]["code_digest"] = "0" * 16
            old.append((f"old{p.config.seed}", c))
        s.register(old)
        for run_id, _ in old:
            s.mark_running(run_id)
            s.mark_done(run_id, {"eval": {}}, f"runs/{run_id}")
    env = dict(os.environ, FEWTUNE_DATA_DIR=str(data_dir), COLUMNS="200")

    def study(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fewtune", "study", str(cfg), "--out", str(out), *extra],
                              capture_output=True, text=True, env=env, timeout=300)

    res = study()
    err = " ".join(res.stderr.split())
    assert res.returncode == 2 and "2 runs are stale" in err and "another fewtune code version (code_digest 000000000000 →" in err, err
    assert "Traceback" not in res.stderr and "--keep-stale" in err
    dry = study("--dry-run")
    assert dry.returncode == 0 and "2 runs are stale" in dry.stdout.replace("\n", " "), dry.stdout + dry.stderr
    both = study("--keep-stale", "--rerun-stale")
    assert both.returncode == 2 and "contradict" in both.stderr
    keep = study("--keep-stale", "--no-report")
    assert keep.returncode == 0, keep.stderr
    assert "2 kept from other code/library versions" in " ".join(keep.stderr.split())
    with Store(out) as s:
        assert {r.status for r in s.runs(run_ids=[p.run_id for p in plan])} == {"pending"}  # not run
    again = study("--no-report")  # the recorded decision holds: no refusal, nothing run
    assert again.returncode == 0 and "2 kept" in " ".join(again.stderr.split()), again.stderr
