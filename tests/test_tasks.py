"""Tasks and data: real-data counts, checksums, downloads, malformed files, custom YAML tasks."""

from __future__ import annotations

import collections
import functools
import gzip
import hashlib
import http.server
import io
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fewtune.errors import ConfigError, DataError
from fewtune.tasks import TASKS, builtin, files, get_task, load_custom_task, load_eval, load_train, register_custom_task
from fewtune.tasks.base import DataFile


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never read or write the user's real download cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv(files.CACHE_DIR_ENV, str(cache))
    return cache


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def labels(examples) -> dict[int, int]:
    return dict(collections.Counter(e.label for e in examples))


# --- real data ---------------------------------------------------------------------------------

REAL_COUNTS = [
    ("cola", None, 8551, {1: 6023, 0: 2528}),
    ("cola", "cola-id", 527, {1: 365, 0: 162}),
    ("cola", "cola-ood", 516, {1: 354, 0: 162}),
    ("cola", "cola-glue-dev", 1043, {1: 721, 0: 322}),
    ("mnli", None, 1198, {0: 621, 1: 577}),
    ("mnli", "mnli-m", 6692, {0: 3479, 1: 3213}),
    ("mnli", "mnli-mm", 2810, {0: 1420, 1: 1390}),
    ("mnli", "hans", 30000, {0: 15000, 1: 15000}),
    ("mnli", "hans-lexical-overlap", 10000, {0: 5000, 1: 5000}),
]


@pytest.mark.parametrize("task,split,count,balance", REAL_COUNTS)
def test_real_split_sizes_and_label_balance(data_dir: Path, task: str, split: str | None, count: int, balance: dict) -> None:
    exs = load_train(task, data_dir) if split is None else load_eval(task, split, data_dir)
    assert len(exs) == count
    assert labels(exs) == balance
    assert len({e.id for e in exs}) == count  # ids are unique
    t = get_task(task)
    assert all(set(e.fields) == set(t.text_fields) and all(v and v == v.strip() for v in e.fields.values()) for e in exs)


def test_hans_groups(data_dir: Path) -> None:
    hans = load_eval("mnli", "hans", data_dir)
    assert collections.Counter(e.groups["heuristic"] for e in hans) == {"lexical_overlap": 10000, "subsequence": 10000, "constituent": 10000}
    subcases = collections.Counter(e.groups["subcase"] for e in hans)
    assert len(subcases) == 30 and set(subcases.values()) == {1000}
    assert hans[0].id == "hans:ex0" and set(hans[0].groups) == {"heuristic", "subcase", "template"}
    lex = load_eval("mnli", "hans-lexical-overlap", data_dir)
    assert {e.groups["heuristic"] for e in lex} == {"lexical_overlap"}


def test_ids_are_stable_and_groups_present(data_dir: Path) -> None:
    ood = load_eval("cola", "cola-ood", data_dir)
    assert ood[0].id == "cola-ood:0" and ood[0].groups == {"source": "clc95"}
    assert ood[0].fields["sentence"] == "Somebody just left - guess who."
    mm = load_eval("mnli", "mnli-mm", data_dir)
    assert mm[0].id == "mnli-mm:75290c" and mm[0].label == 1 and mm[0].groups == {"genre": "letters"}
    assert load_eval("cola", "cola-ood", data_dir)[5] == ood[5]  # second (memoised) load is identical


def test_glue_dev_contains_the_ood_sentences(data_dir: Path) -> None:
    """The reason cola-glue-dev carries a warning: it includes CoLA-OOD (v1.0 has a few typos)."""
    glue = {e.fields["sentence"] for e in load_eval("cola", "cola-glue-dev", data_dir)}
    ood = [e.fields["sentence"] for e in load_eval("cola", "cola-ood", data_dir)]
    assert sum(s in glue for s in ood) >= 500
    cola = get_task("cola")
    assert "516" in (cola.eval_sets["cola-glue-dev"].warning or "")
    assert "cola-glue-dev" not in cola.default_eval_sets and "cola-ood" not in cola.in_domain


