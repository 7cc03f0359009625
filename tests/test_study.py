"""Studies: expansion of the YAML grid, strict config errors, resumable execution (with a fake
runner for the bookkeeping, the real runner on tiny models end to end), and a real ``kill -9``."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from executor_runners import write_fake

from fewtune.errors import ConfigError
from fewtune.study import (MARKER_NAME, expand, is_study_dir, load_study, parse_int_list, parse_override, parse_study, preset_names,
                           run_study, study_lock)
from fewtune.study.executors import InProcessExecutor
from fewtune.study.store import Store

REPO = Path(__file__).resolve().parents[1]


def _study(data: dict, overrides=(), **kw):
    s = parse_study(data, "test")
    s.overrides = [parse_override(o) for o in overrides]
    return s


def _write(tmp_path: Path, data: dict, name: str = "study.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


# ---------------------------------------------------------------------------------------------
# expansion


def test_grid_expansion_sweeps_and_order() -> None:
    runs = expand(_study({"model": "tiny-random", "n": [2, 4], "seed": [0, 1], "tasks": ["cola", "mnli"],
                          "methods": ["zero-shot", {"method": "icl", "params": {"k": [2, 4]}}]}))
    # zero-shot ignores n? No: n is part of the config, so 2 n × 2 seeds × 2 tasks × (1 + 2 k) = 24
    assert len(runs) == 24
    assert len({r.run_id for r in runs}) == 24
    # seed-major, then n, then task, then method entry: the first runs cover every method and task
    assert [(r.config.seed, r.config.n, r.config.task, r.config.method) for r in runs[:6]] == [
        (0, 2, "cola", "zero-shot"), (0, 2, "cola", "icl"), (0, 2, "cola", "icl"),
        (0, 2, "mnli", "zero-shot"), (0, 2, "mnli", "icl"), (0, 2, "mnli", "icl")]
    assert {r.config.params["k"] for r in runs if r.config.method == "icl"} == {2, 4}
    # resolved: task defaults filled in
    cola = next(r for r in runs if r.config.task == "cola")
    assert cola.config.eval_sets == ["cola-id", "cola-ood"] and cola.config.pattern == "minimal"
    assert cola.run_id == cola.config.content_hash()


def test_identical_runs_from_two_entries_are_deduplicated() -> None:
    runs = expand(_study({"model": "tiny-random", "task": "cola", "methods": ["icl", {"method": "icl", "params": {"k": None}}]}))
    assert len(runs) == 1


def test_list_typed_fields_are_values_unless_nested() -> None:
    one = expand(_study({"model": "tiny-random", "task": "cola", "method": "icl", "eval_sets": ["cola-id", "cola-ood"]}))
    assert len(one) == 1 and one[0].config.eval_sets == ["cola-id", "cola-ood"]
    two = expand(_study({"model": "tiny-random", "task": "cola", "method": "icl", "eval_sets": [["cola-id"], ["cola-ood"]]}))
    assert sorted(r.config.eval_sets[0] for r in two) == ["cola-id", "cola-ood"]


def test_precedence_study_task_method_override() -> None:
    data = {"model": "tiny-random", "eval_limit": 10, "train": {"lr": 1e-5, "batch_size": 4},
            "tasks": [{"task": "cola", "eval_limit": 20}, "mnli"],
            "methods": [{"method": "icl", "eval_limit": 30}, "zero-shot"]}
    runs = expand(_study(data))
    limits = {(r.config.task, r.config.method): r.config.eval_limit for r in runs}
    assert limits == {("cola", "icl"): 30, ("cola", "zero-shot"): 20, ("mnli", "icl"): 30, ("mnli", "zero-shot"): 10}
    over = expand(_study(data, ["eval_limit=5", "icl:train.lr=0.001"]))
    assert {r.config.eval_limit for r in over} == {5}
    assert {(r.config.method, r.config.train.lr, r.config.train.batch_size) for r in over} == {("icl", 1e-3, 4), ("zero-shot", 1e-5, 4)}


def test_method_restricted_to_tasks() -> None:
    runs = expand(_study({"model": "tiny-random", "tasks": ["cola", "mnli"], "methods": ["zero-shot", {"method": "icl", "tasks": ["mnli"]}]}))
    assert sorted((r.config.task, r.config.method) for r in runs) == [("cola", "zero-shot"), ("mnli", "icl"), ("mnli", "zero-shot")]
    swept = expand(_study({"model": "tiny-random", "task": ["cola", "mnli"], "methods": [{"method": "icl", "tasks": "cola"}]}))
    assert [r.config.task for r in swept] == ["cola"]


def test_seeds_and_n_flags(tmp_path: Path) -> None:
    p = _write(tmp_path, {"model": "tiny-random", "task": "cola", "method": "icl", "seed": [0, 1], "n": 16})
    s = load_study(p, ["eval_limit=8"], seeds="3-5,7", n="2,4")
    runs = expand(s)
    assert sorted({r.config.seed for r in runs}) == [3, 4, 5, 7]
    assert sorted({r.config.n for r in runs}) == [2, 4]
    assert len(runs) == 8 and {r.config.eval_limit for r in runs} == {8}
    assert parse_int_list("0-2, 2", "--seeds") == [0, 1, 2]


def test_presets_ship_and_quick_covers_the_main_job() -> None:
    assert set(preset_names()) >= {"quick", "paper", "paper-released"}
    quick = load_study("quick")
    assert quick.base["model"] == "embedded" and quick.base["n"] == 16 and len(quick.base["seed"]) >= 2
    assert [m["method"] for m in quick.methods] == ["icl", "vanilla", "pbft", "adaptive", "lora", "distill"]
    assert [t["task"] if isinstance(t, dict) else t for t in quick.tasks] == ["cola", "mnli"]
    assert quick.base["eval_limit"] and quick.base["train"]["max_steps"]
    paper = load_study("paper")
    assert paper.base["n"] == [2, 16, 32, 64, 128] and paper.base["seed"] == list(range(10))
    assert paper.base["train"] == {"lr": 1e-5, "epochs": 40, "batch_size": 32, "warmup_ratio": 0.1, "schedule": "linear"}
    assert {"method": "lora", "params": {"r": [1, 2, 4, 8, 64]}} in paper.methods
    released = load_study("paper-released")
    assert {"task": "cola", "eval_sets": ["cola-glue-dev", "cola-ood"]} in released.tasks
    assert {m["method"] for m in released.methods} >= {"pbft-released", "distill-released"}


def test_presets_expand_with_registered_methods() -> None:
    """Every preset expands (and so validates) as soon as all of its methods are registered."""
    from fewtune.methods import METHODS

    for name in preset_names():
        s = load_study(name)
        missing = [m["method"] for m in s.methods if m["method"] not in METHODS]
        assert not missing, f"preset {name} names unregistered methods: {missing}"
        runs = expand(s)
        assert runs
        if name == "quick":
            assert len(runs) == 6 * 2 * len(s.base["seed"])
        if name == "paper":
            assert len(runs) == 2 * 10 * (3 + 5 * (4 + 5))
        if name == "sizes":  # every method × seed at both embedded sizes
            assert sorted({r.config.model for r in runs}) == ["gemma3-270m", "smollm2-135m"]
            assert len(runs) == 2 * 6 * len(s.base["seed"])


# ---------------------------------------------------------------------------------------------
# strict errors


@pytest.mark.parametrize(
    ("data", "message", "hint"),
    [
        ({"methds": ["icl"]}, "unknown key 'methds'", "did you mean 'methods'"),
        ({"trian": {"lr": 1}}, "unknown key 'trian'", "did you mean 'train'"),
        ({"train": {"lrr": 1e-4}, "method": "icl"}, "unknown key 'train.lrr'", "did you mean 'lr'"),
        ({"methods": [{"method": "icl", "eval_limt": 5}]}, "unknown key 'eval_limt'", "did you mean 'eval_limit'"),
        ({"methods": ["lorra"]}, "unknown method 'lorra'", "did you mean 'lora'"),
        ({"tasks": ["colaa"], "method": "icl"}, "unknown task 'colaa'", "did you mean 'cola'"),
        ({"methods": [{"method": "icl", "params": {"kk": 2}}]}, "unknown key 'kk'", "did you mean 'k'"),
        ({"method": "icl", "eval_sets": ["cola-idd"]}, "unknown eval set 'cola-idd'", "did you mean 'cola-id'"),
        ({"method": "icl", "n": 0}, "'n'", None),
        ({"method": "icl", "seed": []}, "empty list", None),
        ({"task": "cola", "tasks": ["cola"]}, "both 'task' and 'tasks'", None),
        ({"methods": [{"method": "icl", "task": "cola"}]}, "sets 'task'", "tasks: [..]"),
        ({"methods": [{"params": {}}]}, "no 'method' key", None),
        ({"methods": [{"method": ["icl", "zero-shot"]}]}, "must be one name", None),
        ({"tasks": ["cola"], "methods": [{"method": "icl", "tasks": ["mnli"]}]}, "not among the study's tasks", None),
        ({"methods": []}, "non-empty list", None),
    ],
)
def test_strict_config_errors(data: dict, message: str, hint: str | None) -> None:
    data = {"model": "tiny-random", **data}
    with pytest.raises(ConfigError) as e:
        expand(parse_study(data, "test"))
    assert message in e.value.message
    if hint:
        assert hint in (e.value.hint or "")


@pytest.mark.parametrize(
    ("override", "message", "hint"),
    [
        ("train.max_step=2", "unknown key 'train.max_step'", "did you mean 'max_steps'"),
        ("eval_limt=2", "unknown key 'eval_limt'", "did you mean 'eval_limit'"),
        ("n 2", "expects key=value", None),
        ("method=icl", "cannot change 'method'", None),
        ("task=mnli", "cannot change 'task'", "tasks:"),
    ],
)
def test_strict_override_errors(override: str, message: str, hint: str | None) -> None:
    with pytest.raises(ConfigError) as e:
        parse_override(override)
    assert message in e.value.message
    if hint:
        assert hint in (e.value.hint or "")


def test_global_param_override_needs_a_scope() -> None:
    with pytest.raises(ConfigError) as e:
        expand(_study({"model": "tiny-random", "methods": ["icl", "zero-shot"]}, ["params.k=2"]))
    assert "method 'zero-shot' has no parameter 'k'" in e.value.message
    assert "zero-shot:" not in e.value.hint and "lora:params.k" in e.value.hint


def test_unknown_preset_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_study("quik")
    assert "did you mean preset 'quick'" in e.value.hint
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [icl\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- icl\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_study(lst)
    with pytest.raises(ConfigError, match="--seeds expects integers"):
        parse_int_list("a,b", "--seeds")


# ---------------------------------------------------------------------------------------------
# execution bookkeeping (fake runner: fast, deterministic)


class FakeRunner:
    """Stands in for run_experiment: writes metrics.json like the runner, can fail on demand."""

    def __init__(self, fail_methods=(), interrupt_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.fail_methods = set(fail_methods)
        self.interrupt_at = interrupt_at

    def __call__(self, cfg, out_dir: Path, *, data_dir=None, progress=None):
        self.calls.append(cfg.content_hash())
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if cfg.method in self.fail_methods:
            from fewtune.errors import TrainingDiverged

            raise TrainingDiverged("training loss became NaN at step 1", "lower train.lr")
        if progress is not None:
            progress.add_task("fake training", total=1)  # left behind on purpose: run_study cleans up
        return write_fake(cfg, out_dir, 0.5 + 0.01 * cfg.seed)


SMALL = {"model": "tiny-random", "task": "cola", "seed": [0, 1, 2], "methods": ["icl", "zero-shot"]}


def test_rerun_skips_finished_runs(tmp_path: Path) -> None:
    study = _study(SMALL)
    fake = FakeRunner()
    first = run_study(study, tmp_path, executor=InProcessExecutor(fake), show_progress=False)
    assert (first.succeeded, first.counts["done"], first.complete) == (6, 6, True)
    again = run_study(study, tmp_path, executor=InProcessExecutor(fake), show_progress=False)
    assert (again.ran, again.skipped_done) == (0, 6)
    assert len(fake.calls) == 6
    with Store(tmp_path) as s:
        assert all(r.attempts == 1 and r.run_dir == f"runs/{r.run_id}" for r in s.runs())
    assert (tmp_path / "study.yaml").is_file()


def test_failures_recorded_and_retried(tmp_path: Path) -> None:
    study = _study(SMALL)
    out = run_study(study, tmp_path, executor=InProcessExecutor(FakeRunner(fail_methods={"zero-shot"})), show_progress=False)
    assert (out.succeeded, out.failed_now, out.counts["failed"]) == (3, 3, 3)
    assert all("TrainingDiverged" in f[2] for f in out.failures)
    with Store(tmp_path) as s:
        failed = s.runs(status="failed")
        assert {r.method for r in failed} == {"zero-shot"} and "NaN" in failed[0].error
    skip = run_study(study, tmp_path, executor=InProcessExecutor(FakeRunner()), show_progress=False)
    assert (skip.ran, skip.skipped_failed) == (0, 3)
    retry = run_study(study, tmp_path, executor=InProcessExecutor(FakeRunner()), retry_failed=True, show_progress=False)
    assert (retry.succeeded, retry.counts["done"]) == (3, 6)
    with Store(tmp_path) as s:
        assert {r.attempts for r in s.runs() if r.method == "zero-shot"} == {2}
        assert all(r.error is None for r in s.runs())


def test_limit_and_bugs_in_runs_are_recorded(tmp_path: Path) -> None:
    study = _study(SMALL)

    def buggy(cfg, out_dir, **kw):
        raise ZeroDivisionError("oops")

    out = run_study(study, tmp_path, executor=InProcessExecutor(buggy), limit=2, show_progress=False)
    assert (out.ran, out.failed_now, out.counts["pending"]) == (2, 2, 4)
    with Store(tmp_path) as s:
        err = s.runs(status="failed")[0].error
    assert err.startswith("ZeroDivisionError: oops") and "Traceback" in err
    with pytest.raises(ConfigError, match="--limit"):
        run_study(study, tmp_path, executor=InProcessExecutor(buggy), limit=0, show_progress=False)


def test_interrupt_leaves_run_pending(tmp_path: Path) -> None:
    study = _study(SMALL)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, tmp_path, executor=InProcessExecutor(FakeRunner(interrupt_at=2)), show_progress=False)
    with Store(tmp_path) as s:
        assert s.counts() == {"pending": 5, "running": 0, "done": 1, "failed": 0}


def test_finished_but_unrecorded_run_is_adopted_and_leftovers_removed(tmp_path: Path) -> None:
    """A crash between the runner's rename and the database commit: the run is on disk, complete."""
    study = _study(SMALL)
    planned = expand(study)
    first = planned[0]
    FakeRunner()(first.config, tmp_path / "runs" / first.run_id)
    leftover = tmp_path / "runs" / f".{planned[1].run_id}.tmp-abc"
    leftover.mkdir(parents=True)
    (leftover / "metrics.json").write_text("{")
    fake = FakeRunner()
    out = run_study(study, tmp_path, executor=InProcessExecutor(fake), show_progress=False)
    assert out.adopted == 1 and out.succeeded == 5 and first.run_id not in fake.calls
    assert not leftover.exists()


