"""The built-in tasks: CoLA (with CoLA-OOD) and binary MNLI (with HANS), as YAML files.

Each task is a ``<name>.yaml`` next to this module, loaded by the same loader as a custom task
(``custom.load_task_file``): one task format, so a built-in task is also a template to copy
(``fewtune tasks --show cola``). What YAML cannot say — fetching and verifying the checksummed
official downloads — lives in ``files``.

Download URLs are the official locations; they were written on a machine without internet, so
they could not be tried. The checksums protect against a URL that now serves different bytes:
such a download is rejected with a clear error, never used.

- CoLA release zip ``cola_public_1.1.zip``: layout ``cola_public/raw/*.tsv`` as documented by the
  CoLA README; the member checksums are assumed to equal the files here.
- GLUE ``CoLA.zip`` member ``CoLA/dev.tsv``: header-less 4-column TSV like the raw release; that
  its bytes equal ``glue_validation.tsv`` is unverified.
- MNLI files here are TSV extracts (TaxiNLI subsets, HF validation_matched) that no official
  archive contains byte-for-byte, so they have no URL and must be present locally.
- HANS: the GitHub raw URL serves the plain ``.txt``; it is verified by its content sha256 and
  stored uncompressed (see ``files``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from fewtune.tasks.base import TASKS, DataFile, Example, Task
from fewtune.tasks.custom import load_task_file

BUILTIN_DIR = Path(__file__).resolve().parent
NAMES = ("cola", "mnli")


def builtin_file(name: str) -> Path:
    """The YAML file that defines the built-in task ``name``."""
    return BUILTIN_DIR / f"{name}.yaml"


def _loader(task: str, split: str) -> Callable[[Path], list[Example]]:
    """The loader the built-in ``task`` uses for ``split`` ("train" or an eval set)."""
    t = TASKS.get(task)
    return (t.train if split == "train" else t.eval_split(split)).loader


def _renamed(load: Callable[[Path], list[Example]], split: str) -> Callable[[Path], list[Example]]:
    return lambda path: [dataclasses.replace(e, id=f"{split}:{e.id.split(':', 1)[1]}") for e in load(path)]


def cola_loader(split: str) -> Callable[[Path], list[Example]]:
    """CoLA's header-less TSV (source, label, notation, sentence), ids ``<split>:<row index>``:
    exactly the loader of the task's YAML (for checks of malformed files)."""
    return _renamed(_loader("cola", "train"), split)


def mnli_loader(split: str) -> Callable[[Path], list[Example]]:
    """MNLI's TSV with a header (pairID, premise, hypothesis, label), neutral pairs dropped
    (the loader of mnli-m, whose file has no genre column)."""
    return _renamed(_loader("mnli", "mnli-m"), split)


for _name in NAMES:
    if _name not in TASKS:
        TASKS.add(_name, load_task_file(builtin_file(_name)))

MNLI: Task = TASKS.get("mnli")
COLA: Task = TASKS.get("cola")
HANS_FILE: DataFile = MNLI.eval_sets["hans"].file