def test_task_metadata() -> None:
    cola, mnli = get_task("cola"), get_task("mnli")
    assert cola.label_names == ("unacceptable", "acceptable") and mnli.label_names == ("entailment", "contradiction")
    assert cola.default_eval_sets == ("cola-id", "cola-ood") and mnli.default_eval_sets == ("mnli-m", "hans")
    assert mnli.in_domain == ("mnli-m",) and cola.icl_separator == " " and mnli.icl_separator == "\n\n"
    assert mnli.eval_sets["hans"].group_fields == ("heuristic", "subcase")
    assert any("TaxiNLI" in n for n in mnli.notes) and "40%" in mnli.eval_sets["mnli-mm"].description
    assert "non-entailment" in mnli.eval_sets["hans"].description
    with pytest.raises(ConfigError, match="did you mean 'mnli'"):
        get_task("mnlii")
    with pytest.raises(ConfigError, match="hans"):
        mnli.eval_split("hanz")


@pytest.mark.parametrize("task", ["cola", "mnli"])
def test_patterns_are_well_formed(task: str) -> None:
    t = get_task(task)
    assert {"minimal", "gpt-3", "eval-harness", "released"} <= set(t.patterns)
    fields = {f: "x" for f in t.text_fields}
    for p in t.patterns.values():
        assert set(p.fields()) <= set(t.text_fields)
        assert len(p.verbalizer) == t.num_labels and all(w.startswith(" ") for w in p.verbalizer)
        assert not p.query(fields).endswith(" ")


def test_pattern_texts() -> None:
    cola, mnli = get_task("cola"), get_task("mnli")
    assert cola.pattern().demonstration({"sentence": "He go."}, 0) == "He go. ? No"
    assert mnli.pattern("gpt-3").query({"premise": "A.", "hypothesis": "B."}) == "A. question: B. Yes or No? answer:"
    assert mnli.pattern("eval-harness").demonstration({"premise": "A.", "hypothesis": "B."}, 1) == "A. \nQuestion: B. True or False?\nAnswer: False"
    assert cola.pattern("released").query({"sentence": "S."}) == "Yes or No?S."
    assert cola.pattern("eval-harness").verbalizer == (" False", " True")


# --- checksums, missing files, data dir ---------------------------------------------------------


def test_corrupt_file_is_detected(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "cola").mkdir()
    dst = tmp_path / "cola" / "in_domain_dev.tsv"
    data = bytearray((data_dir / "cola" / "in_domain_dev.tsv").read_bytes())
    data[100] ^= 0x01
    dst.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        load_eval("cola", "cola-id", tmp_path)
    text = str(err.value)
    assert "in_domain_dev.tsv" in text and sha(bytes(data)) in text
    assert "77176f6a03faa5a1c4f23c69971fc1bff565931112fb65af47b2d6e24b7f42f7" in text
    assert "delete" in text and "cola_public_1.1.zip" in text


