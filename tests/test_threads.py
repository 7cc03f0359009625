"""The torch thread count of a study's runs is fixed per study: every executor gives each run the
study's ``threads`` whatever ``--parallel`` is, it is part of each run's identity (CPU), it is
recorded, and a study resumed with another value is refused rather than mixed or recomputed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import REPO
from executor_runners import write_fake

from fewtune.errors import ConfigError
from fewtune.study import expand, parse_study, run_study
from fewtune.study.config import DEFAULT_THREADS
from fewtune.study.execute import recorded_threads, study_threads
from fewtune.study.executors import InProcessExecutor
from fewtune.study.store import Store

TESTS = Path(__file__).resolve().parent
STUDY = {"name": "thr", "model": "tiny-random", "task": "cola", "seed": [0, 1], "methods": ["icl", "zero-shot"]}
# Every interpreter the CLI starts runs this first: runs become executor_runners.slow_logged (which
# records the torch threads it was given), not real training.
FAKE_RUNS = (f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
             "import executor_runners, fewtune.run.runner\nfewtune.run.runner.run_experiment = executor_runners.slow_logged\n")


def threads_runner(cfg, out_dir: Path, *, data_dir=None, progress=None):
    result = write_fake(cfg, out_dir)
    result.metrics["threads"] = torch.get_num_threads()
    return result


def test_threads_key_is_validated_and_recorded():
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ConfigError, match="'threads' must be a whole number"):
            parse_study({**STUDY, "threads": bad})
    with pytest.raises(ConfigError, match="unknown key 'threads'"):  # one value per study, not per method
        parse_study({**STUDY, "methods": [{"method": "icl", "threads": 2}]})
    assert "threads: 3" in parse_study({**STUDY, "threads": 3}).to_yaml()


def test_the_plan_carries_the_study_threads_in_each_identity():
    default = expand(parse_study(STUDY))
    two = expand(parse_study({**STUDY, "threads": 2}))
    assert {p.config.identity.threads for p in default} == {DEFAULT_THREADS} and DEFAULT_THREADS == 1
    assert {p.config.identity.threads for p in two} == {2}
    assert not {p.run_id for p in default} & {p.run_id for p in two}


def test_inprocess_runs_compute_with_the_study_threads_and_the_caller_keeps_its_own(tmp_path):
    before = torch.get_num_threads()
    study = parse_study({**STUDY, "threads": 2})
    out = run_study(study, tmp_path, executor=InProcessExecutor(threads_runner), show_progress=False)
    assert out.succeeded == 4 and torch.get_num_threads() == before
    with Store(tmp_path) as s:
        assert {r.metrics["threads"] for r in s.runs()} == {2}
    assert recorded_threads(tmp_path) == 2


def test_a_resume_keeps_the_recorded_threads_and_refuses_another_value(tmp_path):
    run_study(parse_study({**STUDY, "threads": 2}), tmp_path, executor=InProcessExecutor(threads_runner),
              show_progress=False, limit=1)
    assert study_threads(parse_study(STUDY), tmp_path) == 2  # no value given: the recorded one, not the default
    resumed = run_study(parse_study(STUDY), tmp_path, executor=InProcessExecutor(threads_runner), show_progress=False)
    assert resumed.succeeded == 3 and resumed.complete
    with pytest.raises(ConfigError) as e:
        study_threads(parse_study({**STUDY, "threads": 1}), tmp_path)
    assert "compute with 2 torch thread(s) each" in e.value.message and "the study config asks for 1" in e.value.message
    with pytest.raises(ConfigError, match="--threads asks for 4"):
        study_threads(parse_study(STUDY), tmp_path, requested=4)
    assert study_threads(parse_study({**STUDY, "threads": 2}), tmp_path, requested=2) == 2


def test_the_thread_count_is_returned_and_the_study_is_left_as_it_is(tmp_path):
    """``study_threads`` and ``run_study`` return or use the count without writing it into the
    caller's study: a ``--threads`` value checked once must not become that study's config."""
    study = parse_study(STUDY)
    assert study_threads(study, tmp_path, requested=3) == 3
    assert study.threads is None and study_threads(study, tmp_path) == DEFAULT_THREADS
    run_study(study, tmp_path, executor=InProcessExecutor(threads_runner), show_progress=False, limit=1)
    assert study.threads is None and recorded_threads(tmp_path) == DEFAULT_THREADS


def _env(data_dir: Path, site: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FEWTUNE_THREADS"}
    path = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
    return {**env, "FEWTUNE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, "FEWTUNE_TEST_RUN_S": "0"}


def test_cli_resume_with_another_parallel_keeps_ids_and_threads_and_refuses_other_threads(tmp_path, data_dir):
    cfg, out = tmp_path / "thr.yaml", tmp_path / "out"
    cfg.write_text(json.dumps(STUDY))
    with tempfile.TemporaryDirectory() as site:
        Path(site, "sitecustomize.py").write_text(FAKE_RUNS)

        def study(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "fewtune", "study", str(cfg), "--out", str(out), "--no-report", *args],
                                  env=_env(data_dir, site), cwd=REPO, capture_output=True, text=True, timeout=600)

        first = study("--threads", "2", "--limit", "2")
        assert first.returncode == 0, first.stderr[-3000:]
        with Store(out) as s:
            planned = json.loads(s.get_meta("study_run_ids"))
        resumed = study("--parallel", "2")  # no --threads: the study's 2, not 2 // 2 and not the default 1
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        refused = study("--threads", "1")
    err = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "compute with 2 torch thread(s) each" in err and "--threads asks for 1" in err and "start a new --out" in err
    with Store(out) as s:
        rows = s.runs()
        assert json.loads(s.get_meta("study_run_ids")) == planned  # the same run ids
    assert len(rows) == 4 and {r.status for r in rows} == {"done"}
    assert {r.metrics["threads"] for r in rows} == {2}
    assert {r.config["identity"]["threads"] for r in rows} == {2}


def test_ray_tasks_get_the_study_threads_and_reserve_as_many_cpus():
    pytest.importorskip("ray")
    from fewtune.study.ray_executor import RayExecutor

    ex = RayExecutor(threads_runner)  # constructing it starts no cluster
    ex.start(parallel=2, threads=3)
    assert ex._threads == 3 and ex.resources["cpus"] == 3  # not resources.cpus // parallel, not 1
    given = RayExecutor(threads_runner, resources={"cpus": 1})
    given.start(parallel=1, threads=3)
    assert given._threads == 3 and given.resources["cpus"] == 1  # the study's resources stay as written
