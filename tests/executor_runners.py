"""Stand-in runners for the executor tests. They live in an importable module (not in a test file
or ``__main__``) because the subprocess executor pickles its runner by reference and the run's
process imports it again."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

from fewtune.errors import TrainingDiverged

ID_SETS = ("cola-id", "mnli-m")


def fake_metrics(cfg, accuracy: float = 0.5) -> dict:
    """metrics.json of a run that never ran: every field the store, the stats and the report read."""
    return {"run_id": cfg.content_hash(), "task": cfg.task, "method": cfg.method, "model": cfg.model, "n": cfg.n,
            "seed": cfg.seed, "eval": {es: {"domain": "id" if es in ID_SETS else "ood", "n": 10, "n_skipped": 0,
                                            "accuracy": accuracy, "mcc": 0.0, "majority_baseline": 0.6, "majority_label": "x",
                                            "per_label": {}, "groups": {}, "warning": None} for es in cfg.eval_sets},
            "resources": {"peak_memory_mb": 1.0, "memory_kind": "rss", "trainable_params": 0, "total_params": 1},
            "warnings": [], "pid": os.getpid()}


def write_fake(cfg, out_dir: Path, accuracy: float = 0.5) -> SimpleNamespace:
    metrics = fake_metrics(cfg, accuracy)
    out_dir.mkdir(parents=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics))
    return SimpleNamespace(metrics=metrics, config=cfg, out_dir=out_dir)


def killed_by_signal(cfg, out_dir: Path, *, data_dir=None, progress=None):
    """zero-shot runs die by SIGKILL (as under the OOM killer); the others finish."""
    if cfg.method == "zero-shot":
        os.kill(os.getpid(), signal.SIGKILL)
    return write_fake(cfg, out_dir)


def diverges(cfg, out_dir: Path, *, data_dir=None, progress=None):
    """zero-shot runs raise TrainingDiverged (a FewtuneError); icl runs hit a bug."""
    if cfg.method == "zero-shot":
        raise TrainingDiverged("training loss became NaN at step 1", "lower train.lr")
    if cfg.method == "icl" and cfg.seed == 1:
        raise ZeroDivisionError("oops")
    return write_fake(cfg, out_dir)


def hangs_mid_write(cfg, out_dir: Path, *, data_dir=None, progress=None):
    """Writes its pid and a half-written temporary directory, then works until stopped; notes
    when it was stopped by an interrupt (the executor's SIGTERM), rather than killed outright."""
    (out_dir.parent / f".{out_dir.name}.tmp-half").mkdir(parents=True)
    (out_dir.parent / f"{out_dir.name}.pid").write_text(str(os.getpid()))
    try:
        while True:
            time.sleep(0.1)
    except KeyboardInterrupt:
        (out_dir.parent / f"{out_dir.name}.interrupted").write_text("")
        raise


def write_fake_runner(cfg, out_dir: Path, *, data_dir=None, progress=None):
    return write_fake(cfg, out_dir)


def slow_logged(cfg, out_dir: Path, *, data_dir=None, progress=None):
    """Takes a while (FEWTUNE_TEST_RUN_S seconds), and logs to ``<study>/events.log`` when it
    starts (with its pid) and when its result is complete — what a test of interruption and
    resumption counts — plus the torch threads it was given."""
    import torch

    log = out_dir.parent.parent / "events.log"

    def event(kind: str) -> None:
        with open(log, "a") as f:  # one short write per line: whole lines even from parallel runs
            f.write(f"{kind} {out_dir.name} {os.getpid()} {time.time():.3f}\n")

    event("start")
    time.sleep(float(os.environ.get("FEWTUNE_TEST_RUN_S", "1")))
    result = write_fake(cfg, out_dir)
    result.metrics["threads"] = torch.get_num_threads()
    (out_dir / "metrics.json").write_text(json.dumps(result.metrics))
    event("end")
    return result


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper does not count)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state
