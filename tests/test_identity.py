"""Run identity: everything that changes a result changes the run id, and config.yaml hashes to it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from fewtune.config import RunConfig, TrainConfig
from fewtune.run import identity
from fewtune.run.resolve import resolve

TASK_YAML = """\
name: idtask
label_names: [negative, positive]
text_fields: [text]
train: {path: train.csv}
eval_sets:
  dev: {path: dev.csv, in_domain: true}
patterns:
  minimal: {template: "{text} ?", verbalizer: [" No", " Yes"]}
"""


def _custom_task(tmp_path: Path) -> Path:
    (tmp_path / "train.csv").write_text("text,label\ngood,positive\nbad,negative\nfine,positive\nawful,negative\n")
    (tmp_path / "dev.csv").write_text("text,label\nok,positive\nno,negative\n")
    p = tmp_path / "idtask.yaml"
    p.write_text(TASK_YAML)
    return p


def _id(**kw) -> str:
    return resolve(RunConfig(**kw)).content_hash()


def test_identity_block_is_filled_by_resolve():
    cfg = resolve(RunConfig(task="cola", method="icl"))
    assert cfg.identity is not None
    assert cfg.identity.code_digest == identity.code_digest() == identity.package_digest(identity.PACKAGE_DIR)
    assert set(cfg.identity.libraries) == {"torch", "transformers", "peft", "accelerate"}
    assert cfg.identity.libraries["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]
    assert cfg.identity.device == "cpu" and cfg.identity.precision in ("bf16", "fp32")
    assert cfg.identity.task_digest is None  # built-in task: pinned by the code
    assert cfg.identity.fewtune_version is None and cfg.identity.git_commit is None  # metadata, not identity


def _package_copy(tmp_path: Path) -> Path:
    """A copy of the repository's layout: src/fewtune (the package), README.md, tests/."""
    root = tmp_path / "repo"
    shutil.copytree(identity.PACKAGE_DIR, root / "src" / "fewtune", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "README.md").write_text("# fewtune\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("def test_x():\n    pass\n")
    return root / "src" / "fewtune"


def test_code_digest_covers_the_package_files_and_nothing_else(tmp_path):
    pkg = _package_copy(tmp_path)
    before = identity.package_digest(pkg)
    assert before == identity.code_digest()  # the copy is the code this test runs
    (pkg.parents[1] / "README.md").write_text("# fewtune, better explained\n")  # README-only change
    (pkg.parents[1] / "tests" / "test_x.py").write_text("def test_x():\n    assert True\n")  # test-only change
    (pkg / "__pycache__").mkdir(exist_ok=True)
    (pkg / "__pycache__" / "x.cpython-312.pyc").write_bytes(b"compiled")  # caches and backups do not count
    (pkg / "config.py~").write_text("an editor backup")
    (pkg / ".config.py.swp").write_text("an editor swap file")
    assert identity.package_digest(pkg) == before
    training = pkg / "training" / "loop.py"
    training.write_text(training.read_text() + "\n# an uncommitted edit\n")  # an edit under src/fewtune
    edited = identity.package_digest(pkg)
    assert edited != before
    task = pkg / "tasks" / "builtin" / "cola.yaml"
    task.write_text(task.read_text() + "\n")  # package data computes results too
    assert identity.package_digest(pkg) not in (before, edited)


def test_code_digest_and_library_versions_change_the_run_id(monkeypatch):
    before = _id(task="cola", method="icl")
    monkeypatch.setattr(identity, "code_digest", lambda: "f" * 16)
    code = _id(task="cola", method="icl")
    assert code != before
    upgraded = {**identity.library_versions(), "transformers": "99.0"}  # pip install -U transformers
    monkeypatch.setattr(identity, "library_versions", lambda: upgraded)
    assert _id(task="cola", method="icl") not in (before, code)


def test_version_and_commit_are_metadata_outside_the_run_id(monkeypatch):
    before = _id(task="cola", method="icl")
    monkeypatch.setattr(identity, "fewtune_version", lambda: "99.0")
    monkeypatch.setattr(identity, "git_commit", lambda: "f" * 40)
    assert _id(task="cola", method="icl") == before
    prov = identity.provenance()
    assert prov["fewtune_version"] == "99.0" and prov["git_commit"] == "f" * 40 and prov["code_digest"] == identity.code_digest()


def test_an_identity_from_before_code_digest_still_loads():
    old = {"fewtune_version": "0.1.0", "git_commit": "a" * 40, "task_digest": None, "model_digest": None, "device": "cpu",
           "precision": "fp32"}
    cfg = RunConfig.model_validate({"task": "cola", "identity": old})
    assert cfg.result_dump()["identity"] == old  # and dumps (hashes) exactly as it was written


@pytest.mark.parametrize("spelling", ["tiny-random:", "tiny-random:llama"])
def test_tiny_random_names_are_normalised_before_hashing(spelling):
    base = resolve(RunConfig(task="cola", method="icl", model="tiny-random"))
    other = resolve(RunConfig(task="cola", method="icl", model=spelling))
    assert other.model == "tiny-random" and other.content_hash() == base.content_hash()
    assert _id(task="cola", method="icl", model="tiny-random:qwen2") != base.content_hash()


def test_cpu_thread_count_is_in_the_identity_but_not_on_a_gpu(monkeypatch):
    cfg = RunConfig(task="cola", method="icl")
    one, two = resolve(cfg, threads=1), resolve(cfg, threads=2)
    assert (one.identity.threads, two.identity.threads) == (1, 2) and one.content_hash() != two.content_hash()
    monkeypatch.setattr(identity, "_device_precision", lambda req: ("cuda", "bf16"))
    gpu1, gpu2 = resolve(cfg, threads=1), resolve(cfg, threads=2)
    assert gpu1.identity.threads is None and gpu1.content_hash() == gpu2.content_hash()


def test_data_parallel_process_count_is_in_the_identity_above_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    alone = resolve(RunConfig(task="cola", method="lora"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve(RunConfig(task="cola", method="lora")).content_hash() == alone.content_hash()
    assert "processes" not in alone.result_dump()["identity"]  # omitted at 1: single-process ids stay
    monkeypatch.setenv("WORLD_SIZE", "2")
    two = resolve(RunConfig(task="cola", method="lora"))
    assert two.identity.processes == 2 and two.content_hash() != alone.content_hash()


def test_resolved_precision_and_device_change_the_run_id(monkeypatch):
    cfg = RunConfig(task="cola", method="icl", precision="auto")
    monkeypatch.setattr(identity, "_device_precision", lambda req: ("cpu", "bf16"))
    bf16 = resolve(cfg)
    monkeypatch.setattr(identity, "_device_precision", lambda req: ("cpu", "fp32"))
    fp32 = resolve(cfg)
    monkeypatch.setattr(identity, "_device_precision", lambda req: ("cuda", "bf16"))
    gpu = resolve(cfg)
    assert len({bf16.content_hash(), fp32.content_hash(), gpu.content_hash()}) == 3
    assert (fp32.identity.precision, gpu.identity.device) == ("fp32", "cuda")


def test_custom_task_file_and_data_change_the_run_id(tmp_path):
    path = _custom_task(tmp_path)
    first = _id(task=str(path), method="icl")
    assert resolve(RunConfig(task=str(path))).identity.task_digest is not None
    assert _id(task=str(path), method="icl") == first  # stable
    path.write_text(TASK_YAML.replace('"{text} ?"', '"{text} ??"'))
    edited_yaml = _id(task=str(path), method="icl")
    assert edited_yaml != first
    (tmp_path / "dev.csv").write_text("text,label\nok,positive\nno,positive\n")
    os.utime(tmp_path / "dev.csv", ns=(1, 1))  # a new mtime: the digest memo must not hide the change
    assert _id(task=str(path), method="icl") != edited_yaml


def test_local_model_directory_changes_the_run_id(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    ids = [identity.model_digest(str(model))]
    (model / "model.safetensors").write_bytes(b"\1" * 65)  # retrained weights: new size (and mtime)
    ids.append(identity.model_digest(str(model)))
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    ids.append(identity.model_digest(str(model)))
    (model / "tokenizer.json").write_text("{}")
    ids.append(identity.model_digest(str(model)))
    assert None not in ids and len(set(ids)) == 4
    assert identity.model_digest("some-org/some-hub-model") is None


def test_model_digest_enters_the_run_id(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "model_digest", lambda model: "a")
    a = _id(task="cola", method="icl")
    monkeypatch.setattr(identity, "model_digest", lambda model: "b")
    assert _id(task="cola", method="icl") != a


def test_read_git_head_of_a_worktree_with_packed_refs(tmp_path):
    common = tmp_path / "repo" / ".git"
    (common / "worktrees" / "wt").mkdir(parents=True)
    (common / "packed-refs").write_text("# pack-refs\n" + "a" * 40 + " refs/heads/feature\n")
    wt_git = common / "worktrees" / "wt"
    (wt_git / "HEAD").write_text("ref: refs/heads/feature\n")
    (wt_git / "commondir").write_text("../..\n")
    checkout = tmp_path / "wt"
    checkout.mkdir()
    (checkout / ".git").write_text(f"gitdir: {wt_git}\n")
    assert identity.read_git_head(checkout / ".git") == "a" * 40
    (common / "refs" / "heads").mkdir(parents=True)
    (common / "refs" / "heads" / "feature").write_text("b" * 40 + "\n")  # a loose ref wins over packed
    assert identity.read_git_head(checkout / ".git") == "b" * 40
    (wt_git / "HEAD").write_text("c" * 40 + "\n")  # detached
    assert identity.read_git_head(checkout / ".git") == "c" * 40
    assert identity.read_git_head(tmp_path / "nothing" / ".git") is None


def _hash_yaml(path: Path) -> str:
    data = yaml.safe_load(path.read_text())
    cfg = RunConfig.model_validate(data)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))  # config.yaml exactly as written
    assert cfg.content_hash() == hashlib.sha256(blob.encode()).hexdigest()[:16]
    return cfg.content_hash()


def test_config_yaml_hashes_to_the_run_id_even_when_the_context_is_clipped(tmp_path, data_dir):
    from fewtune.run.runner import run_experiment

    # tiny-random's window is 2048 positions: a larger max_context is clipped for the run, but
    # config.yaml keeps what was asked (and hashed) and metrics.json says what was used.
    cfg = RunConfig(task="cola", method="zero-shot", model="tiny-random", n=1, eval_limit=4, max_context=4096,
                    train=TrainConfig(max_steps=1))
    res = run_experiment(cfg, tmp_path / "run", data_dir=data_dir)
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stored["max_context"] == 4096 and metrics["max_context_effective"] == 2048
    assert _hash_yaml(tmp_path / "run" / "config.yaml") == metrics["run_id"] == res.metrics["run_id"]
    assert metrics["identity"] == stored["identity"] and stored["identity"]["code_digest"] == identity.code_digest()
    assert metrics["provenance"]["fewtune_version"] == identity.fewtune_version()  # metadata beside the identity


@pytest.mark.parametrize("given", [None, {"code_digest": "0" * 16, "device": "tpu", "precision": "fp8"}])
def test_identity_is_recomputed_whatever_the_config_says(given):
    cfg = resolve(RunConfig.model_validate({"task": "cola", "identity": given}))
    assert cfg.identity.code_digest == identity.code_digest() and cfg.identity.device == "cpu"
