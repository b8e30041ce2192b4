"""`vmswarm config show` (the effective settings and where each came from) and `config example`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..daemon.settings import KEYS, SECTIONS, Settings, shown
from .config_options import ConfigOption, load
from .output import print_json, print_table

config_app = typer.Typer(
    name="config",
    help="Show vmswarm's configuration and where each value came from.",
    no_args_is_help=True,
)


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def print_settings(settings: Settings, json_output: bool) -> None:
    """The settings as a KEY / VALUE / SOURCE table, or one JSON object."""
    if json_output:
        print_json(settings.as_json())
        return
    state = "read" if settings.loaded else "not found, defaults apply"
    rows = [[name, _text(shown(s.value)), s.where] for name, s in settings.entries.items()]
    print_table(["KEY", "VALUE", "SOURCE"], rows, title=f"config file {settings.path} ({state})")


@config_app.command("show")
def config_show(
    config: ConfigOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: file, and per key value, source.")
    ] = False,
) -> None:
    """Print the effective configuration and where each value came from
    (default, FILE:LINE, env VMSWARM_..., flag)."""
    print_settings(load(config), json_output)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


def example_text() -> str:
    """A config file with every key, its help and its default; unset keys commented out."""
    lines = [
        "# vmswarm configuration: /etc/vmswarm/vmswarm.toml (or --config / $VMSWARM_CONFIG).",
        "# Precedence: command-line flags > VMSWARM_* variables > this file > defaults.",
    ]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for spec in (k for k in KEYS if k.section == section):
            lines.append(f"# {spec.help} (env {spec.env})")
            if spec.default is None:
                lines.append(f"# {spec.name} = ...")
            else:
                lines.append(f"{spec.name} = {_toml(spec.default)}")
    return "\n".join(lines) + "\n"


@config_app.command("example")
def config_example() -> None:
    """Print a config file with every key, its meaning and its default (a starting point)."""
    typer.echo(example_text(), nl=False)


def register(app: typer.Typer) -> None:
    """Add `config show` and `config example` to the vmswarm app."""
    app.add_typer(config_app, name="config")
