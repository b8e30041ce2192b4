"""Structured log lines on stderr: `ts=… level=info logger=… msg="…" template=… peer=… chunk=17`.

One line per record (journald and `grep` both want that): values with spaces, quotes or `=` are
quoted, newlines escaped. Call sites pass context with `extra={"template": ..., "peer": ...}`;
every such field follows `msg`, in the order given.
"""

from __future__ import annotations

import datetime
import logging
import re
import sys
import traceback
from typing import TextIO

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_BARE = re.compile(r"[^\s\"=\\]+")


def quote(value: object) -> str:
    """A logfmt value: bare when it can be, else double-quoted with \\, " and newlines escaped."""
    if isinstance(value, bytes):
        value = value.hex()
    elif isinstance(value, bool):
        value = str(value).lower()
    elif value is None:
        value = "-"
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


def timestamp(created: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2024-05-01T12:00:00.123Z."""
    moment = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class LogfmtFormatter(logging.Formatter):
    """Formats a record as one key=value line."""

    def format(self, record: logging.LogRecord) -> str:
        fields: list[tuple[str, object]] = [
            ("ts", timestamp(record.created)),
            ("level", record.levelname.lower()),
            ("logger", record.name),
            ("msg", record.getMessage()),
        ]
        fields.extend(
            (name, value) for name, value in record.__dict__.items() if name not in _STANDARD
        )
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            fields.append(("error", f"{type(error).__name__}: {error}"))
            fields.append(("traceback", "".join(traceback.format_exception(error)).rstrip()))
        if record.stack_info:
            fields.append(("stack", record.stack_info))
        return " ".join(f"{name}={quote(value)}" for name, value in fields)


class LogfmtHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler setup_logging installs (a class of its own, so a second call replaces it)."""


def setup_logging(level: str, stream: TextIO | None = None) -> LogfmtHandler:
    """Send every log record at `level` or above to `stream` (stderr) as logfmt lines."""
    handler = LogfmtHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, LogfmtHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


__all__ = ["LogfmtFormatter", "LogfmtHandler", "quote", "setup_logging", "timestamp"]
