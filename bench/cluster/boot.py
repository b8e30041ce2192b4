"""Time to a running VM on the emulated cluster, with and without `vmswarm launch --stream`.

N hosts launch one VM each from one template at the same moment, each placed with --host on
its own host. The template is the tiny bootable disk padded with random data the boot never
reads. Per host: launch → the guest's serial marker, the share of chunks the host held at that
moment, and when its image was complete. The prefetch figure: a streaming boot on a fresh host
before and after a first streaming boot stored the template's boot profile at the tracker.

The tracker, storage centers and host daemons run in the network's namespaces (links shaped as
in bench.cluster); libvirtd and the VMs run in the root namespace: qemu:///system and each
host's NBD export are Unix sockets, reachable from any namespace. Every VM a run launched is
deleted, and every domain named after the run undefined, before its processes stop.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio
from vmswarm.daemon.bootdisk import build_boot_disk, pad_boot_disk
from vmswarm.daemon.cluster import ManagedProcess, vmswarm_command, vmswarm_script
from vmswarm.daemon.control import ControlUnreachable, call_control
from vmswarm.daemon.keys import generate_keypair
from vmswarm.daemon.rpc import RpcError
from vmswarm.daemon.tracker_client import TrackerClient

from . import procstat
from .fluid import payload_rate
from .netns import Network
from .scenarios import (
    CENTER_NAMES,
    DAEMON_PORT,
    READY_TIMEOUT,
    REPO_ROOT,
    TRACKER,
    TRACKER_PORT,
    BenchError,
    Processes,
    _live_centers,
    _wait,
    _wait_tcp,
    host_names,
)

LIBVIRT_URI = "qemu:///system"
TEMPLATE_NAME = "bootbench"
TEMPLATE_VERSION = "1"
FLAVOR = "tiny"
PROFILE_LOG_LINE = "stored the prefetch profile"
QEMU_PID_DIR = Path("/run/libvirt/qemu")
_MARKER_POLL = 0.05
_STATUS_POLL = 0.5
_DELETE_TIMEOUT = 60.0
_SETTLED_BUSY = 0.2
_SETTLE_WINDOW = 1.0
_SETTLE_LIMIT = 30.0

Mode = Literal["fetch", "stream"]
Say = Callable[[str], None]


@dataclass(frozen=True)
class BootImage:
    """The padded template: the tiny boot disk first, seeded random data after it."""

    path: Path
    size: int
    marker: str
    boot_bytes: int

    @staticmethod
    def create(directory: Path, size: int, marker: str, *, seed: int = 1) -> BootImage:
        directory.mkdir(parents=True, exist_ok=True)
        # The guest stays up after its marker, so the switch to the local file runs under it.
        disk = build_boot_disk(directory / "boot.raw", marker=marker, power_off=False)
        padded = pad_boot_disk(disk.path, directory / "padded.raw", size, seed)
        disk.path.unlink()
        return BootImage(padded, size, marker, disk.size)


@dataclass(frozen=True)
class HostBoot:
    """One host's VM: seconds from the common launch start, and what the host held."""

    name: str
    vm_id: str
    domain: str
    streaming: bool
    seconds_launch: float  # the launch call returned (the VM was started)
    seconds_marker: float  # the guest's marker was on its serial console
    seconds_complete: float | None  # the host's image was complete (None: not waited for)
    seconds_fetch: float  # as the host reported it
    seconds_boot: float
    chunks: int
    chunks_held_at_marker: int
    daemon_cpu_to_marker: float  # the host daemon's CPU seconds from launch start to marker
    vm_cpu_to_marker: float  # the VM's qemu process, from its start to the marker

    @property
    def held_fraction(self) -> float:
        return self.chunks_held_at_marker / self.chunks if self.chunks else 0.0


@dataclass(frozen=True)
class BootRun:
    """N hosts launching at once in one mode."""

    mode: Mode
    hosts: int
    size: int
    rate: int
    boots: list[HostBoot]
    cpu_busy: float  # share of the machine's cores busy from launch start to the last marker
    node_cpu: dict[str, float]  # each daemon's CPU seconds from launch start to the run's end
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def slowest(self) -> float:
        return max(b.seconds_marker for b in self.boots)

    @property
    def mean(self) -> float:
        return sum(b.seconds_marker for b in self.boots) / len(self.boots)

    @property
    def fetch_bound(self) -> float:
        """Seconds one host's link needs for the whole template (the fetch-first floor)."""
        return self.size / payload_rate(self.rate)


