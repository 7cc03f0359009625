"""One reading of ``--set`` and YAML for `run` and `study`: values, scopes, conflicts, duplicate keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewtune.errors import ConfigError
from fewtune.overrides import (
    Override,
    apply,
    check_flag_conflicts,
    check_scopes,
    deep_merge,
    load_yaml_file,
    load_yaml_text,
    parse_override,
    parse_overrides,
    parse_value,
)


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1e-4", 1e-4), ("2", 2), ("0.5", 0.5), ("[1, 8]", [1, 8]), ("null", None), ("", None), ("true", True),
     ("cola-id", "cola-id"), ("{r: 4}", {"r": 4})],
)
def test_values_are_yaml_and_exponents_are_floats(raw: str, value: object) -> None:
    got = parse_value(raw)
    assert got == value and type(got) is type(value)


def test_override_scope_path_and_text() -> None:
    o = parse_override("lora:params.r=[1, 8]")
    assert o == Override(("params", "r"), [1, 8], "lora")
    assert o.method == "lora" and o.text() == "lora:params.r=[1, 8]"
    assert parse_override("train.lr=1e-4") == Override(("train", "lr"), 1e-4, None)


@pytest.mark.parametrize(("item", "message"), [("novalue", "expects key=value"), ("a..b=1", "malformed"), (":n=1", "empty method scope")])
def test_malformed_overrides(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_override(item)


@pytest.mark.parametrize("items", [["n=2", "n=3"], ["train.lr=1", "train={lr: 2}"], ["lora:params.r=1", "lora:params.r=2"]])
def test_the_same_key_twice_is_a_conflict(items: list[str]) -> None:
    with pytest.raises(ConfigError, match="set the same key"):
        parse_overrides(items)


def test_different_scopes_or_keys_do_not_conflict() -> None:
    got = parse_overrides(["lora:params.r=1", "adaptive:params.r=2", "train.lr=1", "train.epochs=2"])
    assert len(got) == 4


def test_flag_and_set_of_the_same_key_conflict() -> None:
    with pytest.raises(ConfigError, match="--n and --set n=3 both set 'n'"):
        check_flag_conflicts({"n": 2}, parse_overrides(["n=3"]))
    check_flag_conflicts({"n": None, "seed": 1}, parse_overrides(["n=3"]))  # a flag not given is no conflict


def test_unknown_or_unused_scope() -> None:
    with pytest.raises(ConfigError) as e:
        check_scopes(parse_overrides(["lroa:params.r=4"]), ["lora", "icl"])
    assert "unknown method 'lroa'" in e.value.message and "did you mean 'lora'" in (e.value.hint or "")
    with pytest.raises(ConfigError, match="which the study does not use"):
        check_scopes(parse_overrides(["lora:params.r=4"]), ["lora", "icl"], ["icl"], "the study")
    check_scopes(parse_overrides(["lora:params.r=4", "n=2"]), ["lora", "icl"], ["lora"])


def test_deep_merge_and_apply() -> None:
    base = {"train": {"lr": 1, "epochs": 2}, "params": {"k": 1}, "n": 2}
    assert deep_merge(base, {"train": {"lr": 3}, "n": 4}) == {"train": {"lr": 3, "epochs": 2}, "params": {"k": 1}, "n": 4}
    assert apply(base, parse_overrides(["train.lr=5", "params={r: 1}"])) == {"train": {"lr": 5, "epochs": 2}, "params": {"r": 1}, "n": 2}
    assert base["train"]["lr"] == 1  # inputs are not modified


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [("a: 1\nb: 2\na: 3\n", "'a'", "first on line 1, again on line 3"),
     ("train:\n  lr: 1\n  epochs: 2\n  lr: 3\n", "'lr'", "first on line 2, again on line 4"),
     ("{a: 1, a: 2}", "'a'", "again on line 1")],
)
def test_duplicate_yaml_keys_are_errors(text: str, key: str, lines: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_yaml_text(text, "x")
    assert f"duplicate key {key}" in e.value.message and lines in e.value.message


def test_yaml_merge_keys_and_equal_nested_keys_are_fine(tmp_path: Path) -> None:
    assert load_yaml_text("a: {x: 1}\nb: {x: 2}\n", "x") == {"a": {"x": 1}, "b": {"x": 2}}
    assert load_yaml_text("d: &d {x: 1}\ne:\n  <<: *d\n  x: 2\n", "x")["e"] == {"x": 2}
    p = tmp_path / "c.yaml"
    p.write_bytes(b"\xef\xbb\xbfn: 2\n")  # a BOM is not part of the first key
    assert load_yaml_file(p, "run config") == {"n": 2}
    p.write_text("")
    assert load_yaml_file(p, "run config") == {}
    p.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml_file(p, "run config")
