"""The ``fewtune study`` and ``fewtune report`` commands (registered on the main typer app).

Kept apart from ``cli.app`` so the study machinery (store, stats, report) is imported only when
these commands run. User errors are raised as ``FewtuneError``; ``cli.main`` prints them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fewtune.atomic import ensure_writable_dir
from fewtune.cli.options import import_torch, requested_threads, set_threads, threads_option
from fewtune.errors import ConfigError, Interrupted


def check_study_dir(out: Path, config: str = "") -> None:
    """Before any work: OUT must be a study directory (to resume), empty or new, and writable.
    A study is recognised only by fewtune's own marker (``is_study_dir``); a directory holding
    anything else (the user's own report.md or study.yaml…) is refused, not overwritten. Two
    things are not the user's work to protect: a lone lock file (a study killed in its first
    instant, before its marker) and the study's own config file (``study d/study.yaml --out d``:
    the study runs there and leaves that file as it is)."""
    from fewtune.study import LOCK_NAME, is_study_dir

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory", "give --out a directory path (the file was left untouched)")
    if out.is_dir() and not is_study_dir(out):
        own = {LOCK_NAME} | ({Path(config).name} if Path(config).is_file() and Path(config).parent.resolve() == out.resolve() else set())
        found = sorted(p.name for p in out.iterdir() if p.name not in own)
        if found:
            shown = ", ".join(found[:5]) + (f", … ({len(found)} entries)" if len(found) > 5 else "")
            raise ConfigError(f"{out} is not a fewtune study directory (no study made by fewtune) but holds: {shown}",
                              "choose a new or empty --out directory; a study writes report.md, runs/, … into it")
    ensure_writable_dir(out)


def print_summary(outcome: Any, console: Console) -> None:
    """What this call did and where the study stands (``outcome``: a ``StudyOutcome``)."""
    c = outcome.counts
    console.print(f"this call: {outcome.succeeded} finished, {outcome.failed_now} failed, "
                  f"{outcome.skipped_done} already done, {outcome.skipped_failed} previously failed (skipped)"
                  + (f", {outcome.adopted} recovered from disk" if outcome.adopted else "")
                  + (f", {len(outcome.missing)} re-run because their directory was missing" if outcome.missing else "")
                  + (f", {outcome.kept} kept from other code/library versions (--keep-stale)" if outcome.kept else ""))
    console.print(f"study: {c.get('done', 0)}/{outcome.planned} done, {c.get('failed', 0)} failed, "
                  f"{c.get('pending', 0)} pending")


def study_cmd(
    config: str = typer.Argument(..., help="study YAML file, or a preset: quick, paper, paper-released"),
    out: Path = typer.Option(..., "--out", help="study directory (created; re-use it to resume)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="run failed runs again"),
    rerun_stale: bool = typer.Option(
        False, "--rerun-stale", help="run again the runs whose results come from another code/library version, task file, "
                                     "model, device, thread or process count (docs/identity.md)"),
    keep_stale: bool = typer.Option(
        False, "--keep-stale", help="keep such results instead of running them again; the report marks which code and "
                                    "library versions produced them"),
    limit: Optional[int] = typer.Option(None, "--limit", help="execute at most N runs in this call"),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="override a run parameter for all runs (train.max_steps=2) or one method (lora:params.r=8); a list sweeps"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="data seeds, e.g. 0,1,2 or 0-9 (replaces the study's)"),
    n: Optional[str] = typer.Option(None, "--n", help="n per class, e.g. 2,16 (replaces the study's)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="FEWTUNE_DATA_DIR", help="data directory"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the runs, check that each can work (tokenizer only) and exit"),
    report: bool = typer.Option(True, "--report/--no-report", help="write the report when the runs are done"),
    executor: str = typer.Option(
        "subprocess", "--executor",
        help="where runs execute: subprocess (each run in a fresh process: per-run memory figures, crashes "
             "contained), inprocess (one process; for debugging) or ray (each run a Ray task; "
             "pip install fewtune[ray])"),
    parallel: int = typer.Option(
        1, "--parallel", help="run up to N runs at once (subprocess: local processes; ray: the cluster decides "
                              "within the limit; every run computes with the study's threads, so N runs use N × threads)"),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="with --executor ray: the Ray cluster to use (e.g. ray://head:10001 or auto); "
                                    "default: start a local one"),
    pack: Optional[int] = typer.Option(
        None, "--pack", help="train up to K adapter runs (LoRA, DoRA, IA³, BitFit) of one model, task and method together on one loaded base "
                             "(same results as alone; see docs/packing.md); default: the study's pack:, else off"),
    threads: Optional[int] = threads_option(),
) -> None:
    """Run a study (a grid of runs) into OUT; re-running resumes where it stopped."""
    from fewtune.study.stale import guard_stale

    set_threads(threads)
    import_torch()  # first: expanding a study imports the methods (and torch); see import_torch
    study, planned, runs_in = plan_study(config, set_ or [], seeds, n, executor, parallel, ray_address, out, pack)
    stale = guard_stale(out, [(p.run_id, p.config.model_dump(mode="json")) for p in planned], rerun_stale=rerun_stale or dry_run,
                        keep_stale=keep_stale and not dry_run)
    if dry_run:
        return dry_run_study(planned, stale, out, data_dir, pack if pack is not None else study.pack)
    if not ray_address:  # a remote cluster's nodes, not this machine, hold the data the runs read
        check_inputs(planned, data_dir)
    check_study_dir(out, config)
    console = Console(stderr=True)
    if stale:
        console.print(f"[yellow]{escape(stale.message())}[/yellow]: "
                      + ("keeping them (--keep-stale)" if keep_stale else "running them again under the current identity"))
    console.print(f"study [bold]{escape(study.name)}[/bold] ({escape(str(study.source))}): {len(planned)} runs → {escape(str(out))}")
    outcome = execute_study(study, out, planned, runs_in, console, retry_failed=retry_failed, limit=limit, data_dir=data_dir,
                            parallel=parallel, pack=pack, rerun_stale=rerun_stale, keep_stale=keep_stale)
    print_summary(outcome, console)
    finish_study(outcome, out, report, console)


def plan_study(config: str, overrides: list[str], seeds: Optional[str], n: Optional[str], executor: str, parallel: int,
               ray_address: Optional[str], out: Path, pack: Optional[int]) -> tuple[Any, list, Any]:
    """The study (its threads fixed: ``study_threads``), its runs and the executor that will run
    them; every option checked."""
    from fewtune.study import expand, load_study, make_executor
    from fewtune.study.execute import study_threads
    from fewtune.study.executor import check_parallel
    from fewtune.study.pack import check_pack

    study = load_study(config, overrides, seeds=seeds, n=n)
    study = dataclasses.replace(study, threads=study_threads(study, out, requested_threads()))
    options = {"ray_address": ray_address} if ray_address else {}
    if study.resources and executor == "ray":  # other executors run where they are: nothing to ask for
        options["resources"] = study.resources
    runs_in = make_executor(executor, **options)
    check_parallel(runs_in, parallel)
    check_pack(pack if pack is not None else study.pack, runs_in.name)
    return study, expand(study), runs_in


def dry_run_study(planned: list, stale: Any, out: Path, data_dir: Optional[Path], pack: Optional[int] = None) -> None:
    """``--dry-run``: list the runs, how they would be packed, and check that each can work;
    nothing is written."""
    from fewtune.study.pack import pack_summary

    out_console = Console()
    for p in planned:
        out_console.print(escape(f"{p.run_id}  {p.label()}  {p.config.model}  params={p.config.params}"))
    out_console.print(f"{len(planned)} runs" + (escape(f"; in {out}: {stale.message()}") if stale else ""))
    if pack and pack > 1:
        out_console.print(escape(pack_summary(planned, pack)))
    check_feasibility(planned, data_dir, out_console)


def check_inputs(planned: list, data_dir: Optional[Path]) -> None:
    """Input errors that every run would meet — a tracker package not installed, a data file that
    fails its checksum — found once, before any run, as a usage error (exit 2), instead of as N
    identical failed runs. Each task's files are verified once (a hub split verifies itself)."""
    from fewtune.tasks import fetch, get_task
    from fewtune.tasks.custom import is_hub_split
    from fewtune.training.tracking import check_available

    check_available(sorted({name for p in planned for name in p.config.log_to or []}))
    splits = {}
    for p in planned:
        task = get_task(p.config.task)
        for split in (task.train, *(task.eval_split(name) for name in p.config.eval_sets or [])):
            splits.setdefault(split.file, split)
    for split in splits.values():
        if not is_hub_split(split):
            fetch(split.file, data_dir)


