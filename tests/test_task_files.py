"""Tasks from any file: per-file column mapping, gzipped files, per-file group fields, clear
errors for missing columns, and built-in tasks as YAML templates (issue 12)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fewtune.errors import ConfigError, DataError
from fewtune.tasks import get_task, load_custom_task, load_eval, load_train

HANS_COLUMNS = ["sentence1", "sentence2", "gold_label", "pairID", "heuristic"]


def _hans_style_gz(data_dir: Path, dest: Path, per_cell: int = 2) -> list[dict[str, str]]:
    """A gzipped TSV with HANS's column names (and only five of its columns): ``per_cell`` real
    HANS rows for each heuristic × gold label, as a user's out-of-domain file might look."""
    with gzip.open(data_dir / "hans" / "heuristics_evaluation_set.txt.gz", "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    picked: list[dict[str, str]] = []
    for h in ("lexical_overlap", "subsequence", "constituent"):
        for gold in ("entailment", "non-entailment"):
            picked += [r for r in rows if r["heuristic"] == h and r["gold_label"] == gold][:per_cell]
    text = "\t".join(HANS_COLUMNS) + "\n" + "".join("\t".join(r[c] for c in HANS_COLUMNS) + "\n" for r in picked)
    dest.write_bytes(gzip.compress(text.encode()))
    return picked


def _nli_task(tmp_path: Path, data_dir: Path, ood: str | None = None) -> Path:
    """Binary MNLI from the shared data plus the HANS-style .gz as an out-of-domain set."""
    mnli = data_dir / "mnli"
    ood = ood or """\
  hans-gz:
    path: hans_style.tsv.gz
    format: tsv
    fields: {premise: sentence1, hypothesis: sentence2, label: gold_label, id: pairID}
    label_map: {entailment: entailment, non-entailment: contradiction}
    group_fields: [heuristic]
    breakdown_field: heuristic
    gold_names: [entailment, non-entailment]
"""
    body = f"""\
name: nli-ood
label_names: [entailment, contradiction]
text_fields: [premise, hypothesis]
label_map: {{entailment: entailment, contradiction: contradiction, neutral: null}}
id_field: pairID
group_fields: [genre]
train: {{path: {mnli / 'train_subset.tsv'}}}
eval_sets:
  mnli-m: {{path: {mnli / 'dev_matched.tsv'}, in_domain: true, group_fields: []}}
{ood}patterns:
  minimal: {{template: "{{premise}} {{hypothesis}} ?", verbalizer: [" Yes", " No"]}}
"""
    task = tmp_path / "nli_ood.yaml"
    task.write_text(body)
    return task


def test_column_mapping_gz_and_group_fields_per_file(tmp_path: Path, data_dir: Path) -> None:
    picked = _hans_style_gz(data_dir, tmp_path / "hans_style.tsv.gz")
    task = load_custom_task(_nli_task(tmp_path, data_dir))
    ood = load_eval(task, "hans-gz")
    assert [e.id for e in ood] == [f"hans-gz:{r['pairID']}" for r in picked]
    assert [e.fields for e in ood] == [{"premise": r["sentence1"], "hypothesis": r["sentence2"]} for r in picked]
    assert [e.label for e in ood] == [0 if r["gold_label"] == "entailment" else 1 for r in picked]
    assert [e.groups for e in ood] == [{"heuristic": r["heuristic"]} for r in picked]
    assert task.eval_sets["hans-gz"].group_fields == ("heuristic",) and task.eval_sets["mnli-m"].group_fields == ()
    train = load_train(task)  # the train file has no heuristic column: it needs none
    assert len(train) == 1198 and set(train[0].groups) == {"genre"}


def test_gz_format_from_the_inner_extension(tmp_path: Path) -> None:
    (tmp_path / "t.csv.gz").write_bytes(gzip.compress(b"text,label\ngood,1\nbad,0\n"))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok", "label": 1}\n'))
    task = load_custom_task(_toy(tmp_path, "train: {path: t.csv.gz}\neval_sets: {dev: {path: d.jsonl.gz}}\n"))
    assert [(e.fields["text"], e.label) for e in load_train(task)] == [("good", 1), ("bad", 0)]
    assert load_eval(task, "dev")[0].label == 1


def _toy(tmp_path: Path, files: str) -> Path:
    p = tmp_path / "toy.yaml"
    p.write_text("name: toy\nlabel_names: [bad, good]\ntext_fields: [text]\n" + files
                 + "patterns: {minimal: {template: '{text} ?', verbalizer: [' No', ' Yes']}}\n")
    return p


@pytest.mark.slow  # starts processes: not in the fast tier
def test_missing_column_names_file_columns_and_closest(tmp_path: Path, data_dir: Path) -> None:
    _hans_style_gz(data_dir, tmp_path / "hans_style.tsv.gz", per_cell=1)
    ood = """\
  hans-gz:
    path: hans_style.tsv.gz
    format: tsv
    fields: {premise: sentence1, hypothesis: sentence_2, label: gold_label, id: pairID}
    label_map: {entailment: entailment, non-entailment: contradiction}
"""
    task = load_custom_task(_nli_task(tmp_path, data_dir, ood))
    with pytest.raises(DataError) as err:
        load_eval(task, "hans-gz")
    text = str(err.value)
    assert "hans_style.tsv.gz" in text and "no field 'sentence_2'" in text and "text field 'hypothesis'" in text
    assert "fields: sentence1, sentence2, gold_label, pairID, heuristic" in text and "closest: 'sentence2'" in text
    assert "fields: {hypothesis: sentence2}" in text  # the hint says how to map it
    res = _fewtune("run", "--model", "tiny-random", "--n", "2", "--task", str(tmp_path / "nli_ood.yaml"), "--method", "zero-shot",
                   "--eval-sets", "hans-gz", "--out", str(tmp_path / "o"), data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2 and "no field 'sentence_2'" in res.stderr and "Traceback" not in res.stderr


def test_fields_keys_are_checked(tmp_path: Path, data_dir: Path) -> None:
    ood = "  x: {path: x.tsv, fields: {premis: sentence1}}\n"
    with pytest.raises(ConfigError, match=r"(?s)maps 'premis'.*did you mean 'premise'"):
        load_custom_task(_nli_task(tmp_path, data_dir, ood))
    ood = "  x: {path: x.tsv, breakdown_field: heuristic}\n"  # not a group field of this set (nor the task's)
    with pytest.raises(ConfigError, match="breakdown_field 'heuristic' is not in group_fields"):
        load_custom_task(_nli_task(tmp_path, data_dir, ood))


def _fewtune(*args: str, data_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FEWTUNE_DATA_DIR=str(data_dir), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "fewtune", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow  # starts processes: not in the fast tier
def test_issue_scenario_runs_through_the_cli(tmp_path: Path, data_dir: Path) -> None:
    """Binary MNLI + a gzipped HANS-style OOD file with other column names, no preprocessing:
    the run works and the heuristic reaches the metrics and every prediction."""
    _hans_style_gz(data_dir, tmp_path / "hans_style.tsv.gz")
    task, out = _nli_task(tmp_path, data_dir), tmp_path / "run"
    res = _fewtune("run", "--model", "tiny-random", "--n", "2", "--eval-limit", "12", "--task", str(task), "--method", "icl",
                   "--out", str(out), data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["hans-gz"]["domain"] == "ood" and metrics["eval"]["hans-gz"]["n"] == 12
    assert set(metrics["eval"]["hans-gz"]["groups"]["heuristic"]) == {"lexical_overlap", "subsequence", "constituent"}
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    ood = [p for p in preds if p["eval_set"] == "hans-gz"]
    assert len(ood) == 12 and all(p["groups"]["heuristic"] in {"lexical_overlap", "subsequence", "constituent"} for p in ood)
    assert all("heuristic" not in p.get("groups", {}) for p in preds if p["eval_set"] == "mnli-m")


@pytest.mark.slow  # starts processes: not in the fast tier
def test_show_prints_a_template_that_loads_as_the_builtin(tmp_path: Path, data_dir: Path) -> None:
    res = _fewtune("tasks", "--show", "mnli", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("#") and "breakdown_field: heuristic" in res.stdout
    copy = tmp_path / "my_mnli.yaml"
    copy.write_text(res.stdout.replace("name: mnli\n", "name: my-mnli\n"))
    mine, builtin = load_custom_task(copy), get_task("mnli")
    assert mine.eval_sets.keys() == builtin.eval_sets.keys() and mine.patterns == builtin.patterns
    strip = lambda exs: [(e.id.split(":", 1)[1], e.fields, e.label, e.groups) for e in exs]  # noqa: E731
    assert strip(load_eval(mine, "mnli-mm")) == strip(load_eval(builtin, "mnli-mm"))
    res = _fewtune("tasks", "--show", "mnlii", data_dir=data_dir, cwd=tmp_path)
    assert res.returncode == 2 and "did you mean 'mnli'" in res.stderr and "Traceback" not in res.stderr


def test_builtin_tasks_are_yaml_files() -> None:
    for name in ("cola", "mnli"):
        source = get_task(name).source_file
        assert source is not None and Path(source).name == f"{name}.yaml" and Path(source).is_file()


