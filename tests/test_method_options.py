"""Options a method cannot honour are refused before any run (exit 2, a message and a hint, no
traceback, nothing written), and the adapter methods count as keeping the base weights frozen
(bf16 weights on GPUs, ``device_map`` allowed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fewtune.config import RunConfig
from fewtune.errors import ConfigError
from fewtune.methods import METHODS
from fewtune.models.loading import resolve_model_dtype
from fewtune.run.resolve import resolve

ADAPTERS = ("lora", "dora", "ia3", "prompt-tuning", "prefix-tuning")


@pytest.mark.parametrize("method, setting, needle", [
    ("icl", "select={train.lr: [1.0e-5, 1.0e-3]}", "trains nothing"),
    ("icl", "train.gradient_checkpointing=true", "trains nothing"),
    ("prefix-tuning", "train.gradient_checkpointing=true", "append"),
    ("vanilla", "model_dtype=bf16", "round away"),
])
def test_options_the_method_cannot_honour_exit_2_before_any_run(tmp_path, method, setting, needle):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fewtune", "run", "--model", "tiny-random", "--task", "cola",
                           "--method", method, "--n", "2", "--out", str(out), "--set", setting],
                          capture_output=True, text=True, timeout=300)
    err = " ".join(proc.stderr.split())  # the message is wrapped to the terminal's width
    assert proc.returncode == 2, proc.stderr
    assert needle in err and "hint:" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("method, kw, needle", [
    ("zero-shot", {"select": {"train.epochs": [1, 2]}, "n": 4}, "trains nothing"),
    ("pbft", {"model_dtype": "fp16"}, "round away"),
    ("distill", {"model_dtype": "bf16"}, "round away"),
])
def test_more_refusals_in_resolve(method, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve(RunConfig(model="tiny-random", method=method, **kw))


def test_the_same_options_are_accepted_where_they_apply():
    resolve(RunConfig(model="tiny-random", method="icl", select={"params.k": [2, 4]}, n=4))
    resolve(RunConfig(model="tiny-random", method="lora", model_dtype="bf16", train={"gradient_checkpointing": True}))
    resolve(RunConfig(model="tiny-random", method="prompt-tuning", train={"gradient_checkpointing": True}))
    resolve(RunConfig(model="tiny-random", method="vanilla", model_dtype="fp32"))


@pytest.mark.parametrize("method", ADAPTERS)
def test_adapter_methods_keep_the_base_frozen(monkeypatch, method):
    cls = METHODS.get(method)
    assert cls.trains and not cls.trains_base_weights and cls.keeps_base_frozen()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_model_dtype("auto", cls.keeps_base_frozen(), torch.device("cuda")) == "bf16"
    assert resolve(RunConfig(method=method, model="tiny-random", device_map="auto")).device_map == "auto"
    assert resolve(RunConfig(method=method, model="tiny-random", model_dtype="bf16")).model_dtype == "bf16"


@pytest.mark.parametrize("method", ["vanilla", "pbft", "adaptive", "bitfit", "distill"])
def test_methods_updating_base_weights_do_not(method):
    assert not METHODS.get(method).keeps_base_frozen()
