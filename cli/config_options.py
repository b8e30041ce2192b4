"""What commands share about configuration: `--config`, help that names each key, and loading.

Options that map to a setting default to None ("not given"), so daemon/settings.py can apply
flags > VMSWARM_* variables > the file > defaults and say where each value came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from ..daemon.keys import KeyFileError, load_trusted_keys
from ..daemon.settings import (
    DEFAULT_CONFIG_PATH,
    ENV_CONFIG,
    Settings,
    SettingsError,
    key,
    load_settings,
)
from ..daemon.settings import shown as shown_value
from .output import fail

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help=f"Config file (default: ${ENV_CONFIG}, else {DEFAULT_CONFIG_PATH} if it exists).",
        show_default=False,
    ),
]


def setting_help(dotted: str, text: str | None = None) -> str:
    """Help for an option that sets `dotted`: what it does, its config key, variable and default."""
    spec = key(dotted)
    default = "unset" if spec.default is None else shown_value(spec.parse(spec.default))
    if isinstance(default, bool):
        default = str(default).lower()
    # Parentheses, not brackets: typer's rich help reads [..] as markup and drops it.
    return f"{text or spec.help} (config {dotted}, env {spec.env}, default: {default})"


def load(config: Path | None, flags: Mapping[str, object] | None = None) -> Settings:
    """The effective settings for a command; a SettingsError ends it with exit code 2."""
    try:
        return load_settings(config, env=os.environ, flags=flags)
    except SettingsError as exc:
        fail(str(exc))


def tracker_address(settings: Settings) -> tuple[str, int]:
    """cluster.tracker, or one line saying how to give it."""
    address: tuple[str, int] | None = settings["cluster.tracker"]
    if address is None:
        fail(
            "no tracker address: pass --tracker HOST:PORT, set VMSWARM_TRACKER, "
            f"or set cluster.tracker in {settings.path}"
        )
    return address


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
TrackerOption = Annotated[
    str | None,
    typer.Option("--tracker", help=setting_help("cluster.tracker"), show_default=False),
]
ControlOption = Annotated[
    Path | None,
    typer.Option("--control", help=setting_help("daemon.control"), show_default=False),
]


def control_socket(config: Path | None, control: Path | None) -> Path:
    """The local daemon's control socket: --control, $VMSWARM_CONTROL, daemon.control, or
    DATA_DIR/control.sock (daemon.data_dir, /var/lib/vmswarm by default)."""
    return load(config, {"daemon.control": control}).control_socket()


ShowConfigOption = Annotated[
    bool,
    typer.Option(
        "--show-config",
        help="Print the effective configuration and where each value came from, then exit.",
    ),
]


def setting_option(dotted: str, *names: str, text: str | None = None) -> Any:
    """A typer option for setting `dotted`; not given is None, so env, file and default apply."""
    return typer.Option(*names, help=setting_help(dotted, text), show_default=False)


def trust_keys(settings: Settings) -> tuple[bytes, ...]:
    """The public keys of cluster.trusted_keys; one line naming where a bad one came from."""
    try:
        return load_trusted_keys(settings["cluster.trusted_keys"])
    except KeyFileError as exc:
        fail(f"{settings.where('cluster.trusted_keys')}: cluster.trusted_keys: {exc}")


__all__ = [
    "ConfigOption",
    "ControlOption",
    "JsonOption",
    "ShowConfigOption",
    "TrackerOption",
    "control_socket",
    "load",
    "setting_help",
    "setting_option",
    "tracker_address",
    "trust_keys",
]
