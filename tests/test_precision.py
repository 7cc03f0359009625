"""Precision selection (mocked CUDA: no GPU here) and the fp16 gradient-scaler path of the loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_training import BagNet, toy_data  # noqa: E402

from fewtune.config import TrainConfig
from fewtune.errors import ConfigError, TrainingDiverged
from fewtune.models.loading import autocast, resolve_precision
from fewtune.training import loop as training

CUDA = torch.device("cuda")


def fake_bf16(native: bool):
    """``torch.cuda.is_bf16_supported`` of a GPU: emulated bf16 counts unless asked not to."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or including_emulation
    return is_bf16_supported


@pytest.mark.parametrize("native,requested,expected", [
    (True, "auto", "bf16"),   # A100/H100
    (False, "auto", "fp16"),  # V100/T4: bf16 only emulated
    (True, "fp16", "fp16"),
    (False, "fp16", "fp16"),
    (True, "fp32", "fp32"),
])
def test_cuda_precision_follows_native_bf16(monkeypatch, native, requested, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_bf16(native))
    assert resolve_precision(requested, CUDA) == expected


def test_bf16_on_a_gpu_without_native_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_bf16(False))
    with pytest.raises(ConfigError, match="no native bf16") as exc:
        resolve_precision("bf16", CUDA)
    assert "fp16" in exc.value.hint


def test_older_torch_without_including_emulation_uses_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # no keyword: TypeError
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert resolve_precision("auto", CUDA) == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert resolve_precision("auto", CUDA) == "bf16"


def test_cpu_stays_as_before_and_refuses_fp16(monkeypatch):
    for has_bf16, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda v=has_bf16: v, raising=False)
        assert resolve_precision("auto", torch.device("cpu")) == expected
    with pytest.raises(ConfigError, match="fp16' needs a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))


def test_autocast_dtype_per_precision():
    cpu = torch.device("cpu")
    with autocast("fp16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    with autocast("bf16", cpu):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast("fp32", cpu):
        assert not torch.is_autocast_enabled("cpu")


def test_fp16_asks_accelerate_for_mixed_precision_fp16():
    acc = training.make_accelerator("fp16", TrainConfig(), torch.device("cpu"))
    try:
        assert acc.mixed_precision == "fp16"
    finally:
        training.reset_accelerate_state()


def _with_cpu_scaler(monkeypatch, scalers: list):
    """accelerate builds its GradScaler only on GPUs; give the CPU Accelerator the one a GPU would
    get (torch.amp.GradScaler) so the loop's fp16 path runs here for real."""
    real = training.make_accelerator

    def make(precision, cfg, device):
        acc = real(precision, cfg, device)
        if precision == "fp16":
            acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
            scalers.append(acc.scaler)
        return acc

    monkeypatch.setattr(training, "make_accelerator", make)


def test_fp16_overflow_is_skipped_by_the_scaler_not_reported_as_divergence(monkeypatch):
    """An overflowing step (inf gradients, finite loss) is the scaler's business: it skips the
    update and lowers its scale; training goes on. In fp32 the same gradients stop the run."""
    seqs, labels = toy_data(16)
    scalers: list = []
    _with_cpu_scaler(monkeypatch, scalers)

    def loss_fn(logits, batch, calls={"n": 0}):
        calls["n"] += 1
        loss = F.cross_entropy(logits, labels[batch.idx])
        return loss * 1e38 if calls["n"] == 3 else loss  # finite loss, gradients overflow to inf

    net = BagNet()
    res = training.train(net, seqs, loss_fn, [{"params": list(net.parameters())}], TrainConfig(lr=0.05, epochs=1, batch_size=4),
                         pad_id=0, precision="fp16", model_seed=0, device=torch.device("cpu"))
    assert res.steps == 4 and all(torch.isfinite(p).all() for p in net.parameters())
    assert scalers and scalers[0].get_scale() < 2.0**8  # the scaler saw the overflow and backed off

    def loss_fn32(logits, batch, calls={"n": 0}):
        calls["n"] += 1
        loss = F.cross_entropy(logits, labels[batch.idx])
        return loss * 1e38 if calls["n"] == 3 else loss

    net = BagNet()
    with pytest.raises(TrainingDiverged, match="gradient norm became inf at optimizer step 3"):
        training.train(net, seqs, loss_fn32, [{"params": list(net.parameters())}], TrainConfig(lr=0.05, epochs=1, batch_size=4),
                       pad_id=0, precision="fp32", model_seed=0, device=torch.device("cpu"))
