"""`vmswarm publish IMAGE`: register a template and stripe its chunks over the storage centers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import trio
import typer

from ..daemon.imagefile import ImageFileError
from ..daemon.publish import PublishError, PublishResult, default_name, publish
from ..daemon.rpc import RpcError
from ..daemon.tracker_client import TrackerUnreachable
from ..swarm.errors import ManifestError
from ..swarm.manifest import DEFAULT_CHUNK_SIZE, check_chunk_size
from .manifest_command import parse_size
from .output import fail, print_json
from .tracker_commands import (
    EXIT_FAILURE,
    JsonOption,
    LogLevelOption,
    TrackerOption,
    _tracker_address,
    setup_logging,
)


def publish_command(
    image: Annotated[Path, typer.Argument(help="Raw or qcow2 image file.", show_default=False)],
    name: Annotated[
        str | None, typer.Option("--name", help="Template name (default: the file's stem).")
    ] = None,
    version: Annotated[str, typer.Option("--version", help="Template version.")] = "1",
    tracker_address: TrackerOption = None,
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
    json_output: JsonOption = False,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Publish IMAGE as NAME:VERSION; the centers pull and verify their stripes."""
    setup_logging(log_level)
    tracker = _tracker_address(tracker_address)
    try:
        size = (
            DEFAULT_CHUNK_SIZE if chunk_size is None else check_chunk_size(parse_size(chunk_size))
        )
    except (ValueError, ManifestError) as exc:
        fail(f"--chunk-size: {exc}")

    def step(text: str) -> None:
        if not json_output:
            sys.stderr.write(f"{text}\n")

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
            )
        )
    except (ImageFileError, ManifestError) as exc:
        fail(str(exc))
    except (PublishError, TrackerUnreachable) as exc:
        fail(str(exc), EXIT_FAILURE)
    except RpcError as exc:
        fail(f"tracker refused the template: {exc.message}", EXIT_FAILURE)
    summary = result.summary()
    if json_output:
        print_json(summary)
        return
    typer.echo(summary["template_id"])
    moved = summary["chunks_moved"]
    sys.stderr.write(
        f"published {summary['name']}:{summary['version']} "
        f"({'new' if summary['created'] else 'already known'}), {summary['chunks']} chunks, "
        f"{summary['zero_chunks']} zero, r={summary['replicas']}, {moved} chunk copies moved "
        f"in {summary['seconds']:.1f}s\n"
    )


def register(app: typer.Typer) -> None:
    app.command("publish")(publish_command)
