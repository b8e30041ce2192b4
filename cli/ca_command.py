"""`vmswarm ca init` and `vmswarm ca issue`: a lab cluster CA and role certificates for mTLS."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from ..daemon.pki import (
    CA_CERT_NAME,
    CA_KEY_NAME,
    DEFAULT_CA_NAME,
    TlsError,
    TlsRole,
    init_ca,
    issue,
)
from .key_commands import parse_duration
from .output import fail, print_json, say

ca_app = typer.Typer(
    name="ca",
    help="Make a cluster CA and role certificates for mutual TLS (labs; production brings its "
    "own PKI: vmswarm reads the role from a URI SAN vmswarm:role:ROLE).",
    no_args_is_help=True,
)

CaDirOption = Annotated[
    Path, typer.Option("--dir", help=f"The CA directory (holds {CA_CERT_NAME} and {CA_KEY_NAME}).")
]


@ca_app.command("init")
def ca_init(
    ca_dir: CaDirOption,
    name: Annotated[str, typer.Option("--name", help="The CA's common name.")] = DEFAULT_CA_NAME,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Make a new cluster CA: DIR/ca.crt (give it to every node) and DIR/ca.key (mode 0600)."""
    try:
        cert_path = init_ca(ca_dir, name)
    except TlsError as exc:
        fail(str(exc))
    key_path = ca_dir / CA_KEY_NAME
    if json_output:
        print_json({"ca_cert": str(cert_path), "ca_key": str(key_path)})
        return
    typer.echo(str(cert_path))
    say(
        f"CA certificate {cert_path} (trusted by every node as tls.ca), "
        f"CA key {key_path} (mode 0600: keep it offline)"
    )


@ca_app.command("issue")
def ca_issue(
    ca_dir: CaDirOption,
    role: Annotated[
        TlsRole,
        typer.Option("--role", help="What the holder is; it limits what the holder may do."),
    ],
    name: Annotated[str, typer.Argument(help="The holder's name: common name and file stem.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where to write NAME.crt and NAME.key (default: the CA dir)."),
    ] = None,
    san: Annotated[
        list[str] | None,
        typer.Option("--san", help="A DNS name or IP address to add; repeat for several."),
    ] = None,
    valid_for: Annotated[
        str, typer.Option("--valid-for", help="Lifetime, like 90d, 12h or 1y.")
    ] = "365d",
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Sign a certificate for NAME with ROLE: writes NAME.crt and NAME.key (mode 0600)."""
    try:
        seconds = parse_duration(valid_for)
    except ValueError as exc:
        fail(f"--valid-for: {exc}")
    if seconds is None:
        fail("--valid-for: a certificate needs an expiry; give a duration like 365d")
    # Beyond the CA's own ten years is pointless (issue() caps it there); timedelta has a limit.
    seconds = min(seconds, 100 * 365 * 86400)
    try:
        made = issue(
            ca_dir, role, name, out, sans=san or (), valid_for=dt.timedelta(seconds=seconds)
        )
    except TlsError as exc:
        fail(str(exc))
    if json_output:
        print_json(
            {
                "cert": str(made.cert),
                "key": str(made.key),
                "role": role.value,
                "fingerprint": made.fingerprint,
            }
        )
        return
    typer.echo(str(made.cert))
    say(f"{role.value} certificate {made.cert}, key {made.key} (mode 0600)")
    say(f"sha256 fingerprint {made.fingerprint}")


def register(app: typer.Typer) -> None:
    app.add_typer(ca_app, name="ca")
