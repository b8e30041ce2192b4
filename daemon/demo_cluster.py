"""The local demo: tracker, storage centers and hosts as real processes; all hosts fetch at once."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import trio

from .bootdisk import BootDiskError, build_boot_disk, missing_tools
from .cluster import LocalCluster, Node
from .mixed_image import write_mixed_image
from .rpc import RpcClient

LIBVIRT_URI = "qemu:///system"
VM_FLAVOR = "tiny"
MARKER_TIMEOUT = 300.0


@dataclass(frozen=True)
class HostResult:
    name: str
    seconds: float
    bytes_from_centers: int
    bytes_from_peers: int
    sources: int
    path: str
    digest_ok: bool


@dataclass(frozen=True)
class VmResult:
    """The VM the demo launched from the distributed template, and how long each step took."""

    host: str
    vm_id: str
    domain: str
    placement: str
    domain_type: str | None
    seconds_fetch: float
    seconds_boot: float
    seconds_to_marker: float  # from the launch command to the guest's line on its serial console
    marker: str


@dataclass(frozen=True)
class DemoResult:
    template_id: str
    size: int
    publish_seconds: float
    hosts: list[HostResult]
    vm: VmResult | None = None
    vm_problem: str | None = None  # why no VM was launched, said plainly

    @property
    def bytes_from_centers(self) -> int:
        return sum(h.bytes_from_centers for h in self.hosts)

    @property
    def bytes_from_peers(self) -> int:
        return sum(h.bytes_from_peers for h in self.hosts)

    @property
    def all_verified(self) -> bool:
        return bool(self.hosts) and all(h.digest_ok for h in self.hosts)


def file_digest(path: Path) -> bytes:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as image:
        while block := image.read(1 << 22):
            hasher.update(block)
    return hasher.digest()


def vm_launch_problem(uri: str = LIBVIRT_URI) -> str | None:
    """Why this machine cannot boot a real VM through libvirtd, or None if it can."""
    if os.geteuid() != 0:
        return "booting VMs through libvirtd needs root here"
    missing = missing_tools()
    if missing:
        return f"the boot disk tools are missing ({', '.join(missing)})"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86 is not installed"
    # Only daemon/libvirt_launcher.py imports libvirt; here it is enough to know it is installed.
    if importlib.util.find_spec("libvirt") is None:
        return "the libvirt Python binding (libvirt-python) is not installed"
    virsh = shutil.which("virsh")
    if virsh is None:
        return "virsh (libvirt-clients) is not installed"
    try:
        answer = subprocess.run(
            [virsh, "-c", uri, "version"], capture_output=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        return f"libvirtd does not answer on {uri}"
    if answer.returncode != 0:
        detail = answer.stderr.decode(errors="replace").strip().splitlines()
        return f"libvirtd does not answer on {uri}: {detail[-1] if detail else 'no reason given'}"
    return None


def make_bootable(image: Path, marker: str) -> None:
    """Put a tiny bootable Linux disk at the start of `image`; the rest stays as it is."""
    with tempfile.TemporaryDirectory(prefix="vmswarm-demo-boot-") as scratch:
        disk = build_boot_disk(Path(scratch) / "boot.raw", marker=marker)
        data = disk.path.read_bytes()
    if len(data) > image.stat().st_size:
        raise BootDiskError(f"the template must be at least {len(data) >> 20} MiB to boot")
    with image.open("r+b") as target:
        target.write(data)


def control_call(node: Node, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One RPC on a daemon's control socket."""

    async def call() -> dict[str, Any]:
        assert node.control is not None
        async with await RpcClient.connect_unix(str(node.control)) as client:
            return await client.call(method, params)

    return trio.run(call)


def wait_for_marker(path: Path, marker: str, timeout: float = MARKER_TIMEOUT) -> float:
    """Seconds until `marker` shows in a serial console file; TimeoutError if it never does."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if path.exists() and marker.encode() in path.read_bytes():
            return time.monotonic() - began
        time.sleep(0.1)
    raise TimeoutError(f"the guest printed no {marker!r} on {path} within {timeout:g}s")


def launch_vm(
    cluster: LocalCluster, template: str, marker: str, say: Callable[[str], None]
) -> VmResult:
    """`vmswarm launch` through the tracker, wait for the guest's marker, then delete the VM."""
    began = time.monotonic()
    launched = json.loads(
        cluster.run_cli("launch", template, "--flavor", VM_FLAVOR, "--json", timeout=900).stdout
    )
    node = next(h for h in cluster.hosts if h.listen_address == launched["host"])
    say(
        f"tracker placed VM {launched['vm_id']} on {node.name} ({launched['placement']}); "
        f"waiting for its serial console"
    )
    try:
        wait_for_marker(Path(launched["serial_log"]), marker)
        seconds = time.monotonic() - began
    finally:
        control_call(node, "vm_delete", {"vm_id": launched["vm_id"]})
    return VmResult(
        host=node.name,
        vm_id=launched["vm_id"],
        domain=launched["domain"],
        placement=launched["placement"],
        domain_type=launched.get("domain_type"),
        seconds_fetch=float(launched["seconds_fetch"]),
        seconds_boot=float(launched["seconds_boot"]),
        seconds_to_marker=seconds,
        marker=marker,
    )


