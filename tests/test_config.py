import pytest

from fewtune.config import RunConfig, TrainConfig, validate
from fewtune.errors import ConfigError
from fewtune.overrides import apply, parse_overrides
from fewtune.run.resolve import resolve


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError) as e:
        validate(RunConfig, {"taks": "cola"})
    assert "taks" in e.value.message and "task" in e.value.hint


def test_unknown_nested_key_names_closest():
    with pytest.raises(ConfigError) as e:
        validate(RunConfig, {"train": {"learning_rate": 1e-4}})
    assert "train.learning_rate" in e.value.message
    assert "lr" in e.value.hint or "valid" in e.value.hint


def test_bad_value_is_reported_with_location():
    with pytest.raises(ConfigError) as e:
        validate(RunConfig, {"n": 0})
    assert "'n'" in e.value.message


def test_resolve_fills_task_defaults_and_method_params():
    cfg = resolve(RunConfig(task="mnli", method="icl", params={"k": 4}))
    assert cfg.pattern == "minimal"
    assert cfg.eval_sets == ["mnli-m", "hans"]
    assert cfg.params["k"] == 4 and "prefix_cache" in cfg.params


def test_resolve_rejects_unknown_names():
    with pytest.raises(ConfigError, match="unknown task"):
        resolve(RunConfig(task="colaa"))
    with pytest.raises(ConfigError, match="unknown method"):
        resolve(RunConfig(method="icll"))
    with pytest.raises(ConfigError, match="unknown pattern"):
        resolve(RunConfig(pattern="gpt3"))
    with pytest.raises(ConfigError, match="unknown eval set"):
        resolve(RunConfig(eval_sets=["cola-oodd"]))
    with pytest.raises(ConfigError, match="unknown key 'params.kk'|params.kk|kk"):
        resolve(RunConfig(method="icl", params={"kk": 3}))


def test_content_hash_identifies_resolved_config():
    a = resolve(RunConfig(task="cola", method="icl"))
    b = resolve(RunConfig(task="cola", method="icl", pattern="minimal", eval_sets=["cola-id", "cola-ood"]))
    c = resolve(RunConfig(task="cola", method="icl", seed=1))
    assert a.content_hash() == b.content_hash() != c.content_hash()
    d = resolve(RunConfig(task="cola", method="icl", train=TrainConfig(lr=2e-5)))
    assert d.content_hash() != a.content_hash()


def test_parse_overrides_builds_nested_typed_values():
    got = apply({}, parse_overrides(["train.lr=1e-4", "params.k=8", "eval_sets=[cola-id]", "eval_limit=null"]))
    assert got == {"train": {"lr": 1e-4}, "params": {"k": 8}, "eval_sets": ["cola-id"], "eval_limit": None}
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])