def test_missing_file_error_names_file_and_place(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_eval("mnli", "mnli-m", tmp_path)
    text = str(err.value)
    assert "mnli/dev_matched.tsv" in text and str(tmp_path) in text and "no download URL" in text


def test_hans_plain_file_is_accepted_by_content_checksum(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "hans").mkdir()
    with gzip.open(data_dir / "hans" / "heuristics_evaluation_set.txt.gz", "rb") as f:
        (tmp_path / "hans" / "heuristics_evaluation_set.txt").write_bytes(f.read())
    assert len(load_eval("mnli", "hans-lexical-overlap", tmp_path)) == 10000


def test_recompressed_hans_ok_but_edited_hans_rejected(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "hans").mkdir()
    with gzip.open(data_dir / "hans" / "heuristics_evaluation_set.txt.gz", "rb") as f:
        content = f.read()
    target = tmp_path / "hans" / "heuristics_evaluation_set.txt.gz"
    target.write_bytes(gzip.compress(content, compresslevel=1, mtime=0))  # other gzip bytes, same content
    assert files.fetch(builtin.HANS_FILE, tmp_path) == target
    target.write_bytes(gzip.compress(content.replace(b"The doctor", b"The dentist", 1), mtime=0))
    with pytest.raises(DataError, match="decompressed content sha256"):
        files.fetch(builtin.HANS_FILE, tmp_path)


def test_checksum_results_are_memoised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "f.txt"
    p.write_text("hello")
    calls = []
    real_open = open
    monkeypatch.setattr(files, "open", lambda *a, **k: (calls.append(a[0]), real_open(*a, **k))[1], raising=False)
    df = DataFile(str(p), sha256=sha(b"hello"))
    files.verify(p, df)
    n_first = len(calls)
    files.verify(p, df)
    assert len(calls) == n_first  # no re-reading
    p.write_text("hello!")  # size (and mtime) change invalidates the memo
    with pytest.raises(DataError):
        files.verify(p, df)


def test_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, env, cwd = tmp_path / "a", tmp_path / "b", tmp_path / "proj"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    for d in (explicit, env, cwd):
        d.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv(files.DATA_DIR_ENV, raising=False)
    assert files.resolve_data_dir() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.setenv(files.DATA_DIR_ENV, str(env))
    assert files.resolve_data_dir() == env.resolve()
    assert files.resolve_data_dir(explicit) == explicit.resolve()
    with pytest.raises(DataError, match="does not exist"):
        files.resolve_data_dir(tmp_path / "nope")
    monkeypatch.delenv(files.DATA_DIR_ENV)
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    assert files.resolve_data_dir() is None


# --- malformed data -----------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("text,match", [
    ("s1\t1\t\tGood.\ns1\t1\tGood too.\n", r"line 2: expected 4 tab-separated columns, found 3"),
    ("s1\t1\t\tGood.\ns1\t2\t*\tBad label.\n", r"line 2: unknown label '2'"),
    ("s1\t1\t\tGood.\ns1\t0\t*\t  \n", r"line 2: empty sentence"),
    ("s1\t1\t\tGood.\n\ns1\t1\t\tAfter a blank.\n", r"line 2: empty line"),
])
def test_malformed_cola(tmp_path: Path, text: str, match: str) -> None:
    p = _write(tmp_path, "bad.tsv", text)
    with pytest.raises(DataError, match=match) as err:
        builtin.cola_loader("x")(p)
    assert "bad.tsv" in str(err.value)


def test_cola_file_without_trailing_newline(tmp_path: Path) -> None:
    p = _write(tmp_path, "ok.tsv", 's1\t1\t\tSay "hi".\ns2\t0\t*\tHi say.')
    exs = builtin.cola_loader("x")(p)
    assert [(e.id, e.label, e.fields["sentence"]) for e in exs] == [("x:0", 1, 'Say "hi".'), ("x:1", 0, "Hi say.")]


@pytest.mark.parametrize("text,match", [
    ("pairID\tpremise\thypothesis\tlabel\n1e\tA.\tB.\tmaybe\n", r"line 2: unknown label 'maybe'"),
    ("pairID\tpremise\thypothesis\tgold\n1e\tA.\tB.\tentailment\n", r"no field 'label' \(fields: pairID, premise, hypothesis, gold\); it is the task's label"),
    ("pairID\tpremise\thypothesis\tlabel\n1e\tA.\tB.\tentailment\n2e\tA.\tentailment\n", r"line 3: expected 4"),
    ("pairID\tpremise\thypothesis\tlabel\n1e\tA.\tB.\tentailment\n1e\tC.\tD.\tcontradiction\n", r"duplicate example id"),
])
def test_malformed_mnli(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        builtin.mnli_loader("x")(_write(tmp_path, "bad.tsv", text))


def test_mnli_binarisation(tmp_path: Path) -> None:
    text = "pairID\tpremise\thypothesis\tlabel\n1e\tA.\tB.\tentailment\n2n\tA.\tC.\tneutral\n3c\tA.\tD.\tcontradiction\n"
    exs = builtin.mnli_loader("x")(_write(tmp_path, "m.tsv", text))
    assert [(e.id, e.label) for e in exs] == [("x:1e", 0), ("x:3c", 1)]


# --- downloads ------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server over a temp dir, torn down after the test (bounded by daemon thread)."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _empty_data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    return d


def _cache_files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())


