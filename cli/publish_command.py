"""`vmswarm publish IMAGE`: register a template and stripe its chunks over the storage centers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import trio
import typer

from ..daemon.keys import KeyFileError, load_private_key
from ..daemon.logfmt import setup_logging
from ..daemon.publish import PublishResult, default_name, publish
from ..daemon.rpc import RpcError
from ..daemon.tls import TlsRole
from ..swarm.errors import ManifestError
from ..swarm.manifest import DEFAULT_CHUNK_SIZE, check_chunk_size
from .config_options import (
    ConfigOption,
    InsecureOption,
    JsonOption,
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TrackerOption,
    load,
    tls_flags,
    tls_material,
    tracker_address,
)
from .config_options import setting_option as _option
from .errors import EXIT_FAILURE
from .key_commands import parse_duration
from .manifest_command import parse_size
from .output import fail, print_json, say


def publish_command(
    image: Annotated[Path, typer.Argument(help="Raw or qcow2 image file.", show_default=False)],
    name: Annotated[
        str | None, typer.Option("--name", help="Template name (default: the file's stem).")
    ] = None,
    version: Annotated[str, typer.Option("--version", help="Template version.")] = "1",
    tracker_flag: TrackerOption = None,
    replicas: Annotated[
        int, typer.Option("--replicas", help="Storage centers that hold each chunk.")
    ] = 2,
    chunk_size: Annotated[
        str | None, typer.Option("--chunk-size", help="Chunk size, a power of two.")
    ] = None,
    source_host: Annotated[
        str | None,
        typer.Option("--source-host", help="Address the centers pull from (default: auto)."),
    ] = None,
    sign_key: Annotated[
        Path | None,
        typer.Option(
            "--sign-key", help="Ed25519 private key to sign the template with (`vmswarm key`)."
        ),
    ] = None,
    valid_for: Annotated[
        str, typer.Option("--valid-for", help="How long the signature holds: 30d, 1y, never.")
    ] = "365d",
    json_output: JsonOption = False,
    log_level: Annotated[str | None, _option("cli.log_level", "--log-level")] = None,
    config: ConfigOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    insecure: InsecureOption = False,
) -> None:
    """Publish IMAGE as NAME:VERSION; the centers pull and verify their stripes."""
    settings = load(
        config,
        {
            "cluster.tracker": tracker_flag,
            "cli.log_level": log_level,
            **tls_flags(tls_ca, tls_cert, tls_key, insecure),
        },
    )
    setup_logging(settings["cli.log_level"])
    tracker = tracker_address(settings)
    tls = tls_material(settings, TlsRole.OPERATOR)  # publishing is an operator's act
    try:
        signing_key = None if sign_key is None else load_private_key(sign_key)
        valid_seconds = parse_duration(valid_for)
    except KeyFileError as exc:
        fail(f"--sign-key: {exc}")
    except ValueError as exc:
        fail(f"--valid-for: {exc}")
    try:
        size = (
            DEFAULT_CHUNK_SIZE if chunk_size is None else check_chunk_size(parse_size(chunk_size))
        )
    except (ValueError, ManifestError) as exc:
        fail(f"--chunk-size: {exc}")

    def step(text: str) -> None:
        if not json_output:
            say(text)

    try:
        result: PublishResult = trio.run(
            lambda: publish(
                image,
                name or default_name(image),
                version,
                tracker,
                replicas=replicas,
                chunk_size=size,
                source_host=source_host,
                on_step=step,
                signing_key=signing_key,
                valid_for=valid_seconds,
                tls=tls,
            )
        )
    except RpcError as exc:
        fail(f"tracker refused the template: {exc.message}", EXIT_FAILURE)
    summary = result.summary()
    if json_output:
        print_json(summary)
        return
    typer.echo(summary["template_id"])
    moved = summary["chunks_moved"]
    say(
        f"published {summary['name']}:{summary['version']} "
        f"({'new' if summary['created'] else 'already known'}), {summary['chunks']} chunks, "
        f"{summary['zero_chunks']} zero, r={summary['replicas']}, {moved} chunk copies moved "
        f"in {summary['seconds']:.1f}s"
    )


def register(app: typer.Typer) -> None:
    """Add `publish` to the vmswarm app."""
    app.command("publish")(publish_command)
