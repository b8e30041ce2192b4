"""`vmswarm launch NAME[:VER] --flavor F`: the tracker places the VM, the chosen host boots it."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..daemon.tracker_client import DEFAULT_LAUNCH_TIMEOUT, LaunchResult, TrackerClient
from ..swarm.address import format_address, parse_address
from .config_options import (
    ConfigOption,
    InsecureOption,
    JsonOption,
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TrackerOption,
    tls_flags,
)
from .output import fail, print_json
from .tracker_commands import ask_tracker, parse_template_ref


def launch_json(result: LaunchResult) -> dict[str, Any]:
    return {
        "vm_id": result.vm_id,
        "host": result.host,
        "template_id": result.template_id.hex(),
        "seconds_fetch": result.seconds_fetch,
        "seconds_boot": result.seconds_boot,
        "domain": result.domain,
        "host_peer_id": result.host_peer_id.hex(),
        "placement": result.placement,
        "serial_log": result.serial_log,
        "domain_type": result.domain_type,
        "streaming": result.streaming,
    }


def _check_host(text: str) -> None:
    """--host is HOST:PORT or a peer id (prefix); catch a malformed address before the call."""
    if ":" not in text:
        return
    try:
        host, port = parse_address(text)
    except ValueError as exc:
        fail(f"--host: {exc}")
    if port == 0:
        fail(f"--host: {format_address(host, port)} needs a non-zero port")


def launch(
    template: Annotated[str, typer.Argument(help="NAME or NAME:VERSION (default: newest).")],
    flavor: Annotated[str, typer.Option("--flavor", help="Flavor name (vmswarm flavors).")],
    tracker_flag: TrackerOption = None,
    host: Annotated[
        str | None,
        typer.Option(
            "--host", help="Run it on this host daemon: HOST:PORT or its peer id (prefix)."
        ),
    ] = None,
    vm_name: Annotated[
        str | None, typer.Option("--name", help="The VM's name (default: template name + id).")
    ] = None,
    wait: Annotated[
        float,
        typer.Option("--timeout", min=1.0, help="Seconds to wait for the VM to be running."),
    ] = DEFAULT_LAUNCH_TIMEOUT,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Boot at once from the host's NBD export of the template while it arrives "
            "(chunks the VM reads first jump the queue); the VM moves to the local copy once "
            "it is complete.",
        ),
    ] = False,
    json_output: JsonOption = False,
    config: ConfigOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    insecure: InsecureOption = False,
) -> None:
    """Launch a VM: the tracker picks a host with room, preferring one that holds the template;
    that host fetches the template through the swarm and boots it."""
    try:
        name, version = parse_template_ref(template)
    except ValueError as exc:
        fail(str(exc))
    if host is not None:
        _check_host(host)

    async def query(client: TrackerClient) -> LaunchResult:
        return await client.launch(
            name, version, flavor, host=host, vm_name=vm_name, stream=stream, time_limit=wait
        )

    result = ask_tracker(
        config, tracker_flag, query, tls_flags(tls_ca, tls_cert, tls_key, insecure)
    )
    if json_output:
        print_json(launch_json(result))
        return
    fetched = "streaming" if result.streaming else f"fetch {result.seconds_fetch:.2f}s"
    typer.echo(
        f"launched {result.domain} (vm {result.vm_id}) on {result.host} [{result.placement}]: "
        f"{fetched}, boot {result.seconds_boot:.2f}s"
    )
    if result.serial_log:
        typer.echo(f"serial console: {result.serial_log}")


def register(app: typer.Typer) -> None:
    """Add `launch` to the vmswarm app."""
    app.command("launch")(launch)
