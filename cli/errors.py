"""The one place that turns an exception into an exit code and a one-line message.

Exit codes: 0 ok, 1 the operation failed, 2 bad usage or input, 3 the daemon or tracker is
unreachable. Commands just let these exceptions out; `report` prints the line (and, with
`--debug`, the traceback first).
"""

from __future__ import annotations

import sqlite3
import sys
import traceback

import trio

from ..daemon.catalog import CatalogError
from ..daemon.config_files import ConfigError
from ..daemon.control import ControlError, ControlUnreachable
from ..daemon.imagefile import ImageFileError
from ..daemon.keys import KeyFileError
from ..daemon.node import NodeError
from ..daemon.publish import PublishError
from ..daemon.rpc import RpcError
from ..daemon.settings import SettingsError
from ..daemon.storeerrors import StoreError
from ..daemon.tracker_client import TrackerUnreachable
from ..swarm.errors import ManifestError
from ..swarm.flavors import FlavorError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# First match wins: the more specific classes come first.
_EXIT_CODES: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    (
        (
            ControlUnreachable,
            TrackerUnreachable,
            ConnectionError,
            TimeoutError,
            trio.TooSlowError,
            trio.BrokenResourceError,
        ),
        EXIT_UNREACHABLE,
    ),
    (
        (SettingsError, ConfigError, ImageFileError, ManifestError, FlavorError, KeyFileError),
        EXIT_USAGE,
    ),
    (
        (
            RpcError,
            PublishError,
            NodeError,
            ControlError,
            StoreError,
            CatalogError,
            sqlite3.Error,
            OSError,
        ),
        EXIT_FAILURE,
    ),
)


def leaf(exc: BaseException) -> BaseException:
    """The first real error inside (possibly nested) exception groups, as trio raises them."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def known(exc: BaseException) -> bool:
    return any(isinstance(exc, kinds) for kinds, _ in _EXIT_CODES)


def _causes(exc: BaseException) -> list[BaseException]:
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 16:
        chain.append(chain[-1].__cause__)
    return chain


def exit_code(exc: BaseException) -> int:
    """The exit code for an error: unreachable 3 (also when that is its cause, as when publish
    wraps it), bad input 2, anything else 1."""
    unreachable_kinds = _EXIT_CODES[0][0]
    if any(isinstance(cause, unreachable_kinds) for cause in _causes(exc)):
        return EXIT_UNREACHABLE
    for kinds, code in _EXIT_CODES:
        if isinstance(exc, kinds):
            return code
    return EXIT_FAILURE


def message(exc: BaseException) -> str:
    """The error as one line for the operator."""
    if isinstance(exc, RpcError):
        text = exc.message
    elif isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ConnectionError):
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    elif isinstance(exc, trio.TooSlowError):
        text = "no answer in time"
    else:
        text = str(exc) or type(exc).__name__
    if not known(exc):
        text = f"unexpected {type(exc).__name__}: {text} (run `vmswarm --debug ...` for details)"
    return " ".join(text.split())  # one line, whatever the exception carried


def error_line(text: str) -> None:
    sys.stderr.write(f"vmswarm: error: {text}\n")
    sys.stderr.flush()


def report(exc: BaseException, *, debug: bool) -> int:
    """Print the error (traceback first when debugging) and return its exit code."""
    error = leaf(exc)
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    error_line(message(error))
    return exit_code(error)


__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "error_line",
    "exit_code",
    "leaf",
    "message",
    "report",
]
