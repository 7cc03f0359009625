"""Inputs that used to be silently mixed, merged, or unbounded are refused through the real CLI,
with exit code 2, a message that names the problem, and nothing written (issue 9, causes 6–8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.usefixtures("data_dir"), pytest.mark.slow]  # the real CLI in subprocesses: not in the fast tier

RUN = ["run", "--model", "tiny-random", "--eval-limit", "8", "--n", "2", "--task", "cola"]


def fewtune(*args: str, data_dir: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, FEWTUNE_DATA_DIR=str(data_dir), COLUMNS="250", **(env or {}))
    return subprocess.run([sys.executable, "-m", "fewtune", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300)


def refused(res: subprocess.CompletedProcess, *messages: str) -> str:
    """Exit 2, every message in stderr, no traceback; returns stderr with the line breaks joined."""
    err = " ".join(res.stderr.split())
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    for m in messages:
        assert m in err, err
    return err


def write_task(dir: Path, file: str, name: str, rows: int = 12) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    lines = ["text,label"] + [f"sample {i} is {'good' if i % 2 else 'bad'},{i % 2}" for i in range(rows)]
    (dir / f"{file}.csv").write_text("\n".join(lines) + "\n")
    path = dir / f"{file}.yaml"
    path.write_text(f"name: {name}\nlabel_names: [bad, good]\ntext_fields: [text]\ntrain: {{path: {file}.csv}}\n"
                    f"eval_sets: {{dev: {{path: {file}.csv, in_domain: true}}}}\n"
                    "patterns: {minimal: {template: '{text} ?', verbalizer: [' No', ' Yes']}}\n")
    return path


# --- 6. silent mixing and merging -------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "messages"),
    [
        (["--method", "icl", "--set", "n=3"], ["--n and --set n=3 both set 'n'"]),
        (["--method", "icl", "--seed", "1", "--set", "seed=2"], ["--seed and --set seed=2 both set 'seed'"]),
        (["--method", "lora", "--set", "lroa:params.r=4"], ["unknown method 'lroa'", "did you mean 'lora'"]),
        (["--method", "icl", "--set", "lora:params.r=4"], ["applies to method 'lora'", "uses: icl"]),
        (["--method", "icl", "--set", "eval_limit=4", "--set", "eval_limit=5"], ["set the same key"]),
    ],
)
def test_run_refuses_conflicting_or_misdirected_overrides(tmp_path, data_dir, extra, messages):
    out = tmp_path / "out"
    refused(fewtune(*RUN, *extra, "--out", str(out), data_dir=data_dir, cwd=tmp_path), *messages)
    assert not out.exists()


def test_scoped_override_that_matches_the_method_is_applied(tmp_path, data_dir):
    out = tmp_path / "out"
    res = fewtune(*RUN, "--method", "icl", "--set", "icl:params.k=1", "--set", "train.max_steps=1", "--out", str(out),
                  data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["params"]["k"] == 1


def test_duplicate_keys_in_a_run_config_are_refused(tmp_path, data_dir):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: icl\ntrain:\n  lr: 1e-4\n  lr: 1e-5\n")
    refused(fewtune(*RUN, "--config", str(cfg), "--out", str(tmp_path / "o"), data_dir=data_dir, cwd=tmp_path),
            "duplicate key 'lr'", "first on line 3, again on line 4", str(cfg))
    assert not (tmp_path / "o").exists()


def test_duplicate_keys_in_a_custom_task_are_refused(tmp_path, data_dir):
    task = write_task(tmp_path, "toy", "toy")
    task.write_text(task.read_text() + "name: toy2\n")
    refused(fewtune(*RUN[:-2], "--task", str(task), "--method", "icl", "--out", str(tmp_path / "o"), data_dir=data_dir, cwd=tmp_path),
            "duplicate key 'name'", "first on line 1")
    assert not (tmp_path / "o").exists()


def _study(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text("model: tiny-random\neval_limit: 8\nn: 2\ntrain: {max_steps: 1}\n" + text)
    return path


@pytest.mark.parametrize(
    ("text", "args", "messages"),
    [
        ("tasks: [cola]\nmethods: [icl, lora]\n", ["--set", "lroa:params.r=4"], ["unknown method 'lroa'", "did you mean 'lora'"]),
        ("tasks: [cola]\nmethods: [icl]\n", ["--set", "lora:params.r=4"], ["applies to method 'lora'", "the study uses: icl"]),
        ("tasks: [cola]\nmethods: [icl]\n", ["--seeds", "0,1", "--set", "seed=2"], ["--seeds and --set seed=2 both set 'seed'"]),
        ("tasks: [cola]\nmethods: [icl]\n", ["--n", "2", "--set", "n=[2, 4]"], ["--n and --set n=[2, 4] both set 'n'"]),
        ("tasks: [cola]\nmethods: [icl]\nseed: 0\nseed: 1\n", [], ["duplicate key 'seed'", "first on line 7, again on line 8"]),
    ],
)
def test_study_refuses_misdirected_overrides_and_duplicate_keys(tmp_path, data_dir, text, args, messages):
    out = tmp_path / "out"
    refused(fewtune("study", str(_study(tmp_path, text)), "--out", str(out), *args, data_dir=data_dir, cwd=tmp_path), *messages)
    assert not out.exists()


def test_two_custom_tasks_with_one_name_are_refused(tmp_path, data_dir):
    a = write_task(tmp_path / "a", "first", "toy")
    b = write_task(tmp_path / "b", "second", "toy")
    out = tmp_path / "out"
    study = _study(tmp_path, f"tasks: ['{a}', '{b}']\nmethods: [icl]\n")
    for args in (["--dry-run"], []):
        refused(fewtune("study", str(study), "--out", str(out), *args, data_dir=data_dir, cwd=tmp_path),
                "both named 'toy'", str(a), str(b))
        assert not out.exists()


# --- 7. unbounded grids -----------------------------------------------------------------------


@pytest.mark.parametrize("dry", [["--dry-run"], []])
def test_a_huge_seed_range_is_refused_at_once(tmp_path, data_dir, dry):
    out = tmp_path / "out"
    t0 = time.monotonic()
    res = fewtune("study", "quick", "--seeds", "0-99999999", "--out", str(out), *dry, data_dir=data_dir, cwd=tmp_path)
    refused(res, "100,000,000 values", "limited to 100,000 runs")
    assert time.monotonic() - t0 < 60 and not out.exists()


def test_a_huge_grid_is_counted_and_refused_before_it_is_built(tmp_path, data_dir):
    study = _study(tmp_path, "tasks: [cola]\nmethods: [icl, {method: lora, params: {r: [1, 2, 4, 8, 16]}}]\n")
    out = tmp_path / "out"
    # 6 method arms × 20,000 seeds = 120,000 runs; each flag alone is under the cap
    res = fewtune("study", str(study), "--seeds", "0-19999", "--out", str(out), "--dry-run", data_dir=data_dir, cwd=tmp_path)
    refused(res, "would expand to 120,000 runs", "more than the limit of 100,000")
    assert not out.exists()


# --- custom task files: BOM, and no file contents in messages ----------------------------------


@pytest.mark.parametrize("sep, ext", [(",", "csv"), ("\t", "tsv")])
def test_a_byte_order_mark_in_the_header_is_not_part_of_the_first_column(tmp_path, data_dir, sep, ext):
    task = write_task(tmp_path, "toy", "toy")
    rows = [f"sentence{sep}label"] + [f"sample {i}{sep}{i % 2}" for i in range(12)]
    (tmp_path / f"bom.{ext}").write_bytes(b"\xef\xbb\xbf" + ("\n".join(rows) + "\n").encode())
    task.write_text(task.read_text().replace("toy.csv", f"bom.{ext}").replace("[text]", "[sentence]").replace("{text}", "{sentence}"))
    out = tmp_path / "out"
    res = fewtune("run", "--model", "tiny-random", "--n", "2", "--task", str(task), "--method", "icl", "--out", str(out),
                  data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "metrics.json").read_text())["eval"]["dev"]["n"] == 12


def test_a_task_path_to_another_file_does_not_echo_its_contents(tmp_path, data_dir):
    task = write_task(tmp_path, "toy", "toy")
    (tmp_path / "secret.csv").write_text("token=hunter2-very-secret\nline two with more secrets\n")
    task.write_text(task.read_text().replace("{path: toy.csv}", "{path: secret.csv}"))
    out = tmp_path / "out"
    err = refused(fewtune("run", "--model", "tiny-random", "--n", "2", "--task", str(task), "--method", "icl", "--out", str(out),
                          data_dir=data_dir, cwd=tmp_path), "secret.csv", "no field 'label'", "is it a header row?")
    assert "hunter2" not in err and "more secrets" not in err
    assert not out.exists()


def test_a_misnamed_field_lists_the_header_columns(tmp_path, data_dir):
    task = write_task(tmp_path, "toy", "toy")
    task.write_text(task.read_text().replace("[text]", "[txt]").replace("{text}", "{txt}"))
    refused(fewtune("run", "--model", "tiny-random", "--n", "2", "--task", str(task), "--method", "icl", "--out", str(tmp_path / "o"),
                    data_dir=data_dir, cwd=tmp_path), "no field 'txt' (fields: text, label)")


# --- 8. damaged stores and files --------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """A finished two-run study with HANS predictions (tiny model): (study config, study dir)."""
    root = tmp_path_factory.mktemp("study")
    cfg = root / "s.yaml"
    cfg.write_text("model: tiny-random\neval_limit: 8\nn: 2\nseed: [0, 1]\ntasks: [mnli]\nmethods: [icl]\n")
    res = fewtune("study", str(cfg), "--out", str(root / "st"), data_dir=data_dir, cwd=root)
    assert res.returncode == 0, res.stderr
    return cfg, root / "st"


def _copy_study(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _mtimes(study: Path) -> dict[str, int]:
    return {str(p.relative_to(study)): p.stat().st_mtime_ns for p in (study / "runs").rglob("*")}


@pytest.mark.parametrize(("damage", "message"), [(b"", "it holds no study tables (0 bytes)"), (b"not a database" * 100, "file is not a database")])
def test_a_damaged_database_is_refused_by_report_and_rebuilt_by_study(tmp_path, data_dir, finished_study, damage, message):
    cfg, good = finished_study
    st = _copy_study(good, tmp_path / "st")
    report_before = (st / "report.md").read_bytes()
    runs_before = _mtimes(st)
    (st / "study.db").write_bytes(damage)
    # report: exit 2 (the input is unusable, nothing was attempted), the good report is untouched
    refused(fewtune("report", str(st), data_dir=data_dir, cwd=tmp_path), f"{st / 'study.db'} is damaged: {message}",
            "fewtune study", f"--out {st}", "rebuilds it from the finished runs")
    assert (st / "report.md").read_bytes() == report_before
    # study on the same directory rebuilds the database from runs/ without running anything again
    res = fewtune("study", str(cfg), "--out", str(st), data_dir=data_dir, cwd=tmp_path)
    err = " ".join(res.stderr.split())
    assert res.returncode == 0, res.stderr
    assert "2 recovered from disk" in err and "0 finished" in err and "2/2 done" in err
    assert _mtimes(st) == runs_before
    assert bool(list(st.glob("study.db.damaged-*"))) == bool(damage)  # a non-empty damaged file is kept aside
    if damage:
        assert "was damaged; set aside as study.db.damaged-" in err
    res = fewtune("report", str(st), data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (st / "report.md").read_text().count("icl") == report_before.decode().count("icl")


@pytest.mark.parametrize("cut", ["mid-line", "whole lines"])
def test_a_truncated_predictions_file_is_named_and_its_run_left_out_of_the_breakdown(tmp_path, data_dir, finished_study, cut):
    _, good = finished_study
    st = _copy_study(good, tmp_path / "st")
    run = sorted((st / "runs").iterdir())[0]
    preds = run / "predictions.jsonl"
    lines = preds.read_text().splitlines(keepends=True)
    preds.write_text("".join(lines[:-3]) + (lines[-3][:20] if cut == "mid-line" else ""))
    res = fewtune("report", str(st), data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = (st / "report.md").read_text()
    assert f"{preds}" in report and f"run {run.name}" in report and "left out of the per-example statistics and the breakdown tables" in report
    why = f"line {len(lines) - 2}: not a complete JSON record" if cut == "mid-line" else "predictions but metrics.json counts"
    assert why in report
    # the HANS table now rests on the other run only (each cell: 1 run instead of 2)
    assert _hans_counts(good) == {"2"} and _hans_counts(st) == {"1"}


def _hans_counts(study: Path) -> set[str]:
    import csv

    (path,) = (study / "csv").glob("breakdown*.csv")
    return {row["count"] for row in csv.DictReader(path.open())}


# --- models: missing directories, offline hub, damaged cache ----------------------------------


@pytest.mark.parametrize("spec", ["/no/such/model", "./no-such-model", "~/no-such-model-dir", "a/b/c"])
def test_a_missing_model_directory_is_named(tmp_path, data_dir, spec):
    res = fewtune(*RUN, "--method", "icl", "--model", spec, "--out", str(tmp_path / "o"), data_dir=data_dir, cwd=tmp_path)
    err = refused(res, f"cannot load model '{spec}': the directory", "does not exist")
    assert "Repo id" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline", "unreachable"])
def test_an_unknown_hub_model_with_no_hub_fails_fast(tmp_path, data_dir, env):
    t0 = time.monotonic()
    res = fewtune(*RUN, "--method", "icl", "--model", "nobody/no-such-model", "--out", str(tmp_path / "o"), data_dir=data_dir,
                  cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf"), **env})
    refused(res, "cannot load model 'nobody/no-such-model': not found locally, and the hub is unreachable")
    assert time.monotonic() - t0 < 30  # it used to retry for ~50 s
    assert not (tmp_path / "o").exists()


@pytest.mark.integration  # converts the embedded model again: ~40 s (verify_model_dir has a fast unit test)
@pytest.mark.parametrize("victim", ["tokenizer.json", "model.safetensors"])
def test_a_truncated_cached_model_is_rebuilt(tmp_path, data_dir, victim):
    from fewtune.models.loading import embedded_model_dir

    real = embedded_model_dir()
    cache = tmp_path / "cache" / "models" / real.name
    cache.mkdir(parents=True)
    for f in real.iterdir():  # links to the good files, a truncated copy of the victim
        (cache / f.name).symlink_to(f)
    (cache / victim).unlink()
    (cache / victim).write_bytes(((real / victim).read_bytes())[: (real / victim).stat().st_size // 2])
    out = tmp_path / "o"
    res = fewtune(*RUN, "--method", "icl", "--out", str(out), data_dir=data_dir, cwd=tmp_path,
                  env={"FEWTUNE_CACHE_DIR": str(tmp_path / "cache")})
    err = " ".join(res.stderr.split())
    assert res.returncode == 0, res.stderr
    assert f"the cached embedded model at {cache} is damaged ({victim}" in err and "rebuilding it" in err
    assert (cache / victim).stat().st_size == (real / victim).stat().st_size and not (cache / victim).is_symlink()
    assert (real / victim).stat().st_size > 0  # the linked originals were not touched
    assert (out / "metrics.json").is_file()
