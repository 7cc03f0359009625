"""The ``fewtune`` command line (typer).

Exit codes: 0 done; 1 runs failed or the output could not be written; 2 usage or input error
(a message and a hint, never a traceback); 130 interrupted (Ctrl-C). Everything printed through
Rich that comes from the user or from a message is escaped: ``[v2]`` in a path is text, not markup.
"""

from __future__ import annotations

import errno
import gc
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fewtune.cli.options import import_torch, set_threads, threads_option
from fewtune.config import RunConfig, validate
from fewtune.errors import FewtuneError, Interrupted
from fewtune.overrides import load_yaml_file, run_data

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fewtune: few-shot adaptation of language models, compared on equal footing.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _global_options(threads: Optional[int] = threads_option()) -> None:
    """fewtune: few-shot adaptation of language models, compared on equal footing."""
    set_threads(threads)


@app.command()
def run(
    task: Optional[str] = typer.Option(None, help="task name (see `fewtune tasks`)"),
    method: Optional[str] = typer.Option(None, help="method name (see `fewtune methods`)"),
    n: Optional[int] = typer.Option(None, "--n", help="few-shot examples per class"),
    seed: Optional[int] = typer.Option(None, help="data seed (which few-shot sample)"),
    model: Optional[str] = typer.Option(None, help="'embedded' (default, = smollm2-135m), 'gemma3-270m' (see `fewtune models`), "
                                         "'tiny-random[:family]' (llama, opt, gpt2, gpt_neox, qwen2, gemma3, phi, gemma2), HF id or local path"),
    pattern: Optional[str] = typer.Option(None, help="prompt pattern (task default: minimal)"),
    eval_limit: Optional[int] = typer.Option(None, help="stratified, seeded subsample of each eval set"),
    eval_sets: Optional[str] = typer.Option(None, help="comma-separated eval sets (task default)"),
    precision: Optional[str] = typer.Option(None, help="auto | bf16 | fp16 | fp32"),
    log_to: Optional[str] = typer.Option(None, "--log-to", help="experiment trackers, comma-separated: tensorboard,mlflow,wandb"),
    config: Optional[Path] = typer.Option(None, help="YAML run config; flags override it"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override any key: train.lr=1e-4, params.k=8"),
    out: Path = typer.Option(..., help="output directory (new, empty, or holding this same run)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a run with another config in OUT"),
    data_dir: Optional[Path] = typer.Option(None, envvar="FEWTUNE_DATA_DIR", help="data directory"),
    threads: Optional[int] = threads_option(),
) -> None:
    """Run one experiment and write config.yaml, sample.json, metrics.json, predictions.jsonl to OUT.

    If OUT already holds this run (same config), finished, nothing is run again."""
    set_threads(threads)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    data = load_yaml_file(config, "run config") if config else {}
    flags = {"task": task, "method": method, "n": n, "seed": seed, "model": model, "pattern": pattern,
             "eval_limit": eval_limit, "precision": precision,
             "eval_sets": eval_sets.split(",") if eval_sets else None,
             "log_to": [x.strip() for x in log_to.split(",") if x.strip()] if log_to else None}
    try:
        import_torch()  # before run_data, whose method-scope check imports the methods (and torch)
        cfg = validate(RunConfig, run_data(data, flags, set_ or []), where="run config")
        from fewtune.run.runner import run_experiment

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True) as progress:
            result = run_experiment(cfg, out, data_dir=data_dir, progress=progress, overwrite=overwrite)
    except KeyboardInterrupt:
        raise Interrupted(f"nothing was written: {out} is as it was") from None
    if not result.main_process:  # another process of a data-parallel launch: process 0 reports
        return
    if result.reused:
        err_console.print(f"already done: {escape(str(out))} holds this run (same config); "
                          "showing its results (--overwrite runs it again)")
    print_summary(result.metrics)
    console.print(f"results in [bold]{escape(str(out))}[/bold]")


def print_summary(metrics: dict) -> None:
    r = metrics["resources"]
    from fewtune.methods import METHODS

    uses_sample = METHODS.get(metrics["method"]).uses_sample  # zero-shot reads no sample: its n is n/a
    n, seed = (f"n={metrics['n']}", f"seed={metrics['seed']}") if uses_sample else ("n n/a", "no sample")
    table = Table(title=escape(f"{metrics['method']} · {metrics['task']} · {n} · {seed} · {metrics['model_name']}"))
    for col in ("eval set", "domain", "n", "accuracy", "MCC", "majority", "skipped", "outside verb."):
        table.add_column(col, justify="right" if col not in ("eval set", "domain") else "left")
    for name, m in metrics["eval"].items():
        fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
        table.add_row(escape(name), m["domain"], str(m["n"]), fmt(m["accuracy"]), fmt(m["mcc"]), fmt(m["majority_baseline"]),
                      str(m["n_skipped"]), fmt(m.get("frac_outside_verbalizer")))
    console.print(table)
    console.print(f"peak memory {r['peak_memory_mb']:.0f} MB ({r['memory_kind']}), trainable params {r['trainable_params']:,}"
                  f" / {r['total_params']:,}, train {r['train_seconds']:.1f} s, eval {r['eval_seconds']:.1f} s, precision {r['precision']}")
    for w in metrics.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {escape(str(w))}")