def test_download_plain_file(server, tmp_path: Path, _isolated_cache: Path) -> None:
    url, root = server
    payload = b"a\tb\n1\t2\n"
    (root / "f.tsv").write_bytes(payload)
    df = DataFile("sub/f.tsv", sha256=sha(payload), url=f"{url}/f.tsv")
    path = files.fetch(df, _empty_data_dir(tmp_path), timeout=5)
    assert path == _isolated_cache / "sub" / "f.tsv" and path.read_bytes() == payload
    assert _cache_files(_isolated_cache) == ["sub/f.tsv"]  # no temp files left behind
    (root / "f.tsv").unlink()
    assert files.fetch(df, _empty_data_dir(tmp_path), timeout=5) == path  # now served from the cache


def test_download_gzip_and_zip_members(server, tmp_path: Path, _isolated_cache: Path) -> None:
    url, root = server
    payload = b"hello world\n"
    (root / "f.gz").write_bytes(gzip.compress(payload))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("pkg/raw/x.tsv", payload)
        zf.writestr("pkg/raw/y.tsv", b"other")
    (root / "a.zip").write_bytes(buf.getvalue())
    g = files.fetch(DataFile("g.txt", sha256=sha(payload), url=f"{url}/f.gz", unpack="gzip"), None, timeout=5)
    z = files.fetch(DataFile("z.tsv", sha256=sha(payload), url=f"{url}/a.zip", unpack="zip:pkg/raw/x.tsv"), None, timeout=5)
    assert g.read_bytes() == payload and z.read_bytes() == payload
    with pytest.raises(DataError, match="no member 'pkg/raw/nope.tsv'"):
        files.fetch(DataFile("n.tsv", url=f"{url}/a.zip", unpack="zip:pkg/raw/nope.tsv"), None, timeout=5)
    with pytest.raises(DataError, match="no member 'pkg/raw/x'"):  # a prefix of a member is not that member
        files.fetch(DataFile("p.tsv", url=f"{url}/a.zip", unpack="zip:pkg/raw/x"), None, timeout=5)
    assert _cache_files(_isolated_cache) == ["g.txt", "z.tsv"]


def test_download_of_plain_file_for_gz_relpath_is_stored_plain(server, _isolated_cache: Path) -> None:
    url, root = server
    payload = b"gold_label\tx\n"
    (root / "h.txt").write_bytes(payload)
    df = DataFile("hans/h.txt.gz", sha256="0" * 64, url=f"{url}/h.txt", content_sha256=sha(payload))
    path = files.fetch(df, None, timeout=5)
    assert path == _isolated_cache / "hans" / "h.txt" and path.read_bytes() == payload


def test_download_checksum_mismatch_leaves_nothing(server, _isolated_cache: Path) -> None:
    url, root = server
    (root / "f.tsv").write_bytes(b"tampered\n")
    df = DataFile("f.tsv", sha256=sha(b"original\n"), url=f"{url}/f.tsv")
    with pytest.raises(DataError, match="corrupt or a different version") as err:
        files.fetch(df, None, timeout=5)
    assert sha(b"tampered\n") in str(err.value) and "nothing was saved" in str(err.value)
    assert _cache_files(_isolated_cache) == []


def test_download_failure_says_where_to_put_the_file(server, tmp_path: Path, _isolated_cache: Path) -> None:
    url, _ = server
    data = _empty_data_dir(tmp_path)
    df = DataFile("cola/x.tsv", sha256="0" * 64, url=f"{url}/missing.tsv")
    with pytest.raises(DataError) as err:  # HTTP 404
        files.fetch(df, data, timeout=5)
    text = str(err.value)
    assert "cola/x.tsv" in text and str(data) in text and f"{url}/missing.tsv" in text and "404" in text
    assert str(data / "cola" / "x.tsv") in text
    assert _cache_files(_isolated_cache) == [] and not (_isolated_cache / "cola").exists()  # no empty dirs either


