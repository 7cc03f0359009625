"""The Ray executor: the same results as in-process, files written by the driver from the data a
task returns, dead workers retried (bounded), a run that raises recorded failed, Ctrl-C cancels.

One local cluster (2 CPUs) serves the whole module; skipped where Ray is not installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray executor needs ray (pip install fewtune[ray])")
pytestmark = pytest.mark.slow  # a cluster of processes: not in the fast tier

import executor_runners as runners  # noqa: E402
import ray_runners  # noqa: E402
from conftest import REPO  # noqa: E402

from fewtune.study import expand, parse_study, run_study  # noqa: E402
from fewtune.study.executors import InProcessExecutor, make_executor  # noqa: E402
from fewtune.study.ray_executor import EXECUTOR_FILE, RayExecutor  # noqa: E402
from fewtune.study.store import Store  # noqa: E402

FAKE = {"name": "fake", "model": "tiny-random", "task": "cola", "seed": [0, 1], "methods": ["icl", "zero-shot"]}
TINY = {"name": "tiny", "model": "tiny-random", "n": 2, "seed": [0], "eval_limit": 8, "eval_batch_size": 8,
        "train": {"max_steps": 2, "batch_size": 4}, "task": "cola", "methods": ["icl", "vanilla"]}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for the module; the executors find it initialised and leave it running."""
    import logging

    # The stand-in runners' modules are not installed: Ray workers get them by value. The
    # executor does that for a runner's own module; ray_runners also uses executor_runners.
    ray.cloudpickle.register_pickle_by_value(runners)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _study(data: dict):
    return parse_study(data, "test")


def _records(out: Path) -> dict:
    with Store(out) as s:
        return {r.run_id: r for r in s.runs()}


def test_identical_results_inprocess_and_ray(tmp_path: Path, data_dir: Path, cluster) -> None:
    study = _study(TINY)
    run_study(study, tmp_path / "in", data_dir=data_dir, show_progress=False, executor=InProcessExecutor())
    run_study(study, tmp_path / "ray", data_dir=data_dir, show_progress=False, executor=RayExecutor())
    a, b = _records(tmp_path / "in"), _records(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) == 2 and all(r.status == "done" for r in [*a.values(), *b.values()])
    for run_id, ra in a.items():
        rb = b[run_id]
        assert ra.metrics["eval"] == rb.metrics["eval"] and ra.metrics.get("curve") == rb.metrics.get("curve")
        assert set(ra.metrics) == set(rb.metrics)  # no executor fields in metrics.json
        for name in ("config.yaml", "sample.json", "predictions.jsonl"):
            assert (tmp_path / "in" / ra.run_dir / name).read_bytes() == (tmp_path / "ray" / rb.run_dir / name).read_bytes()
        assert json.loads((tmp_path / "ray" / rb.run_dir / "metrics.json").read_text()) == rb.metrics
        assert not (tmp_path / "in" / ra.run_dir / EXECUTOR_FILE).exists()
        placed = json.loads((tmp_path / "ray" / rb.run_dir / EXECUTOR_FILE).read_text())
        assert placed["executor"] == "ray" and placed["resources"] == {"cpus": 1, "gpus": 0} and placed["node_id"]


def test_a_pack_through_ray_gives_every_member_its_lone_results(tmp_path: Path, data_dir: Path, cluster) -> None:
    """``--pack 4`` through Ray: one task per pack, each member's files written by the driver into
    the member's own run directory; run ids, eval metrics, predictions and losses are those of
    the study without packing, in-process."""
    from test_pack import STUDY, packed_counts, results

    run_study(_study(STUDY), tmp_path / "alone", data_dir=data_dir, show_progress=False, executor=InProcessExecutor())
    run_study(_study({**STUDY, "pack": 4}), tmp_path / "ray", data_dir=data_dir, show_progress=False, executor=RayExecutor())
    assert results(tmp_path / "ray") == results(tmp_path / "alone")
    packed = packed_counts(tmp_path / "ray")
    assert sorted(packed.values(), key=str) == [4, 4, 4, 4, None, None]
    for run_id, k in packed.items():
        placed = json.loads((tmp_path / "ray" / "runs" / run_id / EXECUTOR_FILE).read_text())
        assert placed["executor"] == "ray" and (run_id in placed.get("packed_with", [])) == (k == 4)
    assert not [p for p in (tmp_path / "ray" / "runs").iterdir() if p.name.startswith(".")]


