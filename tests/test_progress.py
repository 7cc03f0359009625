"""The study's progress display: counts, an ETA from the runs finished, the running runs' names."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fewtune.study import progress as progress_mod
from fewtune.study.progress import StudyProgress


def _shown(board: StudyProgress) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(board.progress.get_renderable())
    return out.getvalue()


def test_counts_eta_and_running_names(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "time", lambda: clock[0])
    board = StudyProgress("demo", 4, Console(file=io.StringIO()), enabled=True)
    board.adopted()  # found finished on disk: counted done, but says nothing about run times
    board.started("a", "icl · cola · n=2 · seed=0")
    board.started("b", "vanilla · cola · n=2 · seed=0")
    assert board.counts_text() == "1/4 · done 1 · running 2 · failed 0 · ETA –"
    shown = _shown(board)
    assert "icl · cola · n=2 · seed=0" in shown and "vanilla · cola · n=2 · seed=0" in shown

    clock[0] = 130.0  # 30 s after the first run started, one run finished: 30 s per run, 2 left
    board.finished("a", ok=True)
    assert board.counts_text() == "2/4 · done 2 · running 1 · failed 0 · ETA 0:01:00"
    clock[0] = 140.0  # 40 s, two runs finished: 20 s per run, 1 left
    board.finished("b", ok=False)
    assert board.counts_text() == "3/4 · done 2 · running 0 · failed 1 · ETA 0:00:20"
    shown = _shown(board)
    assert "vanilla · cola" not in shown and "done 2 · running 0 · failed 1" in shown