def test_unreachable_host(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    df = DataFile("f.tsv", url=f"http://127.0.0.1:{port}/f.tsv")
    with pytest.raises(DataError, match=r"'f.tsv' is missing .* downloading it from http://127.0.0.1"):
        files.fetch(df, _empty_data_dir(tmp_path), timeout=5)


# --- custom tasks ------------------------------------------------------------------------------------

TASK_YAML = """\
name: {name}
description: tiny sentiment task
label_names: [negative, positive]
text_fields: [text]
{extra}
train: {{path: {train}}}
eval_sets:
  dev: {{path: {dev}, in_domain: true}}
patterns:
  minimal: {{template: "{{text}} ?", verbalizer: [" No", " Yes"]}}
"""


def _yaml(tmp_path: Path, name: str = "tiny", train: str = "train.csv", dev: str = "dev.csv", extra: str = "", body: str | None = None) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(body if body is not None else TASK_YAML.format(name=name, train=train, dev=dev, extra=extra))
    return p


def test_custom_task_csv(tmp_path: Path) -> None:
    _write(tmp_path, "train.csv", 'text,label\n"good, really",positive\nbad,negative\nfine,1\n')
    _write(tmp_path, "dev.csv", "text,label\nok,positive\n")
    task = load_custom_task(_yaml(tmp_path))
    train = load_train(task)
    assert [(e.id, e.fields["text"], e.label) for e in train] == [("tiny-train:0", "good, really", 1), ("tiny-train:1", "bad", 0), ("tiny-train:2", "fine", 1)]
    assert task.in_domain == ("dev",) and task.default_eval_sets == ("dev",) and task.default_pattern == "minimal"
    assert len(load_eval(task, "dev")) == 1


def test_custom_task_tsv_with_label_map_and_ids(tmp_path: Path) -> None:
    sub = tmp_path / "d"
    sub.mkdir()
    _write(sub, "train.tsv", 'id\ttext\tstars\na\tSay "great"\t5\nb\tmeh\t3\nc\tawful\t1\n')
    extra = 'label_field: stars\nlabel_map: {"5": positive, "1": negative, "3": null}\nid_field: id'
    task = load_custom_task(_yaml(tmp_path, train="d/train.tsv", dev="d/train.tsv", extra=extra))
    assert [(e.id, e.fields["text"], e.label) for e in load_train(task)] == [("tiny-train:a", 'Say "great"', 1), ("tiny-train:c", "awful", 0)]


def test_custom_task_jsonl_and_malformed_rows(tmp_path: Path) -> None:
    _write(tmp_path, "train.jsonl", '{"text": "nice", "label": 1}\n\n{"text": "bad", "label": 0}\n')
    _write(tmp_path, "dev.jsonl", '{"text": "nice", "label": 1}\n{"text": "bad", "label": 7}\n')
    task = load_custom_task(_yaml(tmp_path, train="train.jsonl", dev="dev.jsonl"))
    assert labels(load_train(task)) == {1: 1, 0: 1}
    with pytest.raises(DataError, match=r"dev.jsonl, line 2: unknown label '7'"):
        load_eval(task, "dev")
    _write(tmp_path, "dev.jsonl", '{"text": "nice", "label": 1}\n{"txt": "bad", "label": 0}\n')
    with pytest.raises(DataError, match=r"line 2: no field 'text'"):
        load_eval(task, "dev")
    _write(tmp_path, "dev.jsonl", '{"text": "nice", "label": 1}\n{"text": "bad", \n')
    with pytest.raises(DataError, match=r"line 2: invalid JSON"):
        load_eval(task, "dev")


def test_custom_csv_wrong_column_count(tmp_path: Path) -> None:
    _write(tmp_path, "train.csv", "text,label\ngood,1\nbad,0,extra\n")
    _write(tmp_path, "dev.csv", "text,label\nok,1\n")
    with pytest.raises(DataError, match=r"train.csv, line 3: expected 2 comma-separated columns, found 3"):
        load_train(load_custom_task(_yaml(tmp_path)))


def test_custom_task_sha256_is_verified(tmp_path: Path) -> None:
    _write(tmp_path, "train.csv", "text,label\ngood,1\n")
    _write(tmp_path, "dev.csv", "text,label\nok,1\n")
    body = TASK_YAML.format(name="tiny", train="train.csv", dev="dev.csv", extra="").replace(
        "train: {path: train.csv}", "train: {path: train.csv, sha256: " + "a" * 64 + "}")
    with pytest.raises(DataError, match="corrupt or a different version"):
        load_train(load_custom_task(_yaml(tmp_path, body=body)))


@pytest.mark.parametrize("extra,match", [
    ("label_feild: stars", r"(?s)unknown key 'label_feild'.*did you mean 'label_field'"),
    ("default_pattern: fancy", r"default_pattern 'fancy'"),
    ("label_map: {a: neutral}", r"label_map maps to \['neutral'\]"),
])
def test_custom_task_config_errors(tmp_path: Path, extra: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_custom_task(_yaml(tmp_path, extra=extra))


def test_custom_task_declares_report_metrics_and_breakdown(tmp_path: Path) -> None:
    body = TASK_YAML.format(name="tiny", train="t.csv", dev="d.csv", extra="group_fields: [src]\nreport_metrics: [accuracy, mcc]").replace(
        "in_domain: true", "in_domain: true, breakdown_field: src, gold_names: [bad, good]")
    task = load_custom_task(_yaml(tmp_path, body=body))
    assert task.report_metrics == ("accuracy", "mcc")
    assert task.eval_sets["dev"].breakdown_field == "src" and task.eval_sets["dev"].gold_names == ("bad", "good")
    with pytest.raises(ConfigError, match="breakdown_field 'srx' is not in group_fields"):
        load_custom_task(_yaml(tmp_path, body=body.replace("breakdown_field: src", "breakdown_field: srx")))
    with pytest.raises(ConfigError, match="gold_names needs 2 names"):
        load_custom_task(_yaml(tmp_path, body=body.replace("gold_names: [bad, good]", "gold_names: [bad]")))


def test_custom_task_nested_unknown_key_names_closest(tmp_path: Path) -> None:
    body = TASK_YAML.format(name="tiny", train="t.csv", dev="d.csv", extra="").replace("in_domain: true", "in_domian: true")
    with pytest.raises(ConfigError, match=r"(?s)unknown key 'in_domian'.*eval_sets\.dev.*did you mean 'in_domain'"):
        load_custom_task(_yaml(tmp_path, body=body))


def test_custom_task_pattern_validation(tmp_path: Path) -> None:
    good = TASK_YAML.format(name="tiny", train="t.csv", dev="d.csv", extra="")
    with pytest.raises(ConfigError, match=r"placeholders \['sentence'\] that are not text_fields"):
        load_custom_task(_yaml(tmp_path, body=good.replace("{text} ?", "{sentence} ?")))
    with pytest.raises(ConfigError, match=r"3 verbalizer words but the task has 2 labels"):
        load_custom_task(_yaml(tmp_path, body=good.replace('[" No", " Yes"]', '[" No", " Yes", " Maybe"]')))
    with pytest.raises(ConfigError, match="exactly one of 'path', 'data_path' or 'hf_dataset'"):
        load_custom_task(_yaml(tmp_path, body=good.replace("train: {path: t.csv}", "train: {sha256: null}")))


def test_custom_task_hub_dataset_needs_datasets(tmp_path: Path) -> None:
    try:
        import datasets  # noqa: F401

        pytest.skip("datasets is installed")
    except ImportError:
        pass
    body = TASK_YAML.format(name="tiny", train="t.csv", dev="d.csv", extra="").replace(
        "train: {path: t.csv}", "train: {hf_dataset: glue, hf_config: sst2, hf_split: train}")
    task = load_custom_task(_yaml(tmp_path, body=body))
    with pytest.raises(DataError, match=r"pip install datasets.*internet"):
        load_train(task)


def test_register_custom_task(tmp_path: Path) -> None:
    _write(tmp_path, "train.csv", "text,label\ngood,1\nbad,0\n")
    _write(tmp_path, "dev.csv", "text,label\nok,1\n")
    try:
        task = register_custom_task(_yaml(tmp_path, name="tiny-reg"))
        assert get_task("tiny-reg") is task and "tiny-reg" in TASKS
        register_custom_task(_yaml(tmp_path, name="tiny-reg"))  # re-registering replaces
        assert len(load_train("tiny-reg")) == 2
    finally:
        TASKS._items.pop("tiny-reg", None)
    with pytest.raises(ConfigError, match="clashes with a built-in task"):
        register_custom_task(_yaml(tmp_path, name="cola"))
    with pytest.raises(ConfigError, match="does not exist"):
        register_custom_task(tmp_path / "nope.yaml")


def test_no_files_written_to_data_dir(data_dir: Path) -> None:
    before = sorted(p.name for p in data_dir.rglob("*"))
    load_eval("cola", "cola-id", data_dir)
    assert sorted(p.name for p in data_dir.rglob("*")) == before
