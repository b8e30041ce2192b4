"""`vmswarm flavors`, `vmswarm vms` and `vmswarm vm stop|start|delete|resize`: VMs on a host.

`vms` and `vm ...` talk to the local host daemon over its control socket. `flavors` reads a
flavors file (--flavors), else asks the tracker (--tracker / $VMSWARM_TRACKER), else the local
daemon, else shows the built-ins.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import trio
import typer

from ..daemon.config_files import ConfigError, load_flavors
from ..daemon.control import ControlUnreachable, call_control
from ..daemon.rpc import LINK_ERRORS, RpcError
from ..daemon.tracker_client import TrackerClient, TrackerUnreachable
from ..swarm.address import parse_address
from ..swarm.flavors import FlavorError, default_flavors, flavor_list, parse_size
from .daemon_commands import DEFAULT_CONTROL, ControlOption
from .output import fail, human_bytes, print_json

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
VmArgument = Annotated[str, typer.Argument(help="VM id (or a unique prefix of it) or name")]

vm_app = typer.Typer(
    name="vm", help="Stop, start, delete or resize a VM on this host.", no_args_is_help=True
)


def _control(control: Path | None) -> Path:
    return control if control is not None else DEFAULT_CONTROL


def _call(control: Path | None, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One control call to the local daemon; every failure is one clear line."""
    try:
        return trio.run(call_control, _control(control), method, params)
    except ControlUnreachable as exc:
        fail(str(exc))
    except RpcError as exc:
        if exc.code == "unknown_method":
            fail(f"the daemon at {_control(control)} runs no VMs (is it a storage center?)")
        fail(exc.message)


# -- flavors ---------------------------------------------------------------------------------


def _tracker_flavors(address: str) -> list[dict[str, Any]]:
    try:
        host, port = parse_address(address)
    except ValueError as exc:
        fail(f"--tracker: {exc}")

    async def ask() -> list[dict[str, Any]]:
        client = await TrackerClient.connect(host, port)
        async with client:
            return await client.flavors()

    try:
        return trio.run(ask)
    except TrackerUnreachable as exc:
        fail(f"cannot reach tracker {address}: {exc}")
    except LINK_ERRORS as exc:
        fail(f"lost tracker {address}: {exc}")
    except RpcError as exc:
        fail(exc.message)


def flavor_lines(flavors: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'NAME':<12} {'VCPUS':>5} {'MEMORY':>10} {'DISK':>10}  LIVE RESIZE UP TO"]
    for f in flavors:
        lines.append(
            f"{f['name']:<12} {f['vcpus']:>5} {human_bytes(f['memory']):>10} "
            f"{human_bytes(f['disk']):>10}  {f['max_vcpus']} vCPUs, {human_bytes(f['max_memory'])}"
        )
    return lines


def flavors(
    flavors_file: Annotated[
        Path | None, typer.Option("--flavors", help="Read this flavors TOML file.")
    ] = None,
    tracker: Annotated[
        str | None,
        typer.Option("--tracker", envvar="VMSWARM_TRACKER", help="Ask this tracker HOST:PORT."),
    ] = None,
    control: ControlOption = None,
    json_output: JsonOption = False,
) -> None:
    """List the flavors (named VM sizes) launches can use."""
    source: str
    if flavors_file is not None:
        try:
            found = flavor_list(load_flavors(flavors_file))
        except ConfigError as exc:
            fail(str(exc))
        source = str(flavors_file)
    elif tracker:
        found = _tracker_flavors(tracker)
        source = f"tracker {tracker}"
    else:
        path = _control(control)
        try:
            found = trio.run(call_control, path, "flavors", {})["flavors"]
            source = f"daemon {path}"
        except (ControlUnreachable, RpcError):
            found = flavor_list(default_flavors())
            source = "built-in"
            sys.stderr.write(f"vmswarm: no daemon at {path} and no --tracker: built-in flavors\n")
    if json_output:
        print_json({"source": source, "flavors": found})
        return
    for line in flavor_lines(found):
        typer.echo(line)


# -- vms -------------------------------------------------------------------------------------