@dataclass(frozen=True)
class PrefetchRun:
    """A streaming boot on a fresh host without a profile, then one on another with it."""

    rep: int
    size: int
    rate: int
    first: HostBoot
    second: HostBoot
    profile_chunks: int
    seconds_profile_stored: float  # after the first launch started
    cpu_busy: dict[str, float]

    @property
    def gain(self) -> float:
        return self.first.seconds_marker - self.second.seconds_marker


@dataclass(frozen=True)
class _Target:
    name: str
    address: str
    control: Path
    pid: int
    vm_name: str


@dataclass
class _Launched:
    """What a run must undo: a VM on a host."""

    control: Path
    vm_id: str
    domain: str


class _VmProcesses(Processes):
    """Processes of a run whose hosts launch VMs through libvirtd."""

    def start(
        self, name: str, node: str, args: Sequence[str], command: Sequence[str]
    ) -> ManagedProcess:
        process = ManagedProcess(
            name,
            args,
            log_path=self.logdir / f"{name}.log",
            env={"VMSWARM_LIBVIRT_URI": LIBVIRT_URI},
            cwd=REPO_ROOT,
            command=[*self.net.exec_prefix(node), *command],
        )
        self.started[name] = process
        process.start()
        return process


class BootCluster:
    """A tracker, storage centers and VM hosts of one run in `net`'s namespaces.

    Use it as a context manager: leaving it deletes the run's VMs (and undefines any domain
    named after `tag`), stops every process and removes the shaping.
    """

    def __init__(
        self,
        net: Network,
        workdir: Path,
        logdir: Path,
        hosts: Sequence[str],
        *,
        tag: str,
        centers: int = len(CENTER_NAMES),
        peers: bool = True,
    ) -> None:
        self.net = net
        self.workdir = workdir
        self.hosts = list(hosts)
        self.centers = list(CENTER_NAMES[:centers])
        self.peers = peers
        self.tag = tag
        self.processes = _VmProcesses(net, logdir)
        self.launched: list[_Launched] = []
        self.tracker_ip = net.node(TRACKER).address
        self.tracker = f"{self.tracker_ip}:{TRACKER_PORT}"
        self.controls = {name: workdir / name / "control.sock" for name in self.all_daemons}
        self._trust: list[str] = []
        self._sign_key: Path | None = None

    @property
    def all_daemons(self) -> list[str]:
        return [*self.centers, *self.hosts]

    def address(self, name: str) -> str:
        return f"{self.net.node(name).address}:{DAEMON_PORT}"

    def log_path(self, name: str) -> Path:
        return self.processes.logdir / f"{name}.log"

    def __enter__(self) -> BootCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every process at once and wait until the centers are announced."""
        # qemu runs as libvirt-qemu: every folder above the templates and overlays is enterable.
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        key = generate_keypair(self.workdir / "keys")
        self._sign_key = key.private_path
        self._trust = ["--trusted-key", str(key.public_path), "--insecure"]
        vmswarm = vmswarm_command()
        state = ["--state-dir", str(self.workdir / TRACKER)]
        args = ["tracker", "run", "--listen", self.tracker, *state, *self._trust]
        self.processes.start(TRACKER, TRACKER, args, vmswarm)
        for name in self.centers:
            self._daemon(name, "storage", [])
        for name in self.hosts:
            extra = ["--libvirt-uri", LIBVIRT_URI, *([] if self.peers else ["--no-peers"])]
            self._daemon(name, "host", extra)
        _wait_tcp(self.net, TRACKER, TRACKER_PORT, self.processes)
        for name in self.all_daemons:
            what = f"{name}'s control socket"
            _wait(self.controls[name].exists, what, READY_TIMEOUT, self.processes)
            _wait_tcp(self.net, name, DAEMON_PORT, self.processes)
        _wait(
            lambda: _live_centers(self.net, self.tracker_ip) >= len(self.centers),
            f"{len(self.centers)} centers announced at the tracker",
            READY_TIMEOUT,
            self.processes,
        )

    def _daemon(self, name: str, role: str, extra: Sequence[str]) -> None:
        args = ["daemon", "run", "--role", role, "--tracker", self.tracker]
        args += ["--listen", self.address(name), "--data-dir", str(self.workdir / name)]
        args += ["--control", str(self.controls[name]), *self._trust, *extra]
        self.processes.start(name, name, args, vmswarm_command())

    def cli(self, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        """`vmswarm ARGS --tracker T --insecure` inside the tracker's namespace."""
        argv = [*self.net.exec_prefix(TRACKER), str(vmswarm_script()), *args]
        done = subprocess.run(
            [*argv, "--tracker", self.tracker, "--insecure"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(
                f"vmswarm {' '.join(args[:2])} failed ({done.returncode}): "
                f"{done.stderr.strip()[-2000:]}"
            )
        return done

    def publish(self, image: Path, *, replicas: int, chunk_size: int) -> None:
        """Publish `image` as bootbench:1, signed, unshaped (the timed part comes later)."""
        assert self._sign_key is not None, "start() the cluster first"
        self.cli(
            "publish",
            str(image),
            *("--name", TEMPLATE_NAME, "--version", TEMPLATE_VERSION),
            *("--replicas", str(min(replicas, len(self.centers)))),
            *("--chunk-size", str(chunk_size)),
            *("--sign-key", str(self._sign_key)),
            "--json",
        )

    def settle(self, busy: float = _SETTLED_BUSY, limit: float = _SETTLE_LIMIT) -> float:
        """Wait until the machine is mostly idle (the centers may still be storing the
        publish), so a timed boot starts from the same state; the seconds waited."""
        began = time.monotonic()
        while time.monotonic() - began < limit:
            before = procstat.MachineCpu.now()
            time.sleep(_SETTLE_WINDOW)
            if procstat.MachineCpu.now().busy_fraction_since(before) < busy:
                break
        return time.monotonic() - began

    def shape(self, rate: int) -> None:
        self.net.shape(self.all_daemons, rate)

    def pid(self, name: str) -> int:
        return self.processes.started[name].pid

    def target(self, name: str) -> _Target:
        return _Target(
            name, self.address(name), self.controls[name], self.pid(name), f"{self.tag}-{name}"
        )

    def boot(
        self,
        hosts: Sequence[str],
        *,
        stream: bool,
        marker: str,
        limit: float,
        wait_complete: bool,
    ) -> tuple[list[HostBoot], float]:
        """Launch on `hosts` at one moment; their boots and the machine's busy share until the
        last marker. Runs in the tracker's namespace (the launch goes to the tracker)."""
        targets = [self.target(name) for name in hosts]

        def run() -> tuple[list[HostBoot], float]:
            return trio.run(
                _boot_all,
                self.tracker_ip,
                targets,
                stream,
                marker,
                limit,
                wait_complete,
                self.launched,
            )

        return self.net.call_in(TRACKER, run)

    def track(self, control: Path, vm_id: str, domain: str) -> None:
        """Delete this VM when the cluster stops (for VMs launched outside `boot`)."""
        self.launched.append(_Launched(control, vm_id, domain))

    def delete_vm(self, vm_id: str) -> None:
        """Delete a VM this run launched (through its host's control socket)."""
        for launched in list(self.launched):
            if launched.vm_id == vm_id:
                trio.run(_delete, launched)
                self.launched.remove(launched)

    def stop(self) -> None:
        """Delete the VMs, undefine what is left of the run's domains, stop the processes."""
        try:
            for launched in self.launched:
                with contextlib.suppress(Exception):
                    trio.run(_delete, launched)
            self.launched.clear()
            undefine_domains(self.tag)
        finally:
            try:
                self.processes.stop_all()
            finally:
                self.net.unshape()


def run_domains(tag: str) -> list[str]:
    """libvirt domains (any state) whose names contain `tag`."""
    listed = subprocess.run(
        ["virsh", "-c", LIBVIRT_URI, "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [name for name in listed.stdout.split() if tag in name]


def undefine_domains(tag: str) -> list[str]:
    """Destroy and undefine every domain named after `tag`; the names."""
    found = run_domains(tag)
    for domain in found:
        for action in ("destroy", "undefine"):
            subprocess.run(
                ["virsh", "-c", LIBVIRT_URI, action, domain], capture_output=True, check=False
            )
    return found


async def _delete(launched: _Launched) -> None:
    with trio.move_on_after(_DELETE_TIMEOUT):
        await call_control(launched.control, "vm_delete", {"vm_id": launched.vm_id})


def qemu_cpu_seconds(domain: str) -> float:
    """CPU seconds of a running domain's qemu process (0 if it is not running)."""
    try:
        pid = int((QEMU_PID_DIR / f"{domain}.pid").read_text().strip())
        return procstat.cpu_seconds(pid, children=False)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return 0.0


def has_marker(path: Path, marker: str) -> bool:
    try:
        return marker.encode() in path.read_bytes()
    except FileNotFoundError:
        return False


async def _wait_for_marker(serial: Path, marker: str) -> None:
    # A file written by qemu: nothing to wait on but the file itself.
    while True:
        if has_marker(serial, marker):
            return
        await trio.sleep(_MARKER_POLL)


def template_status(status: dict[str, Any]) -> dict[str, Any] | None:
    """The benchmark template's entry in a host's `status` reply."""
    for entry in status.get("templates", []):
        if entry.get("name") == TEMPLATE_NAME:
            return dict(entry)
    return None


def _cpu(pid: int) -> float:
    try:
        return procstat.cpu_seconds(pid)
    except FileNotFoundError:
        return 0.0


async def _boot_all(
    tracker_ip: str,
    targets: Sequence[_Target],
    stream: bool,
    marker: str,
    limit: float,
    wait_complete: bool,
    launched: list[_Launched],
) -> tuple[list[HostBoot], float]:
    start = trio.current_time()
    machine = procstat.MachineCpu.now()
    cpu_before = {t.name: _cpu(t.pid) for t in targets}
    boots: dict[str, HostBoot] = {}
    at_marker: list[procstat.MachineCpu] = []

    def since() -> float:
        return trio.current_time() - start

    async def watch_complete(target: _Target, seen: list[float]) -> None:
        while True:
            with contextlib.suppress(ControlUnreachable, RpcError):
                entry = template_status(await call_control(target.control, "status", {}))
                if entry is not None and entry["complete"]:
                    seen.append(since())
                    return
            await trio.sleep(_STATUS_POLL)

    async def one(target: _Target) -> None:
        complete: list[float] = []
        async with trio.open_nursery() as inner:
            if wait_complete:
                inner.start_soon(watch_complete, target, complete)
            client = await TrackerClient.connect(tracker_ip, TRACKER_PORT, connect_timeout=10.0)
            try:
                result = await client.launch(
                    TEMPLATE_NAME,
                    TEMPLATE_VERSION,
                    FLAVOR,
                    host=target.address,
                    vm_name=target.vm_name,
                    stream=stream,
                    time_limit=limit,
                )
            finally:
                await client.aclose()
            seconds_launch = since()
            launched.append(_Launched(target.control, result.vm_id, result.domain))
            if result.serial_log is None:
                raise BenchError(f"{target.name} reported no serial console for its VM")
            serial = Path(result.serial_log)
            await _wait_for_marker(serial, marker)
            seconds_marker = since()
            at_marker.append(procstat.MachineCpu.now())
            daemon_cpu = _cpu(target.pid) - cpu_before[target.name]
            vm_cpu = qemu_cpu_seconds(result.domain)
            entry = template_status(await call_control(target.control, "status", {}))
            if entry is None:
                raise BenchError(f"{target.name}'s status lists no {TEMPLATE_NAME} template")
        boots[target.name] = HostBoot(
            name=target.name,
            vm_id=result.vm_id,
            domain=result.domain,
            streaming=result.streaming,
            seconds_launch=round(seconds_launch, 3),
            seconds_marker=round(seconds_marker, 3),
            seconds_complete=round(complete[0], 3) if complete else None,
            seconds_fetch=round(result.seconds_fetch, 3),
            seconds_boot=round(result.seconds_boot, 3),
            chunks=int(entry["chunks"]),
            chunks_held_at_marker=int(entry["chunks_held"]),
            daemon_cpu_to_marker=round(daemon_cpu, 3),
            vm_cpu_to_marker=round(vm_cpu, 3),
        )

    with trio.fail_after(limit):
        async with trio.open_nursery() as nursery:
            for target in targets:
                nursery.start_soon(one, target)
    last = max(at_marker, key=lambda sample: sample.total)
    return [boots[t.name] for t in targets], last.busy_fraction_since(machine)


@dataclass(frozen=True)
class BootSettings:
    rate: int  # bits per second on every center and host link, each direction
    workdir: Path
    logdir: Path
    chunk_size: int = 2 << 20
    replicas: int = 2
    timeout_floor: float = 300.0

    def timeout(self, size: int, hosts: int) -> float:
        """A generous bound on one run: 5x one link's time for all hosts' images, plus a floor."""
        return self.timeout_floor + 5 * hosts * size / payload_rate(self.rate)


def _fresh(settings: BootSettings, label: str) -> tuple[Path, Path]:
    workdir = settings.workdir / label
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return workdir, settings.logdir / label


def run_boot(
    net: Network,
    image: BootImage,
    hosts: int,
    mode: Mode,
    settings: BootSettings,
    say: Say = lambda _t: None,
) -> BootRun:
    """All `hosts` launch one VM each at one moment, streaming or fetching first."""
    label = f"{mode}-n{hosts}"
    workdir, logdir = _fresh(settings, label)
    names = host_names(hosts)
    tag = f"{net.run_id}-{label}"
    try:
        with BootCluster(net, workdir, logdir, names, tag=tag) as cluster:
            cluster.start()
            began = time.monotonic()
            cluster.publish(image.path, replicas=settings.replicas, chunk_size=settings.chunk_size)
            say(f"  published in {time.monotonic() - began:.1f}s")
            cluster.settle()
            pids = {name: cluster.pid(name) for name in cluster.all_daemons}
            cpu_before = {name: _cpu(pid) for name, pid in pids.items()}
            cluster.shape(settings.rate)
            boots, busy = cluster.boot(
                names,
                stream=mode == "stream",
                marker=image.marker,
                limit=settings.timeout(image.size, hosts),
                wait_complete=True,
            )
            node_cpu = {n: round(_cpu(pid) - cpu_before[n], 3) for n, pid in pids.items()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return BootRun(mode, hosts, image.size, settings.rate, boots, busy, node_cpu)


def run_prefetch(
    net: Network,
    image: BootImage,
    rep: int,
    settings: BootSettings,
    say: Say = lambda _t: None,
) -> PrefetchRun:
    """First streaming boot on h1 (no profile yet); once h1's image is complete and its profile
    stored, the first VM is deleted and h2 boots streaming with the profile. Peers off: both
    hosts fetch from the same centers over the same links."""
    label = f"prefetch-{rep}"
    workdir, logdir = _fresh(settings, label)
    first_host, second_host = host_names(2)
    tag = f"{net.run_id}-{label}"
    limit = settings.timeout(image.size, 1)
    try:
        with BootCluster(
            net, workdir, logdir, [first_host, second_host], tag=tag, peers=False
        ) as cluster:
            cluster.start()
            cluster.publish(image.path, replicas=settings.replicas, chunk_size=settings.chunk_size)
            cluster.settle()
            cluster.shape(settings.rate)
            began = time.monotonic()
            [first], busy_first = cluster.boot(
                [first_host], stream=True, marker=image.marker, limit=limit, wait_complete=True
            )
            log = cluster.log_path(first_host)
            _wait(
                lambda: PROFILE_LOG_LINE in log.read_text(errors="replace"),
                f"{first_host} to store the prefetch profile",
                limit,
                cluster.processes,
            )
            stored = time.monotonic() - began
            profile_chunks = _profile_chunks(cluster.controls[first_host])
            say(f"  first boot {first.seconds_marker:.1f}s; profile of {profile_chunks} chunks")
            cluster.delete_vm(first.vm_id)
            cluster.settle()
            [second], busy_second = cluster.boot(
                [second_host], stream=True, marker=image.marker, limit=limit, wait_complete=False
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return PrefetchRun(
        rep,
        image.size,
        settings.rate,
        first,
        second,
        profile_chunks,
        round(stored, 3),
        {"first": busy_first, "second": busy_second},
    )


def _profile_chunks(control: Path) -> int:
    status = trio.run(call_control, control, "status", {})
    return max((int(s.get("profile_chunks", 0)) for s in status.get("streams", [])), default=0)


__all__ = [
    "FLAVOR",
    "LIBVIRT_URI",
    "TEMPLATE_NAME",
    "BootCluster",
    "BootImage",
    "BootRun",
    "BootSettings",
    "HostBoot",
    "PrefetchRun",
    "has_marker",
    "qemu_cpu_seconds",
    "run_boot",
    "run_domains",
    "run_prefetch",
    "template_status",
    "undefine_domains",
]
