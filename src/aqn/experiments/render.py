"""Report building blocks rendered to markdown and to self-contained HTML, the number formats,
and the one plot style (a thin line per seed, a thick seed mean per variant)."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aqn.experiments.stats import mean_curve

# --- report blocks, rendered both to markdown and to HTML -------------------------------


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Alert:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    file: str
    caption: str


Block = Heading | Text | Alert | Table | Image


def _md_table(table: Table) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(table.headers), "|" + "|".join("---" for _ in table.headers) + "|"]
    return "\n".join(lines + [line(r) for r in table.rows])


def to_markdown(blocks: Iterable[Block]) -> str:
    parts = []
    for b in blocks:
        match b:
            case Heading():
                parts.append("#" * b.level + " " + b.text)
            case Text():
                parts.append(b.text)
            case Alert():
                parts.append("**WARNING** " + b.text)
            case Table():
                parts.append(_md_table(b))
            case Image():
                parts.append(f"![{b.caption}]({b.file})")
    return "\n\n".join(parts) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; }
th:first-child, td:first-child { text-align: left; }
.warning { color: #c00000; font-weight: bold; }
img { max-width: 100%; }
"""


def to_html(blocks: Iterable[Block], out_dir: Path, title: str) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        f'<html><head><meta charset="utf-8"><title>{esc(title)}</title>',
        f"<style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        match b:
            case Heading():
                parts.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
            case Text():
                parts.append(f"<p>{esc(b.text)}</p>")
            case Alert():
                parts.append(
                    f'<p class="warning" style="color:#c00000">WARNING {esc(b.text)}</p>'
                )
            case Table():
                head = "".join(f"<th>{esc(h)}</th>" for h in b.headers)
                body = "".join(
                    "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in b.rows
                )
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            case Image():
                data = base64.b64encode((out_dir / b.file).read_bytes()).decode("ascii")
                parts.append(
                    f'<figure><img alt="{esc(b.caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{esc(b.caption)}</figcaption></figure>"
                )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- formatting ---------------------------------------------------------------------------


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def fmt_pts(d: float | None) -> str:
    # Adding 0.0 turns a rounded -0.0 into 0.0, so a float-noise difference reads +0.00.
    return "n/a" if d is None else f"{round(100 * d, 2) + 0.0:+.2f}"


def fmt_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def fmt_num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def fmt_steps(steps: Sequence[int]) -> str:
    """1, 2, 3, 7 -> '1-3, 7'."""
    ranges: list[list[int]] = []
    for s in sorted(steps):
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1][1] = s
        else:
            ranges.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def plot_curves(path: Path, title: str, xlabel: str,
          curves: dict[str, list[dict[int, float]]], colors: dict[str, str]) -> None:
    """One figure: each seed a thin line, the seed mean a thick line per variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    ax = fig.add_subplot()
    plotted = False
    for variant, seeds in curves.items():
        seeds = [c for c in seeds if c]
        if not seeds:
            continue
        for c in seeds:
            ax.plot(list(c), list(c.values()), color=colors[variant], lw=0.8, alpha=0.35)
        mean = mean_curve(seeds)
        ax.plot(list(mean), list(mean.values()), color=colors[variant], lw=2.2, label=variant)
        plotted = True
    if plotted:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
