"""Studies: a grid of runs expanded from one YAML file (``config``, ``expand``), executed where an
executor decides (``executors``), recorded durably in ``study.db`` (``store``) by the driver
(``execute``), resumable after any crash.

The public API is re-exported here: ``from fewtune.study import load_study, expand, run_study``.
"""

from __future__ import annotations

from fewtune.study.config import MAX_RUNS, PRESETS, StudyConfig, load_study, parse_int_list, parse_override, parse_study, preset_names
from fewtune.study.execute import LOCK_NAME, MARKER_NAME, STUDY_FILE, StudyOutcome, is_study_dir, run_study, study_lock
from fewtune.study.executor import Executor, RunOutcome
from fewtune.study.executors import EXECUTORS, InProcessExecutor, SubprocessExecutor, make_executor
from fewtune.study.expand import PlannedRun, count_runs, expand
from fewtune.study.store import DB_NAME, RUNS_DIR, RunRecord, Store

__all__ = [
    "DB_NAME", "EXECUTORS", "LOCK_NAME", "MARKER_NAME", "MAX_RUNS", "PRESETS", "RUNS_DIR", "STUDY_FILE",
    "Executor", "InProcessExecutor", "PlannedRun", "RunOutcome", "RunRecord", "Store", "StudyConfig", "StudyOutcome",
    "SubprocessExecutor", "count_runs", "expand", "is_study_dir", "load_study", "make_executor", "parse_int_list", "parse_override",
    "parse_study", "preset_names", "run_study", "study_lock",
]