def test_files_are_written_by_the_driver_from_returned_data(tmp_path: Path, cluster) -> None:
    """The task writes into a worker-local directory; the study's run directory gets its files
    (nested ones too) from the data the task returned, plus executor.json."""
    study = _study({**FAKE, "seed": [0], "methods": ["icl"]})
    out = run_study(study, tmp_path, show_progress=False, executor=RayExecutor(ray_runners.writes_where))
    assert out.succeeded == 1
    (rec,) = _records(tmp_path).values()
    run_dir = tmp_path / rec.run_dir
    written_at = Path((run_dir / "extra" / "where.txt").read_text())
    assert written_at != run_dir and tmp_path not in written_at.parents
    assert not written_at.exists()  # the worker's directory is gone
    assert json.loads((run_dir / "metrics.json").read_text()) == rec.metrics
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(["extra", "metrics.json", EXECUTOR_FILE])
    assert not list(tmp_path.joinpath("runs").glob(".*tmp-*"))


def test_a_worker_killed_once_is_retried(tmp_path: Path, cluster) -> None:
    (tmp_path / "m").mkdir()
    runner = partial(ray_runners.dies_once, marker_dir=tmp_path / "m")
    out = run_study(_study({**FAKE, "seed": [0]}), tmp_path / "s", show_progress=False, executor=RayExecutor(runner, max_retries=1))
    assert (out.succeeded, out.failed_now) == (2, 0)
    killed = {int(p.read_text()) for p in (tmp_path / "m").iterdir()}
    finished = {r.metrics["pid"] for r in _records(tmp_path / "s").values()}
    assert len(killed) == 2 and not killed & finished  # each run died once, then ran in another worker


def test_a_worker_that_keeps_dying_is_a_failed_run(tmp_path: Path, cluster) -> None:
    out = run_study(_study({**FAKE, "seed": [0]}), tmp_path, show_progress=False,
                    executor=RayExecutor(runners.killed_by_signal, max_retries=1))
    assert (out.succeeded, out.failed_now) == (1, 1)
    (failed,) = [r for r in _records(tmp_path).values() if r.status == "failed"]
    assert failed.method == "zero-shot"
    assert failed.error.startswith("ProcessDied: the run's Ray worker died 2 time(s)"), failed.error
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [r.run_id for r in _records(tmp_path).values() if r.status == "done"]


def test_a_run_that_raises_is_recorded_and_not_retried(tmp_path: Path, cluster) -> None:
    out = run_study(_study(FAKE), tmp_path, show_progress=False, executor=RayExecutor(runners.diverges, max_retries=2))
    assert (out.succeeded, out.failed_now) == (1, 3)
    errors = {(r.method, r.seed): r.error for r in _records(tmp_path).values() if r.status == "failed"}
    diverged = errors[("zero-shot", 0)]
    assert diverged.startswith("TrainingDiverged: training loss became NaN at step 1") and "Traceback" not in diverged
    assert errors[("icl", 1)].startswith("ZeroDivisionError: oops") and "Traceback" in errors[("icl", 1)]


def test_ctrl_c_cancels_the_task_and_leaves_the_run_pending(tmp_path: Path, cluster) -> None:
    (tmp_path / "pids").mkdir()
    runner = partial(ray_runners.hangs, pid_dir=tmp_path / "pids")

    def interrupt_when_started() -> None:
        deadline = time.time() + 120
        while not any((tmp_path / "pids").iterdir()) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_study(_study(FAKE), tmp_path / "s", show_progress=False, executor=RayExecutor(runner))
    (pid_file,) = (tmp_path / "pids").iterdir()
    pid = int(pid_file.stem)
    deadline = time.time() + 30
    while runners.alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not runners.alive(pid)  # the task was cancelled: its worker is gone
    with Store(tmp_path / "s") as s:
        assert s.counts() == {"pending": 4, "running": 0, "done": 0, "failed": 0}



