"""Data-parallel runs: the batch split (in process) and a real 2-process launch (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_training import BagNet, toy_data  # noqa: E402  (tests/ is on sys.path under pytest)

from fewtune.errors import ConfigError
from fewtune.training import distributed
from fewtune.training.loop import shard_batch


@pytest.mark.parametrize("size,world", [(8, 2), (5, 2), (7, 3), (1, 2), (2, 3)])
def test_shards_cover_the_global_batch_once(size, world):
    batch = list(range(10, 10 + size))
    shards = [shard_batch(batch, r, world) for r in range(world)]
    real = [i for s in shards for i, w in s if w > 0]
    assert real == batch  # every example exactly once, in order
    # averaged over the processes, each example's weighted share of its process's mean loss is 1/size
    for s in shards:
        for _, w in s:
            assert w / (world * len(s)) == pytest.approx(1 / size) or w == 0


@pytest.mark.parametrize("size,world", [(8, 2), (5, 2), (7, 3), (1, 2)])
def test_weighted_shares_give_the_global_batch_gradient(size, world):
    """What DDP computes — the mean over processes of the gradient of each weighted share's mean
    loss — equals the gradient of the mean loss over the whole global batch."""
    seqs, labels = toy_data(size)
    from fewtune.scoring.scorer import pad_batch

    def grads(idx: list[int], weight: float) -> list[torch.Tensor]:
        net = BagNet()
        ids, mask, last = pad_batch([seqs[i] for i in idx], 0, torch.device("cpu"))
        loss = F.cross_entropy(net(ids, mask, last), labels[idx]) * weight
        loss.backward()
        return [p.grad.clone() for p in net.parameters()]

    full = grads(list(range(size)), 1.0)
    per_rank = [grads([i for i, _ in s], s[0][1]) for s in (shard_batch(list(range(size)), r, world) for r in range(world))]
    ddp = [sum(g[k] for g in per_rank) / world for k in range(len(full))]
    for a, b in zip(full, ddp):
        assert torch.allclose(a, b, atol=1e-6)


def test_single_process_is_not_a_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.from_main(lambda: 42) == 42


@pytest.mark.parametrize("env,method,trains,device_map,message", [
    ({"ACCELERATE_USE_FSDP": "true"}, "vanilla", True, None, "FSDP launches are not supported"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "vanilla", True, None, "DeepSpeed"),
    ({"WORLD_SIZE": "2"}, "icl", False, None, "trains nothing"),
    ({"WORLD_SIZE": "2"}, "lora", True, "auto", "device_map"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "vanilla", True, None, "mixed_precision=fp16"),
])
def test_unsupported_launches_are_refused(monkeypatch, env, method, trains, device_map, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message) as exc:
        distributed.check_supported(method, trains, device_map, "fp32")
    assert exc.value.hint


def test_supported_combinations_pass(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    distributed.check_supported("icl", False, "auto", "bf16")  # one process: device_map and ICL are fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.check_supported("vanilla", True, None, "bf16")


# --- real launches (subprocesses) ------------------------------------------------------------

# 15 examples in global batches of 4: the last batch (3) splits 2/1, so the weighted shares matter
RUN = ["run", "--task", "cola", "--method", "vanilla", "--model", "tiny-random", "--set", "n=15", "--set", "n_is_total=true",
       "--eval-limit", "40", "--set", "train.epochs=2", "--set", "train.batch_size=4", "--precision", "fp32"]
ACCELERATE_DDP = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\nnum_machines: 1\nmixed_precision: 'no'\n"
ACCELERATE_FSDP = ("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\nnum_machines: 1\n"
                   "mixed_precision: 'no'\nfsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n")


def _launch(prefix: list[str], args: list[str], data_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEWTUNE_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "FEWTUNE_THREADS": "1"}
    return subprocess.run([*prefix, "-m", "fewtune", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=500)


def _accelerate(config: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]


@pytest.mark.integration
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, data_dir):
    """accelerate launch with a config file (2 gloo processes on CPU) vs a plain run: the same
    loss curve within 1e-5 (float summation order differs), the same predictions, one run dir."""
    one = _launch([sys.executable], [*RUN, "--out", str(tmp_path / "one")], data_dir, tmp_path)
    assert one.returncode == 0, one.stderr
    (tmp_path / "ddp.yaml").write_text(ACCELERATE_DDP)
    two = _launch(_accelerate(tmp_path / "ddp.yaml"), [*RUN, "--out", str(tmp_path / "out" / "two")], data_dir, tmp_path)
    assert two.returncode == 0, two.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["two"]  # process 1 wrote nothing
    assert two.stdout.count("results in") == 1
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "one", tmp_path / "out" / "two"))
    assert b["resources"]["processes"] == 2 and a["resources"]["processes"] == 1
    # the process count is in the identity above 1 (dropout masks are drawn per process)
    assert a["run_id"] != b["run_id"] and b["identity"]["processes"] == 2 and "processes" not in a["identity"]
    assert b["train"]["steps"] == a["train"]["steps"] == 8 and b["train"]["examples"] == 15
    assert b["train"]["loss_history"] == pytest.approx(a["train"]["loss_history"], abs=1e-5)
    assert b["train"]["epoch_losses"] == pytest.approx(a["train"]["epoch_losses"], abs=1e-5)
    for name in a["eval"]:
        assert a["eval"][name]["accuracy"] == b["eval"][name]["accuracy"]
    preds = [(d / "predictions.jsonl").read_text().splitlines() for d in (tmp_path / "one", tmp_path / "out" / "two")]
    assert [json.loads(x)["pred"] for x in preds[0]] == [json.loads(x)["pred"] for x in preds[1]]


@pytest.mark.integration
def test_fsdp_config_is_refused_with_exit_2(tmp_path, data_dir):
    (tmp_path / "fsdp.yaml").write_text(ACCELERATE_FSDP)
    r = _launch(_accelerate(tmp_path / "fsdp.yaml"), [*RUN, "--out", str(tmp_path / "o")], data_dir, tmp_path)
    # every fewtune process exits 2 with the message (no traceback of ours); the launcher then
    # exits 1 with its own ChildFailedError report, which names our exit code
    assert r.returncode != 0 and "error: FSDP launches are not supported" in r.stderr
    assert "exitcode  : 2" in r.stderr and "fewtune/" not in r.stderr.split("error: FSDP")[0]
    assert not (tmp_path / "o").exists()
