"""The results table, rendered with rich: one line per row, the reason in place of a missing figure."""

from __future__ import annotations

import io
import shutil
import sys
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from benchmarks.harness.common import Row

FILE_WIDTH = 220  # wide enough that no row label wraps in the JSON copy or a redirected stdout


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if abs(v) >= 0.01 else f"{v:.2g}"


def cells(r: Row) -> list[str]:
    if r.status != "ok":  # no figure: the reason goes in the notes column
        return [r.label, r.unit, r.status, "", "", r.target, "", r.reason]
    met = "" if r.met is None else ("yes" if r.met else "NO")
    theirs = fmt(r.theirs) if r.theirs is not None else ("skipped" if r.reason else "-")
    return [r.label, r.unit, fmt(r.ours), theirs, fmt(r.ratio), r.target, met, r.note]


def render(rows: list[Row], machine: dict[str, Any]) -> str:
    """The table as plain text: the terminal's width on a terminal, FILE_WIDTH otherwise."""
    title = (f"flow-nexus-server bench  |  {machine['cores']} cores, {machine['memory_gib']} GiB, torch "
             f"{machine['torch']}, Python {machine['python']}  |  load average {machine['load_average_start']} "
             f"at start, {machine.get('load_average_end')} at end")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("row", no_wrap=True)
    table.add_column("unit", no_wrap=True)
    for name in ("ours", "theirs", "ours/theirs"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("target", no_wrap=True)
    table.add_column("met", no_wrap=True)
    table.add_column("notes", min_width=30)
    for r in rows:
        table.add_row(*cells(r))
    width = shutil.get_terminal_size((FILE_WIDTH, 24)).columns if sys.stdout.isatty() else FILE_WIDTH
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, highlight=False, markup=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().rstrip("\n").splitlines())