def vm_lines(vms: list[dict[str, Any]]) -> list[str]:
    """The `vmswarm vms` table: one line per VM."""
    if not vms:
        return ["no VMs"]
    lines = [
        f"{'VM_ID':<12} {'NAME':<24} {'STATE':<9} {'FLAVOR':<8} {'VCPUS':>5} {'MEMORY':>10} "
        f"{'CPU':>6} {'MEM USED':>10} {'NET RX/TX':>21} {'DISK R/W':>21}  TEMPLATE"
    ]
    for vm in vms:
        net = f"{human_bytes(vm['net_rx_bytes'])}/{human_bytes(vm['net_tx_bytes'])}"
        disk = f"{human_bytes(vm['disk_read_bytes'])}/{human_bytes(vm['disk_write_bytes'])}"
        lines.append(
            f"{vm['vm_id']:<12} {vm['name'][:24]:<24} {vm['state']:<9} {vm['flavor']:<8} "
            f"{vm['vcpus']:>5} {human_bytes(vm['memory']):>10} "
            f"{100 * vm['cpu_utilisation']:>5.1f}% {human_bytes(vm['memory_bytes']):>10} "
            f"{net:>21} {disk:>21}  {vm.get('template', vm['template_id'][:16])}"
        )
    return lines


def vms(control: ControlOption = None, json_output: JsonOption = False) -> None:
    """List this host's VMs with CPU, memory, network and disk figures."""
    result = _call(control, "vms", {})
    if json_output:
        print_json(result)
        return
    capacity = result.get("capacity")
    if capacity:
        typer.echo(
            f"host {result.get('host') or '-'} ({result.get('domain_type') or '?'}): "
            f"{capacity['vcpus_used']}/{capacity['vcpus_total']} vCPUs, "
            f"{human_bytes(capacity['memory_used'])}/{human_bytes(capacity['memory_total'])} "
            "memory in use"
        )
    for line in vm_lines(result["vms"]):
        typer.echo(line)


# -- vm stop|start|delete|resize -------------------------------------------------------------


def _state_line(result: dict[str, Any]) -> str:
    return f"{result['domain']} ({result['vm_id']}): {result['state']}"


@vm_app.command("stop")
def vm_stop(
    vm: VmArgument,
    force: Annotated[
        bool, typer.Option("--force", help="Power off at once instead of an ACPI shutdown.")
    ] = False,
    control: ControlOption = None,
    json_output: JsonOption = False,
) -> None:
    """Stop a VM: ACPI shutdown, then power off if the guest does not within the timeout."""
    result = _call(control, "vm_stop", {"vm_id": vm, "force": force})
    if json_output:
        print_json(result)
        return
    typer.echo(f"{_state_line(result)} ({result.get('how')})")


@vm_app.command("start")
def vm_start(
    vm: VmArgument, control: ControlOption = None, json_output: JsonOption = False
) -> None:
    """Start a stopped VM."""
    result = _call(control, "vm_start", {"vm_id": vm})
    if json_output:
        print_json(result)
        return
    typer.echo(_state_line(result))


@vm_app.command("delete")
def vm_delete(
    vm: VmArgument, control: ControlOption = None, json_output: JsonOption = False
) -> None:
    """Delete a VM: its domain and its overlay (never the template)."""
    result = _call(control, "vm_delete", {"vm_id": vm})
    if json_output:
        print_json(result)
        return
    typer.echo(f"deleted {result['domain']} ({result['vm_id']})")


@vm_app.command("resize")
def vm_resize(
    vm: VmArgument,
    vcpus: Annotated[int | None, typer.Option("--vcpus", min=1, help="New vCPU count.")] = None,
    memory: Annotated[
        str | None, typer.Option("--memory", help="New memory size, e.g. 512MiB or 2G.")
    ] = None,
    control: ControlOption = None,
    json_output: JsonOption = False,
) -> None:
    """Change a VM's vCPUs and/or memory, live when it runs, within its flavor's maximums."""
    if vcpus is None and memory is None:
        fail("give --vcpus N and/or --memory SIZE")
    size: int | None = None
    if memory is not None:
        try:
            size = parse_size(memory, "--memory")
        except FlavorError as exc:
            fail(str(exc))
    result = _call(control, "vm_resize", {"vm_id": vm, "vcpus": vcpus, "memory": size})
    if json_output:
        print_json(result)
        return
    when = "live" if result.get("live") else "from its next start"
    typer.echo(
        f"{result['domain']} ({result['vm_id']}): {result['vcpus']} vCPUs, "
        f"{human_bytes(result['memory'])} ({when})"
    )


def register(app: typer.Typer) -> None:
    """Add `flavors`, `vms` and the `vm` group to the vmswarm app."""
    app.command("flavors")(flavors)
    app.command("vms")(vms)
    app.add_typer(vm_app, name="vm")