def test_one_process_per_study_dir(tmp_path: Path) -> None:
    with study_lock(tmp_path):
        with pytest.raises(ConfigError, match="another fewtune study is running"):
            run_study(_study(SMALL), tmp_path, executor=InProcessExecutor(FakeRunner()), show_progress=False)


MARKER_ON_A_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from fewtune.study import study_lock
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))  # room for the lock's pid, not for the marker
try:
    with study_lock(Path(sys.argv[1])):
        pass
except OSError as e:
    print(type(e).__name__, e.errno)
"""


def test_a_marker_that_cannot_be_written_leaves_no_marker(tmp_path: Path) -> None:
    """The marker makes a directory a study (``is_study_dir``): a write that fails (full disk) must
    leave none, nor a half-written one, nor its temporary — or the directory would count as a study."""
    out = tmp_path / "s"
    res = subprocess.run([sys.executable, "-c", MARKER_ON_A_FULL_DISK, str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0 and res.stdout.split() == ["OSError", "27"], res.stdout + res.stderr  # EFBIG
    assert list(out.iterdir()) == [] and not is_study_dir(out)
    with study_lock(out):  # without the limit: the marker, whole
        assert (out / MARKER_NAME).read_text().startswith("a fewtune study directory") and is_study_dir(out)


# ---------------------------------------------------------------------------------------------
# real runs on tiny models


def _tiny_study(methods: list) -> dict:
    return {"name": "tiny", "model": "tiny-random", "n": 2, "seed": [0, 1], "eval_limit": 8, "eval_batch_size": 8,
            "train": {"max_steps": 2, "batch_size": 4}, "tasks": ["cola", "mnli"], "methods": methods}


def _available(methods: list[str]) -> list[str]:
    from fewtune.methods import METHODS

    return [m for m in methods if m in METHODS]


@pytest.mark.slow  # each run in its own process (the default executor): not in the fast tier
def test_tiny_study_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    from fewtune.report import write_report

    # Three methods keep it quick; every method's own tests live with the method.
    methods = _available(["icl", "vanilla", "lora"])
    study = parse_study({**_tiny_study(methods), "methods": [m if m != "lora" else {"method": "lora", "params": {"r": 2}} for m in methods],
                         "claims": ["srinivasan2024"]}, "tiny")
    out = run_study(study, tmp_path, data_dir=data_dir, show_progress=False)
    assert out.counts["done"] == len(methods) * 2 * 2, out.failures
    with Store(tmp_path) as s:
        for r in s.runs():
            assert {"config.yaml", "metrics.json", "predictions.jsonl", "sample.json"} <= {p.name for p in (tmp_path / r.run_dir).iterdir()}
            assert set(r.metrics["eval"]) == set(r.config["eval_sets"])
    paths = write_report(tmp_path)
    md = paths.markdown.read_text()
    assert "## Claims of the study" in md and "mnli per heuristic and gold label" in md
    claims = md.split("## Claims of the study", 1)[1].split("\n## ", 1)[0]
    assert "efficient-comparable" in claims and "SE eval" in claims  # the declared claims, tested on predictions
    assert "*cola-id (ID) accuracy*" in md and "*hans (OOD) accuracy*" in md
    assert all(p.stat().st_size > 1000 for p in paths.figures)


def _db_done(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


@pytest.mark.slow  # starts processes: not in the fast tier
def test_kill_9_mid_study_then_resume(tmp_path: Path, data_dir: Path) -> None:
    """SIGKILL the study process once ≥ 1 run is recorded, re-run: every run done exactly once."""
    methods = _available(["icl", "vanilla"])
    data = {**_tiny_study(methods), "seed": [0, 1, 2], "tasks": ["cola"]}
    cfg = _write(tmp_path, data)
    out = tmp_path / "study"
    env = {**os.environ, "FEWTUNE_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fewtune", "study", str(cfg), "--out", str(out), "--no-report"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    try:
        while _db_done(out / "study.db") < 1:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no run finished in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    planned = len(expand(parse_study(data, "kill")))
    with Store(out) as s:
        done_before = {r.run_id: r.finished_at for r in s.runs(status="done")}
        assert 1 <= len(done_before) < planned, "the kill must land mid-study"
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with Store(out) as s:
        assert s.integrity_check() == "ok"
        rows = s.runs()
        assert len(rows) == planned and len({r.run_id for r in rows}) == planned
        assert all(r.status == "done" for r in rows)
        for rid, finished in done_before.items():  # finished runs were not run again
            assert s.get(rid).finished_at == finished and s.get(rid).attempts == 1
        assert max(r.attempts for r in rows) <= 2  # only the killed run may have started twice
    run_dirs = sorted(p.name for p in (out / "runs").iterdir())
    assert run_dirs == sorted(r.run_id for r in rows)  # no temp dirs, no strays
    for r in rows:
        json.loads((out / r.run_dir / "metrics.json").read_text())
