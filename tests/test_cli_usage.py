"""Usage errors, exit codes and Rich markup, through the real CLI (a subprocess).

Exit codes: 0 done, 1 runs failed or the output could not be written, 2 usage or input error,
130 interrupted. No user error prints a traceback; user text is printed as text, not markup.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_cli import BASE, fewtune

pytestmark = [pytest.mark.usefixtures("data_dir"), pytest.mark.slow]  # the real CLI in subprocesses: not in the fast tier


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--task", "cola", "--method", "icl"], "Missing option '--out'"),
        (["--threads", "0", "run", "--task", "cola", "--method", "icl", "--out", "o"], "Invalid value for '--threads'"),
        (["run", "--threads", "0", "--task", "cola", "--out", "o"], "Invalid value for '--threads'"),
        (["run", "--task", "cola", "--method", "icl", "--n", "abc", "--out", "o"], "Invalid value for '--n'"),
        (["run", "--task", "cola", "--bogus-flag", "--out", "o"], "No such option: --bogus-flag"),
        (["bogus"], "No such command 'bogus'"),
        (["report"], "Missing argument 'DIR'"),
        (["study", "quick"], "Missing option '--out'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path, data_dir, args, message):
    res = fewtune(*args, data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Usage: fewtune" in res.stderr and message in res.stderr
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_arguments_shows_help(tmp_path, data_dir):
    res = fewtune(data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2 and "Commands" in res.stdout + res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "extra, shown",
    [
        (["--task", "[/x]", "--method", "icl"], "unknown task '[/x]'"),  # a closing tag crashed the handler
        (["--task", "cola", "--method", "[icl]"], "unknown method '[icl]'"),  # an opening tag vanished
    ],
)
def test_user_text_is_not_rich_markup(tmp_path, data_dir, extra, shown):
    res = fewtune(*BASE, *extra, "--out", str(tmp_path / "o"), data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert shown in res.stderr.replace("\n", " ")
    assert not (tmp_path / "o").exists()


def test_global_option_after_the_command_and_bracketed_out_path(tmp_path, data_dir):
    """``--threads`` is accepted after ``run`` too; ``o/[v2]`` is printed as that path."""
    res = fewtune(*BASE, "--threads", "1", "--task", "cola", "--method", "zero-shot", "--out", "o/[v2]",
                  data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "results in o/[v2]" in res.stdout
    assert (tmp_path / "o" / "[v2]" / "metrics.json").is_file()


def test_study_accepts_threads_after_the_command(tmp_path, data_dir):
    res = fewtune("study", "quick", "--threads", "1", "--seeds", "0", "--dry-run", "--out", "s", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "12 runs" in res.stdout


def _study_yaml(tmp_path: Path, **over) -> Path:
    data = {"name": "tiny", "model": "tiny-random", "n": 2, "seed": [0], "eval_limit": 8,
            "train": {"max_steps": 1, "batch_size": 4}, "tasks": ["cola"], "methods": ["zero-shot", "icl"], **over}
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_study_with_a_failed_run_exits_1(tmp_path, data_dir):
    study = _study_yaml(tmp_path)
    res = fewtune("study", str(study), "--set", "icl:max_context=40", "--no-report", "--out", "s", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "1 failed" in res.stderr and "--retry-failed" in res.stderr and "Traceback" not in res.stderr
    done = [json.loads(p.read_text()) for p in (tmp_path / "s" / "runs").glob("*/metrics.json")]
    assert [m["method"] for m in done] == ["zero-shot"]


def test_study_refuses_a_directory_that_is_not_a_study(tmp_path, data_dir):
    study = _study_yaml(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my own notes")
    (out / "[draft].md").write_text("x")
    res = fewtune("study", str(study), "--out", str(out), data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "not a fewtune study directory" in res.stderr and "[draft].md" in res.stderr and "report.md" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["[draft].md", "report.md"]
    assert (out / "report.md").read_text() == "my own notes"


def test_study_killed_in_its_first_instant_is_still_a_study(tmp_path, data_dir):
    study = _study_yaml(tmp_path, methods=["zero-shot"])
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / ".lock").write_text("12345")  # all that a study killed right after starting leaves
    res = fewtune("study", str(study), "--no-report", "--out", "s", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "1/1 done" in res.stderr


def test_study_out_that_is_a_file_is_refused(tmp_path, data_dir):
    study = _study_yaml(tmp_path)
    (tmp_path / "f").write_text("keep me")
    res = fewtune("study", str(study), "--out", "f", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2 and "is a file" in res.stderr, res.stderr
    assert (tmp_path / "f").read_text() == "keep me"


def test_too_long_prompt_hint_names_a_flag_that_exists(tmp_path, data_dir):
    res = fewtune(*BASE, "--task", "cola", "--method", "icl", "--set", "max_context=40", "--out", "o", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    hint = res.stderr.replace("\n", " ")
    assert "--set max_context=" in hint and "--max-context" not in hint
