"""`vmswarm tracker run`, `vmswarm templates` and `vmswarm peers`: the tracker and its queries."""

from __future__ import annotations

import functools
import logging
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import trio
import typer

from ..daemon import tracker
from ..daemon.catalog import CatalogError
from ..daemon.config_files import load_flavors
from ..daemon.tls import TlsMaterial, TlsRole
from ..daemon.tracker_client import DEFAULT_CONNECT_TIMEOUT, SwarmView, TemplateInfo, TrackerClient
from ..swarm.address import format_address
from ..swarm.flavors import Flavor
from .config_options import (
    ConfigOption,
    InsecureOption,
    JsonOption,
    ShowConfigOption,
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TrackerOption,
    load,
    tls_flags,
    tls_material,
    tracker_address,
    tracker_tls,
    trust_keys,
)
from .config_options import setting_option as _option
from .errors import EXIT_FAILURE, leaf
from .key_commands import AllowUnsignedOption, TrustedKeyOption
from .output import fail, human_bytes, print_json, print_table
from .run_setup import run_settings

log = logging.getLogger("vmswarm.tracker")

T = TypeVar("T")


def parse_template_ref(text: str) -> tuple[str, str | None]:
    """ "NAME" or "NAME:VERSION" (split at the first colon) -> (name, version or None)."""
    name, sep, version = text.partition(":")
    if not name or (sep and not version):
        raise ValueError(f"template {text!r} is not NAME or NAME:VERSION")
    return name, version if sep else None


def ask_tracker(
    config: Path | None,
    tracker_flag: str | None,
    query: Callable[[TrackerClient], Awaitable[T]],
    tls: dict[str, object] | None = None,
) -> T:
    """One query against the tracker (--tracker, $VMSWARM_TRACKER or cluster.tracker), over
    mutual TLS when tls.* is set (`tls`: the --tls-* flags); an unreachable tracker or a refusal
    propagates to the one error handler in cli/main.py."""
    settings = load(config, {"cluster.tracker": tracker_flag, **(tls or {})})
    host, port = tracker_address(settings)
    context = tracker_tls(settings)

    async def run() -> T:
        client = await TrackerClient.connect(
            host, port, connect_timeout=DEFAULT_CONNECT_TIMEOUT, tls=context
        )
        async with client:
            return await query(client)

    return trio.run(run)


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


def templates(
    tracker_flag: TrackerOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    insecure: InsecureOption = False,
) -> None:
    """List the tracker's template catalog."""

    async def query(client: TrackerClient) -> list[TemplateInfo]:
        return await client.list_templates()

    found = ask_tracker(config, tracker_flag, query, tls_flags(tls_ca, tls_cert, tls_key, insecure))
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
    print_table(
        ["NAME", "VERSION", "FORMAT", "SIZE", "CHUNKS", "ZERO", "TEMPLATE ID"],
        rows,
        right={"SIZE", "CHUNKS", "ZERO"},
    )


def peers(
    template: Annotated[str, typer.Argument(help="NAME or NAME:VERSION (default: newest).")],
    tracker_flag: TrackerOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    insecure: InsecureOption = False,
) -> None:
    """Show the tracker's view of a template's swarm: each host or center and its progress."""
    try:
        name, version = parse_template_ref(template)
    except ValueError as exc:
        fail(str(exc))

    async def query(client: TrackerClient) -> tuple[TemplateInfo, SwarmView]:
        found = await client.lookup(name, version)
        return found.info, await client.swarm(found.template_id)

    info, view = ask_tracker(
        config, tracker_flag, query, tls_flags(tls_ca, tls_cert, tls_key, insecure)
    )
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
    headline = (
        f"{info.name}:{info.version}  id {info.template_id.hex()[:16]}  {info.chunks} chunks  "
        f"{len(members)} live peers"
    )
    if not members:
        typer.echo(headline)
    else:
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
        print_table(
            ["PEER", "ROLE", "ADDRESS", "RACK", "COMPLETE"],
            rows,
            right={"COMPLETE"},
            title=headline,
        )


def tracker_run(
    listen: Annotated[str | None, _option("tracker.listen", "--listen")] = None,
    state_dir: Annotated[Path | None, _option("tracker.state_dir", "--state-dir")] = None,
    announce_ttl: Annotated[float | None, _option("tracker.announce_ttl", "--announce-ttl")] = None,
    flavors_file: Annotated[Path | None, _option("cluster.flavors", "--flavors")] = None,
    log_level: Annotated[str | None, _option("log.level", "--log-level")] = None,
    metrics: Annotated[str | None, _option("tracker.metrics", "--metrics")] = None,
    trusted_key: TrustedKeyOption = None,
    allow_unsigned: AllowUnsignedOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    insecure: InsecureOption = False,
    config: ConfigOption = None,
    show_config: ShowConfigOption = False,
) -> None:
    """Run the tracker: the template catalog, the peer handout and VM placement.

    With tls.ca/cert/key (--tls-*), every client must present a certificate of the cluster CA,
    and its role limits its calls; the tracker's own certificate must have the tracker role.
    """
    settings = run_settings(
        config,
        {
            "tracker.listen": listen,
            "tracker.state_dir": state_dir,
            "tracker.announce_ttl": announce_ttl,
            "cluster.flavors": flavors_file,
            "log.level": log_level,
            "tracker.metrics": metrics,
            **tls_flags(tls_ca, tls_cert, tls_key, insecure),
        },
        trusted_key=trusted_key,
        allow_unsigned=allow_unsigned,
        show_config=show_config,
    )
    if settings is None:
        return
    host, port = settings["tracker.listen"]
    where: Path = settings["tracker.state_dir"]
    serve = functools.partial(
        _serve_until_signal,
        trusted_keys=trust_keys(settings),
        allow_unsigned=settings["cluster.allow_unsigned"],
        tls=tls_material(settings, TlsRole.TRACKER, warn=False),  # it logs
    )
    flavors = load_flavors(settings["cluster.flavors"])
    try:
        trio.run(
            serve,
            host,
            port,
            where,
            settings["tracker.announce_ttl"],
            flavors,
            settings["tracker.metrics"],
        )
    except (OSError, sqlite3.Error, CatalogError, BaseExceptionGroup) as exc:
        error = leaf(exc)
        address = format_address(host, port)
        if isinstance(error, OSError):
            fail(f"tracker cannot run on {address} with state in {where}: {error}", EXIT_FAILURE)
        if isinstance(error, sqlite3.Error | CatalogError):
            fail(f"tracker catalog in {where}: {error}", EXIT_FAILURE)
        raise error from None


async def _serve_until_signal(
    host: str,
    port: int,
    state_dir: Path,
    ttl: float,
    flavors: dict[str, Flavor],
    metrics_listen: tuple[str, int] | None = None,
    *,
    trusted_keys: tuple[bytes, ...] = (),
    allow_unsigned: bool = False,
    tls: TlsMaterial | None = None,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    tracker.run,
                    host,
                    port,
                    state_dir,
                    announce_ttl=ttl,
                    flavors=flavors,
                    metrics_listen=metrics_listen,
                    trusted_keys=trusted_keys,
                    allow_unsigned=allow_unsigned,
                    tls=tls,
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
