"""How every command prints: data on stdout, messages on stderr; rich on a terminal, plain if piped.

Rich (tables, live views, progress bars) only when the stream is a terminal, so pipes and
scripts get plain aligned text with no escape codes; `NO_COLOR` (https://no-color.org) turns
off every colour and style, tables stay.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Collection, Sequence
from typing import Any, NoReturn, TextIO

import typer
from rich import box
from rich.console import Console, RenderableType
from rich.table import Table

from .errors import EXIT_USAGE, error_line


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One clear line on stderr and a non-zero exit, never a traceback."""
    error_line(message)
    raise typer.Exit(code)


def say(text: str) -> None:
    """A message for the operator (never data): stderr."""
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except ValueError:  # a closed stream
        return False


def console(stream: TextIO | None = None) -> Console:
    """A rich console on `stream` (stdout): no colour or style at all under NO_COLOR."""
    target = sys.stdout if stream is None else stream
    return Console(
        file=target,
        color_system=None if no_color() else "auto",
        force_terminal=is_terminal(target),
        highlight=False,
        soft_wrap=False,
    )


def rich_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Collection[str] = (),
    title: str | None = None,
) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", title_justify="left")
    for header in headers:
        table.add_column(header, justify="right" if header in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded with spaces: easy to read, easy to cut/awk."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *rows]
    )


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Collection[str] = (),
    title: str | None = None,
) -> None:
    """A table on stdout: rich on a terminal, plain text otherwise."""
    if is_terminal(sys.stdout):
        console().print(rich_table(headers, rows, right=right, title=title))
        return
    if title:
        typer.echo(title)
    typer.echo(plain_table(headers, rows))


def print_renderable(renderable: RenderableType, plain: Sequence[str]) -> None:
    """`renderable` through rich on a terminal, else the `plain` lines."""
    if is_terminal(sys.stdout):
        console().print(renderable)
        return
    for line in plain:
        typer.echo(line)


__all__ = [
    "console",
    "fail",
    "human_bytes",
    "is_terminal",
    "no_color",
    "plain_table",
    "print_json",
    "print_renderable",
    "print_table",
    "rich_table",
    "say",
]