def run_demo(
    *,
    hosts: int = 6,
    centers: int = 3,
    size: int = 256 << 20,
    replicas: int = 2,
    workdir: Path | None = None,
    launch: bool = True,
    say: Callable[[str], None] = lambda _text: None,
) -> DemoResult:
    """Run the whole demo and stop every process it started, whatever happens."""
    vm_problem = vm_launch_problem() if launch else "not asked to (--no-vm)"
    marker = f"VMSWARM-DEMO-{uuid.uuid4().hex[:8]}"
    # Mutual TLS on every link, as in production: the cluster makes a CA and role certificates.
    with LocalCluster(workdir, tls=True) as cluster:
        say(f"work dir {cluster.workdir}")
        say(f"mutual TLS on every link: cluster CA and role certificates in {cluster.ca_dir}")
        # qemu runs as libvirt-qemu and must reach the templates and overlays under it.
        cluster.workdir.chmod(0o755)
        # What an operator does first: a publisher key; every node trusts its public half.
        keys = cluster.workdir / "keys"
        made = json.loads(
            cluster.run_cli(
                "key", "generate", "--out", str(keys), "--name", "publisher", "--json"
            ).stdout
        )
        cluster.use_signing_key(Path(made["private_key"]), Path(made["public_key"]))
        say(f"publisher key {made['key_id']} in {keys}; every node trusts only it")
        cluster.start_tracker()
        for i in range(centers):
            cluster.start_center(f"center{i + 1}")
        say(f"tracker at {cluster.tracker_address}, {centers} storage centers up")
        image = cluster.workdir / "demo.img"
        write_mixed_image(image, size, seed=7)
        say(f"generated a {size >> 20} MiB image mixing random data and zero regions")
        if vm_problem is None:
            try:
                make_bootable(image, marker)
                say("made its first 16 MiB a tiny bootable Linux disk")
            except BootDiskError as exc:
                vm_problem = str(exc)
        started = time.perf_counter()
        published = json.loads(
            cluster.run_cli(
                "publish",
                str(image),
                "--name",
                "demo",
                "--version",
                "1",
                "--replicas",
                str(replicas),
                *cluster.sign_args,
                "--json",
                timeout=600,
            ).stdout
        )
        publish_seconds = time.perf_counter() - started
        say(
            f"published demo:1 as {published['template_id']} "
            f"in {publish_seconds:.1f}s (r={replicas})"
        )
        host_args = ["--libvirt-uri", LIBVIRT_URI if vm_problem is None else "none"]
        for i in range(hosts):
            cluster.start_host(f"host{i + 1}", *host_args)
        say(f"{hosts} hosts up; fetching on all of them at once")
        expected = bytes.fromhex(published["digest"]) if "digest" in published else None

        def fetch(index: int) -> dict[str, Any]:
            node = cluster.hosts[index]
            result = cluster.run_cli("fetch", "demo:1", "--json", node=node, timeout=900)
            return {"name": node.name, **json.loads(result.stdout)}

        with ThreadPoolExecutor(max_workers=hosts) as pool:
            fetched = list(pool.map(fetch, range(hosts)))
        if expected is None:
            manifest_json = json.loads(cluster.run_cli("manifest", str(image), "--json").stdout)
            expected = bytes.fromhex(manifest_json["digest"])
        results = [
            HostResult(
                name=f["name"],
                seconds=float(f["seconds"]),
                bytes_from_centers=int(f["bytes_from_centers"]),
                bytes_from_peers=int(f["bytes_from_peers"]),
                sources=int(f["sources"]),
                path=str(f["path"]),
                digest_ok=file_digest(Path(f["path"])) == expected,
            )
            for f in fetched
        ]
        vm = None
        if vm_problem is None:
            say("launching a VM from the distributed template")
            vm = launch_vm(cluster, "demo:1", marker, say)
        else:
            say(f"no VM launched: {vm_problem}")
        return DemoResult(published["template_id"], size, publish_seconds, results, vm, vm_problem)
