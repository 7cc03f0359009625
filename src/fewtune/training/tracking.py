"""Experiment trackers (``log_to``: TensorBoard, MLflow, Weights & Biases) through accelerate's
tracker classes.

A run logs, under its run id: the resolved config (as hyper-parameters), the learning curve
(the training loss of every optimizer step, and the per-epoch eval points when
``train.eval_every_epoch``), and the final metrics and resources. It logs once the run's results
are safely written, from process 0 only: a tracker is a view of the results, never their store,
so a tracker that fails (a W&B server out of reach) costs a warning, not the run.

Why accelerate's tracker classes (``accelerate.tracking``) used directly rather than
``Accelerator(log_with=...)``: the Accelerator of the training loop is created and reset per run
(and not at all for ICL or zero-shot), while every run — trained or not — gets its record.

Where: ``log_dir`` if given (a study's runs side by side: ``--set log_dir=DIR``), else
``<run dir>/trackers``. TensorBoard writes ``<dir>/tensorboard/<run id>``; MLflow a file store at
``<dir>/mlruns`` (experiment ``fewtune``; read it with ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui
--backend-store-uri <dir>/mlruns``) unless ``MLFLOW_TRACKING_URI`` names a server; W&B
project ``$WANDB_PROJECT`` or ``fewtune``, files under ``<dir>`` (``WANDB_MODE=offline`` works).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fewtune.errors import ConfigError

# tracker → (module it imports, what to pip install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb", "wandb")}


def check_available(names: list[str]) -> None:
    """Before any work: every requested tracker's package is importable (else exit 2 with the
    command that installs it)."""
    for name in names:
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"log_to '{name}' needs the '{package}' package, which is not installed",
                              f"pip install 'fewtune[trackers]'  (TensorBoard and MLflow), or pip install {package}")


def _make(name: str, run_id: str, where: Path):
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        return TensorBoardTracker(run_id, where / "tensorboard")
    if name == "mlflow":
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # server-less: MLflow 3 keeps its file store (no database package needed, which
            # mlflow-skinny lacks) behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((where / "mlruns").resolve().as_uri())
        return MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "fewtune"), run_name=run_id)
    where.mkdir(parents=True, exist_ok=True)
    return WandBTracker(os.environ.get("WANDB_PROJECT", "fewtune"), name=run_id, dir=str(where))


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-5}}`` → ``{"train.lr": 1e-5}``; lists and None as text (what the
    trackers' hyper-parameter tables accept)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def curve_points(metrics: dict) -> Iterator[tuple[int, dict[str, float]]]:
    """(optimizer step, values) of the learning curve, in order."""
    train = metrics.get("train") or {}
    every = train.get("loss_history_every") or 1
    for i, loss in enumerate(train.get("loss_history") or []):
        if loss is not None:
            yield (i + 1) * every, {"train/loss": loss}
    steps, epochs = train.get("steps") or 0, train.get("epochs_run") or 0
    for point in metrics.get("curve") or []:
        values = {"curve/train_loss": point["train_loss"]}
        for name, m in point["eval"].items():
            values.update({f"curve/{name}/{k}": v for k, v in m.items() if isinstance(v, (int, float))})
        yield (round(point["epoch"] * steps / epochs) if epochs else 0), values


def final_values(metrics: dict) -> dict[str, float]:
    """The final metrics per eval set and the resources, numbers only."""
    out = {f"eval/{name}/{k}": v for name, m in metrics["eval"].items() for k, v in m.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({f"resources/{k}": v for k, v in metrics["resources"].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def log_run(names: list[str], config: dict, metrics: dict, where: Path) -> None:
    """Log one finished run to each tracker in ``names`` (see the module docstring)."""
    for name in names:
        try:
            tracker = _make(name, metrics["run_id"], where)
            tracker.start()
            tracker.store_init_configuration(flat(config))
            for step, values in curve_points(metrics):
                tracker.log(values, step=step)
            tracker.log(final_values(metrics), step=(metrics.get("train") or {}).get("steps") or 0)
            tracker.finish()
        except Exception as e:  # noqa: BLE001 - the results are written; a tracker is only a view
            print(f"warning: logging run {metrics['run_id']} to {name} failed ({type(e).__name__}: {e}); "
                  "its results are written all the same", file=sys.stderr)
