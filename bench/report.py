"""Shared output for every benchmark: one JSON document, then a readable table."""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Mapping, Sequence
from typing import Any


def machine() -> dict[str, Any]:
    import os

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of `columns` from `rows`."""
    cells = [[_cell(row.get(col, "")) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    line = "| " + " | ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join([line, rule, *body])


def emit(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Print the benchmark's figures as JSON (one line) and then as a table."""
    doc = {"benchmark": name, "machine": machine(), "results": list(rows), **(extra or {})}
    sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n\n")
    sys.stdout.write(f"## {name}\n\n{table(rows, columns)}\n")
    sys.stdout.flush()
