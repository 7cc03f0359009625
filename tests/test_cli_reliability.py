"""Reliability cases of a careless or unlucky user (issue 18), through the real CLI (a subprocess)
or the public API: nothing of the user's lost, nothing hung, nothing mislabelled."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml
from test_cli import fewtune

from fewtune.results import load_runs
from fewtune.study import Store

pytestmark = pytest.mark.usefixtures("data_dir")

TINY = {"name": "tiny", "model": "tiny-random", "n": 2, "seed": [0], "eval_limit": 8, "tasks": ["cola"], "methods": ["zero-shot"]}


def _write_study(path: Path, **over) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# my own study, with my comments\n" + yaml.safe_dump({**TINY, **over}, sort_keys=False))
    return path


# --- a directory is a study only by fewtune's own marker; the user's files are never overwritten --


def test_a_users_study_yaml_does_not_make_a_directory_a_study(tmp_path, data_dir):
    study = _write_study(tmp_path / "tiny.yaml")
    out = tmp_path / "mine"
    _write_study(out / "study.yaml", name="another")
    (out / "report.md").write_text("my own notes")
    before = (out / "study.yaml").read_bytes()
    res = fewtune("study", str(study), "--out", str(out), data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "not a fewtune study directory" in res.stderr and "report.md" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "study.yaml"]
    assert (out / "report.md").read_text() == "my own notes" and (out / "study.yaml").read_bytes() == before


def test_a_study_db_without_fewtunes_schema_is_not_a_study(tmp_path, data_dir):
    study = _write_study(tmp_path / "tiny.yaml")
    out = tmp_path / "mine"
    out.mkdir()
    with sqlite3.connect(out / "study.db") as conn:
        conn.execute("CREATE TABLE animals (name TEXT)")
    conn.close()
    res = fewtune("study", str(study), "--out", str(out), data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2 and "not a fewtune study directory" in res.stderr, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["study.db"]


def test_study_of_its_own_config_in_out_never_rewrites_it(tmp_path, data_dir):
    """``fewtune study d/study.yaml --out d``: the study runs in d, the user's config (and its
    comments) stays byte for byte, on the first call and on a resume."""
    d = tmp_path / "d"
    config = _write_study(d / "study.yaml")
    before = config.read_bytes()
    for _ in range(2):
        res = fewtune("study", str(config), "--no-report", "--out", str(d), data_dir=data_dir, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert "1/1 done" in res.stderr
        assert config.read_bytes() == before
    res = fewtune("study", "study.yaml", "--no-report", "--out", ".", data_dir=data_dir, cwd=d)  # the same, relative
    assert res.returncode == 0 and config.read_bytes() == before, res.stderr


# --- arms are labelled from what computes results, wherever a run's config is read from -----------


@pytest.fixture(scope="module")
def icl_study(tmp_path_factory, data_dir) -> Path:
    """Three finished icl runs (three data seeds)."""
    root = tmp_path_factory.mktemp("icl")
    study = _write_study(root / "icl.yaml", seed=[0, 1, 2], methods=["icl"])
    res = fewtune("study", str(study), "--no-report", "--out", "s", data_dir=data_dir, cwd=root)
    assert res.returncode == 0, res.stderr
    return root / "s"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_missing_run_directory_keeps_one_arm_and_is_a_report_warning(icl_study, tmp_path, data_dir):
    s = _copy(icl_study, tmp_path / "s")
    gone = sorted((s / "runs").iterdir())[1]
    shutil.rmtree(gone)
    frame = load_runs(s)
    assert set(frame["arm"]) == {"icl"} and frame["run_id"].nunique() == 3
    res = fewtune("report", str(s), data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = (s / "report.md").read_text()
    assert "log_to" not in report and "| icl | 2 | " in report
    assert f"The directory of run {gone.name}" in report and "is missing" in report


def test_incomplete_study_keeps_one_arm(icl_study, tmp_path):
    """A pending run's config comes from study.db (which holds log_to); a finished run's from its
    config.yaml (which does not): still one arm, labelled by the method alone."""
    s = _copy(icl_study, tmp_path / "s")
    with Store(s) as store:
        store.requeue_missing(store.runs()[0].run_id)
    frame = load_runs(s)
    assert sorted(frame["status"].unique()) == ["done", "pending"]
    assert set(frame["arm"]) == {"icl"}
