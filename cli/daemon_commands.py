"""`vmswarm daemon run`, `vmswarm fetch` and `vmswarm status`: the daemon and its local control."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import trio
import typer
from rich.live import Live

from ..daemon.config_files import load_flavors
from ..daemon.control import call_control
from ..daemon.download import DownloadConfig
from ..daemon.node import NodeConfig, run_until_signalled
from ..daemon.settings import Settings
from ..daemon.tls import TlsRole
from ..swarm.messages import Role
from .config_options import (
    ConfigOption,
    ControlOption,
    InsecureOption,
    JsonOption,
    ShowConfigOption,
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    control_socket,
    load,
    setting_help,
    tls_flags,
    tls_material,
    trust_keys,
)
from .config_options import setting_option as _option
from .errors import leaf
from .key_commands import AllowUnsignedOption, TrustedKeyOption
from .output import console, fail, human_bytes, is_terminal, print_json, print_renderable
from .progress import ProgressView
from .run_setup import run_settings
from .status_view import status_lines, status_renderable

log = logging.getLogger("vmswarm.daemon")

daemon_app = typer.Typer(
    name="daemon", help="Run the host or storage-center daemon.", no_args_is_help=True
)


def node_config(settings: Settings) -> NodeConfig:
    """The NodeConfig that `daemon run` starts, from the effective settings."""
    role = settings["daemon.role"]
    if role is None:
        fail(f"no role: pass --role host|storage, or set daemon.role in {settings.path}")
    libvirt_uri: str = settings["daemon.libvirt_uri"]
    return NodeConfig(
        role=Role(role),
        data_dir=settings["daemon.data_dir"],
        listen=settings["daemon.listen"],
        tracker=settings["cluster.tracker"],
        control_path=settings["daemon.control"],
        rack=settings["daemon.rack"],
        max_peers=settings["daemon.max_peers"],
        upload_slots=settings["daemon.upload_slots"],
        upload_limit=settings["daemon.upload_limit"],
        max_connections_per_address=settings["daemon.max_connections_per_address"],
        peer_upload_limit=settings["daemon.peer_upload_limit"],
        peer_download_limit=settings["daemon.peer_download_limit"],
        ban_seconds=settings["daemon.ban_seconds"],
        handshake_timeout=settings["daemon.handshake_timeout"],
        idle_timeout=settings["daemon.idle_timeout"],
        libvirt_uri=None if libvirt_uri.lower() == "none" else libvirt_uri,
        flavors=load_flavors(settings["cluster.flavors"]),
        download=DownloadConfig(no_source_timeout=settings["daemon.no_source_timeout"]),
        peers=settings["daemon.peers"],
        metrics_listen=settings["daemon.metrics"],
        trusted_keys=trust_keys(settings),
        allow_unsigned=settings["cluster.allow_unsigned"],
        scrub_interval=settings["daemon.scrub_interval"],
        nbd_read_timeout=settings["daemon.nbd_read_timeout"],
        tls=tls_material(
            settings, TlsRole(role), warn=False
        ),  # a host needs a host certificate, and so on
    )


@daemon_app.command("run")
def daemon_run(
    role: Annotated[str | None, _option("daemon.role", "--role")] = None,
    data_dir: Annotated[Path | None, _option("daemon.data_dir", "--data-dir")] = None,
    tracker: Annotated[str | None, _option("cluster.tracker", "--tracker")] = None,
    listen: Annotated[str | None, _option("daemon.listen", "--listen")] = None,
    control: Annotated[Path | None, _option("daemon.control", "--control")] = None,
    rack: Annotated[str | None, _option("daemon.rack", "--rack")] = None,
    max_peers: Annotated[int | None, _option("daemon.max_peers", "--max-peers")] = None,
    upload_slots: Annotated[int | None, _option("daemon.upload_slots", "--upload-slots")] = None,
    upload_limit: Annotated[str | None, _option("daemon.upload_limit", "--upload-limit")] = None,
    max_connections_per_address: Annotated[
        int | None,
        _option("daemon.max_connections_per_address", "--max-connections-per-address"),
    ] = None,
    peer_upload_limit: Annotated[
        str | None, _option("daemon.peer_upload_limit", "--peer-upload-limit")
    ] = None,
    peer_download_limit: Annotated[
        str | None, _option("daemon.peer_download_limit", "--peer-download-limit")
    ] = None,
    ban_seconds: Annotated[float | None, _option("daemon.ban_seconds", "--ban-seconds")] = None,
    handshake_timeout: Annotated[
        float | None, _option("daemon.handshake_timeout", "--handshake-timeout")
    ] = None,
    idle_timeout: Annotated[float | None, _option("daemon.idle_timeout", "--idle-timeout")] = None,
    no_source_timeout: Annotated[
        float | None, _option("daemon.no_source_timeout", "--no-source-timeout")
    ] = None,
    flavors_file: Annotated[Path | None, _option("cluster.flavors", "--flavors")] = None,
    libvirt_uri: Annotated[str | None, _option("daemon.libvirt_uri", "--libvirt-uri")] = None,
    peers: Annotated[bool | None, _option("daemon.peers", "--peers/--no-peers")] = None,
    log_level: Annotated[str | None, _option("log.level", "--log-level")] = None,
    metrics: Annotated[str | None, _option("daemon.metrics", "--metrics")] = None,
    trusted_key: TrustedKeyOption = None,
    allow_unsigned: AllowUnsignedOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    insecure: InsecureOption = False,
    config: ConfigOption = None,
    show_config: ShowConfigOption = False,
) -> None:
    """Run a host or storage-center daemon until SIGTERM or SIGINT.

    Every link (tracker, peers, RPC) is mutual TLS with tls.ca/cert/key (--tls-*) and a
    certificate of the daemon's own role; --insecure runs plain TCP instead (it warns).
    """
    settings = run_settings(
        config,
        {
            "daemon.role": role,
            "daemon.data_dir": data_dir,
            "cluster.tracker": tracker,
            "daemon.listen": listen,
            "daemon.control": control,
            "daemon.rack": rack,
            "daemon.max_peers": max_peers,
            "daemon.upload_slots": upload_slots,
            "daemon.upload_limit": upload_limit,
            "daemon.max_connections_per_address": max_connections_per_address,
            "daemon.peer_upload_limit": peer_upload_limit,
            "daemon.peer_download_limit": peer_download_limit,
            "daemon.ban_seconds": ban_seconds,
            "daemon.handshake_timeout": handshake_timeout,
            "daemon.idle_timeout": idle_timeout,
            "daemon.no_source_timeout": no_source_timeout,
            "cluster.flavors": flavors_file,
            "daemon.libvirt_uri": libvirt_uri,
            "daemon.peers": peers,
            "log.level": log_level,
            "daemon.metrics": metrics,
            **tls_flags(tls_ca, tls_cert, tls_key, insecure),
        },
        trusted_key=trusted_key,
        allow_unsigned=allow_unsigned,
        show_config=show_config,
    )
    if settings is None:
        return
    node = node_config(settings)
    if node.tracker is None:
        log.warning("no tracker configured (--tracker, cluster.tracker): running without one")
    try:
        trio.run(run_until_signalled, node)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:  # trio wraps the one real error: report that one
        raise leaf(group) from None


def _split_name(text: str) -> tuple[str, str | None]:
    name, sep, version = text.partition(":")
    if not name or (sep and not version):
        fail(f"template must be NAME or NAME:VERSION, got {text!r}")
    return name, version if sep else None


def fetch(
    template: Annotated[str, typer.Argument(help="NAME or NAME:VERSION (default: newest).")],
    control: ControlOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Ask the local daemon to fetch a template and wait until it is verified."""
    name, version = _split_name(template)
    path = control_socket(config, control)
    view = ProgressView(template)
    try:
        result = trio.run(call_control, path, "fetch", {"name": name, "version": version}, view)
    finally:
        view.finish()
    summary = {
        key: result.get(key)
        for key in (
            "template_id",
            "path",
            "size",
            "seconds",
            "chunks_seconds",
            "bytes_from_centers",
            "bytes_from_peers",
            "sources",
            "wasted_bytes",
        )
    }
    if json_output:
        print_json(summary)
        return
    typer.echo(
        f"fetched {result.get('name', name)}:{result.get('version', version)} "
        f"({summary['template_id']}) to {summary['path']}: "
        f"{human_bytes(int(summary['size'] or 0))} in {float(summary['seconds'] or 0):.2f}s, "
        f"{human_bytes(int(summary['bytes_from_centers'] or 0))} from centers, "
        f"{human_bytes(int(summary['bytes_from_peers'] or 0))} from peers, "
        f"{summary['sources']} sources"
    )


