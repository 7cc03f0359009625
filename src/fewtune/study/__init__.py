"""Studies: a grid of runs expanded from one YAML file, executed with progress, stored durably and
resumable after any crash. The public API is re-exported here."""

from .config import (  # noqa: F401
    LOCK_NAME, MAX_RUNS, PRESETS, STUDY_FILE, PlannedRun, StudyConfig, StudyOutcome, count_runs, expand, load_study,
    parse_int_list, parse_override, parse_study, preset_names, run_study, study_lock,
)
