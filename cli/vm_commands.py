"""`vmswarm flavors`, `vmswarm vms` and `vmswarm vm stop|start|delete|resize`: VMs on a host.

`vms` and `vm ...` talk to the local host daemon over its control socket. `flavors` reads a
flavors file (--flavors), else asks the tracker (--tracker, $VMSWARM_TRACKER, cluster.tracker),
else the local daemon, else shows the built-ins.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Any

import trio
import typer

from ..daemon.config_files import load_flavors
from ..daemon.control import ControlUnreachable, call_control
from ..daemon.rpc import RpcError
from ..daemon.tracker_client import ClusterVms, TrackerClient, VmInfo
from ..swarm.flavors import default_flavors, flavor_list, parse_size
from .config_options import (
    ConfigOption,
    ControlOption,
    InsecureOption,
    JsonOption,
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TrackerOption,
    load,
    tls_flags,
    tracker_tls,
)
from .output import fail, human_bytes, print_json, print_table, say
from .tracker_commands import ask_tracker

VmArgument = Annotated[str, typer.Argument(help="VM id (or a unique prefix of it) or name.")]

vm_app = typer.Typer(
    name="vm", help="Stop, start, delete or resize a VM on this host.", no_args_is_help=True
)


def _call(
    control: Path | None, config: Path | None, method: str, params: dict[str, Any]
) -> dict[str, Any]:
    """One control call to the local daemon; errors go to the one handler in cli/main.py."""
    path = load(config, {"daemon.control": control}).control_socket()
    try:
        return trio.run(call_control, path, method, params)
    except RpcError as exc:
        if exc.code == "unknown_method":
            fail(f"the daemon at {path} runs no VMs (is it a storage center?)", 1)
        raise


# -- flavors ---------------------------------------------------------------------------------


def _tracker_flavors(address: tuple[str, int], tls: ssl.SSLContext | None) -> list[dict[str, Any]]:
    async def ask() -> list[dict[str, Any]]:
        client = await TrackerClient.connect(*address, tls=tls)
        async with client:
            return await client.flavors()

    return trio.run(ask)


FLAVOR_HEADERS = ["NAME", "VCPUS", "MEMORY", "DISK", "LIVE RESIZE UP TO"]


def flavor_rows(flavors: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            f["name"],
            str(f["vcpus"]),
            human_bytes(f["memory"]),
            human_bytes(f["disk"]),
            f"{f['max_vcpus']} vCPUs, {human_bytes(f['max_memory'])}",
        ]
        for f in flavors
    ]


def flavors(
    flavors_file: Annotated[
        Path | None, typer.Option("--flavors", help="Read this flavors TOML file.")
    ] = None,
    tracker_flag: TrackerOption = None,
    control: ControlOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    insecure: InsecureOption = False,
) -> None:
    """List the flavors (named VM sizes) launches can use: from --flavors FILE, else the tracker,
    else the local daemon, else the built-ins."""
    settings = load(
        config,
        {
            "cluster.tracker": tracker_flag,
            "daemon.control": control,
            **tls_flags(tls_ca, tls_cert, tls_key, insecure),
        },
    )
    tracker: tuple[str, int] | None = settings["cluster.tracker"]
    source: str
    if flavors_file is not None:
        found = flavor_list(load_flavors(flavors_file))
        source = str(flavors_file)
    elif tracker is not None:
        found = _tracker_flavors(tracker, tracker_tls(settings))
        source = f"tracker {settings.where('cluster.tracker')}"
    else:
        path = settings.control_socket()
        try:
            found = trio.run(call_control, path, "flavors", {})["flavors"]
            source = f"daemon {path}"
        except (ControlUnreachable, RpcError):
            found = flavor_list(default_flavors())
            source = "built-in"
            say(f"vmswarm: no daemon at {path} and no tracker configured: built-in flavors")
    if json_output:
        print_json({"source": source, "flavors": found})
        return
    print_table(FLAVOR_HEADERS, flavor_rows(found), right={"VCPUS", "MEMORY", "DISK"})


# -- vms -------------------------------------------------------------------------------------

VM_HEADERS = [
    "VM_ID",
    "NAME",
    "STATE",
    "FLAVOR",
    "VCPUS",
    "MEMORY",
    "CPU",
    "MEM USED",
    "NET RX/TX",
    "DISK R/W",
    "TEMPLATE",
]


def vm_rows(vms: list[dict[str, Any]]) -> list[list[str]]:
    """The `vmswarm vms` table: one row per VM."""
    return [
        [
            vm["vm_id"],
            vm["name"],
            vm["state"],
            vm["flavor"],
            str(vm["vcpus"]),
            human_bytes(vm["memory"]),
            f"{100 * vm['cpu_utilisation']:.1f}%",
            human_bytes(vm["memory_bytes"]),
            f"{human_bytes(vm['net_rx_bytes'])}/{human_bytes(vm['net_tx_bytes'])}",
            f"{human_bytes(vm['disk_read_bytes'])}/{human_bytes(vm['disk_write_bytes'])}",
            vm.get("template", vm["template_id"][:16]),
        ]
        for vm in vms
    ]


def _cluster_vm_json(vm: VmInfo) -> dict[str, Any]:
    return {
        "host": vm.host,
        "vm_id": vm.vm_id,
        "domain": vm.domain,
        "name": vm.name,
        "template_id": vm.template_id.hex(),
        "flavor": vm.flavor,
        "state": vm.state,
        "vcpus": vm.vcpus,
        "memory": vm.memory,
        **vm.stats,
    }


def _cluster_vms(
    config: Path | None, tracker_flag: str | None, json_output: bool, tls: dict[str, object]
) -> None:
    async def query(client: TrackerClient) -> ClusterVms:
        return await client.vms()

    found = ask_tracker(config, tracker_flag, query, tls)
    listed = [_cluster_vm_json(vm) for vm in found.vms]
    unreachable = [{"host": f.host, "error": f.error} for f in found.unreachable]
    if json_output:
        print_json({"vms": listed, "unreachable": unreachable})
        return
    for failure in unreachable:
        say(f"vmswarm: host {failure['host']} did not answer: {failure['error']}")
    if not listed:
        typer.echo("no VMs in the cluster")
        return
    rows = [[vm["host"], *row] for vm, row in zip(listed, vm_rows(listed), strict=True)]
    print_table(
        ["HOST", *VM_HEADERS],
        rows,
        right={"VCPUS", "MEMORY", "CPU", "MEM USED", "NET RX/TX", "DISK R/W"},
    )


def vms(
    control: ControlOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster", help="Every host's VMs, through the tracker, instead of this host's."
        ),
    ] = False,
    tracker_flag: TrackerOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    insecure: InsecureOption = False,
) -> None:
    """List this host's VMs (or with --cluster every host's) with CPU, memory, net and disk."""
    if cluster:
        _cluster_vms(
            config, tracker_flag, json_output, tls_flags(tls_ca, tls_cert, tls_key, insecure)
        )
        return
    result = _call(control, config, "vms", {})
    if json_output:
        print_json(result)
        return
    capacity = result.get("capacity")
    title = None
    if capacity:
        title = (
            f"host {result.get('host') or '-'} ({result.get('domain_type') or '?'}): "
            f"{capacity['vcpus_used']}/{capacity['vcpus_total']} vCPUs, "
            f"{human_bytes(capacity['memory_used'])}/{human_bytes(capacity['memory_total'])} "
            "memory in use"
        )
    if not result["vms"]:
        if title:
            typer.echo(title)
        typer.echo("no VMs")
        return
    print_table(
        VM_HEADERS,
        vm_rows(result["vms"]),
        right={"VCPUS", "MEMORY", "CPU", "MEM USED", "NET RX/TX", "DISK R/W"},
        title=title,
    )


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
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Stop a VM: ACPI shutdown, then power off if the guest does not within the timeout."""
    result = _call(control, config, "vm_stop", {"vm_id": vm, "force": force})
    if json_output:
        print_json(result)
        return
    typer.echo(f"{_state_line(result)} ({result.get('how')})")


@vm_app.command("start")
def vm_start(
    vm: VmArgument,
    control: ControlOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Start a stopped VM."""
    result = _call(control, config, "vm_start", {"vm_id": vm})
    if json_output:
        print_json(result)
        return
    typer.echo(_state_line(result))


@vm_app.command("delete")
def vm_delete(
    vm: VmArgument,
    control: ControlOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Delete a VM: its domain and its overlay (never the template)."""
    result = _call(control, config, "vm_delete", {"vm_id": vm})
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
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Change a VM's vCPUs and/or memory, live when it runs, within its flavor's maximums."""
    if vcpus is None and memory is None:
        fail("give --vcpus N and/or --memory SIZE")
    size = None if memory is None else parse_size(memory, "--memory")
    result = _call(control, config, "vm_resize", {"vm_id": vm, "vcpus": vcpus, "memory": size})
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
