"""An installed transformers without the attention/mask registries (older than the 4.56 bound)
makes ICL score naively and say so — it must not crash."""

from __future__ import annotations

import pytest

from fewtune.config import RunConfig
from fewtune.run.runner import run_experiment
from fewtune.scoring import shared_prefix


@pytest.mark.parametrize("missing", ["transformers.masking_utils", "transformers.cache_utils"])
def test_icl_falls_back_to_naive_scoring_with_a_note(tmp_path, data_dir, monkeypatch, missing):
    cfg = RunConfig(task="cola", method="icl", model="tiny-random", n=2, eval_limit=6, precision="fp32")
    ref = run_experiment(cfg, data_dir=data_dir)
    assert ref.metrics["method_info"]["scoring"] == ["prefix_cache"]
    monkeypatch.setattr(shared_prefix, "_REGISTERED", False)
    # Patch only fewtune's own import of the module: transformers keeps using its loaded copy.
    real_import = __import__

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == missing and globals is not None and globals.get("__name__") == "fewtune.scoring.shared_prefix":
            raise ImportError(f"No module named '{missing}'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr("builtins.__import__", fake_import)
    res = run_experiment(cfg, data_dir=data_dir)
    assert res.metrics["status"] == "ok" and res.metrics["method_info"]["scoring"] == ["naive"]
    assert any("upgrade to >= 4.56" in w for w in res.metrics["warnings"])
    for name, ev in res.metrics["eval"].items():  # the naive path gives the same predictions
        assert ev["accuracy"] == ref.metrics["eval"][name]["accuracy"]