def execute_study(study: Any, out: Path, planned: list, runs_in: Any, console: Console, **options: Any) -> Any:
    """``run_study``; a Ctrl-C becomes the "interrupted, re-run to resume" exit (130)."""
    from fewtune.study import run_study

    try:
        return run_study(study, out, console=console, planned=planned, executor=runs_in, **options)
    except KeyboardInterrupt:
        raise Interrupted("finished runs are kept; re-run the same command to resume where it stopped") from None


def finish_study(outcome: Any, out: Path, report: bool, console: Console) -> None:
    """Write the report when a run finished; exit 1 when runs failed, pointing to where they are
    listed (the report's section only when a report was written)."""
    c = outcome.counts
    wrote = False
    if report and c.get("done", 0):
        from fewtune.report import write_report

        paths = write_report(out)
        wrote = True
        Console().print(f"report: [bold]{escape(str(paths.markdown))}[/bold] and [bold]{escape(str(paths.html))}[/bold]")
    if c.get("failed", 0):
        where = "see the report's 'Failed runs' section" if wrote else "the errors are listed above"
        console.print(f"[yellow]some runs failed[/yellow]; {where}, fix the cause and re-run with --retry-failed")
        raise typer.Exit(1)


def check_feasibility(planned: list, data_dir: Optional[Path], console: Console) -> None:
    """Tokenizer-only checks of every run; infeasible runs are a usage error (exit 2)."""
    from fewtune.run.feasibility import check_study, report_lines

    result = check_study(planned, data_dir)
    for line in report_lines(result):
        console.print(escape(line), soft_wrap=True)
    if not result.ok:
        n = len({x.run_id for x in result.errors})
        raise ConfigError(f"{n} of {len(planned)} runs cannot work as configured (listed above)",
                          "apply the fixes listed, or drop those runs from the study")


def report_cmd(
    study_dir: Path = typer.Argument(..., metavar="DIR", help="a study directory (fewtune study --out DIR)"),
    margin: float | None = typer.Option(None, "--margin", help="replace the margin of every non-inferiority/equivalence claim (default: each claim's own)"),
) -> None:
    """Write report.md, report.html, plots and CSV exports into DIR."""
    from fewtune.report import write_report

    paths = write_report(study_dir, margin=margin)
    Console().print(f"report: [bold]{escape(str(paths.markdown))}[/bold] and [bold]{escape(str(paths.html))}[/bold]; "
                    f"CSV in {escape(str(paths.csv_dir))}, plots in {escape(str(paths.figures_dir))}")


def register(app: typer.Typer) -> None:
    """Add ``study`` and ``report`` to ``app``."""
    app.command("study")(study_cmd)
    app.command("report")(report_cmd)
