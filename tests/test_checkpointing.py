"""train.gradient_checkpointing: the same training, activations recomputed in backward."""

from __future__ import annotations

import pytest
import torch
from test_methods_train import make, toy_examples  # noqa: E402

from fewtune.config import TrainConfig
from fewtune.errors import ConfigError
from fewtune.training.loop import enable_gradient_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit_counting_layer_calls(method: str, checkpointing: bool, params: dict | None = None):
    m = make(method, params, lr=1e-3, epochs=2, batch_size=4, gradient_checkpointing=checkpointing)
    base = m.ctx.lm.model
    layer = (base.get_base_model() if hasattr(base, "get_base_model") else base).model.layers[0]
    calls = {"train": 0}
    # counted on the MLP's ``forward`` itself: module hooks do not fire again when backward
    # recomputes a checkpointed layer, the forward code does
    forward = layer.mlp.forward

    def counting_forward(*args, **kwargs):
        calls["train"] += layer.mlp.training and torch.is_grad_enabled()
        return forward(*args, **kwargs)

    layer.mlp.forward = counting_forward
    summary = m.fit(toy_examples(8))
    return summary, calls["train"]


@pytest.mark.parametrize("method,params", [("vanilla", None), ("lora", {"r": 4})])
def test_checkpointing_gives_the_same_losses_and_recomputes_each_layer(method, params):
    plain, calls_plain = _fit_counting_layer_calls(method, False, params)
    ckpt, calls_ckpt = _fit_counting_layer_calls(method, True, params)
    assert ckpt["loss_history"] == pytest.approx(plain["loss_history"], abs=1e-5)
    assert plain["steps"] == ckpt["steps"] == 4
    # without checkpointing a layer runs once per micro-step; with it, once more in backward
    assert calls_plain == 4 and calls_ckpt == 8


def test_a_model_without_checkpointing_support_is_a_config_error():
    with pytest.raises(ConfigError, match="does not support gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_the_option_defaults_off():
    assert TrainConfig().gradient_checkpointing is False


@pytest.mark.slow  # starts processes: not in the fast tier
def test_bf16_weights_with_checkpointing_train_through_the_cli(tmp_path, data_dir):
    """The big-model combination: bf16 weights (adapters only) + gradient checkpointing trains."""
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fewtune", "run", "--model", "tiny-random", "--task", "cola", "--method", "lora",
         "--n", "4", "--out", str(out), "--set", "eval_limit=8", "--set", "model_dtype=bf16",
         "--set", "train.gradient_checkpointing=true", "--set", "train.max_steps=3", "--set", "train.batch_size=4",
         "--set", "train.lr=1e-2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_load"]["dtype"] == "bfloat16"
    losses = metrics["train"]["loss_history"]
    assert len(losses) == 3 and all(map(lambda x: x == x and abs(x) < 1e3, losses))
