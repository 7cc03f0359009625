"""The CLI never loses a result: existing outputs, unwritable or full locations, leftovers of
killed runs, permissions and Ctrl-C — each through the real CLI in a subprocess."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from test_cli import BASE, fewtune

pytestmark = [pytest.mark.usefixtures("data_dir"), pytest.mark.slow]  # the real CLI in subprocesses: not in the fast tier

ZERO_SHOT = [*BASE, "--task", "cola", "--method", "zero-shot"]


def fewtune_patched(patch: str, *args: str, data_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI with ``patch`` (Python code) executed first in every interpreter it starts (as a
    ``sitecustomize`` module: a study's run processes too): how a test makes the disk full or
    proves that no work started, without root tricks."""
    with tempfile.TemporaryDirectory() as site:
        Path(site, "sitecustomize.py").write_text(f"import errno, sys\n{patch}")
        env = dict(os.environ, FEWTUNE_DATA_DIR=str(data_dir), COLUMNS="200",
                   PYTHONPATH=os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p))
        return subprocess.run([sys.executable, "-m", "fewtune", *args], capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=300)


NO_WORK = ("import fewtune.run.runner, fewtune.study\n"
           "def boom(*a, **k): raise SystemExit('work started')\n"
           "fewtune.run.runner.load_model = boom\nfewtune.study.run_study = boom\n")
DISK_FULL = ("import fewtune.run.output\n"
             "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')\n"
             "fewtune.run.output.replace_dir = full\n")


