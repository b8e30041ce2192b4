"""The benchmark's scenarios: one template to N hosts over shaped links, each engine in turn.

- central: vmswarm, 1 storage center, hosts fetch only from it (peers off); the paper's
  traditional method.
- striped-r1 / striped-r2: vmswarm, 3 centers holding the chunks striped with r=1 or r=2, peers
  off; the paper's method.
- swarm: vmswarm, 3 centers (r=2) plus host-to-host trading.
- libtorrent: 3 seeds (`high_performance_seed`, seed mode) and N leechers, TCP only, peers added
  directly, 1 MiB pieces.
- aria2: N hosts each run `aria2c -s3 -x3 -k1M` against 3 lighttpd mirrors (byte ranges), given a
  Metalink with a sha-256 per 1 MiB piece, so every piece is verified as it arrives (a whole-file
  `--checksum` instead re-reads the image at the end, at about 45 MB/s here).

Every run starts its processes fresh inside the network's namespaces, sets up unshaped (publish,
seeding), then shapes every center and host link, starts all hosts at one moment and times each
host until its image is complete and verified. Each host's file is compared with the template.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import blake3
import trio
from vmswarm.daemon.cluster import (
    ManagedProcess,
    ProcessExitedError,
    vmswarm_command,
    vmswarm_script,
)
from vmswarm.daemon.control import call_control
from vmswarm.daemon.keys import generate_keypair
from vmswarm.daemon.tracker_client import TrackerClient

from . import procstat
from .fluid import payload_rate, t_min_uniform
from .netns import Network

REPO_ROOT = Path(__file__).resolve().parents[2]
TRACKER_PORT = 7000
DAEMON_PORT = 7881
TORRENT_PORT = 6881
HTTP_PORT = 8080
TEMPLATE_NAME = "bench"
TEMPLATE_VERSION = "1"
IMAGE_NAME = "image.raw"
CENTER_NAMES = ("c1", "c2", "c3")
TRACKER = "tracker"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
_POLL = 0.01

Engine = Literal["vmswarm", "libtorrent", "aria2"]
Say = Callable[[str], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    engine: Engine
    centers: int
    replicas: int
    peers: bool
    description: str


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("central", "vmswarm", 1, 1, False, "vmswarm, 1 center, peers off"),
        Scenario("striped-r1", "vmswarm", 3, 1, False, "vmswarm, 3 centers r=1, peers off"),
        Scenario("striped-r2", "vmswarm", 3, 2, False, "vmswarm, 3 centers r=2, peers off"),
        Scenario("swarm", "vmswarm", 3, 2, True, "vmswarm, 3 centers r=2, hosts trade"),
        Scenario("libtorrent", "libtorrent", 3, 1, True, "libtorrent, 3 tuned seeds, TCP"),
        Scenario("aria2", "aria2", 3, 1, False, "aria2c -s3 -x3 -k1M, 3 lighttpd mirrors"),
    ]
}


def host_names(count: int) -> list[str]:
    return [f"h{i + 1}" for i in range(count)]


def node_names(max_hosts: int) -> list[str]:
    """Every node the network needs for up to `max_hosts` hosts."""
    return [TRACKER, *CENTER_NAMES, *host_names(max_hosts)]


@dataclass(frozen=True)
class Settings:
    rate: int  # bits per second on every center and host link, each direction
    workdir: Path
    logdir: Path
    chunk_size: int = 2 << 20
    piece_size: int = 1 << 20
    timeout_floor: float = 120.0

    def timeout(self, size: int, hosts: int) -> float:
        """A generous bound on one run: 5x the single-server time for all hosts, plus a floor."""
        return self.timeout_floor + 5 * hosts * size / payload_rate(self.rate)


@dataclass
class Template:
    """The image every host downloads, with the digests and files the engines need."""

    path: Path
    size: int
    blake3_hex: str
    sha256_hex: str
    _torrent: Path | None = None
    _pieces: dict[int, list[str]] = field(default_factory=dict)

    @staticmethod
    def create(path: Path, size: int, *, seed: int = 1) -> Template:
        from vmswarm.daemon.mixed_image import write_mixed_image

        path.parent.mkdir(parents=True, exist_ok=True)
        # All random: zero chunks would let vmswarm skip bytes the others must move.
        write_mixed_image(path, size, zero_fraction=0.0, seed=seed)
        b3 = blake3.blake3(max_threads=blake3.blake3.AUTO)
        sha = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                b3.update(block)
                sha.update(block)
        return Template(path, size, b3.hexdigest(), sha.hexdigest())

    def torrent(self, piece_size: int) -> Path:
        if self._torrent is None:
            from bench.libtorrent_baseline import make_torrent

            self._torrent = self.path.with_suffix(".torrent")
            make_torrent(self.path, self._torrent, piece_size)
        return self._torrent

    def piece_hashes(self, piece_size: int) -> list[str]:
        """sha-256 of every `piece_size` piece, hex."""
        if piece_size not in self._pieces:
            with self.path.open("rb") as f:
                self._pieces[piece_size] = [
                    hashlib.sha256(block).hexdigest()
                    for block in iter(lambda: f.read(piece_size), b"")
                ]
        return self._pieces[piece_size]

    def metalink(self, urls: Sequence[str], piece_size: int) -> str:
        """A Metalink 4 document for the image: its mirrors, size and piece hashes."""
        pieces = "".join(f"<hash>{h}</hash>" for h in self.piece_hashes(piece_size))
        mirrors = "".join(f'<url priority="{i + 1}">{url}</url>' for i, url in enumerate(urls))
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<metalink xmlns="urn:ietf:params:xml:ns:metalink">'
            f'<file name="{IMAGE_NAME}"><size>{self.size}</size>'
            f'<pieces length="{piece_size}" type="sha-256">{pieces}</pieces>'
            f"{mirrors}</file></metalink>\n"
        )

    def link_into(self, directory: Path) -> Path:
        """A hard link of the image in `directory` (seeds and mirrors serve it, no copy)."""
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / IMAGE_NAME
        if not target.exists():
            os.link(self.path, target)
        return target

    def matches(self, path: Path) -> bool:
        """Is `path` byte-identical to the template?"""
        if not path.exists() or path.stat().st_size != self.size:
            return False
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                hasher.update(block)
        return bool(hasher.hexdigest() == self.blake3_hex)


@dataclass(frozen=True)
class HostFigure:
    name: str
    seconds: float
    identical: bool
    cpu_seconds: float
    bytes_from_centers: int | None = None
    bytes_from_peers: int | None = None
    wasted_bytes: int | None = None


@dataclass(frozen=True)
class NodeFigure:
    name: str
    role: str
    cpu_seconds: float
    wire_bytes_sent: int
    wire_bytes_received: int


@dataclass(frozen=True)
class RunResult:
    scenario: str
    hosts: int
    size: int
    rate: int
    t_min: float
    t_min_scenario: float
    host_figures: list[HostFigure]
    nodes: list[NodeFigure]
    cpu_busy: float
    peak_memory_bytes: int  # the highest sum of PSS over all processes of the run
    peak_memory_by_node: dict[str, int]
    bench_cpu_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def slowest(self) -> float:
        return max(h.seconds for h in self.host_figures)

    @property
    def mean(self) -> float:
        return sum(h.seconds for h in self.host_figures) / len(self.host_figures)

    @property
    def all_identical(self) -> bool:
        return bool(self.host_figures) and all(h.identical for h in self.host_figures)

    @property
    def center_bytes_sent(self) -> int:
        return sum(n.wire_bytes_sent for n in self.nodes if n.role == "center")


class BenchError(RuntimeError):
    """A run failed; the message says which process and shows its log's last lines."""


