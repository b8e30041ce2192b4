"""`vmswarm key generate` and `vmswarm key id`: publisher signing keys (Ed25519)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from ..daemon.keys import (
    DEFAULT_KEY_NAME,
    KeyFileError,
    generate_keypair,
    load_private_key,
    load_public_key,
)
from ..swarm.signature import key_id_of, public_key_bytes
from .output import fail, print_json

NEVER = "never"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdwy]?)")


def parse_duration(text: str) -> float | None:
    """Seconds in "90s", "12h", "30d", "2w", "1y" or a bare number; None for "never"."""
    value = text.strip().lower()
    if value == NEVER:
        return None
    match = _DURATION.fullmatch(value)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 12h, 30d, 1y or 'never'")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


key_app = typer.Typer(
    name="key", help="Make and inspect template signing keys (Ed25519).", no_args_is_help=True
)


@key_app.command("generate")
def key_generate(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the key pair into.")],
    name: Annotated[
        str, typer.Option("--name", help="File stem: writes NAME.key (0600) and NAME.pub.")
    ] = DEFAULT_KEY_NAME,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Write a new Ed25519 key pair: NAME.key (0600) signs, NAME.pub is what nodes trust.

    Sign with `vmswarm publish --sign-key NAME.key`; trackers and daemons take NAME.pub as
    `--trusted-key` (or in cluster.trusted_keys).
    """
    try:
        made = generate_keypair(out, name)
    except KeyFileError as exc:
        fail(str(exc))
    if json_output:
        print_json(
            {
                "key_id": made.key_id,
                "private_key": str(made.private_path),
                "public_key": str(made.public_path),
            }
        )
        return
    typer.echo(made.key_id)
    typer.echo(
        f"signing key {made.private_path} (mode 0600: keep it secret), "
        f"public key {made.public_path} (give it to trackers and daemons as --trusted-key)",
        err=True,
    )


@key_app.command("id")
def key_id(
    path: Annotated[Path, typer.Argument(help="A .pub or .key file.", show_default=False)],
) -> None:
    """Print the key id that logs and errors use for the key in PATH."""
    try:
        if path.suffix == ".key":
            raw = public_key_bytes(load_private_key(path).public_key())
        else:
            raw = load_public_key(path)
    except KeyFileError as exc:
        fail(str(exc))
    typer.echo(key_id_of(raw).hex())


TrustedKeyOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--trusted-key",
        help="Public key (.pub) whose template signatures to accept; repeat for several.",
    ),
]
AllowUnsignedOption = Annotated[
    bool,
    typer.Option(
        "--allow-unsigned",
        help="Also accept templates without a signature (logs a warning; labs only).",
    ),
]


def register(app: typer.Typer) -> None:
    app.add_typer(key_app, name="key")
