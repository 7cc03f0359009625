"""The Ray executor: each run of a study is one Ray task, on a local or a remote Ray cluster (a
pack of runs, ``--pack``, is one task with the declared resources; each member's files go to
the member's own run directory).

Why it is built the way it is:

- **No shared file system.** The task runs the runner into a directory that is local to its
  worker and returns the run's files (config.yaml, sample.json, metrics.json, predictions.jsonl,
  whatever the runner wrote) *as data* with the outcome. The driver writes them into the study's
  run directory, atomically (a temporary sibling renamed into place, as the runner itself does),
  together with ``executor.json`` (where the run executed; metrics.json is left as the runner
  wrote it, so metrics are the same through every executor). The driver stays the only writer
  of the study directory and of ``study.db``.
- **One fresh worker process per run** (``max_calls=1``): a run's peak memory is its own (a
  reused worker keeps what the allocator kept from earlier runs), a crash costs one run, GPU
  memory is freed. It costs a process start and the imports per run (see the benchmark).
- **Bounded retries of dead workers only.** A worker that dies (OOM kill, ``kill -9``, a node
  lost) is retried by Ray up to ``max_retries`` times, then recorded as a failed run
  (``ProcessDied``). A run that raises is a failed run at once: the runner's exception is
  turned into the outcome inside the task, so Ray never sees it and never retries it.
- **GPU fractions are bookkeeping only.** ``resources={"gpus": 0.25}`` lets Ray place four runs
  on one GPU; it does not partition the device. Packed runs compete for it, so their wall times
  are distorted (per-run peak memory stays valid: CUDA counts each process's own allocations).
  ``executor.json`` records how many GPU runs were in flight alongside each run.

Requires ``pip install fewtune[ray]``. On a remote cluster every node needs fewtune installed
and the data directory at the same path (``--data-dir``/``FEWTUNE_DATA_DIR``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewtune.atomic import make_tmp_dir, output_error, replace_dir
from fewtune.errors import ConfigError, ctrl_c_deferred
from fewtune.run.packable import PackSpec
from fewtune.study.executor import PRELOAD, Executor, Runner, RunOutcome, outcome_of
from fewtune.study.pack import PackPlan
from fewtune.study.ray_cluster import check_address, descendants, reap

if TYPE_CHECKING:
    from fewtune.study.expand import PlannedRun

EXECUTOR_FILE = "executor.json"
DEFAULT_RESOURCES = {"cpus": 1, "gpus": 0}
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its error messages
POLL_S = 0.5  # how long one wait for a task may block before the driver can see Ctrl-C


def import_ray() -> Any:
    """``ray``, or a user error (exit 2) saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ConfigError("the ray executor needs Ray, which is not installed",
                          'pip install "fewtune[ray]" (or pip install "ray>=2.40")') from None


def check_resources(resources: Mapping[str, Any] | None) -> dict[str, float]:
    """``{"cpus": c, "gpus": g}`` with defaults filled in; anything else is a user error."""
    res = {**DEFAULT_RESOURCES, **(resources or {})}
    unknown = sorted(set(res) - set(DEFAULT_RESOURCES))
    if unknown:
        raise ConfigError(f"unknown run resource(s) {', '.join(unknown)}", "resources take cpus and gpus, e.g. {cpus: 2, gpus: 0.25}")
    for key, value in res.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"resources.{key} must be a number ≥ 0, got {value!r}")
    if res["gpus"] > 1 and res["gpus"] != int(res["gpus"]):
        raise ConfigError(f"resources.gpus must be a fraction ≤ 1 or a whole number, got {res['gpus']}",
                          "Ray packs fractional GPUs onto one device only")
    return res


@dataclass
class _InFlight:
    """Driver-side bookkeeping of one submitted run (for executor.json)."""

    gpu_runs_at_submit: int
    gpu_runs_peak: int


@dataclass(frozen=True)
class TaskResult:
    """What a task returns: the outcome, the run's files (relative path → bytes; for a pack, per
    member run directory name), where it ran."""

    outcome: RunOutcome
    files: dict[str, Any] = field(default_factory=dict)
    placement: dict[str, Any] = field(default_factory=dict)