def test_cli_ray_failed_run_exits_1_and_study_goes_on(tmp_path: Path, data_dir: Path, cluster) -> None:
    """Through the CLI on an existing cluster (--ray-address): a real run that fails is recorded,
    the other finishes, exit 1 without a traceback."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps({"name": "f", "model": ["tiny-random", str(tmp_path / "no-such-model")], "task": "cola",
                               "method": "zero-shot", "eval_limit": 8}))
    env = {**os.environ, "FEWTUNE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "fewtune", "study", str(cfg), "--out", str(tmp_path / "out"), "--no-report",
                          "--executor", "ray", "--ray-address", cluster], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    by_model = {r.config["model"]: r for r in _records(tmp_path / "out").values()}
    assert by_model["tiny-random"].status == "done"
    assert (tmp_path / "out" / by_model["tiny-random"].run_dir / EXECUTOR_FILE).is_file()
    bad = by_model[str(tmp_path / "no-such-model")]
    assert bad.status == "failed" and bad.error.startswith("ConfigError: cannot load model")


def test_ray_options_are_user_errors(monkeypatch, cluster) -> None:
    from fewtune.errors import ConfigError

    with pytest.raises(ConfigError, match="gpus"):
        RayExecutor(resources={"gpus": 1.5})
    with pytest.raises(ConfigError, match="unknown run resource"):
        RayExecutor(resources={"memory": 1})
    with pytest.raises(ConfigError, match="apply to --executor ray"):
        make_executor("subprocess", ray_address="auto")
    with pytest.raises(ConfigError, match="cannot hold one run: 0.5 GPUs per run, the cluster has 0"):
        RayExecutor(resources={"gpus": 0.5}).run(expand(_study(FAKE))[0], Path("/nonexistent/never-written"))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ConfigError, match="needs Ray") as e:
        make_executor("ray")
    assert "fewtune[ray]" in e.value.hint


def _session_processes(sid: int) -> list[str]:
    """Live processes of session ``sid`` (a CLI started with start_new_session): what it left."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            out.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120])
    return out


@pytest.mark.parametrize("when", ["cluster starting", "runs running"])
def test_cli_ctrl_c_of_a_ray_study_exits_130_promptly_and_leaves_nothing(tmp_path: Path, data_dir: Path, when: str) -> None:
    """SIGINT to the whole process group, as a terminal sends it, while the local cluster starts
    and while runs execute: exit 130 with the resume message within seconds, no traceback, no
    process of the study left (its Ray cluster included), no run left ``running``."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps({"name": "r", "model": "tiny-random", "task": "cola", "method": "icl", "n": 2, "seed": [0, 1, 2],
                               "eval_limit": 8}))
    out = tmp_path / "out"
    env = {**os.environ, "FEWTUNE_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fewtune", "study", str(cfg), "--out", str(out), "--no-report", "--executor", "ray",
                             "--parallel", "2"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if when == "cluster starting" and (out / "study.db").is_file():
            break
        if when == "runs running" and (out / "study.db").is_file() and any(r.status == "running" for r in _records(out).values()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(1)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    took = time.time() - t0
    time.sleep(1)
    left = _session_processes(proc.pid)
    for _ in range(2 if left else 0):  # never leave them to the next test
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "re-run the same command to resume" in err.replace("\n", "") and "Traceback" not in err
    assert took < 15, f"took {took:.1f} s to exit"
    assert left == []
    assert {r.status for r in _records(out).values()} <= {"pending", "done"}


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_cli_wrong_ray_address_is_exit_2_naming_it(tmp_path: Path, data_dir: Path, address: str) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps({"name": "r", "model": "tiny-random", "task": "cola", "method": "zero-shot", "eval_limit": 8}))
    env = {**os.environ, "FEWTUNE_DATA_DIR": str(data_dir)}
    res = subprocess.run([sys.executable, "-m", "fewtune", "study", str(cfg), "--out", str(tmp_path / "out"), "--executor", "ray",
                          "--ray-address", address], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"cannot reach the Ray cluster at {address}" in res.stderr and "Traceback" not in res.stderr
    assert "free space" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_cli_ray_study_leaves_no_process_behind(tmp_path: Path, data_dir: Path) -> None:
    """A local cluster the study started is shut down with it: no Ray agent outlives the study."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps({"name": "r", "model": "tiny-random", "task": "cola", "method": "zero-shot", "eval_limit": 8}))
    env = {**os.environ, "FEWTUNE_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fewtune", "study", str(cfg), "--out", str(tmp_path / "out"), "--no-report",
                             "--executor", "ray"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _, err = proc.communicate(timeout=300)
    time.sleep(1)
    left = _session_processes(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert left == []
