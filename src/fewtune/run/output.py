"""A run directory: checked before any work (never destroyed by surprise, reused when it holds
this very run) and written atomically at the end (``config.yaml``, ``sample.json``,
``predictions.jsonl``, ``metrics.json``)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import yaml

from fewtune.atomic import check_replaceable, clean_stale_tmp_dirs, ensure_writable_dir, make_tmp_dir, output_error, replace_dir
from fewtune.config import RunConfig
from fewtune.errors import ConfigError
from fewtune.methods import Predictions
from fewtune.run.evaluation import EvalData
from fewtune.tasks.base import Task


def check_out_dir(cfg: RunConfig, run_id: str, out_dir: Path, *, overwrite: bool = False) -> dict | None:
    """Before any work: ``out_dir`` must be a writable place that this run will not destroy by
    surprise. Returns the metrics of this same run, finished, if ``out_dir`` already holds it.

    Refused (``ConfigError``): ``out_dir`` is a file; a non-empty directory that is not a run; a
    run with another config (unless ``overwrite``), listing the differences. Temporaries of
    killed earlier writers of ``out_dir`` are removed here.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory",
                          "give --out a directory path (the file was left untouched)")
    clean_stale_tmp_dirs(out_dir)
    check_replaceable(out_dir)
    ensure_writable_dir(out_dir.parent)
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return None
    metrics = _read_json(out_dir / "metrics.json")
    if metrics is None:
        raise ConfigError(f"output directory {out_dir} exists and is not a fewtune run", "choose a new --out directory")
    if overwrite:
        return None
    diffs = config_differences(_read_yaml(out_dir / "config.yaml"), cfg.result_dump())
    same = metrics.get("run_id") == run_id or not diffs
    if same:  # a finished run is done; a failure record of the same config is simply retried
        return metrics if metrics.get("status", "ok") == "ok" else None
    raise ConfigError(
        f"{out_dir} already holds a run with a different config (existing → this run):\n  " + "\n  ".join(diffs),
        "choose another --out directory, or add --overwrite to replace that run")


def config_differences(old: dict | None, new: dict, prefix: str = "") -> list[str]:
    """``key.path: old → new`` for every leaf that differs between two config dumps."""
    if old is None:
        return ["(the existing config.yaml is missing or unreadable)"]
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, path = old.get(key, "<unset>"), new.get(key, "<unset>"), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{path}.")
        elif a != b:
            out.append(f"{path}: {a!r} → {b!r}")
    return out


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def write_run(out_dir: Path, cfg: RunConfig, manifest: dict, metrics: dict, evals: list[EvalData],
              preds: dict[str, Predictions], task: Task, tokenizer) -> None:
    """Write all run files into a temp dir next to ``out_dir`` and rename it into place; an OS
    refusal (ENOSPC, EROFS, …) becomes an ``OutputError`` (exit 1)."""
    try:
        _write_run_files(out_dir, cfg, manifest, metrics, evals, preds, tokenizer)
    except OSError as e:  # full disk, read-only mount, …: say so, leave no temporaries (done below)
        raise output_error(e, out_dir, "write results to") from None


def _write_run_files(out_dir: Path, cfg: RunConfig, manifest: dict, metrics: dict, evals: list[EvalData],
                     preds: dict[str, Predictions], tokenizer) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tmp_dir(out_dir)
    try:
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.result_dump(), sort_keys=False))
        (tmp / "sample.json").write_text(json.dumps(manifest, indent=1))
        with open(tmp / "predictions.jsonl", "w") as f:
            for ev in evals:
                p = preds[ev.name]
                for i, e in enumerate(ev.examples):
                    row = {
                        "eval_set": ev.name, "id": e.id, "gold": e.label,
                        "pred": int(p.pred[i]), "skipped": bool(p.skipped[i]),
                        "label_logprobs": [None if not math.isfinite(v) else round(float(v), 6) for v in p.label_scores[i]],
                    }
                    if p.full_argmax_token is not None and not p.skipped[i]:
                        row["full_argmax"] = tokenizer.convert_ids_to_tokens(int(p.full_argmax_token[i]))
                        row["outside_verbalizer"] = bool(p.outside_verbalizer[i])
                    if p.tie is not None and p.tie[i]:
                        row["tie"] = True  # the best label score was shared exactly; pred is a seeded coin
                    if e.groups:
                        row["groups"] = e.groups
                    f.write(json.dumps(row) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(clean_json(metrics), indent=1, allow_nan=False))
        for p in tmp.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_json(x):
    """NaN/inf → None so metrics.json is strict JSON."""
    if isinstance(x, dict):
        return {k: clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean_json(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x
