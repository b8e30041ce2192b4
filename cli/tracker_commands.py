"""`vmswarm tracker run`, `vmswarm templates` and `vmswarm peers`: the tracker and its queries."""

from __future__ import annotations

import functools
import logging
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import trio
import typer

from ..daemon import tracker
from ..daemon.catalog import CatalogError
from ..daemon.config_files import ConfigError, load_flavors
from ..daemon.rpc import RpcError
from ..daemon.tracker_client import (
    DEFAULT_CONNECT_TIMEOUT,
    SwarmView,
    TemplateInfo,
    TrackerClient,
    TrackerUnreachable,
)
from ..swarm.address import format_address, parse_address
from ..swarm.flavors import Flavor
from .output import fail, human_bytes, print_json

log = logging.getLogger("vmswarm.tracker")

EXIT_FAILURE = 1
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
T = TypeVar("T")

TrackerOption = Annotated[
    str | None,
    typer.Option(
        "--tracker",
        envvar="VMSWARM_TRACKER",
        help="Tracker address HOST:PORT (default: $VMSWARM_TRACKER).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
LogLevelOption = Annotated[
    str, typer.Option("--log-level", help=f"Logging threshold: {', '.join(LOG_LEVELS)}.")
]


def parse_template_ref(text: str) -> tuple[str, str | None]:
    """ "NAME" or "NAME:VERSION" (split at the first colon) -> (name, version or None)."""
    name, sep, version = text.partition(":")
    if not name or (sep and not version):
        raise ValueError(f"template {text!r} is not NAME or NAME:VERSION")
    return name, version if sep else None


def setup_logging(level: str) -> None:
    if level.upper() not in LOG_LEVELS:
        fail(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _tracker_address(text: str | None) -> tuple[str, int]:
    if not text:
        fail("no tracker address: pass --tracker HOST:PORT or set VMSWARM_TRACKER")
    try:
        host, port = parse_address(text)
    except ValueError as exc:
        fail(f"--tracker: {exc}")
    if port == 0:
        fail(f"--tracker: {text!r} needs a non-zero port")
    return host, port


def _ask_tracker(address: str | None, query: Callable[[TrackerClient], Awaitable[T]]) -> T:
    """Run one query against the tracker; unreachable or refused ends the command in one line."""
    host, port = _tracker_address(address)

    async def run() -> T:
        client = await TrackerClient.connect(host, port, connect_timeout=DEFAULT_CONNECT_TIMEOUT)
        async with client:
            return await query(client)

    try:
        return trio.run(run)
    except TrackerUnreachable as exc:
        fail(str(exc), EXIT_FAILURE)
    except RpcError as exc:
        fail(exc.message, EXIT_FAILURE)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _template_json(info: TemplateInfo) -> dict[str, Any]:
    return {
        "template_id": info.template_id.hex(),
        "name": info.name,
        "version": info.version,
        "size": info.size,
        "chunk_size": info.chunk_size,
        "chunks": info.chunks,
        "zero_chunks": info.zero_chunks,
        "format": info.format,
        "created_at": info.created_at,
    }


def templates(tracker_address: TrackerOption = None, json_output: JsonOption = False) -> None:
    """List the tracker's template catalog."""

    async def query(client: TrackerClient) -> list[TemplateInfo]:
        return await client.list_templates()

    found = _ask_tracker(tracker_address, query)
    if json_output:
        print_json({"templates": [_template_json(t) for t in found]})
        return
    if not found:
        typer.echo("the catalog is empty")
        return
    rows = [
        [
            t.name,
            t.version,
            t.format,
            human_bytes(t.size),
            str(t.chunks),
            str(t.zero_chunks),
            t.template_id.hex()[:16],
        ]
        for t in found
    ]
    typer.echo(_table(["NAME", "VERSION", "FORMAT", "SIZE", "CHUNKS", "ZERO", "TEMPLATE ID"], rows))


def peers(
    template: Annotated[str, typer.Argument(help="NAME or NAME:VERSION (default: newest).")],
    tracker_address: TrackerOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show the tracker's view of a template's swarm: each host or center and its progress."""
    try:
        name, version = parse_template_ref(template)
    except ValueError as exc:
        fail(str(exc))

    async def query(client: TrackerClient) -> tuple[TemplateInfo, SwarmView]:
        found = await client.lookup(name, version)
        return found.info, await client.swarm(found.template_id)

    info, view = _ask_tracker(tracker_address, query)
    members = [
        {
            "peer_id": m.peer_id.hex(),
            "role": m.role.value,
            "host": m.host,
            "port": m.port,
            "rack": m.rack,
            "complete": m.complete,
            "have": m.have,
            "percent": m.percent,
        }
        for m in view.members
    ]
    if json_output:
        print_json(
            {
                "template_id": info.template_id.hex(),
                "name": info.name,
                "version": info.version,
                "chunks": info.chunks,
                "peers": members,
            }
        )
        return
    typer.echo(
        f"{info.name}:{info.version}  id {info.template_id.hex()[:16]}  {info.chunks} chunks  "
        f"{len(members)} live peers"
    )
    if members:
        rows = [
            [
                m.peer_id.hex()[:16],
                m.role.value,
                format_address(m.host, m.port),
                m.rack or "-",
                f"{m.percent:.1f}%",
            ]
            for m in view.members
        ]
        typer.echo(_table(["PEER", "ROLE", "ADDRESS", "RACK", "COMPLETE"], rows))


def tracker_run(
    listen: Annotated[str, typer.Option("--listen", help="Address to listen on, HOST:PORT.")],
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="Directory of the SQLite template catalog.")
    ],
    announce_ttl: Annotated[
        float,
        typer.Option(
            "--announce-ttl", min=0.1, help="Seconds a peer stays listed unless it re-announces."
        ),
    ] = tracker.DEFAULT_ANNOUNCE_TTL,
    flavors_file: Annotated[
        Path | None,
        typer.Option(
            "--flavors", help="TOML file of VM flavors for placement (default: the built-ins)."
        ),
    ] = None,
    log_level: LogLevelOption = "INFO",
) -> None:
    """Run the tracker: the template catalog, the peer handout and VM placement."""
    setup_logging(log_level)
    try:
        host, port = parse_address(listen)
    except ValueError as exc:
        fail(f"--listen: {exc}")
    try:
        flavors = load_flavors(flavors_file)
    except ConfigError as exc:
        fail(str(exc))
    try:
        trio.run(_serve_until_signal, host, port, state_dir, announce_ttl, flavors)
    except (OSError, sqlite3.Error, CatalogError, BaseExceptionGroup) as exc:
        leaf = _single_leaf(exc)
        if isinstance(leaf, OSError):
            fail(f"tracker cannot run on {listen} with state in {state_dir}: {leaf}", EXIT_FAILURE)
        if isinstance(leaf, sqlite3.Error | CatalogError):
            fail(f"tracker catalog in {state_dir}: {leaf}", EXIT_FAILURE)
        raise


def _single_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _serve_until_signal(
    host: str, port: int, state_dir: Path, ttl: float, flavors: dict[str, Flavor]
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    tracker.run, host, port, state_dir, announce_ttl=ttl, flavors=flavors
                )
            )
            async for signum in signals:
                log.info("received %s, stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def register(app: typer.Typer) -> None:
    """Add `tracker run`, `templates` and `peers` to the vmswarm app."""
    tracker_app = typer.Typer(
        help="Run the tracker: template catalog and peer handout.", no_args_is_help=True
    )
    tracker_app.command("run")(tracker_run)
    app.add_typer(tracker_app, name="tracker")
    app.command("templates")(templates)
    app.command("peers")(peers)
