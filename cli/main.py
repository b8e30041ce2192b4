"""The `vmswarm` command: one typer app; each topic's commands live in their own module.

Errors are handled here once: a command lets its exception out, and the app's group prints one
line (a traceback too with `--debug`) and exits with the code from cli/errors.py.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from .errors import EXIT_FAILURE, EXIT_USAGE, error_line, report

# typer vendors click in new releases and depends on it in old ones: find click's base error
# class through typer's public BadParameter rather than a private import.
_CLICK_ERROR: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)


class _ReportingGroup(TyperGroup):
    """The root group: any exception out of a command becomes one line and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, _CLICK_ERROR, BrokenPipeError):
            raise  # click's own ends, and a closed pipe (`| head`), which click ends quietly
        except Exception as exc:  # noqa: BLE001 -- reported, then the process exits
            raise typer.Exit(report(exc, debug=bool(ctx.params.get("debug")))) from None


app = typer.Typer(
    name="vmswarm",
    help=(
        "Distribute VM image templates between storage centers and hosts, and launch VMs.\n\n"
        "Exit codes: 0 ok, 1 the operation failed, 2 bad usage or input, 3 the daemon or "
        "tracker is unreachable. Data goes to stdout, messages to stderr; --json gives JSON, "
        "NO_COLOR turns colour off. Settings: vmswarm config show."
    ),
    cls=_ReportingGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="On an error, print the full traceback before its line."),
    ] = False,
) -> None:
    """Distribute VM image templates between storage centers and hosts, and launch VMs."""


def _usage_error(exc: Exception) -> int:
    """A click usage error as one line (with where to find help), exit code 2."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # the help text was the "error"
        sys.stderr.write(str(getattr(exc, "message", "")).rstrip() + "\n")
        return EXIT_USAGE
    format_message = getattr(exc, "format_message", None)
    text = format_message() if callable(format_message) else str(exc)
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    error_line(" ".join(str(text).split()) + hint)
    code = getattr(exc, "exit_code", EXIT_USAGE)
    return code if isinstance(code, int) else EXIT_USAGE


def main() -> None:
    """Console-script entry point."""
    try:
        code = app(standalone_mode=False)
    except _CLICK_ERROR as exc:
        sys.exit(_usage_error(exc))
    except typer.Abort:
        error_line("aborted")
        sys.exit(EXIT_FAILURE)
    sys.exit(code if isinstance(code, int) else 0)


# Each topic's module adds its commands to `app`; add a topic by registering it here.
from .ca_command import register as _register_ca  # noqa: E402
from .config_command import register as _register_config  # noqa: E402
from .daemon_commands import register as _register_daemon  # noqa: E402
from .key_commands import register as _register_key  # noqa: E402
from .launch_command import register as _register_launch  # noqa: E402
from .manifest_command import register as _register_manifest  # noqa: E402
from .publish_command import register as _register_publish  # noqa: E402
from .scrub_command import register as _register_scrub  # noqa: E402
from .tracker_commands import register as _register_tracker  # noqa: E402
from .vm_commands import register as _register_vm  # noqa: E402

for _register in (
    _register_manifest,
    _register_publish,
    _register_tracker,
    _register_daemon,
    _register_launch,
    _register_vm,
    _register_key,
    _register_config,
    _register_scrub,
    _register_ca,
):
    _register(app)
