"""How the profile commands print: rich tables on a terminal, whole values everywhere else.

rich fits a table to the terminal's width by cutting cells ("rasp…"), which is right for a
person reading and wrong for `schoolfl profile list | grep pi`. So a table goes to rich only
when stdout is a terminal; otherwise each row is one line of tab-separated whole values under
a tab-separated header (`cut -f`, `awk -F'\\t'` and spreadsheets read it), and titles and
notes are lines starting with '# '. `--json` (see docs/profile.md) is for programs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

GIB = 2**30
"""RAM and GPU memory are sold in binary units (a "4 GB" Pi has 4 GiB): shown in GiB."""


def gib(value: float) -> str:
    """A memory figure as the hardware's label reads: '4.00 GiB'."""
    return f"{value / GIB:.2f} GiB"


def stdout_is_terminal() -> bool:
    """Read at each call: click's test runner and a pipe both replace or redirect stdout."""
    return sys.stdout.isatty()


def console() -> Console:
    """Built per command so that it reads the terminal width (or $COLUMNS) of this call."""
    return Console(highlight=False)


@dataclass
class TextTable:
    """A table as plain strings; `styles` colours a row on a terminal only."""

    title: str
    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    styles: list[str] = field(default_factory=list)

    def add_row(self, *cells: str, style: str = "") -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(cells)
        self.styles.append(style)


def echo_table(table: TextTable) -> None:
    """Print `table`: a rich table on a terminal, tab-separated whole values otherwise."""
    if stdout_is_terminal():
        rich_table = Table(title=table.title or None)
        for column in table.columns:
            rich_table.add_column(column)
        for cells, style in zip(table.rows, table.styles, strict=True):
            rich_table.add_row(*(Text(cell) for cell in cells), style=style or None)
        console().print(rich_table)
        return
    if table.title:
        click.echo(f"# {table.title}")
    click.echo("\t".join(table.columns))
    for cells in table.rows:
        click.echo("\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in cells))


def echo_note(text: str, style: str = "") -> None:
    """One line of prose: styled on a terminal, '# text' otherwise (a comment beside rows)."""
    if stdout_is_terminal():
        console().print(Text(text, style=style))
    else:
        click.echo(f"# {text}")


def echo_json(document: Any) -> None:
    """Print `document` as indented JSON (keys in the order built, documented per command)."""
    click.echo(json.dumps(document, indent=2))
