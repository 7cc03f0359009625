"""The ``fewtune`` command line (typer). User errors print a message and a hint, exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from .config import RunConfig, validate
from .errors import ConfigError, FewtuneError
from .overrides import load_yaml_file, run_data

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fewtune: few-shot adaptation of language models, compared on equal footing.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _global_options(
    threads: Optional[int] = typer.Option(
        None, "--threads", envvar="FEWTUNE_THREADS", min=1,
        help="torch CPU threads (default: one per core; on a machine shared with other jobs, 1 avoids "
             "OpenMP threads waiting on each other, which was up to 10× slower here)"),
) -> None:
    """fewtune: few-shot adaptation of language models, compared on equal footing."""
    if threads:
        import torch

        torch.set_num_threads(threads)


@app.command()
def run(
    task: Optional[str] = typer.Option(None, help="task name (see `fewtune tasks`)"),
    method: Optional[str] = typer.Option(None, help="method name (see `fewtune methods`)"),
    n: Optional[int] = typer.Option(None, "--n", help="few-shot examples per class"),
    seed: Optional[int] = typer.Option(None, help="data seed (which few-shot sample)"),
    model: Optional[str] = typer.Option(None, help="'embedded' (default), 'tiny-random', HF id or local path"),
    pattern: Optional[str] = typer.Option(None, help="prompt pattern (task default: minimal)"),
    eval_limit: Optional[int] = typer.Option(None, help="stratified, seeded subsample of each eval set"),
    eval_sets: Optional[str] = typer.Option(None, help="comma-separated eval sets (task default)"),
    precision: Optional[str] = typer.Option(None, help="auto | bf16 | fp32"),
    config: Optional[Path] = typer.Option(None, help="YAML run config; flags override it"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override any key: train.lr=1e-4, params.k=8"),
    out: Path = typer.Option(..., help="output directory (must not hold another kind of content)"),
    data_dir: Optional[Path] = typer.Option(None, envvar="FEWTUNE_DATA_DIR", help="data directory"),
) -> None:
    """Run one experiment and write config.yaml, sample.json, metrics.json, predictions.jsonl to OUT."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .runner import run_experiment

    data = load_yaml_file(config, "run config") if config else {}
    flags = {"task": task, "method": method, "n": n, "seed": seed, "model": model, "pattern": pattern,
             "eval_limit": eval_limit, "precision": precision,
             "eval_sets": eval_sets.split(",") if eval_sets else None}
    data = run_data(data, flags, set_ or [])
    cfg = validate(RunConfig, data, where="run config")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True) as progress:
        result = run_experiment(cfg, out, data_dir=data_dir, progress=progress)
    print_summary(result.metrics)
    console.print(f"results in [bold]{out}[/bold]")


def print_summary(metrics: dict) -> None:
    r = metrics["resources"]
    table = Table(title=f"{metrics['method']} · {metrics['task']} · n={metrics['n']} · seed={metrics['seed']} · {metrics['model_name']}")
    for col in ("eval set", "domain", "n", "accuracy", "MCC", "majority", "skipped", "outside verb."):
        table.add_column(col, justify="right" if col not in ("eval set", "domain") else "left")
    for name, m in metrics["eval"].items():
        fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
        table.add_row(name, m["domain"], str(m["n"]), fmt(m["accuracy"]), fmt(m["mcc"]), fmt(m["majority_baseline"]),
                      str(m["n_skipped"]), fmt(m.get("frac_outside_verbalizer")))
    console.print(table)
    console.print(f"peak memory {r['peak_memory_mb']:.0f} MB ({r['memory_kind']}), trainable params {r['trainable_params']:,}"
                  f" / {r['total_params']:,}, train {r['train_seconds']:.1f} s, eval {r['eval_seconds']:.1f} s, precision {r['precision']}")
    for w in metrics.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")


@app.command()
def tasks(data_dir: Optional[Path] = typer.Option(None, envvar="FEWTUNE_DATA_DIR")) -> None:
    """List tasks, their eval sets and patterns."""
    from .tasks import TASKS

    table = Table(title="tasks")
    for col in ("task", "labels", "eval sets (default marked *)", "patterns", "notes"):
        table.add_column(col)
    for name in TASKS.names():
        t = TASKS.get(name)
        sets = ", ".join(f"{s}{'*' if s in t.default_eval_sets else ''}{' (ID)' if s in t.in_domain else ''}" for s in t.eval_sets)
        table.add_row(name, " / ".join(t.label_names), sets, ", ".join(t.patterns), " ".join(t.notes))
    console.print(table)


@app.command()
def methods() -> None:
    """List methods and their parameters."""
    from .methods import METHODS

    table = Table(title="methods")
    for col in ("method", "what it does", "parameters (default)"):
        table.add_column(col)
    for name in METHODS.names():
        cls = METHODS.get(name)
        params = ", ".join(f"{k}={f.default!r}" for k, f in cls.Params.model_fields.items())
        table.add_row(name, cls.summary, params or "–")
    console.print(table)


def _register_optional_commands() -> None:
    try:
        from . import cli_study
    except ImportError:
        return
    cli_study.register(app)


_register_optional_commands()


def main() -> None:
    """Entry point: user errors become a clear message and exit code 2, not a traceback."""
    try:
        code = app(standalone_mode=False)
        # Without standalone mode click *returns* a typer.Exit's code rather than exiting with it.
        if isinstance(code, int) and code:
            sys.exit(code)
    except FewtuneError as e:
        err_console.print(f"[bold red]error:[/bold red] {e.message}")
        if e.hint:
            err_console.print(f"[dim]hint:[/dim] {e.hint}")
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # click's own usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
