"""`vmswarm manifest IMAGE`: build and show a template's manifest from an image file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer

from ..daemon.imagefile import ImageFileError, image_name, manifest_from_file
from ..swarm.errors import ManifestError
from ..swarm.manifest import DEFAULT_CHUNK_SIZE, Manifest, check_chunk_size
from .output import fail

_SIZE_PATTERN = re.compile(r"\s*(\d+)\s*(?:([kmg])(?:ib)?)?\s*", re.IGNORECASE)
_UNIT_SHIFT = {"k": 10, "m": 20, "g": 30}


def parse_size(text: str) -> int:
    """Bytes from "4194304", "4MiB", "4M", "64KiB" or "1g" (units are binary); ValueError if bad."""
    match = _SIZE_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: use bytes or a binary unit (4194304, 4MiB, 4M)")
    number, unit = match.groups()
    return int(number) << _UNIT_SHIFT[unit.lower()] if unit else int(number)


def _binary_size(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            exact = size % (1 << shift) == 0
            return f"{size >> shift} {unit}" if exact else f"{size / (1 << shift):.1f} {unit}"
    return f"{size} B"


def manifest_summary(manifest: Manifest) -> dict[str, object]:
    """The figures `--json` prints, ids and digests as hex."""
    return {
        "template_id": manifest.template_id.hex(),
        "size": manifest.size,
        "format": manifest.format.value,
        "chunk_size": manifest.chunk_size,
        "chunks": manifest.chunk_count,
        "zero_chunks": len(manifest.zero_chunks),
        "digest": manifest.digest.hex(),
    }


def _human(manifest: Manifest) -> str:
    rows = [
        ("template id", manifest.template_id.hex()),
        ("name", manifest.name),
        ("version", manifest.version),
        ("format", manifest.format.value),
        ("size", f"{manifest.size:,} bytes ({_binary_size(manifest.size)})"),
        ("chunk size", f"{manifest.chunk_size:,} bytes ({_binary_size(manifest.chunk_size)})"),
        ("chunks", f"{manifest.chunk_count:,}"),
        ("zero chunks", f"{len(manifest.zero_chunks):,} (never transferred)"),
        ("digest", manifest.digest.hex()),
    ]
    return "\n".join(f"{label:<12} {value}" for label, value in rows)


def manifest_command(
    image: Annotated[
        # readable=False: our own check reports an unreadable file in one line, not click's box.
        Path, typer.Argument(help="Raw or qcow2 image file.", show_default=False, readable=False)
    ],
    chunk_size: Annotated[
        str | None,
        typer.Option(
            "--chunk-size",
            help=f"Chunk size, a power of two, 64KiB..16MiB (default: {DEFAULT_CHUNK_SIZE}).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    name: Annotated[
        str | None, typer.Option("--name", help="Template name (default: the file's stem).")
    ] = None,
    version: Annotated[str, typer.Option("--version", help="Template version.")] = "1",
) -> None:
    """Chunk and hash IMAGE and print its manifest: template id, chunks, zero chunks, digest."""
    try:
        size = DEFAULT_CHUNK_SIZE if chunk_size is None else parse_size(chunk_size)
        check_chunk_size(size)
    except ValueError as exc:  # ManifestError is a ValueError too
        fail(f"--chunk-size: {exc}")
    try:
        manifest = manifest_from_file(image, name or image_name(image), version, size)
    except ImageFileError as exc:
        fail(str(exc))
    except ManifestError as exc:
        fail(f"{image}: {exc}")
    if as_json:
        typer.echo(json.dumps(manifest_summary(manifest)))
    else:
        typer.echo(_human(manifest))


def register(app: typer.Typer) -> None:
    app.command("manifest")(manifest_command)