class Processes:
    """The processes of one run, started inside the network's namespaces; stop_all() ends them."""

    def __init__(self, net: Network, logdir: Path) -> None:
        self.net = net
        self.logdir = logdir
        self.started: dict[str, ManagedProcess] = {}

    def start(
        self, name: str, node: str, args: Sequence[str], command: Sequence[str]
    ) -> ManagedProcess:
        process = ManagedProcess(
            name,
            args,
            log_path=self.logdir / f"{name}.log",
            # The benchmark moves images only; no host needs libvirt.
            env={"VMSWARM_LIBVIRT_URI": "none"},
            cwd=REPO_ROOT,
            command=[*self.net.exec_prefix(node), *command],
        )
        self.started[name] = process
        process.start()
        return process

    def check_alive(self, *, exit_zero_ok: bool = False) -> None:
        """BenchError if a process died (or, unless `exit_zero_ok`, ended at all)."""
        for name, process in self.started.items():
            code = process.returncode
            if code is not None and (code != 0 or not exit_zero_ok):
                raise BenchError(
                    f"{name} exited with code {process.returncode}; last lines of "
                    f"{process.log_path}:\n{process.log_tail(20)}"
                )

    def stop_all(self) -> None:
        for process in self.started.values():
            process.kill(signal.SIGTERM)
        for process in self.started.values():
            process.terminate_and_wait(STOP_TIMEOUT)


