"""The report's document model and its one renderer.

Sections append blocks to a ``Doc``; the Doc is written as Markdown (``report.md``), and
``report.html`` is that same Markdown rendered by markdown-it-py into a Jinja2 page, with the
figures embedded as data URIs. One source text, so the two files cannot say different things.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markupsafe import Markup

from fewtune import stats as st


@dataclass
class Doc:
    """Blocks of Markdown; ``doc += other`` appends another section's blocks."""

    blocks: list[str] = field(default_factory=list)

    def __iadd__(self, other: Doc) -> Doc:
        self.blocks.extend(other.blocks)
        return self

    def h(self, level: int, text: str) -> None:
        self.blocks.append("#" * level + " " + _one_line(text))

    def p(self, text: str) -> None:
        self.blocks.append(text)

    def items(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append("\n".join(f"- {_one_line(i)}" for i in items))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> None:
        lines = [f"*{caption}*", ""] if caption else []
        lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(_md_cell(cell(c)) for c in r) + " |" for r in rows]
        self.blocks.append("\n".join(lines))

    def img(self, rel: str, alt: str, reading: str) -> None:
        """A figure, with a one-line reading aid under it (what to look for)."""
        self.blocks.append(f"![{_one_line(alt)}]({rel})\n\n*How to read it:* {_one_line(reading)}")

    def headings(self) -> list[str]:
        return [b.split(" ", 1)[1] for b in self.blocks if b.startswith("#")]


def cell(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else f"{x:.3f}"
    return str(x)


def _one_line(text: str) -> str:
    return str(text).replace("\n", " ")


def _md_cell(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


def render_markdown(doc: Doc) -> str:
    return "\n\n".join(doc.blocks) + "\n"


def _embed_images(base: Path):
    """markdown-it image rule: the PNG beside the report becomes a data URI (a self-contained page)."""
    def image(self, tokens, idx, options, env):  # noqa: ANN001 - markdown-it's rule signature
        token = tokens[idx]
        src = str(token.attrGet("src") or "")
        path = base / src
        if src and not src.startswith("data:") and path.is_file():
            token.attrSet("src", "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode())
        return RendererHTML.image(self, tokens, idx, options, env)

    return image


def render_html(markdown: str, title: str, base: Path) -> str:
    """The Markdown report as one self-contained HTML page (figures relative to ``base`` embedded)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.add_render_rule("image", _embed_images(base))
    env = jinja2.Environment(loader=jinja2.PackageLoader("fewtune", "report"), autoescape=True)
    return env.get_template("page.html.j2").render(title=title, body=Markup(md.render(markdown)))


def fmt_summary(s: st.Summary, digits: int = 3) -> str:
    """'0.612 ± 0.031 (3)': mean ± 95 % CI half-width over data seeds (number of runs)."""
    if s.count == 0:
        return "–"
    if s.count == 1 or not math.isfinite(s.half_width):
        return f"{s.mean:.{digits}f} (1 run)"
    return f"{s.mean:.{digits}f} ± {s.half_width:.{digits}f} ({s.count})"


def fmt_p(p: float) -> str:
    return "–" if not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def fmt_n(n: Any, applies: bool = True) -> str:
    """n per class, or 'n/a' for a method that does not use the few-shot sample (zero-shot)."""
    return str(n) if applies else "n/a"


def slug(*parts: str) -> str:
    return "_".join("".join(c if c.isalnum() or c in "-._" else "-" for c in p) for p in parts)
