"""A study resumed under another identity (upgrade, edited task file, other device) reports its
stale runs, refuses to mix them, and re-runs them on request."""

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
from fewtune.run.identity import guard_stale, stale_in_study
from fewtune.study import expand, parse_study, run_study
from fewtune.study.executors import InProcessExecutor
from fewtune.study.store import Store

STUDY = {"name": "stale", "model": "tiny-random", "task": "cola", "seed": [0, 1], "methods": ["icl", "zero-shot"]}


def fake_runner(cfg, out_dir: Path, *, data_dir=None, progress=None):
    """Results that say which identity made them, so mixing would show in the report's rows."""
    return write_fake(cfg, out_dir, 0.9 if cfg.identity.fewtune_version == "9.9" else 0.5)


def _pairs(planned):
    return [(p.run_id, p.config.model_dump(mode="json")) for p in planned]


def test_upgrade_makes_runs_stale_and_the_report_never_mixes_them(tmp_path, monkeypatch):
    study = parse_study(STUDY, "test")
    old_plan = expand(study)
    run_study(study, tmp_path, executor=InProcessExecutor(fake_runner), show_progress=False, planned=old_plan)
    assert not stale_in_study(tmp_path, _pairs(old_plan))  # same identity: nothing stale

    monkeypatch.setattr(identity, "fewtune_version", lambda: "9.9")  # the upgrade
    new_plan = expand(study)
    assert not {p.run_id for p in new_plan} & {p.run_id for p in old_plan}
    with pytest.raises(ConfigError) as e:
        guard_stale(tmp_path, _pairs(new_plan), rerun_stale=False)
    assert "4 runs are stale" in e.value.message and "fewtune_version 0.1.0 → 9.9" in e.value.message
    assert "--rerun-stale" in e.value.hint

    guard_stale(tmp_path, _pairs(new_plan), rerun_stale=True)
    out = run_study(study, tmp_path, executor=InProcessExecutor(fake_runner), show_progress=False, planned=new_plan, limit=1)
    assert out.succeeded == 1
    data = load_study_data(tmp_path)
    assert {r.run_id for r in data.runs} == {p.run_id for p in new_plan}
    assert {r.accuracy for r in data.rows} == {0.9}  # only the current identity's results
    assert data.stale_runs == 4 and data.other_runs == 0
    assert any("4 runs in this directory are stale" in w for w in _warnings(data, []))


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
    assert len(stale) == 1 and set(stale.changes) == {"task_digest"}
    assert stale.records[0].task == str(task_dir / "t.yaml")


@pytest.mark.slow  # starts processes: not in the fast tier
def test_cli_refuses_to_resume_stale_study_and_dry_run_reports_it(tmp_path, data_dir):
    """Simulate runs finished by an older fewtune: their stored identity names another version."""
    cfg = tmp_path / "study.yaml"
    cfg.write_text("name: s\nmodel: tiny-random\ntask: cola\nmethod: zero-shot\nseed: [0, 1]\neval_limit: 4\n")
    out = tmp_path / "out"
    plan = expand(parse_study({"model": "tiny-random", "task": "cola", "method": "zero-shot", "seed": [0, 1], "eval_limit": 4}))
    with Store(out) as s:
        old = []
        for p in plan:
            c = p.config.model_dump(mode="json")
            c["identity"]["fewtune_version"] = "0.0.1"
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
    assert res.returncode == 2 and "2 runs are stale" in res.stderr and "0.0.1 →" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    dry = study("--dry-run")
    assert dry.returncode == 0 and "2 runs are stale" in dry.stdout.replace("\n", " "), dry.stdout + dry.stderr
