"""Executors: the same results wherever a run executes; a run's failure, death or interruption
is contained and recorded; a study resumes over deleted run directories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import executor_runners as runners
import pytest
from conftest import REPO

from fewtune.errors import ConfigError
from fewtune.study import expand, parse_study, run_study
from fewtune.study.executors import InProcessExecutor, SubprocessExecutor, make_executor
from fewtune.study.store import Store

FAKE = {"name": "fake", "model": "tiny-random", "task": "cola", "seed": [0, 1], "methods": ["icl", "zero-shot"]}
TINY = {"name": "tiny", "model": "tiny-random", "n": 2, "seed": [0, 1], "eval_limit": 8, "eval_batch_size": 8,
        "train": {"max_steps": 2, "batch_size": 4}, "task": "cola", "methods": ["icl", "vanilla", {"method": "lora", "params": {"r": 2}}]}


def _study(data: dict):
    return parse_study(data, "test")


def _per_run(out: Path) -> dict[str, tuple]:
    """Per run id: the eval metrics and the predictions file (timings and memory excluded)."""
    with Store(out) as s:
        rows = s.runs()
    assert rows and all(r.status == "done" for r in rows), [(r.status, r.error) for r in rows]
    return {r.run_id: (json.dumps(r.metrics["eval"], sort_keys=True), r.metrics["curve"],
                       (out / r.run_dir / "predictions.jsonl").read_text()) for r in rows}


@pytest.mark.slow  # starts processes: not in the fast tier
def test_identical_results_inprocess_and_subprocess(tmp_path: Path, data_dir: Path) -> None:
    study = _study(TINY)
    a = run_study(study, tmp_path / "in", data_dir=data_dir, show_progress=False, executor=InProcessExecutor())
    b = run_study(study, tmp_path / "sub", data_dir=data_dir, show_progress=False, executor=SubprocessExecutor())
    assert a.counts["done"] == b.counts["done"] == 6
    assert _per_run(tmp_path / "in") == _per_run(tmp_path / "sub")


@pytest.mark.slow  # starts processes: not in the fast tier
def test_each_subprocess_run_has_its_own_process(tmp_path: Path) -> None:
    out = run_study(_study(FAKE), tmp_path, show_progress=False, executor=SubprocessExecutor(runners.killed_by_signal, preload=[]))
    with Store(tmp_path) as s:
        pids = [r.metrics["pid"] for r in s.runs(status="done")]
    assert out.counts["done"] == 2 and len(set(pids)) == 2 and os.getpid() not in pids


@pytest.mark.parametrize("make", [lambda r: InProcessExecutor(r),  # the subprocess case starts processes: slow
                                  pytest.param(lambda r: SubprocessExecutor(r, preload=[]), marks=pytest.mark.slow)],
                         ids=["inprocess", "subprocess"])
def test_a_run_that_raises_is_recorded_and_the_study_goes_on(tmp_path: Path, make) -> None:
    out = run_study(_study(FAKE), tmp_path, show_progress=False, executor=make(runners.diverges))
    assert (out.succeeded, out.failed_now) == (1, 3)
    with Store(tmp_path) as s:
        errors = {(r.method, r.seed): r.error for r in s.runs(status="failed")}
    # A FewtuneError keeps its type and is its message alone; a bug keeps its traceback.
    diverged = errors[("zero-shot", 0)]
    assert diverged.startswith("TrainingDiverged: training loss became NaN at step 1") and "Traceback" not in diverged
    assert errors[("icl", 1)].startswith("ZeroDivisionError: oops") and "Traceback" in errors[("icl", 1)]
    assert {f[2] for f in out.failures} >= {"TrainingDiverged: training loss became NaN at step 1", "ZeroDivisionError: oops"}


@pytest.mark.slow  # starts processes: not in the fast tier
def test_a_run_killed_by_a_signal_is_recorded_failed(tmp_path: Path) -> None:
    out = run_study(_study(FAKE), tmp_path, show_progress=False,
                    executor=SubprocessExecutor(runners.killed_by_signal, preload=[]))
    assert (out.succeeded, out.failed_now, out.counts["done"]) == (2, 2, 2)
    with Store(tmp_path) as s:
        failed = s.runs(status="failed")
    assert {r.method for r in failed} == {"zero-shot"}
    assert all("killed by signal SIGKILL" in r.error and r.error.startswith("ProcessDied") for r in failed)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(r.run_id for r in Store(tmp_path).runs(status="done"))


@pytest.mark.slow  # starts processes: not in the fast tier
def test_ctrl_c_stops_the_run_process_and_leaves_the_run_pending(tmp_path: Path) -> None:
    study = _study(FAKE)
    first = expand(study)[0]

    def interrupt_when_started() -> None:
        pid_file = tmp_path / "runs" / f"{first.run_id}.pid"
        deadline = time.time() + 60
        while not pid_file.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Thread(target=interrupt_when_started, daemon=True)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        run_study(study, tmp_path, show_progress=False, executor=SubprocessExecutor(runners.hangs_mid_write, preload=[]))
    child = int((tmp_path / "runs" / f"{first.run_id}.pid").read_text())
    assert (tmp_path / "runs" / f"{first.run_id}.interrupted").exists()  # stopped by the executor, cleanly
    assert not runners.alive(child)  # and reaped: no orphan
    with Store(tmp_path) as s:
        assert s.counts() == {"pending": 4, "running": 0, "done": 0, "failed": 0}
    assert not list((tmp_path / "runs").glob(".*tmp-*"))  # no half-written run directory



@pytest.mark.slow  # starts processes: not in the fast tier
def test_run_process_ends_when_the_study_process_is_killed(tmp_path: Path) -> None:
    """kill -9 of the study process: its run's process ends too, so it cannot write into a study
    that a new process resumes."""
    code = ("import sys; sys.path[:0] = {paths!r}; import executor_runners as r; "
            "from fewtune.study import parse_study, run_study; from fewtune.study.executors import SubprocessExecutor; "
            "run_study(parse_study({study!r}), {out!r}, show_progress=False, executor=SubprocessExecutor(r.hangs_mid_write, preload=[]))"
            ).format(paths=[str(Path(__file__).parent), str(REPO / "src")], study=FAKE, out=str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    pid_files: list[Path] = []
    deadline = time.time() + 60
    while not pid_files:
        assert parent.poll() is None and time.time() < deadline, parent.stderr.read().decode()[-2000:] if parent.poll() else "no run started"
        time.sleep(0.05)
        pid_files = list((tmp_path / "runs").glob("*.pid")) if (tmp_path / "runs").is_dir() else []
    child = int(pid_files[0].read_text())
    parent.kill()
    parent.wait(10)
    deadline = time.time() + 10
    while runners.alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not runners.alive(child)


def test_deleted_run_directory_is_run_again_on_resume(tmp_path: Path) -> None:
    study = _study(FAKE)
    run_study(study, tmp_path, show_progress=False, executor=InProcessExecutor(runners.write_fake_runner))
    gone, emptied = expand(study)[:2]
    import shutil

    shutil.rmtree(tmp_path / "runs" / gone.run_id)
    (tmp_path / "runs" / emptied.run_id / "metrics.json").unlink()
    again = run_study(study, tmp_path, show_progress=False, executor=InProcessExecutor(runners.write_fake_runner))
    assert sorted(again.missing) == sorted([gone.run_id, emptied.run_id])
    assert (again.succeeded, again.skipped_done, again.counts["done"]) == (2, 2, 4)
    assert (tmp_path / "runs" / gone.run_id / "metrics.json").is_file()


def test_unknown_executor_is_a_user_error() -> None:
    with pytest.raises(ConfigError, match="unknown executor 'subproces'") as e:
        make_executor("subproces")
    assert "subprocess" in e.value.hint


@pytest.mark.parametrize("parallel", [[], ["--parallel", "2"]], ids=["sequential", "parallel"])
@pytest.mark.slow  # starts processes: not in the fast tier
def test_cli_failed_run_in_child_exits_1_and_study_goes_on(tmp_path: Path, data_dir: Path, parallel: list[str]) -> None:
    """A real run that fails inside its process (a model that does not exist) is recorded; the
    other run finishes; the CLI exits 1 without a traceback."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps({"name": "f", "model": ["tiny-random", str(tmp_path / "no-such-model")], "task": "cola",
                               "method": "zero-shot", "eval_limit": 8}))
    env = {**os.environ, "FEWTUNE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "fewtune", "study", str(cfg), "--out", str(tmp_path / "out"), "--no-report", *parallel],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    with Store(tmp_path / "out") as s:
        by_model = {r.config["model"]: r for r in s.runs()}
    assert by_model["tiny-random"].status == "done"
    bad = by_model[str(tmp_path / "no-such-model")]
    assert bad.status == "failed" and bad.error.startswith("ConfigError: cannot load model")


def test_memory_meter_cpu_path_has_no_reserved_peak() -> None:
    import torch

    from fewtune.run.resources import ResourceMeter

    report = ResourceMeter(torch.device("cpu")).report(torch.nn.Linear(2, 2), "fp32", 0)
    assert report["memory_kind"] == "rss" and report["peak_reserved_mb"] is None and report["peak_memory_mb"] > 0


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_memory_meter_cuda_peaks_are_per_run() -> None:
    """The allocated and reserved peaks of a run do not include an earlier, larger run once the
    in-process executor has released memory between them."""
    import torch

    from fewtune.run.resources import ResourceMeter
    from fewtune.study.executors import release_memory

    dev = torch.device("cuda")
    big = ResourceMeter(dev)
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    first = big.report(torch.nn.Linear(2, 2), "fp32", 0)
    del x
    release_memory()
    small = ResourceMeter(dev)
    y = torch.empty(2**20, dtype=torch.uint8, device=dev)
    second = small.report(torch.nn.Linear(2, 2), "fp32", 0)
    del y
    assert first["peak_memory_mb"] >= 256 and first["peak_reserved_mb"] >= first["peak_memory_mb"]
    assert second["peak_memory_mb"] < 16 and second["peak_reserved_mb"] < 64
