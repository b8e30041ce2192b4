"""The `vmswarm` command: one typer app; each topic's commands live in their own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="vmswarm",
    help="Distribute VM image templates between storage centers and hosts, and launch VMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Distribute VM image templates between storage centers and hosts, and launch VMs."""


def main() -> None:
    """Console-script entry point."""
    app()


# Each topic's module adds its commands to `app`; add a topic by registering it here.
from .daemon_commands import register as _register_daemon  # noqa: E402
from .launch_command import register as _register_launch  # noqa: E402
from .manifest_command import register as _register_manifest  # noqa: E402
from .publish_command import register as _register_publish  # noqa: E402
from .tracker_commands import register as _register_tracker  # noqa: E402
from .vm_commands import register as _register_vm  # noqa: E402

for _register in (
    _register_manifest,
    _register_publish,
    _register_tracker,
    _register_daemon,
    _register_launch,
    _register_vm,
):
    _register(app)
