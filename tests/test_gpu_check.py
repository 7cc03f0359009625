"""bench/gpu_check.sh, the prepared GPU check, runs end to end on CPU (``--cpu-smoke``: tiny
sizes, CUDA steps skipped) so it cannot rot between the rare runs on a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "FEWTUNE_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-smoke", str(out)], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, json.loads(out.read_text()) if out.exists() else {}


def test_cpu_smoke_runs_every_step_and_writes_one_results_file(smoke):
    proc, res = smoke  # a step that fails or times out makes "ok" false and the exit status 1
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert res["mode"] == "cpu-smoke" and res["ok"] is True
    steps = res["steps"]
    assert steps["cuda_tests"]["status"] == "skipped"
    assert steps["bench9"]["status"] == "ok" and steps["lora_1b"]["status"] == "ok"
    rows = steps["bench9"]["results"]["rows"]
    assert {r["kernel"] for r in rows} == {"fp32", "sdpa", "split"}
    assert max(r["max_abs_diff"] for r in rows if r["precision"] == "fp32") < 1e-4  # kernels vs naive
    lora = steps["lora_1b"]["results"]
    assert lora["gradient_checkpointing"] and 0 < lora["trainable"] < lora["parameters"]
    assert lora["losses"][-1] < lora["losses"][0]  # the LoRA steps train


def test_unknown_option_is_a_usage_error():
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--gpu-please"], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "unknown option" in proc.stderr and "Traceback" not in proc.stderr