def _hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_existing_run_is_never_replaced_by_surprise(tmp_path, data_dir):
    out = tmp_path / "o"
    assert fewtune(*ZERO_SHOT, "--out", str(out), data_dir=data_dir, cwd=tmp_path).returncode == 0
    before = (out / "metrics.json").read_bytes()

    same = fewtune(*ZERO_SHOT, "--out", str(out), data_dir=data_dir, cwd=tmp_path)
    assert same.returncode == 0 and "already done" in same.stderr and "accuracy" in same.stdout
    assert (out / "metrics.json").read_bytes() == before  # not run again (started_at would differ)

    other = fewtune(*ZERO_SHOT, "--eval-limit", "16", "--out", str(out), data_dir=data_dir, cwd=tmp_path)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "different config" in other.stderr and "eval_limit: 8 → 16" in other.stderr and "--overwrite" in other.stderr
    assert (out / "metrics.json").read_bytes() == before

    forced = fewtune(*ZERO_SHOT, "--eval-limit", "16", "--overwrite", "--out", str(out), data_dir=data_dir, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["eval_limit"] == 16
    assert _hidden(tmp_path) == []  # the replaced run was removed, not left aside


def test_a_diverging_run_does_not_replace_good_results(tmp_path, data_dir):
    """The refusal comes before any work, so a run of another config cannot fail over them."""
    out = tmp_path / "o"
    assert fewtune(*ZERO_SHOT, "--out", str(out), data_dir=data_dir, cwd=tmp_path).returncode == 0
    before = (out / "metrics.json").read_bytes()
    diverge = ("import fewtune.methods.vanilla as v\nfrom fewtune.errors import TrainingDiverged\n"
               "def fit(self, s): raise TrainingDiverged('training diverged: nan')\nv.Vanilla.fit = fit\n")
    res = fewtune_patched(diverge, *BASE, "--task", "cola", "--method", "vanilla", "--out", str(out),
                          data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2 and "different config" in res.stderr and "method: 'zero-shot' → 'vanilla'" in res.stderr
    assert (out / "metrics.json").read_bytes() == before


def test_out_that_is_a_file_is_refused_and_untouched(tmp_path, data_dir):
    (tmp_path / "f").write_text("keep me")
    res = fewtune(*ZERO_SHOT, "--out", "f", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2 and "is a file" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "f").read_text() == "keep me" and _hidden(tmp_path) == []


@pytest.mark.parametrize("command", [[*ZERO_SHOT, "--out"], ["study", "quick", "--seeds", "0", "--out"]])
@pytest.mark.parametrize(
    "out, code, message",
    [
        ("f/sub/out", 2, ("cannot create f/sub", ": f is a file, not a directory")),  # a wrong path: input error
        ("/proc/fewtune-test/out", 1, ("cannot write to /proc/fewtune-test", ": No such file or directory")),  # the OS refuses, even root
    ],
)
def test_unwritable_location_fails_before_any_work(tmp_path, data_dir, command, out, code, message):
    """(chmod would not stop root, so: a path through a regular file, and /proc.)"""
    (tmp_path / "f").write_text("keep me")
    res = fewtune_patched(NO_WORK, *command, out, data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == code, res.stderr
    assert "work started" not in res.stderr and "Traceback" not in res.stderr
    assert all(m in res.stderr.replace("\n", " ") for m in message)
    assert (tmp_path / "f").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_full_disk_while_writing_results_is_clear_and_leaves_no_temporaries(tmp_path, data_dir):
    res = fewtune_patched(DISK_FULL, *ZERO_SHOT, "--out", "o", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "cannot write results to o: No space left on device" in res.stderr.replace("\n", " ")
    assert "free some space" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("executor", ["subprocess", "inprocess"])
def test_full_disk_in_a_study_stops_it_resumably(tmp_path, data_dir, executor):
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump({"name": "tiny", "model": "tiny-random", "n": 2, "seed": [0, 1], "eval_limit": 8,
                                     "tasks": ["cola"], "methods": ["zero-shot"]}))
    res = fewtune_patched(DISK_FULL, "study", str(study), "--no-report", "--out", "s", "--executor", executor,
                          data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 1 and "No space left on device" in res.stderr and "Traceback" not in res.stderr
    assert list((tmp_path / "s" / "runs").iterdir()) == []  # no temporaries, nothing half-written
    again = fewtune("study", str(study), "--no-report", "--out", "s", data_dir=data_dir, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "2 finished, 0 failed" in again.stderr and "2/2 done" in again.stderr  # pending, not failed


def test_leftovers_of_a_killed_run_are_cleaned_next_time(tmp_path, data_dir):
    dead = tmp_path / ".o.tmp-999999999-dead0000"  # beyond any pid_max: its writer is gone
    live = tmp_path / f".o.tmp-{os.getpid()}-live0000"  # this test process: a writer still at work
    other = tmp_path / ".other.tmp-999999999-dead0000"  # another output's: not ours to touch
    for d in (dead, live, other):
        d.mkdir()
        (d / "metrics.json").write_text("{}")
    res = fewtune(*ZERO_SHOT, "--out", "o", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert _hidden(tmp_path) == sorted([live.name, other.name])


def test_outputs_respect_the_umask(tmp_path, data_dir):
    """Results are for colleagues and web servers too: 0644/0755 under umask 022, not 0600/0700."""
    env = dict(os.environ, FEWTUNE_DATA_DIR=str(data_dir))
    subprocess.run([sys.executable, "-m", "fewtune", *ZERO_SHOT, "--out", "o"], env=env, cwd=tmp_path, check=True,
                   capture_output=True, preexec_fn=lambda: os.umask(0o022), timeout=300)
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump({"name": "tiny", "model": "tiny-random", "n": 2, "seed": [0], "eval_limit": 8,
                                     "tasks": ["cola"], "methods": ["zero-shot"]}))
    subprocess.run([sys.executable, "-m", "fewtune", "study", str(study), "--no-report", "--out", "s"], env=env,
                   cwd=tmp_path, check=True, capture_output=True, preexec_fn=lambda: os.umask(0o022), timeout=300)
    (run_dir,) = (tmp_path / "s" / "runs").iterdir()
    for d in (tmp_path / "o", run_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE((tmp_path / "s" / "study.yaml").stat().st_mode) == 0o644


# --- Ctrl-C ------------------------------------------------------------------------------------


def _start(args: list[str], data_dir: Path, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, FEWTUNE_DATA_DIR=str(data_dir), COLUMNS="200")
    # SIGINT back to its default: a shell's background job (pytest … &) would pass it on ignored.
    return subprocess.Popen([sys.executable, "-m", "fewtune", *args], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _interrupt_when(proc: subprocess.Popen, started, delay: float = 2, timeout: float = 120) -> tuple[int, str]:
    """SIGINT (what Ctrl-C sends) ``delay`` seconds after ``started()`` holds."""
    deadline = time.time() + timeout
    while not started():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the command never started"
        time.sleep(0.02)
    time.sleep(delay)
    assert proc.poll() is None, "finished before it could be interrupted: make it slower"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def _torch_loaded(proc: subprocess.Popen) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


SLOW = ["--set", "train.max_steps=100000", "--set", "train.batch_size=4"]


@pytest.mark.parametrize("delay", [0.0, 0.4, 2.0])
def test_ctrl_c_during_run_exits_130_and_writes_nothing(tmp_path, data_dir, delay):
    """Early delays land while torch is being imported, where a Ctrl-C used to be swallowed now
    and then (an import error, exit 1); 2 s lands in training."""
    proc = _start([*BASE, "--task", "cola", "--method", "vanilla", *SLOW, "--out", "o"], data_dir, tmp_path)
    code, err = _interrupt_when(proc, lambda: _torch_loaded(proc), delay)
    assert code == 130, err
    assert "interrupted" in err and "nothing was written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_study_exits_130_and_resumes(tmp_path, data_dir):
    study = tmp_path / "slow.yaml"
    study.write_text(yaml.safe_dump({"name": "slow", "model": "tiny-random", "n": 2, "seed": [0], "eval_limit": 8,
                                     "train": {"max_steps": 100000, "batch_size": 4}, "tasks": ["cola"], "methods": ["vanilla"]}))
    out = tmp_path / "s"
    out.mkdir()  # an empty directory is a fine place for a study
    proc = _start(["study", str(study), "--no-report", "--out", "s"], data_dir, tmp_path)
    code, err = _interrupt_when(proc, lambda: (out / "study.yaml").exists() and _torch_loaded(proc))
    assert code == 130, err
    assert "interrupted" in err and "re-run the same command to resume" in err and "Traceback" not in err
    runs = out / "runs"  # the run's process may not have created it yet
    assert not runs.exists() or list(runs.iterdir()) == []  # nothing half-written, no temporaries
    with sqlite3.connect(out / "study.db") as db:
        assert [s for (s,) in db.execute("SELECT status FROM runs")] == ["pending"]  # resumable, not failed