def _wait(
    condition: Callable[[], bool],
    what: str,
    timeout: float,
    processes: Processes,
    *,
    exit_zero_ok: bool = False,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        processes.check_alive(exit_zero_ok=exit_zero_ok)
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(_POLL)


class _Phases:
    """Wall seconds of each setup step of a run, for finding where a run's time goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now


def _wait_tcp(net: Network, node: str, port: int, processes: Processes) -> None:
    address = net.node(node).address
    _wait(
        lambda: net.probe(node, address, port),
        f"{node} listening on {address}:{port}",
        READY_TIMEOUT,
        processes,
    )


@dataclass
class _Meter:
    """CPU and wire counters around the timed part of a run."""

    net: Network
    pids: dict[str, int]
    cpu_before: dict[str, float] = field(default_factory=dict)
    cpu_after: dict[str, float] = field(default_factory=dict)
    wire_before: dict[str, tuple[int, int]] = field(default_factory=dict)
    wire_after: dict[str, tuple[int, int]] = field(default_factory=dict)
    machine_before: procstat.MachineCpu | None = None
    busy: float = 0.0
    bench_before: float = 0.0
    bench_cpu: float = 0.0

    def start(self) -> None:
        self.cpu_before = {name: _cpu(pid) for name, pid in self.pids.items()}
        self.wire_before = self.net.counters()
        self.bench_before = procstat.cpu_seconds(os.getpid(), children=False)
        self.machine_before = procstat.MachineCpu.now()

    def stop(self) -> None:
        assert self.machine_before is not None
        self.busy = procstat.MachineCpu.now().busy_fraction_since(self.machine_before)
        self.bench_cpu = procstat.cpu_seconds(os.getpid(), children=False) - self.bench_before
        self.cpu_after = {name: _cpu(pid) for name, pid in self.pids.items()}
        self.wire_after = self.net.counters()

    def cpu(self, name: str) -> float:
        return max(0.0, self.cpu_after.get(name, 0.0) - self.cpu_before.get(name, 0.0))

    def nodes(self, roles: dict[str, str], cpu: dict[str, float] | None = None) -> list[NodeFigure]:
        figures = []
        for name, role in roles.items():
            sent0, recv0 = self.wire_before[name]
            sent1, recv1 = self.wire_after[name]
            used = cpu[name] if cpu is not None and name in cpu else self.cpu(name)
            figures.append(NodeFigure(name, role, round(used, 3), sent1 - sent0, recv1 - recv0))
        return figures


def _memory(net: Network) -> procstat.MemorySampler:
    return procstat.MemorySampler(
        {name: Path("/run/netns") / node.netns for name, node in net.nodes.items()}
    )


def _cpu(pid: int) -> float:
    try:
        return procstat.cpu_seconds(pid)
    except FileNotFoundError:
        return 0.0


def _bounds(scenario: Scenario, hosts: int, size: int, rate: int) -> tuple[float, float]:
    """(T_min with 3 centers and trading hosts, the bound for this scenario's own sources)."""
    link = payload_rate(rate)
    headline = t_min_uniform(size, hosts, len(CENTER_NAMES), link, peers=True)
    own = t_min_uniform(size, hosts, scenario.centers, link, peers=scenario.peers)
    return headline, own


def run_scenario(
    net: Network,
    scenario: Scenario,
    hosts: int,
    template: Template,
    settings: Settings,
    say: Say = lambda _t: None,
) -> RunResult:
    """One run of `scenario` with `hosts` hosts; every process it starts is stopped on return."""
    label = f"{scenario.name}-n{hosts}"
    workdir = settings.workdir / label
    logdir = settings.logdir / label
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    processes = Processes(net, logdir)
    runner = {"vmswarm": _run_vmswarm, "libtorrent": _run_libtorrent, "aria2": _run_aria2}
    try:
        # Sampled through the whole run, setup and publish included.
        with _memory(net) as memory:
            return runner[scenario.engine](
                net, processes, scenario, hosts, template, settings, workdir, memory, say
            )
    except ProcessExitedError as exc:
        raise BenchError(f"{label}: {exc}") from exc
    finally:
        try:
            processes.stop_all()
        finally:
            net.unshape()
            shutil.rmtree(workdir, ignore_errors=True)


def _result(
    scenario: Scenario,
    hosts: int,
    template: Template,
    settings: Settings,
    host_figures: list[HostFigure],
    meter: _Meter,
    roles: dict[str, str],
    memory: procstat.MemorySampler,
    cpu: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> RunResult:
    headline, own = _bounds(scenario, hosts, template.size, settings.rate)
    return RunResult(
        scenario=scenario.name,
        hosts=hosts,
        size=template.size,
        rate=settings.rate,
        t_min=headline,
        t_min_scenario=own,
        host_figures=host_figures,
        nodes=meter.nodes(roles, cpu),
        cpu_busy=meter.busy,
        peak_memory_bytes=memory.peak_bytes,
        peak_memory_by_node=dict(memory.peak_by_node),
        bench_cpu_seconds=round(meter.bench_cpu, 3),
        extra=extra or {},
    )


# -- vmswarm -------------------------------------------------------------------------------------


def _run_vmswarm(
    net: Network,
    processes: Processes,
    scenario: Scenario,
    hosts: int,
    template: Template,
    settings: Settings,
    workdir: Path,
    memory: procstat.MemorySampler,
    say: Say,
) -> RunResult:
    phases = _Phases()
    vmswarm = vmswarm_command()
    tracker_ip = net.node(TRACKER).address
    tracker = f"{tracker_ip}:{TRACKER_PORT}"
    key = generate_keypair(workdir / "keys")  # signed templates, as a production cluster runs
    # Plain TCP like the libtorrent and aria2 baselines; bench.loopback measures what TLS costs.
    trust = ["--trusted-key", str(key.public_path), "--insecure"]
    processes.start(
        TRACKER,
        TRACKER,
        ["tracker", "run", "--listen", tracker, "--state-dir", str(workdir / TRACKER), *trust],
        vmswarm,
    )
    centers = list(CENTER_NAMES[: scenario.centers])
    names = host_names(hosts)
    controls = {name: workdir / name / "control.sock" for name in [*centers, *names]}

    def daemon(name: str, role: str, extra: Sequence[str] = ()) -> None:
        address = f"{net.node(name).address}:{DAEMON_PORT}"
        args = ["daemon", "run", "--role", role, "--tracker", tracker, "--listen", address]
        args += ["--data-dir", str(workdir / name), "--control", str(controls[name]), *trust]
        args += extra
        processes.start(name, name, args, vmswarm)

    # Everything starts at once, so the interpreter start-ups overlap: daemons retry the tracker
    # within half a second, and hosts idle until asked to fetch.
    for name in centers:
        daemon(name, "storage")
    for name in names:
        daemon(name, "host", [] if scenario.peers else ["--no-peers"])
    _wait_tcp(net, TRACKER, TRACKER_PORT, processes)
    for name in [*centers, *names]:
        _wait(controls[name].exists, f"{name}'s control socket", READY_TIMEOUT, processes)
        _wait_tcp(net, name, DAEMON_PORT, processes)
    _wait(
        lambda: _live_centers(net, tracker_ip) >= len(centers),
        f"{len(centers)} centers announced at the tracker",
        READY_TIMEOUT,
        processes,
    )
    phases.mark("daemons")
    started = time.monotonic()
    publish = [
        str(vmswarm_script()),
        "publish",
        str(template.path),
        "--name",
        TEMPLATE_NAME,
        "--version",
        TEMPLATE_VERSION,
        "--tracker",
        tracker,
        "--replicas",
        str(scenario.replicas),
        "--chunk-size",
        str(settings.chunk_size),
        "--sign-key",
        str(key.private_path),
        "--insecure",
        "--json",
    ]
    done = subprocess.run(
        [*net.exec_prefix(TRACKER), *publish],
        capture_output=True,
        text=True,
        timeout=settings.timeout(template.size, 1),
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"publish failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    say(f"  published with r={scenario.replicas} in {time.monotonic() - started:.1f}s")
    phases.mark("publish")

    roles = {TRACKER: "tracker", **dict.fromkeys(centers, "center"), **dict.fromkeys(names, "host")}
    pids = {name: processes.started[name].pid for name in roles}
    meter = _Meter(net, pids)
    net.shape([*centers, *names], settings.rate)
    timeout = settings.timeout(template.size, hosts)
    meter.start()
    timelines: dict[str, list[tuple[float, int]]] = {}
    fetched = trio.run(_fetch_all, {n: controls[n] for n in names}, timeout, timelines)
    meter.stop()
    phases.mark("transfer")
    host_figures = []
    for name in names:
        seconds, reply = fetched[name]
        host_figures.append(
            HostFigure(
                name=name,
                seconds=round(seconds, 3),
                identical=template.matches(Path(reply["path"])),
                cpu_seconds=round(meter.cpu(name), 3),
                bytes_from_centers=int(reply["bytes_from_centers"]),
                bytes_from_peers=int(reply["bytes_from_peers"]),
                wasted_bytes=int(reply["wasted_bytes"]),
            )
        )
    phases.mark("verify")
    extra = {"timelines": timelines, "phases": phases.seconds}
    return _result(
        scenario, hosts, template, settings, host_figures, meter, roles, memory, extra=extra
    )


def _live_centers(net: Network, tracker_ip: str) -> int:
    async def count() -> int:
        client = await TrackerClient.connect(tracker_ip, TRACKER_PORT, connect_timeout=2.0)
        try:
            return len(await client.centers())
        finally:
            await client.aclose()

    try:
        return net.call_in(TRACKER, lambda: trio.run(count))
    except Exception:  # noqa: BLE001 (the tracker may not answer yet; the caller polls again)
        return 0


async def _fetch_all(
    controls: dict[str, Path], limit: float, timelines: dict[str, list[tuple[float, int]]]
) -> dict[str, tuple[float, Any]]:
    """Fetch on every host at once; per host (seconds from the common start, the fetch reply).

    `timelines` gets each host's (seconds, bytes done) from the fetch's progress notices.
    """
    results: dict[str, tuple[float, Any]] = {}
    start = trio.current_time()

    async def fetch(name: str, control: Path) -> None:
        params = {"name": TEMPLATE_NAME, "version": TEMPLATE_VERSION}
        timeline = timelines.setdefault(name, [])

        def progress(event: str, data: dict[str, Any]) -> None:
            if event == "progress":
                timeline.append((round(trio.current_time() - start, 2), int(data["done_bytes"])))

        reply = await call_control(control, "fetch", params, progress)
        results[name] = (trio.current_time() - start, reply)

    with trio.fail_after(limit):
        async with trio.open_nursery() as nursery:
            for name, control in controls.items():
                nursery.start_soon(fetch, name, control)
    return results


# -- libtorrent ----------------------------------------------------------------------------------


def _run_libtorrent(
    net: Network,
    processes: Processes,
    scenario: Scenario,
    hosts: int,
    template: Template,
    settings: Settings,
    workdir: Path,
    memory: procstat.MemorySampler,
    say: Say,
) -> RunResult:
    torrent = template.torrent(settings.piece_size)
    centers = list(CENTER_NAMES[: scenario.centers])
    names = host_names(hosts)
    python = [sys.executable, "-m", "bench.cluster.lt_peer"]
    go = workdir / "go"

    def listen(name: str) -> str:
        return f"{net.node(name).address}:{TORRENT_PORT}"

    for name in centers:
        seed_dir = workdir / name
        template.link_into(seed_dir)
        args = ["seed", "--torrent", str(torrent), "--save", str(seed_dir)]
        args += ["--listen", listen(name), "--state", str(workdir / name / "state")]
        processes.start(name, name, args, python)
    for name in centers:
        ready = workdir / name / "state" / "ready"
        _wait(ready.exists, f"seed {name} ready", READY_TIMEOUT, processes)
    for name in names:
        peers = [
            p for other in [*centers, *names] if other != name for p in ("--peer", listen(other))
        ]
        args = ["leech", "--torrent", str(torrent), "--save", str(workdir / name)]
        args += ["--listen", listen(name), "--state", str(workdir / name / "state")]
        processes.start(name, name, [*args, *peers, "--go", str(go)], python)
    for name in names:
        ready = workdir / name / "state" / "ready"
        _wait(ready.exists, f"leecher {name} ready", READY_TIMEOUT, processes)

    roles = {**dict.fromkeys(centers, "center"), **dict.fromkeys(names, "host")}
    meter = _Meter(net, {name: processes.started[name].pid for name in roles})
    net.shape([*centers, *names], settings.rate)
    dones = {name: workdir / name / "state" / "done.json" for name in names}
    meter.start()
    start = time.monotonic()
    go.touch()
    _wait(
        lambda: all(p.exists() for p in dones.values()),
        "every leecher to finish",
        settings.timeout(template.size, hosts),
        processes,
    )
    meter.stop()
    for name in roles:
        (workdir / name / "state" / "stop").touch()
    finals = {name: workdir / name / "state" / "final.json" for name in roles}
    _wait(lambda: all(p.exists() for p in finals.values()), "final figures", 30, processes)
    host_figures = []
    for name in names:
        done = json.loads(dones[name].read_text())
        host_figures.append(
            HostFigure(
                name=name,
                seconds=round(float(done["finished"]) - start, 3),
                identical=template.matches(workdir / name / IMAGE_NAME),
                cpu_seconds=round(meter.cpu(name), 3),
            )
        )
    timelines = {
        name: [(round(t - start, 2), b) for t, b in json.loads(dones[name].read_text())["progress"]]
        for name in names
    }
    seeded = {
        name: int(json.loads(finals[name].read_text())["uploaded_payload"]) for name in centers
    }
    return _result(
        scenario,
        hosts,
        template,
        settings,
        host_figures,
        meter,
        roles,
        memory,
        extra={
            "seed_payload_uploaded": seeded,
            "piece_size": settings.piece_size,
            "timelines": timelines,
        },
    )


# -- aria2 ---------------------------------------------------------------------------------------

LIGHTTPD_CONF = """\
server.document-root = "{root}"
server.bind = "{address}"
server.port = {port}
server.errorlog = "{errorlog}"
server.max-keep-alive-requests = 10000
server.network-backend = "sendfile"
"""


def _run_aria2(
    net: Network,
    processes: Processes,
    scenario: Scenario,
    hosts: int,
    template: Template,
    settings: Settings,
    workdir: Path,
    memory: procstat.MemorySampler,
    say: Say,
) -> RunResult:
    for tool in ("aria2c", "lighttpd"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed (apt-get install aria2 lighttpd)")
    centers = list(CENTER_NAMES[: scenario.centers])
    names = host_names(hosts)
    for name in centers:
        root = workdir / name / "www"
        template.link_into(root)
        conf = workdir / name / "lighttpd.conf"
        conf.write_text(
            LIGHTTPD_CONF.format(
                root=root,
                address=net.node(name).address,
                port=HTTP_PORT,
                errorlog=workdir / name / "error.log",
            )
        )
        processes.start(name, name, ["-D", "-f", str(conf)], [shutil.which("lighttpd") or ""])
    for name in centers:
        _wait_tcp(net, name, HTTP_PORT, processes)
    urls = [f"http://{net.node(c).address}:{HTTP_PORT}/{IMAGE_NAME}" for c in centers]
    go = workdir / "go"
    gate = [sys.executable, "-m", "bench.cluster.gate"]
    for i, name in enumerate(names):
        out = workdir / name
        out.mkdir(parents=True, exist_ok=True)
        # Each host starts with a different mirror first, as a client-side spread of the load.
        mirrors = urls[i % len(urls) :] + urls[: i % len(urls)]
        metalink = out / "image.meta4"
        metalink.write_text(template.metalink(mirrors, settings.piece_size))
        aria2 = [
            "aria2c",
            f"-s{len(urls)}",
            "-x3",
            "-k1M",
            "--realtime-chunk-checksum=true",
            "--show-console-readout=false",
            "--file-allocation=falloc",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            "--summary-interval=0",
            "--console-log-level=warn",
            "--download-result=hide",
            "--enable-color=false",
            "--disable-ipv6=true",
            "--no-netrc=true",
            "-d",
            str(out),
            "-M",
            str(metalink),
        ]
        args = ["--ready", str(out / "ready"), "--go", str(go), "--result", str(out / "result")]
        processes.start(name, name, [*args, "--", *aria2], gate)
    for name in names:
        _wait((workdir / name / "ready").exists, f"{name} ready", READY_TIMEOUT, processes)

    roles = {**dict.fromkeys(centers, "center"), **dict.fromkeys(names, "host")}
    meter = _Meter(net, {name: processes.started[name].pid for name in centers})
    net.shape([*centers, *names], settings.rate)
    results = {name: workdir / name / "result" for name in names}
    meter.start()
    start = time.monotonic()
    go.touch()
    _wait(
        lambda: all(p.exists() for p in results.values()),
        "every aria2c to finish",
        settings.timeout(template.size, hosts),
        processes,
        exit_zero_ok=True,
    )
    meter.stop()
    host_cpu = {}
    host_figures = []
    for name in names:
        result = json.loads(results[name].read_text())
        if result["returncode"] != 0:
            log = processes.started[name]
            raise BenchError(
                f"aria2c on {name} exited with {result['returncode']}:\n{log.log_tail(20)}"
            )
        host_cpu[name] = float(result["cpu_seconds"])
        host_figures.append(
            HostFigure(
                name=name,
                seconds=round(float(result["ended"]) - start, 3),
                identical=template.matches(workdir / name / IMAGE_NAME),
                cpu_seconds=round(host_cpu[name], 3),
            )
        )
    return _result(
        scenario,
        hosts,
        template,
        settings,
        host_figures,
        meter,
        roles,
        memory,
        cpu=host_cpu,
        extra={"mirror": "lighttpd", "aria2c": "-s3 -x3 -k1M, Metalink, sha-256 per piece"},
    )


__all__ = [
    "SCENARIOS",
    "BenchError",
    "HostFigure",
    "NodeFigure",
    "RunResult",
    "Scenario",
    "Settings",
    "Template",
    "node_names",
    "run_scenario",
]
