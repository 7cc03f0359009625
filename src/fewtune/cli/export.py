"""``fewtune export``: a study's results as one file for pandas, R, a spreadsheet or a database.

The rows are ``fewtune.results.load_runs`` (or ``load_predictions`` with ``--predictions``), the
same the report reads. An existing file is never replaced silently (``--overwrite``).
"""

from __future__ import annotations

import importlib.util
import io
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from fewtune.errors import ConfigError


class ExportFormat(str, Enum):
    csv = "csv"
    parquet = "parquet"
    jsonl = "jsonl"


def _encode(frame, fmt: ExportFormat) -> bytes:  # noqa: ANN001 - a pandas DataFrame (pandas imported lazily)
    if fmt is ExportFormat.csv:
        return frame.to_csv(index=False).encode()
    if fmt is ExportFormat.jsonl:
        return frame.to_json(orient="records", lines=True).encode()
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def export(source: Path, fmt: ExportFormat, out: Optional[Path], overwrite: bool, predictions: bool) -> Path:
    """Write the study's runs (or predictions) to ``out`` (default: ``SOURCE/runs.<format>``)."""
    if fmt is ExportFormat.parquet and importlib.util.find_spec("pyarrow") is None:
        raise ConfigError("--format parquet needs the pyarrow package, which is not installed",
                          "pip install pyarrow (or fewtune[parquet]), or use --format csv / jsonl")
    target = out or source / f"{'predictions' if predictions else 'runs'}.{fmt.value}"
    if target.is_dir():
        raise ConfigError(f"--out {target} is a directory; export writes one file",
                          f"give a file path, e.g. --out {target / target.with_suffix('').name}.{fmt.value}"
                          if out else "pass --out with a file path")
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists", "pass --overwrite to replace it, or choose another --out")
    from fewtune.atomic import write_atomic
    from fewtune.results import load_predictions, load_runs

    frame = load_predictions(source) if predictions else load_runs(source)
    write_atomic(target, _encode(frame, fmt))
    return target


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        source: Path = typer.Argument(..., metavar="DIR", help="a study directory (fewtune study --out) or a run directory"),
        fmt: ExportFormat = typer.Option(ExportFormat.csv, "--format", help="csv, parquet (needs pyarrow) or jsonl"),
        out: Optional[Path] = typer.Option(None, "--out", help="the file to write (default: DIR/runs.FORMAT)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output file"),
        predictions: bool = typer.Option(False, "--predictions", help="one row per scored example instead of per run × eval set"),
    ) -> None:
        """Export results as a table: one row per run × eval set (failed runs included, with their status)."""
        path = export(source, fmt, out, overwrite, predictions)
        Console().print(f"wrote [bold]{escape(str(path))}[/bold]")
