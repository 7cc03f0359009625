"""Reliability cases of a careless or unlucky user (issue 18), through the real CLI (a subprocess)
or the public API: nothing of the user's lost, nothing hung, nothing mislabelled."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml
from test_cli import fewtune

from fewtune.results import collect, load_runs
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
    configs = {r.status: r.config for r in collect(s)}
    assert set(configs["pending"]) == set(configs["done"])  # the same keys from study.db as from config.yaml


# --- input errors every run would meet: found once, before any run --------------------------------


def _corrupt_data(tmp_path: Path, data_dir: Path) -> Path:
    bad = tmp_path / "data"
    shutil.copytree(data_dir / "cola", bad / "cola")
    p = bad / "cola" / "in_domain_dev.tsv"
    p.write_bytes(p.read_bytes().replace(b"\t1\t", b"\t0\t", 1))
    return bad


@pytest.mark.parametrize("case", ["tracker not installed", "data file checksum"])
def test_study_input_errors_are_one_exit_2_before_any_run(tmp_path, data_dir, case):
    import importlib.util

    if case == "tracker not installed":
        if importlib.util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed here")
        study, data, message = _write_study(tmp_path / "s.yaml", seed=[0, 1], log_to=["wandb"]), data_dir, "needs the 'wandb' package"
    else:
        study, data, message = _write_study(tmp_path / "s.yaml", seed=[0, 1]), _corrupt_data(tmp_path, data_dir), "in_domain_dev.tsv"
    res = fewtune("study", str(study), "--out", "out", data_dir=data, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr.replace("\n", " ") and "Traceback" not in res.stderr and "failed" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_study_with_no_finished_run_points_to_no_report(tmp_path, data_dir):
    study = _write_study(tmp_path / "s.yaml", methods=["icl"])
    res = fewtune("study", str(study), "--set", "max_context=40", "--out", "out", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "some runs failed" in res.stderr and "Failed runs" not in res.stderr and "listed above" in res.stderr
    assert not (tmp_path / "out" / "report.md").exists()


# --- small things: the right message for each mistake ---------------------------------------------


def test_export_to_a_directory_is_exit_2(icl_study, tmp_path, data_dir):
    (tmp_path / "d").mkdir()
    res = fewtune("export", str(icl_study), "--out", "d", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "is a directory" in res.stderr and "Traceback" not in res.stderr and "free space" not in res.stderr
    assert list((tmp_path / "d").iterdir()) == []


OS_ERROR_CLI = """
import errno, sys
from fewtune.cli.app import app, run_cli

@app.command("boom")
def boom(code: str) -> None:
    raise OSError(getattr(errno, code), "simulated")

sys.exit(run_cli(["boom", sys.argv[1]]))
"""


@pytest.mark.parametrize("code, hint", [("ECONNREFUSED", None), ("EISDIR", None), ("ENOSPC", "free some space"),
                                        ("EACCES", "permissions")])
def test_only_space_and_permission_errors_get_a_disk_hint(tmp_path, code, hint):
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", OS_ERROR_CLI, code], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, COLUMNS="200"), timeout=120)
    assert res.returncode == 1 and "simulated" in res.stderr and "Traceback" not in res.stderr, res.stderr
    if hint is None:
        assert "hint" not in res.stderr
    else:
        assert hint in res.stderr


@pytest.mark.parametrize("text, hint, not_hint", [
    ("task: !!python/object/apply:os.getcwd []\n", "remove the tag", "each key may appear once"),
    ("task: cola\ntask: sst2\n", "each key may appear once", "remove the tag"),
])
def test_yaml_errors_get_their_own_hint(tmp_path, data_dir, text, hint, not_hint):
    (tmp_path / "c.yaml").write_text(text)
    res = fewtune("run", "--config", "c.yaml", "--out", "o", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert hint in res.stderr.replace("\n", " ") and not_hint not in res.stderr.replace("\n", " ")


@pytest.mark.parametrize("flag, env, blamed, not_blamed", [
    (["--threads", "0"], "2", "'--threads'", "FEWTUNE_THREADS"),
    ([], "0", "FEWTUNE_THREADS", "'--threads'"),
])
def test_threads_error_blames_where_the_value_came_from(tmp_path, data_dir, flag, env, blamed, not_blamed):
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "fewtune", *flag, "tasks"], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, FEWTUNE_DATA_DIR=str(data_dir), FEWTUNE_THREADS=env, COLUMNS="200"), timeout=120)
    assert res.returncode == 2, res.stderr
    assert blamed in res.stderr and not_blamed not in res.stderr and "at least 1" in res.stderr


def test_refused_report_on_an_empty_study_db_writes_nothing_beside_it(tmp_path, data_dir):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.db").write_bytes(b"")
    res = fewtune("report", "s", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2 and "damaged" in res.stderr, res.stderr
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["study.db"]


# --- an --out that cannot be replaced: refused up front, no temporary left -------------------------


def test_a_mount_point_as_run_out_is_refused_before_any_work(tmp_path, monkeypatch):
    from fewtune.config import RunConfig
    from fewtune.errors import ConfigError
    from fewtune.run.output import check_out_dir

    target = tmp_path / "mnt"
    target.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == target or real(p))
    with pytest.raises(ConfigError, match="mount point") as e:
        check_out_dir(RunConfig(), "rid", target)
    assert str(target / "run") in e.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]


def test_replace_dir_that_cannot_move_the_target_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    from fewtune.atomic import make_tmp_dir, replace_dir

    target = tmp_path / "out"
    target.mkdir()
    tmp = make_tmp_dir(target)
    real = os.replace

    def busy(src, dst):  # what renaming a mount point gives
        if Path(src) == target:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(OSError):
        replace_dir(tmp, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", tmp.name])  # the caller removes its own tmp