@app.command()
def tasks(
    data_dir: Optional[Path] = typer.Option(None, envvar="FEWTUNE_DATA_DIR"),
    show: Optional[str] = typer.Option(None, "--show", metavar="TASK",
                                       help="print a task's YAML (a built-in name or a task file), a template to copy"),
) -> None:
    """List tasks, their eval sets and patterns; or print one task's YAML with --show."""
    from fewtune.tasks import TASKS, get_task

    if show is not None:
        source = get_task(show).source_file
        if source is None:  # a task registered from Python, not from a file
            raise FewtuneError(f"task '{show}' is not defined by a YAML file", "only YAML tasks can be shown")
        sys.stdout.write(Path(source).read_text(encoding="utf-8"))  # plain text: a file to redirect, no markup
        return
    table = Table(title="tasks")
    for col in ("task", "labels", "eval sets (default marked *)", "patterns", "notes"):
        table.add_column(col)
    for name in TASKS.names():
        t = TASKS.get(name)
        sets = ", ".join(f"{s}{'*' if s in t.default_eval_sets else ''}{' (ID)' if s in t.in_domain else ''}" for s in t.eval_sets)
        table.add_row(*(escape(x) for x in (name, " / ".join(t.label_names), sets, ", ".join(t.patterns), " ".join(t.notes))))
    console.print(table)
    console.print("Copy a task as a template for your own: fewtune tasks --show cola > my_task.yaml")


@app.command()
def methods() -> None:
    """List methods and their parameters."""
    from fewtune.methods import METHODS

    table = Table(title="methods")
    for col in ("method", "what it does", "parameters (default)"):
        table.add_column(col)
    for name in METHODS.names():
        cls = METHODS.get(name)
        params = ", ".join(f"{k}={f.default!r}" for k, f in cls.Params.model_fields.items())
        table.add_row(escape(name), escape(cls.summary), escape(params or "–"))
    console.print(table)


def _register_optional_commands() -> None:
    from fewtune.cli import export as cli_results
    from fewtune.cli import models as cli_models

    cli_models.register(app)
    cli_results.register(app)
    try:
        from fewtune.cli import study as cli_study
    except ImportError:
        return
    cli_study.register(app)


_register_optional_commands()


def _usage_errors() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, exits, aborts) as typer really raises them: typer ≥ 0.20 raises its own
    vendored copy of click's exceptions, older typer raises click's; accept both."""
    usage, exits, aborts = [typer.TyperException] if hasattr(typer, "TyperException") else [], [typer.Exit], [typer.Abort]
    try:
        import click
    except ImportError:
        pass
    else:
        usage.append(click.ClickException)
        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
    return tuple(usage), tuple(exits), tuple(aborts)


def _print_error(message: str, hint: str | None = None) -> None:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}")
    if hint:
        err_console.print(f"[dim]hint:[/dim] {escape(hint)}")


def _os_error_hint(e: OSError) -> str | None:
    """A hint only where the error says what to check: space, or permissions. Any other OSError
    (a connection refused, a path that is a directory…) is shown as it is, not blamed on the disk."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space at the output location, or choose another one"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "check the permissions of the output location, or choose another one"
    return None


def _interrupted(hint: str | None = None) -> int:
    err_console.print("[bold]interrupted[/bold]" + (f": {escape(hint)}" if hint else ""))
    return 130


def run_cli(argv: list[str] | None = None) -> int:
    """Run the app; return its exit code (see the module docstring), printing errors, not tracebacks."""
    usage_errors, exits, aborts = _usage_errors()
    try:
        code = app(args=argv, prog_name="fewtune", standalone_mode=False)
    except FewtuneError as e:
        _print_error(e.message, e.hint)
        return getattr(e, "exit_code", 2)
    except Interrupted as e:
        return _interrupted(e.hint)
    except KeyboardInterrupt:
        return _interrupted()
    except OSError as e:  # an I/O failure no command turned into an OutputError
        _print_error(str(e), _os_error_hint(e))
        return 1
    except usage_errors as e:
        if hasattr(e, "show"):
            e.show()
        else:
            _print_error(str(e))
        return getattr(e, "exit_code", 2)
    except exits as e:
        code = e.exit_code
    except aborts:
        err_console.print("Aborted!")
        return 1
    if code == 130:  # typer turns a Ctrl-C outside our own handlers into Exit(130)
        return _interrupted()
    return code if isinstance(code, int) else 0


def main() -> None:
    """Entry point (``fewtune``)."""
    code = run_cli()
    # The interpreter's last garbage collection walks every object torch and Ray left (seconds on
    # a busy machine, after the work and its files are done): nothing left to free matters now.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    main()