def _show_status(result: dict[str, Any], json_output: bool) -> None:
    if json_output:
        print_json(result)
        return
    print_renderable(status_renderable(result), status_lines(result))


async def _watch_status(path: Path, interval: float, json_output: bool) -> None:
    """Refresh until Ctrl-C: live in place on a terminal, one snapshot after another otherwise."""
    if is_terminal(sys.stdout) and not json_output:
        with Live(console=console(), auto_refresh=False) as live:
            while True:
                live.update(status_renderable(await call_control(path, "status", {})))
                live.refresh()
                await trio.sleep(interval)
    while True:
        _show_status(await call_control(path, "status", {}), json_output)
        if not json_output:
            typer.echo("")
        sys.stdout.flush()
        await trio.sleep(interval)


def status(
    control: ControlOption = None,
    config: ConfigOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (with --watch: one per line).")
    ] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Keep refreshing until Ctrl-C.")] = False,
    interval: Annotated[
        float | None,
        typer.Option("--interval", help=setting_help("cli.watch_interval"), show_default=False),
    ] = None,
) -> None:
    """Show the local daemon's templates, rates, peers and bans."""
    settings = load(config, {"daemon.control": control, "cli.watch_interval": interval})
    path = settings.control_socket()
    if not watch:
        _show_status(trio.run(call_control, path, "status", {}), json_output)
        return
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
        trio.run(_watch_status, path, settings["cli.watch_interval"], json_output)


def register(app: typer.Typer) -> None:
    """Add `daemon run`, `fetch` and `status` to the vmswarm app."""
    app.add_typer(daemon_app, name="daemon")
    app.command("fetch")(fetch)
    app.command("status")(status)
