"""The built-in tasks: CoLA (with CoLA-OOD) and binary MNLI (with HANS).

Data files are described by their path in the data directory and their sha256 (from the data
README). Download URLs, where given, are the official locations; this module was written on a
machine without internet, so the URLs could not be tried. The checksums protect against a URL
that now serves different bytes: such a download is rejected with a clear error, never used.

- CoLA release zip ``cola_public_1.1.zip``: layout ``cola_public/raw/*.tsv`` is as documented by
  the CoLA README and widely used code; the member checksums are assumed to equal the files here.
- GLUE ``CoLA.zip`` member ``CoLA/dev.tsv``: header-less 4-column TSV like the raw release, so the
  format matches; that its bytes equal ``glue_validation.tsv`` is unverified.
- MNLI files here are TSV extracts (TaxiNLI subsets, HF validation_matched) that no official
  archive contains byte-for-byte, so they have no URL and must be present locally.
- HANS: the GitHub raw URL serves the plain ``.txt``; it is verified by its content sha256 and
  stored uncompressed (see ``files``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import DataError
from ..prompts import Pattern
from .base import TASKS, DataFile, Example, Split, Task
from .files import column_index, read_tsv

COLA_ZIP = "https://nyu-mll.github.io/CoLA/cola_public_1.1.zip"
GLUE_COLA_ZIP = "https://dl.fbaipublicfiles.com/glue/data/CoLA.zip"
HANS_URL = "https://raw.githubusercontent.com/tommccoy1/hans/master/heuristics_evaluation_set.txt"

RELEASED_SOURCE = "released code (Srinivasan et al. 2024)"


def _nonempty(value: str, name: str, line: int, column: str) -> str:
    text = value.strip()
    if not text:
        raise DataError(f"{name}, line {line}: empty {column}", "the file is malformed; restore the original file")
    return text


def _unknown_label(name: str, line: int, value: str, valid: list[str]) -> DataError:
    return DataError(
        f"{name}, line {line}: unknown label {value!r} (expected one of {', '.join(map(repr, valid))})",
        "the file is malformed or not the expected data set; restore the original file",
    )


def _check_unique(examples: list[Example], name: str) -> list[Example]:
    """Ids key few-shot manifests and predictions, so a duplicate is a data error."""
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise DataError(f"{name}: duplicate example id '{ex.id}'", "the file has repeated rows or ids; restore the original file")
        seen.add(ex.id)
    return examples


# --- CoLA -------------------------------------------------------------------------------------


def cola_loader(split: str) -> Callable[[Path], list[Example]]:
    """Loader for a header-less CoLA TSV (source_code, label, original_notation, sentence).

    Ids are ``<split>:<0-based row index>``: the files have no ids of their own, and row order is
    fixed by the checksum, so the index is stable.
    """

    def load(path: Path) -> list[Example]:
        name = str(path)
        _, rows = read_tsv(path, header=False, ncols=4)
        out: list[Example] = []
        for idx, (line, (source, label, _notation, sentence)) in enumerate(rows):
            if label not in ("0", "1"):
                raise _unknown_label(name, line, label, ["0", "1"])
            text = _nonempty(sentence, name, line, "sentence")
            out.append(Example(id=f"{split}:{idx}", fields={"sentence": text}, label=int(label), groups={"source": source}))
        return out

    return load


def _cola_file(name: str, sha256: str) -> DataFile:
    return DataFile(f"cola/{name}", sha256=sha256, url=COLA_ZIP, unpack=f"zip:cola_public/raw/{name}")


COLA_PATTERNS = {
    "minimal": Pattern("minimal", "{sentence} ?", "", (" No", " Yes")),
    "gpt-3": Pattern(
        "gpt-3", "{sentence} question: Is this sentence grammatical? Yes or No?", " answer:", (" No", " Yes"),
        source="fewtune (llmft has only minimal for CoLA)",
    ),
    "eval-harness": Pattern(
        "eval-harness", "{sentence}\nQuestion: Does this sentence make sense? True or False?", "\nAnswer:", (" False", " True"),
        source="fewtune (llmft has only minimal for CoLA)",
    ),
    "released": Pattern("released", "Yes or No?{sentence}", "", (" No", " Yes"), source=RELEASED_SOURCE),
}

COLA = Task(
    name="cola",
    description="CoLA (Warstadt et al. 2019): is an English sentence grammatically acceptable? "
    "Labels 0 unacceptable, 1 acceptable. In-domain dev vs. out-of-domain dev (6 held-out sources).",
    label_names=("unacceptable", "acceptable"),
    text_fields=("sentence",),
    train=Split(
        "cola-train",
        _cola_file("in_domain_train.tsv", "f320a10f92d3bce6b29152fde322a362eac39238e50d8de0c8815457fdf4fc12"),
        cola_loader("cola-train"),
        description="CoLA in-domain train (8,551 sentences, 70.4% acceptable)",
        group_fields=("source",),
    ),
    eval_sets={
        "cola-id": Split(
            "cola-id",
            _cola_file("in_domain_dev.tsv", "77176f6a03faa5a1c4f23c69971fc1bff565931112fb65af47b2d6e24b7f42f7"),
            cola_loader("cola-id"),
            description="CoLA v1.1 in-domain dev (527 sentences, 69.3% acceptable)",
            group_fields=("source",),
        ),
        "cola-ood": Split(
            "cola-ood",
            _cola_file("out_of_domain_dev.tsv", "201b9c57b2a20f1282242eec0ed8995729e3be19c29a46c047b3727338836c05"),
            cola_loader("cola-ood"),
            description="CoLA v1.1 out-of-domain dev (516 sentences from 6 sources unseen in train, 68.6% acceptable)",
            group_fields=("source",),
        ),
        "cola-glue-dev": Split(
            "cola-glue-dev",
            DataFile(
                "cola/glue_validation.tsv",
                sha256="8c013e21dc39957cac37378d87bebe225b694a0d5fe13eded66c2856628833fd",
                url=GLUE_COLA_ZIP,  # unverified: see module docstring
                unpack="zip:CoLA/dev.tsv",
            ),
            cola_loader("cola-glue-dev"),
            description="GLUE CoLA validation (1,043 = CoLA v1.0 in-domain dev + out-of-domain dev, 69.1% acceptable)",
            group_fields=("source",),
            warning="cola-glue-dev contains the 516 out-of-domain sentences of cola-ood; earlier studies used it "
            "as the in-domain set, so their ID and OOD scores overlap. Use cola-id for a clean in-domain score.",
        ),
    },
    patterns=COLA_PATTERNS,
    default_pattern="minimal",
    default_eval_sets=("cola-id", "cola-ood"),
    report_metrics=("accuracy", "mcc"),  # MCC is CoLA's official GLUE metric
    in_domain=("cola-id", "cola-glue-dev"),
    icl_separator=" ",  # llmft joins CoLA demonstrations with a space
    instruction="Is the following sentence grammatically acceptable in English? Answer Yes or No.",
    notes=(
        "cola-glue-dev (the GLUE validation split) includes every cola-ood sentence; it is kept only to "
        "compare with earlier studies.",
    ),
)


# --- MNLI (binary) and HANS ------------------------------------------------------------------

MNLI_LABELS = {"entailment": 0, "contradiction": 1, "neutral": None}  # None: dropped (binary task)
HANS_LABELS = {"entailment": 0, "non-entailment": 1}


def mnli_loader(split: str) -> Callable[[Path], list[Example]]:
    """Loader for an MNLI TSV with a header (premise, hypothesis, label; optional pairID, genre).

    Neutral pairs are dropped (the binary task of the HANS studies). Ids are
    ``<split>:<pairID>`` (the official MNLI pair id) or ``<split>:<row index>`` without one.
    """

    def load(path: Path) -> list[Example]:
        name = str(path)
        header, rows = read_tsv(path, header=True)
        assert header is not None
        ip, ih, il = (column_index(header, c, name) for c in ("premise", "hypothesis", "label"))
        iid = header.index("pairID") if "pairID" in header else None
        igenre = header.index("genre") if "genre" in header else None
        out: list[Example] = []
        for idx, (line, cols) in enumerate(rows):
            raw = cols[il].strip()
            if raw not in MNLI_LABELS:
                raise _unknown_label(name, line, raw, list(MNLI_LABELS))
            label = MNLI_LABELS[raw]
            if label is None:
                continue
            fields = {"premise": _nonempty(cols[ip], name, line, "premise"), "hypothesis": _nonempty(cols[ih], name, line, "hypothesis")}
            groups = {"genre": cols[igenre]} if igenre is not None else {}
            ex_id = f"{split}:{cols[iid] if iid is not None else idx}"
            out.append(Example(id=ex_id, fields=fields, label=label, groups=groups))
        return _check_unique(out, name)

    return load


def hans_loader(split: str, heuristic: str | None = None) -> Callable[[Path], list[Example]]:
    """Loader for HANS (``heuristics_evaluation_set.txt``, plain or gzipped).

    sentence1/sentence2 become ``premise``/``hypothesis`` so MNLI's patterns apply unchanged;
    gold entailment → 0, non-entailment → 1. ``heuristic`` keeps one heuristic only (llmft
    evaluates ``lexical_overlap``). Ids are ``<split>:<pairID>`` (ex0 … ex29999).
    """

    def load(path: Path) -> list[Example]:
        name = str(path)
        header, rows = read_tsv(path, header=True)
        assert header is not None
        cols_needed = ("gold_label", "sentence1", "sentence2", "pairID", "heuristic", "subcase", "template")
        ig, i1, i2, iid, ih, isub, itpl = (column_index(header, c, name) for c in cols_needed)
        out: list[Example] = []
        for line, cols in rows:
            raw = cols[ig].strip()
            if raw not in HANS_LABELS:
                raise _unknown_label(name, line, raw, list(HANS_LABELS))
            if heuristic is not None and cols[ih] != heuristic:
                continue
            out.append(Example(
                id=f"{split}:{cols[iid]}",
                fields={"premise": _nonempty(cols[i1], name, line, "sentence1"), "hypothesis": _nonempty(cols[i2], name, line, "sentence2")},
                label=HANS_LABELS[raw],
                groups={"heuristic": cols[ih], "subcase": cols[isub], "template": cols[itpl]},
            ))
        return _check_unique(out, name)

    return load


HANS_FILE = DataFile(
    "hans/heuristics_evaluation_set.txt.gz",
    sha256="31d43828a11694fd27dc01c85cf2548de186686dd250633cf7dd613c9da5bdfe",
    url=HANS_URL,
    content_sha256="c55b62feef9913070e88f38938dc2492018c945ac81f70139346472494124e79",
)

_HANS_LABEL_NOTE = "Label 1 means non-entailment on HANS (contradiction on MNLI); label_names are the task's."

MNLI_PATTERNS = {
    "minimal": Pattern("minimal", "{premise} {hypothesis} ?", "", (" Yes", " No")),
    "gpt-3": Pattern("gpt-3", "{premise} question: {hypothesis} Yes or No?", " answer:", (" Yes", " No")),
    "eval-harness": Pattern("eval-harness", "{premise} \nQuestion: {hypothesis} True or False?", "\nAnswer:", (" True", " False")),
    "released": Pattern("released", "{premise} Question: {hypothesis} Yes or No?", "", (" Yes", " No"), source=RELEASED_SOURCE),
}

MNLI = Task(
    name="mnli",
    description="Binary MNLI (Williams et al. 2018) as in the HANS studies: neutral pairs dropped, "
    "0 entailment, 1 contradiction. Out-of-domain: HANS (McCoy et al. 2019), where 1 is non-entailment.",
    label_names=("entailment", "contradiction"),
    text_fields=("premise", "hypothesis"),
    train=Split(
        "mnli-train",
        DataFile("mnli/train_subset.tsv", sha256="359b0637c647e1150ca452eefccb7126b36d170bced0cf4cda6ebca5146de4e4"),
        mnli_loader("mnli-train"),
        description="MNLI train pairs of the TaxiNLI subset (2,197 rows, 1,198 after dropping neutral)",
        group_fields=("genre",),
    ),
    eval_sets={
        "mnli-m": Split(
            "mnli-m",
            DataFile("mnli/dev_matched.tsv", sha256="415912bc2437ed72644aa212c3a3813c4bb4fa3786c92d82f0abdef2cf27dc52"),
            mnli_loader("mnli-m"),
            description="MNLI validation_matched, binary (6,692 of 9,815 pairs; 52.0% entailment)",
        ),
        "mnli-mm": Split(
            "mnli-mm",
            DataFile("mnli/dev_mismatched_subset.tsv", sha256="1b890ffe1eb33f71bcd0fab92c94f040a10fe804e1ceee50e74e4987d15569b4"),
            mnli_loader("mnli-mm"),
            description="A 40% subset (the TaxiNLI rows) of MNLI validation_mismatched, binary (2,810 of 3,908 pairs); "
            "genres unseen in train",
            group_fields=("genre",),
        ),
        "hans": Split(
            "hans",
            HANS_FILE,
            hans_loader("hans"),
            description="HANS, all three heuristics (30,000 pairs, half entailment). " + _HANS_LABEL_NOTE,
            group_fields=("heuristic", "subcase"),
            breakdown_field="heuristic",
            gold_names=("entailment", "non-entailment"),
        ),
        "hans-lexical-overlap": Split(
            "hans-lexical-overlap",
            HANS_FILE,
            hans_loader("hans-lexical-overlap", heuristic="lexical_overlap"),
            description="HANS lexical_overlap heuristic only (10,000 pairs; the subset llmft evaluates). " + _HANS_LABEL_NOTE,
            group_fields=("heuristic", "subcase"),
            breakdown_field="heuristic",
            gold_names=("entailment", "non-entailment"),
        ),
    },
    patterns=MNLI_PATTERNS,
    default_pattern="minimal",
    default_eval_sets=("mnli-m", "hans"),
    in_domain=("mnli-m",),  # mnli-mm has genres absent from train, so it is not in-domain
    icl_separator="\n\n",
    instruction="Given the premise, does the hypothesis necessarily hold? Answer Yes or No.",
    notes=(
        "The train pool is the TaxiNLI subset of MNLI train (1,198 binary pairs), not a random sample of "
        "train: enough for balanced few-shot samples of up to 128 per class, not for full-data training.",
        "mnli-mm is a 40% subset of validation_mismatched (the TaxiNLI rows).",
    ),
)

for _task in (COLA, MNLI):
    if _task.name not in TASKS:
        TASKS.add(_task.name, _task)
