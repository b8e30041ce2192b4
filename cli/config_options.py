"""What commands share about configuration: `--config`, help that names each key, and loading.

Options that map to a setting default to None ("not given"), so daemon/settings.py can apply
flags > VMSWARM_* variables > the file > defaults and say where each value came from.
"""

from __future__ import annotations

import os
import ssl
import sys
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
from ..daemon.tls import (
    INSECURE_WARNING,
    TlsError,
    TlsFiles,
    TlsMaterial,
    TlsRole,
    check_files,
    client_context,
)
from .output import fail, is_terminal, say

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


TlsCaOption = Annotated[Path | None, setting_option("tls.ca", "--tls-ca")]
TlsCertOption = Annotated[Path | None, setting_option("tls.cert", "--tls-cert")]
TlsKeyOption = Annotated[Path | None, setting_option("tls.key", "--tls-key")]
TLS_KEYS = ("tls.ca", "tls.cert", "tls.key")


InsecureOption = Annotated[bool, setting_option("tls.insecure", "--insecure")]


def tls_flags(
    ca: Path | None, cert: Path | None, key: Path | None, insecure: bool = False
) -> dict[str, object]:
    """The --tls-* and --insecure flags as settings flags (None: not given)."""
    return {**dict(zip(TLS_KEYS, (ca, cert, key), strict=True)), "tls.insecure": insecure or None}


def tls_material(settings: Settings, *roles: TlsRole, warn: bool = True) -> TlsMaterial | None:
    """tls.ca, tls.cert and tls.key checked; one line naming the problem when none is set
    (unless tls.insecure: then None, and a warning if `warn` and stderr is a terminal), only
    some are set, a file is bad, or the certificate's role is not one of `roles`."""
    paths = [settings[dotted] for dotted in TLS_KEYS]
    if all(path is None for path in paths):
        if not settings["tls.insecure"]:
            fail(
                "mutual TLS is on by default and needs tls.ca, tls.cert and tls.key "
                "(--tls-ca/--tls-cert/--tls-key, VMSWARM_TLS_*, or [tls] in the config file; "
                "`vmswarm ca init` and `vmswarm ca issue` make them for a lab); "
                "to run without TLS pass --insecure"
            )
        # People at a terminal are told each time; scripts keep stderr for errors (daemons log it).
        if warn and is_terminal(sys.stderr):
            say(f"vmswarm: warning: {INSECURE_WARNING}")
        return None
    unset = [dotted for dotted, path in zip(TLS_KEYS, paths, strict=True) if path is None]
    if unset:
        fail(f"mutual TLS needs tls.ca, tls.cert and tls.key; {', '.join(unset)} not set")
    try:
        material = check_files(TlsFiles(*paths))
    except TlsError as exc:
        fail(f"TLS ({settings.where('tls.cert')}): {exc}")
    if roles and material.role not in roles:
        wanted = " or ".join(role.value for role in roles)
        article = "an" if wanted[0] in "aeiou" else "a"
        fail(
            f"TLS: certificate {material.files.cert} has role {material.role.value}; "
            f"this command needs {article} {wanted} certificate"
        )
    return material


def tracker_tls(settings: Settings, *roles: TlsRole) -> ssl.SSLContext | None:
    """The client context for talking to the tracker, or None when run with --insecure."""
    material = tls_material(settings, *roles)
    return None if material is None else client_context(material)


__all__ = [
    "TLS_KEYS",
    "ConfigOption",
    "ControlOption",
    "InsecureOption",
    "JsonOption",
    "ShowConfigOption",
    "TlsCaOption",
    "TlsCertOption",
    "TlsKeyOption",
    "TrackerOption",
    "control_socket",
    "load",
    "setting_help",
    "setting_option",
    "tls_flags",
    "tls_material",
    "tracker_address",
    "tracker_tls",
    "trust_keys",
]
