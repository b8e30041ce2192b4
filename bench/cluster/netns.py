"""An emulated cluster network: one namespace per node, all plugged into a bridge, links shaped.

The bridge lives in a private "hub" namespace, not in the root one: nothing of a run is visible
outside its own namespaces, so parallel runs never collide on names or addresses, and no test
traffic can leave. Each node gets `eth0` (uplink shaped there) whose peer in the hub is `v<name>`
(downlink shaped there, so the node's received bytes pass its own htb). Namespace names start
with `vmsb<owner pid>x<random>-`, so `cleanup_stale()` can tell a killed run's leftovers from a
live run's namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

NETNS_DIR = Path("/run/netns")
PREFIX = "vmsb"
HUB = "hub"
BRIDGE = "br0"
DEFAULT_SUBNET = "10.213.0"
# The kernel limits interface names to 15 bytes; hub-side ports are "v" + the node name.
_MAX_NODE_NAME = 14
_RUN_RE = re.compile(rf"^({PREFIX}(\d+)x[0-9a-f]+)-")
_CLONE_NEWNET = 0x40000000
_SHAPE_BURST = "256k"
_GONE_TIMEOUT = 30.0
_POLL = 0.02

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A network namespace command failed; the message carries the command and its stderr."""


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetnsError(
            f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (those under /run/netns)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def namespace_pids(netns: str) -> list[int]:
    """Processes whose network namespace is `netns` (empty if the namespace is gone)."""
    result = _run(["ip", "netns", "pids", netns], check=False)
    if result.returncode != 0:
        return []
    return [int(word) for word in result.stdout.split()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_pids(pids: Iterable[int], timeout: float = 5.0) -> None:
    """SIGTERM these processes, then SIGKILL those still alive after `timeout`; wait until gone."""
    pending = [pid for pid in pids if pid != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pending:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            pending = [pid for pid in pending if _pid_alive(pid) and not _is_zombie(pid)]
            if pending:
                time.sleep(_POLL)
        if not pending:
            return


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def rate_bits(text: str) -> int:
    """'100mbit', '1gbit', '500kbit' or plain bits per second → bits per second."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:bit)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"cannot parse rate {text!r} (examples: 100mbit, 1gbit)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


@dataclass(frozen=True)
class NetNode:
    """One node of the emulated network."""

    name: str
    netns: str
    address: str
    hub_port: str


class Network:
    """A bridge in a hub namespace and one namespace per node; use it as a context manager.

    Leaving the `with` block (normally, on an error or on Ctrl-C) always tears everything down:
    the processes still in the namespaces, the links, the bridge, then the namespaces.
    """

    def __init__(
        self, names: Sequence[str], *, subnet: str = DEFAULT_SUBNET, run_id: str | None = None
    ) -> None:
        if len(names) > 250:
            raise ValueError(f"at most 250 nodes fit in one /24, got {len(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique: {list(names)}")
        for name in names:
            if not re.fullmatch(rf"[a-z][a-z0-9]{{0,{_MAX_NODE_NAME - 1}}}", name) or name == HUB:
                raise ValueError(f"bad node name {name!r}: lowercase letters and digits, <= 14")
        self.run_id = run_id or f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}"
        self.hub = f"{self.run_id}-{HUB}"
        self.nodes = {
            name: NetNode(name, f"{self.run_id}-{name}", f"{subnet}.{i + 2}", f"v{name}")
            for i, name in enumerate(names)
        }
        self.subnet = subnet
        self._created: list[str] = []
        self._shaped: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Network:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this network uses (hub first)."""
        return [self.hub, *(node.netns for node in self.nodes.values())]

    def setup(self) -> None:
        """Create the hub with its bridge, then each node's namespace, veth pair and address."""
        self._add_namespace(self.hub)
        hub_batch = [f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up", "link set lo up"]
        for node in self.nodes.values():
            self._add_namespace(node.netns)
            hub_batch += [
                f"link add {node.hub_port} type veth peer name eth0 netns {node.netns}",
                f"link set {node.hub_port} master {BRIDGE} up",
            ]
        self._batch(self.hub, hub_batch)
        for node in self.nodes.values():
            self._batch(
                node.netns,
                [
                    "link set lo up",
                    f"addr add {node.address}/24 dev eth0",
                    "link set eth0 up",
                ],
            )

    def teardown(self) -> None:
        """Kill what runs inside, delete links, bridge and namespaces; wait until all are gone."""
        teardown_namespaces(self.namespaces, hub=self.hub)
        self._created.clear()
        self._shaped.clear()

    def _add_namespace(self, netns: str) -> None:
        self._created.append(netns)
        _run(["ip", "netns", "add", netns])

    @staticmethod
    def _batch(netns: str, commands: Sequence[str]) -> None:
        result = subprocess.run(
            ["ip", "-n", netns, "-batch", "-"],
            input="\n".join(commands) + "\n",
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise NetnsError(f"ip -n {netns} -batch failed: {result.stderr.strip()}")

    # -- running things inside ----------------------------------------------------------------

    def node(self, name: str) -> NetNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"no node {name!r} in this network ({', '.join(self.nodes)})") from None

    def exec_prefix(self, name: str) -> list[str]:
        """The argv prefix that runs a command inside node `name`'s namespace."""
        return ["ip", "netns", "exec", self.node(name).netns]

    def call_in(self, name: str, fn: Callable[[], T]) -> T:
        """Run `fn` in a thread that lives in node `name`'s namespace (sockets it opens do too)."""
        return call_in_netns(self.node(name).netns, fn)

    def probe(self, name: str, address: str, port: int, timeout: float = 0.5) -> bool:
        """Does `address:port` accept TCP connections, seen from inside node `name`?"""

        def connect() -> bool:
            try:
                with socket.create_connection((address, port), timeout=timeout):
                    return True
            except OSError:
                return False

        return self.call_in(name, connect)

    def pids(self, name: str) -> list[int]:
        return namespace_pids(self.node(name).netns)

    # -- shaping and counters -----------------------------------------------------------------

    def shape(self, names: Iterable[str], rate: int) -> None:
        """Limit each node's uplink and downlink to `rate` bits/s with htb (burst 256k)."""
        for name in names:
            node = self.node(name)
            self._htb(node.netns, "eth0", rate)
            self._htb(self.hub, node.hub_port, rate)
            self._shaped.add(name)

    def unshape(self, names: Iterable[str] | None = None) -> None:
        """Remove the limits again (all shaped nodes if `names` is None)."""
        for name in list(self._shaped if names is None else names):
            node = self.node(name)
            _run(["tc", "-n", node.netns, "qdisc", "del", "dev", "eth0", "root"], check=False)
            _run(["tc", "-n", self.hub, "qdisc", "del", "dev", node.hub_port, "root"], check=False)
            self._shaped.discard(name)

    @staticmethod
    def _htb(netns: str, dev: str, rate: int) -> None:
        tc = ["tc", "-n", netns]
        _run([*tc, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1"])
        spec = [
            "rate",
            f"{rate}bit",
            "ceil",
            f"{rate}bit",
            "burst",
            _SHAPE_BURST,
            "cburst",
            _SHAPE_BURST,
        ]
        _run([*tc, "class", "replace", "dev", dev, "parent", "1:", "classid", "1:1", "htb", *spec])

    def shaping(self, name: str) -> str:
        """The node's uplink qdisc setup as `tc` reports it (for the record)."""
        node = self.node(name)
        return _run(["tc", "-n", node.netns, "class", "show", "dev", "eth0"]).stdout.strip()

    def counters(self) -> dict[str, tuple[int, int]]:
        """Per node (bytes sent, bytes received) on the wire, read at the hub side of its link."""
        out = _run(["ip", "-n", self.hub, "-j", "-s", "link", "show"]).stdout
        by_port = {
            link["ifname"]: link.get("stats64", link.get("stats", {})) for link in json.loads(out)
        }
        result: dict[str, tuple[int, int]] = {}
        for node in self.nodes.values():
            stats = by_port.get(node.hub_port)
            if stats is None:
                raise NetnsError(f"no link {node.hub_port} in {self.hub}")
            # The hub receives what the node sends, and transmits what the node receives.
            result[node.name] = (int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"]))
        return result


def call_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a fresh thread that joined `netns` (setns affects the calling thread only)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns({netns}): {os.strerror(code)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the calling thread)
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def teardown_namespaces(namespaces: Sequence[str], *, hub: str | None = None) -> None:
    """Kill processes in `namespaces`, delete every link and the namespaces, wait until gone."""
    present = [ns for ns in namespaces if (NETNS_DIR / ns).exists()]
    pids = {pid for ns in present for pid in namespace_pids(ns)}
    kill_pids(sorted(pids))
    if hub is not None and hub in present:
        # Deleting the hub-side ends removes both ends of each veth pair, synchronously.
        _delete_links(hub)
    for ns in present:
        _delete_links(ns)
        _run(["ip", "netns", "del", ns], check=False)
    deadline = time.monotonic() + _GONE_TIMEOUT
    while any((NETNS_DIR / ns).exists() for ns in present):
        if time.monotonic() >= deadline:
            left = [ns for ns in present if (NETNS_DIR / ns).exists()]
            raise NetnsError(f"network namespaces still present after teardown: {left}")
        time.sleep(_POLL)


def _delete_links(netns: str) -> None:
    """Delete every interface but lo in `netns`, and wait until none is left."""
    deadline = time.monotonic() + _GONE_TIMEOUT
    while True:
        result = _run(["ip", "-n", netns, "-j", "link", "show"], check=False)
        if result.returncode != 0:
            return  # the namespace is already gone
        links = [link["ifname"] for link in json.loads(result.stdout or "[]")]
        left = [name for name in links if name != "lo"]
        if not left:
            return
        if time.monotonic() >= deadline:
            raise NetnsError(f"interfaces {left} in {netns} did not go away")
        for name in left:
            # "eth0@if12" style names never appear in JSON, but the peer may vanish meanwhile.
            _run(["ip", "-n", netns, "link", "del", name], check=False)
        time.sleep(_POLL)


def run_namespaces(run_id: str) -> list[str]:
    """The namespaces of one run (hub included), as they exist now."""
    return [ns for ns in list_namespaces() if ns.startswith(f"{run_id}-")]


def cleanup_stale() -> list[str]:
    """Tear down the namespaces of runs whose owner process is dead; the namespaces removed."""
    runs: dict[str, int] = {}
    for ns in list_namespaces():
        match = _RUN_RE.match(ns)
        if match is not None:
            runs[match.group(1)] = int(match.group(2))
    removed: list[str] = []
    for run_id, owner in sorted(runs.items()):
        if _pid_alive(owner):
            continue
        namespaces = run_namespaces(run_id)
        hub = f"{run_id}-{HUB}"
        teardown_namespaces(namespaces, hub=hub if hub in namespaces else None)
        removed += namespaces
    return removed


def cleanup_stale_scratch(base: Path) -> list[Path]:
    """Remove `base/vmsb-<pid>-*` scratch folders whose owner process is dead; those removed."""
    removed: list[Path] = []
    for path in sorted(base.glob(f"{PREFIX}-*-*")):
        owner = path.name.split("-")[1]
        if path.is_dir() and owner.isdigit() and not _pid_alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def scratch_prefix() -> str:
    """The mkdtemp prefix of this process's scratch folders (see cleanup_stale_scratch)."""
    return f"{PREFIX}-{os.getpid()}-"


__all__ = [
    "NetNode",
    "NetnsError",
    "Network",
    "call_in_netns",
    "cleanup_stale",
    "cleanup_stale_scratch",
    "kill_pids",
    "list_namespaces",
    "namespace_pids",
    "rate_bits",
    "run_namespaces",
    "scratch_prefix",
    "teardown_namespaces",
]