def run_task(runner: Runner | None, config: Any, run_name: str, data_dir: Path | None, threads: int) -> TaskResult:
    """The body of a Ray task (module level, so workers import it): run into a worker-local
    directory, read back what the runner wrote, remove the directory."""
    import ray

    if runner is None:
        for module in PRELOAD:  # before the run's clock starts, as the subprocess executor's fork server does
            importlib.import_module(module)
        from fewtune.run.pack import run_unit as runner  # a run, or a pack of runs
    torch = sys.modules.get("torch")  # the real runner imports it; a stand-in need not pay for it
    if torch is not None:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="fewtune-ray-") as work:
        out_dir = Path(work) / run_name
        if isinstance(config, PackSpec):  # every member into a worker-local directory of its own name
            config = replace(config, out_dirs=tuple(Path(work) / Path(d).name for d in config.out_dirs))
            outcome = outcome_of(lambda: runner(config, out_dir, data_dir=data_dir, progress=None))
            files = {Path(d).name: _read_files(Path(d)) for d in config.out_dirs}
        else:
            outcome = outcome_of(lambda: runner(config, out_dir, data_dir=data_dir, progress=None))
            files = _read_files(out_dir)
    ctx = ray.get_runtime_context()
    placement = {"node_id": ctx.get_node_id(), "hostname": socket.gethostname(), "pid": os.getpid(),
                 "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "torch_threads": threads}
    return TaskResult(outcome, files, placement)


def _read_files(out_dir: Path) -> dict[str, bytes]:
    """What the runner wrote under ``out_dir`` (relative path → bytes); nothing if it wrote nothing."""
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()} \
        if out_dir.is_dir() else {}


