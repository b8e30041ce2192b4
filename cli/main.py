"""The `vmswarm` command: one typer app; each topic's commands live in their own module."""

from __future__ import annotations

from typing import NoReturn

import typer

app = typer.Typer(
    name="vmswarm",
    help="Distribute VM image templates between storage centers and hosts, and launch VMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_USAGE = 2


@app.callback()
def _root() -> None:
    """Distribute VM image templates between storage centers and hosts, and launch VMs."""


def fail(message: str) -> NoReturn:
    """End the command with one line on stderr and exit status 2 (no traceback)."""
    typer.echo(f"vmswarm: error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


def main() -> None:
    """Console-script entry point."""
    app()


# Command modules register themselves on `app` with @app.command and use `fail`, so they are
# imported after both exist; add a topic by adding its module here.
from . import manifest_command  # noqa: E402, F401
from .tracker_commands import register as _register_tracker  # noqa: E402

_register_tracker(app)
from .daemon_commands import register as _register_daemon  # noqa: E402
from .publish_command import register as _register_publish  # noqa: E402

_register_daemon(app)
_register_publish(app)
