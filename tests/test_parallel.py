"""``fewtune study --parallel N``: the same results as one run at a time, runs really overlap,
failures are contained, and an interrupted or killed study resumes with no run lost or run twice.
Through the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO
from executor_runners import alive as _alive
from test_executors import _per_run

from fewtune.study.store import Store

pytestmark = pytest.mark.slow  # the real CLI in subprocesses: not in the fast tier

TESTS = Path(__file__).resolve().parent
TINY = {"name": "tiny", "model": "tiny-random", "n": 2, "seed": [0, 1], "eval_limit": 8, "eval_batch_size": 8,
        "train": {"max_steps": 2, "batch_size": 4}, "task": "cola", "methods": ["icl", "vanilla"]}
SLOW = {"name": "slow", "model": "tiny-random", "task": "cola", "seed": [0, 1, 2], "methods": ["icl", "zero-shot"]}
# Every interpreter the CLI starts (the study's, the fork server, the runs') runs this first: the
# runs become executor_runners.slow_logged (seconds long, logged), not real training.
SLOW_RUNNER = (f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
               "import executor_runners, fewtune.run.runner\nfewtune.run.runner.run_experiment = executor_runners.slow_logged\n")


def _env(data_dir: Path, site: str | None = None, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "FEWTUNE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


def _study(cfg: Path, *args: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fewtune", "study", str(cfg), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600, **kw)


def _write(tmp_path: Path, data: dict) -> Path:
    cfg = tmp_path / f"{data['name']}.yaml"
    cfg.write_text(json.dumps(data))
    return cfg


def test_parallel_gives_the_same_results_as_sequential_inprocess(tmp_path: Path, data_dir: Path) -> None:
    cfg = _write(tmp_path, TINY)
    env = _env(data_dir)
    seq = _study(cfg, "--out", str(tmp_path / "seq"), "--executor", "inprocess", "--no-report", env=env)
    par = _study(cfg, "--out", str(tmp_path / "par"), "--executor", "subprocess", "--parallel", "2", "--no-report", env=env)
    assert seq.returncode == 0 and par.returncode == 0, (seq.stderr[-2000:], par.stderr[-2000:])
    a, b = _per_run(tmp_path / "seq"), _per_run(tmp_path / "par")
    assert len(a) == 4 and a == b


@pytest.mark.parametrize("args, message", [
    (["--parallel", "0"], "--parallel must be a whole number of runs at least 1, got 0"),
    (["--executor", "inprocess", "--parallel", "2"], "--executor inprocess runs at most 1 run(s) at once"),
])
def test_bad_parallel_is_a_usage_error(tmp_path: Path, data_dir: Path, args: list[str], message: str) -> None:
    res = _study(_write(tmp_path, TINY), "--out", str(tmp_path / "o"), *args, env=_env(data_dir))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert message in " ".join(res.stderr.split())
    assert not (tmp_path / "o").exists()  # refused before anything was written


def _events(out: Path) -> list[tuple[str, str, int]]:
    log = out / "events.log"
    lines = log.read_text().splitlines() if log.is_file() else []
    return [(kind, run, int(pid)) for kind, run, pid, _ in (line.split() for line in lines)]


def _in_flight(out: Path) -> dict[str, int]:
    """Runs started and not (yet) complete, with their process ids."""
    ev = _events(out)
    ended = {r for k, r, _ in ev if k == "end"}
    return {r: pid for k, r, pid in ev if k == "start" and r not in ended}


def _wait_until(proc: subprocess.Popen, cond, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the study ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def _ends(out: Path) -> int:
    return sum(k == "end" for k, _, _ in _events(out))


def test_interrupted_and_killed_parallel_study_resumes_without_loss_or_duplicate(tmp_path: Path, data_dir: Path) -> None:
    cfg, out = _write(tmp_path, SLOW), tmp_path / "out"
    args = [sys.executable, "-m", "fewtune", "study", str(cfg), "--out", str(out), "--parallel", "2", "--threads", "2", "--no-report"]
    with tempfile.TemporaryDirectory() as site:
        Path(site, "sitecustomize.py").write_text(SLOW_RUNNER)
        env = _env(data_dir, site, FEWTUNE_TEST_RUN_S="2")

        # 1. Ctrl-C while two runs are in flight at once: both processes stop, both runs pending.
        first = subprocess.Popen(args, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
        _wait_until(first, lambda: _ends(out) >= 1 and len(_in_flight(out)) == 2, "one run finished and two ran at once")
        flying = _in_flight(out)
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 130, first.stderr.read()[-3000:]
        assert not any(_alive(pid) for pid in flying.values())
        assert not set(flying) & {r for k, r, _ in _events(out) if k == "end"}  # stopped, not left to finish
        with Store(out) as s:
            status = {r.run_id: r.status for r in s.runs()}
        assert "running" not in status.values() and all(status[r] == "pending" for r in flying)

        # 2. kill -9 of the study process with runs in flight: the runs' processes end with it.
        ended = _ends(out)
        second = subprocess.Popen(args, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
        _wait_until(second, lambda: _ends(out) > ended and _in_flight(out), "the resumed study finished a run")
        flying = _in_flight(out)
        second.kill()
        second.wait(60)
        deadline = time.time() + 30
        while any(_alive(pid) for pid in flying.values()) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in flying.values())

        # 3. resumed to the end: every run done once, none lost, none run twice.
        last = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]
    with Store(out) as s:
        rows = s.runs()
    assert len(rows) == 6 and all(r.status == "done" for r in rows)
    completed = Counter(r for k, r, _ in _events(out) if k == "end")
    assert max(completed.values()) == 1  # no run completed twice
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(r.run_id for r in rows)
    assert {r.metrics["threads"] for r in rows} == {2}  # --threads 2 per run, however many run at once