def write_run_files(run_dir: Path, files: Mapping[str, bytes], executor_info: dict[str, Any]) -> None:
    """Write the files a worker returned, plus ``executor.json``, into ``run_dir`` atomically."""
    run_dir = Path(run_dir)
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_tmp_dir(run_dir)
        try:
            for rel, data in {**files, EXECUTOR_FILE: json.dumps(executor_info, indent=1).encode()}.items():
                path = tmp / rel
                if not path.resolve().is_relative_to(tmp.resolve()):
                    raise ValueError(f"a run returned a file outside its directory: {rel}")
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            replace_dir(tmp, run_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        raise output_error(e, run_dir, "write results to") from None


class RayExecutor(Executor):
    """Every run as a Ray task with declared resources (see the module docstring).

    ``address``: None starts a local cluster (``num_cpus`` CPUs, all by default) that ``close()``
    shuts down; an address (``ray://host:10001``, ``host:6379``, ``auto``) connects to a running
    cluster. If Ray is already initialised in this process (a test fixture, a notebook), that
    session is used and left running. ``resources``: per run, ``{"cpus": 1, "gpus": 0}`` by
    default; ``gpus`` may be fractional. ``fresh_process=False`` lets a worker process run
    several runs (saves the process start and imports per run; memory figures then may include
    what earlier runs left, as in-process). ``runner`` must be picklable; a runner from a module the
    workers cannot import (a test module) is pickled by value.

    Thread-safe: several threads may call ``run`` at once, each waits for its own task."""

    name = "ray"

    def __init__(self, runner: Runner | None = None, *, address: str | None = None,
                 resources: Mapping[str, Any] | None = None, max_retries: int = 2, num_cpus: int | None = None,
                 fresh_process: bool = True) -> None:
        self.ray = import_ray()
        self.runner = runner
        if address:
            check_address(address)
        self.address = address
        self.resources = check_resources(resources)
        self._cpus_given = "cpus" in (resources or {})
        self._threads: int | None = None
        if max_retries < 0:
            raise ConfigError(f"max_retries must be ≥ 0, got {max_retries}")
        self.max_retries = max_retries
        self.num_cpus = num_cpus
        self.fresh_process = fresh_process
        self._lock = threading.Lock()
        self._started = False  # we called ray.init, so close() calls ray.shutdown
        self._remote: Any = None
        self._in_flight: dict[Any, _InFlight] = {}  # ObjectRef → bookkeeping
        self._cancelling = False

    def _ensure_started(self) -> Any:
        """Start or join the cluster on the first run (not at construction: a dry run or a study
        with nothing left to do never starts Ray). Returns the remote function."""
        with self._lock:
            if self._remote is not None:
                return self._remote
            ray = self.ray
            if self.runner is not None:
                _pickle_by_value_if_needed(self.runner)
            if not ray.is_initialized():
                kwargs: dict[str, Any] = {"address": self.address} if self.address else {
                    "num_cpus": self.num_cpus, "include_dashboard": False}
                try:
                    self._started = True  # from here on (a Ctrl-C mid-start too), close() ends what was started
                    ray.init(**kwargs, logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
                except (ConnectionError, TimeoutError) as e:  # an address that answers but is no Ray cluster
                    raise ConfigError(f"cannot connect to the Ray cluster at {self.address or 'a new local cluster'}: "
                                      f"{ANSI.sub('', str(e)).strip()}",
                                      "check --ray-address, or leave it out to start a local cluster") from None
            res = self.resources
            _check_fits(ray.cluster_resources(), res)
            self._remote = ray.remote(max_calls=1 if self.fresh_process else 0)(run_task).options(
                num_cpus=res["cpus"], num_gpus=res["gpus"], max_retries=self.max_retries, retry_exceptions=False)
            return self._remote

    def start(self, parallel: int = 1, threads: int | None = None) -> None:
        """Each task computes with the study's ``threads`` torch threads; unless the study says
        otherwise, Ray reserves as many CPUs for it (``resources.cpus``)."""
        self._threads = threads
        if threads and not self._cpus_given:
            self.resources["cpus"] = float(threads)

    def prepare(self) -> None:
        """Start or join the cluster on the driver's main thread, so that a Ctrl-C while it
        starts (seconds) reaches the driver, which then ends it, rather than a run thread."""
        self._ensure_started()

    def run(self, planned: PlannedRun, run_dir: Path, *, data_dir: Path | None = None, progress: Any = None) -> RunOutcome:
        remote = self._ensure_started()
        threads = self._threads or max(1, int(self.resources["cpus"]))
        ref = remote.remote(self.runner, planned.config, Path(run_dir).name, data_dir, threads)
        book = self._submitted(ref)
        try:
            result = self._wait(ref)
        except BaseException:
            with ctrl_c_deferred(), suppress(Exception):  # the cluster may be going away
                self.ray.cancel(ref, force=True)
            raise
        finally:
            with self._lock:
                self._in_flight.pop(ref, None)
        info = self._executor_info(result, book)
        if isinstance(planned, PackPlan):  # a pack: each member's files into the member's own run directory
            for member_dir in planned.out_dirs:
                files = result.files.get(member_dir.name)
                if files:
                    write_run_files(member_dir, files, {**info, "packed_with": [d.name for d in planned.out_dirs]})
        elif result.files:
            write_run_files(run_dir, result.files, info)
        return result.outcome

    def _submitted(self, ref: Any) -> _InFlight:
        """Count GPU runs in flight (this one included) and raise the peaks of the others."""
        with self._lock:
            gpu = self.resources["gpus"] > 0
            count = len(self._in_flight) + 1 if gpu else 0
            book = _InFlight(count, count)
            if gpu:
                for other in self._in_flight.values():
                    other.gpu_runs_peak = max(other.gpu_runs_peak, count)
            self._in_flight[ref] = book
            return book

    def _wait(self, ref: Any) -> TaskResult:
        """The task's result; a worker that died more often than allowed becomes a failed run;
        a task cancelled by ``cancel_all`` (Ctrl-C seen by another thread) a KeyboardInterrupt."""
        ray = self.ray
        while True:
            with ctrl_c_deferred():  # short waits: Ctrl-C is seen between them, never inside Ray
                ready, _ = ray.wait([ref], timeout=POLL_S)
            if self._cancelling:  # interrupt() was called: do not wait for Ray to confirm the cancel
                raise KeyboardInterrupt
            if ready:
                break
        try:
            with ctrl_c_deferred():
                return ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            raise KeyboardInterrupt from None
        except ray.exceptions.RayError as e:
            if self._cancelling:
                raise KeyboardInterrupt from None
            return TaskResult(_ray_failure(e, self.max_retries))

    def _executor_info(self, result: TaskResult, book: _InFlight) -> dict[str, Any]:
        return {"executor": self.name, "ray_version": self.ray.__version__, "resources": dict(self.resources),
                "fresh_process": self.fresh_process,
                **result.placement,
                "gpu_runs_in_flight_at_submit": book.gpu_runs_at_submit, "gpu_runs_in_flight_peak": book.gpu_runs_peak,
                "note": "gpu_runs_* count this study's runs with gpus > 0 in flight on the whole cluster "
                        "(an upper bound on the runs sharing this run's device); 0 for CPU runs"}

    def cancel_all(self) -> None:
        """Cancel every task in flight (force: their workers are killed). For a driver whose
        Ctrl-C arrives on another thread than the ones waiting in ``run``: they then raise
        KeyboardInterrupt."""
        with self._lock:
            self._cancelling = True
            refs = list(self._in_flight)
        with ctrl_c_deferred():
            for ref in refs:
                with suppress(Exception):  # a task that finished or a cluster going away
                    self.ray.cancel(ref, force=True)

    def interrupt(self) -> None:
        """The driver's Ctrl-C (or a full disk) with several runs in flight: cancel them all."""
        self.cancel_all()

    def close(self) -> None:
        """Cancel what is in flight and, for a local cluster this executor started, shut it down
        in order and end whatever processes of it ``ray.shutdown`` leaves behind (its agents
        otherwise linger for minutes). A Ctrl-C meanwhile is held until it is done."""
        if self._in_flight:
            self.cancel_all()
        with self._lock, ctrl_c_deferred():
            if self._started:
                local = [] if self.address else descendants(os.getpid())
                with suppress(Exception):  # a cluster whose start was interrupted: end its processes all the same
                    self.ray.shutdown()
                reap(local)
                self._started = False
            self._remote = None


def _check_fits(cluster: Mapping[str, float], res: Mapping[str, float]) -> None:
    """A task that no node can hold would wait forever (Ray only logs a warning): refuse it."""
    have = {"cpus": cluster.get("CPU", 0), "gpus": cluster.get("GPU", 0)}
    short = [f"{res[k]:g} {k[:-1].upper()}s per run, the cluster has {have[k]:g}" for k in ("cpus", "gpus") if res[k] > have[k]]
    if short:
        raise ConfigError(f"the Ray cluster cannot hold one run: {'; '.join(short)}",
                          "lower the run resources, or use a cluster with those resources (--ray-address)")


def _ray_failure(e: BaseException, max_retries: int) -> RunOutcome:
    """The outcome of a task that Ray reports failed. The runner's own exceptions never get here
    (the task returns them as its outcome), so this is a worker that kept dying, a lost node, or
    Ray failing to run the task at all (e.g. a runner the worker cannot unpickle)."""
    import ray.exceptions as rex

    text = ANSI.sub("", str(e)).strip()
    died = (rex.WorkerCrashedError, rex.NodeDiedError, rex.OutOfMemoryError, rex.LocalRayletDiedError)
    if isinstance(e, died):
        first = (text.splitlines() or [type(e).__name__])[0]
        return RunOutcome(error=f"ProcessDied: the run's Ray worker died {max_retries + 1} time(s) ({max_retries} "
                                f"retries; out of memory, kill -9 or a lost node): {type(e).__name__}: {first}",
                          error_type="ProcessDied")
    return RunOutcome(error=f"{type(e).__name__}: Ray could not run the task: {text}", error_type=type(e).__name__)


def _pickle_by_value_if_needed(runner: Runner) -> None:
    """Ray workers unpickle a function by importing its module; a runner defined outside an
    installed package (a test module, a script) is sent by value instead."""
    import ray.cloudpickle as cloudpickle

    fn = getattr(runner, "func", runner)  # functools.partial
    module = getattr(fn, "__module__", None)
    if module and module.split(".")[0] not in ("fewtune", "__main__"):
        mod = sys.modules.get(module)
        if mod is not None:
            cloudpickle.register_pickle_by_value(mod)

