"""Prometheus metrics of a daemon or the tracker, each in its own CollectorRegistry.

Counters and histograms are pushed by the swarm (`MetricsEvents`, a `TransferEvents`) and by the
tracker's hooks (`TrackerMetrics`); everything that is a current state (templates, peers, disk,
VMs) is read at scrape time by a custom collector, so the series of a template or a VM that is
gone disappear with it. Label values come from small fixed sets or from what exists right now
(templates held, VMs defined): never a chunk index or a peer id.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..swarm.messages import Role
from .announces import AnnounceTable
from .bans import BAN_REASONS
from .catalog import Catalog
from .download import TemplateDownload
from .rpc import RpcError
from .streaming import TemplateStreams
from .transfer_events import TransferEvents, role_label
from .vm_service import VmService

log = logging.getLogger(__name__)

PREFIX = "vmswarm"
ROLES = ("center", "host")
# Chunks are MiB-sized: from a loopback millisecond to a congested minute.
CHUNK_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TEMPLATE_SECONDS_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# Why a connection was refused or cut short, besides a ban's own reason.
DROP_REASONS = (
    "banned",
    "per_address_limit",
    "total_limit",
    "handshake_timeout",
    "idle_timeout",
    "tls_refused",
)
# Placement outcomes: swarm.vm_placement's reasons and PlacementError codes; anything else "other".
PLACEMENT_REASONS = ("requested", "locality", "least_loaded", "no_capacity", "unknown_host")


def new_registry() -> CollectorRegistry:
    """A registry of this process's own: the global default one would mix in foreign series."""
    # A `_created` gauge beside every counter and histogram doubles the output for no reader.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    return CollectorRegistry(auto_describe=False)


def _role(value: str) -> str:
    """A role label from the fixed set, whatever the caller passed."""
    return value if value in ROLES else "host"


class MetricsEvents(TransferEvents):
    """The swarm's push-style events as counters and histograms."""

    def __init__(self, registry: CollectorRegistry) -> None:
        received = Counter(
            f"{PREFIX}_received_bytes",
            "Bytes of chunks received and verified, by the sending peer's role",
            ["role"],
            registry=registry,
        )
        sent = Counter(
            f"{PREFIX}_sent_bytes",
            "Bytes of chunks sent, by the receiving peer's role",
            ["role"],
            registry=registry,
        )
        verified = Counter(
            f"{PREFIX}_chunks_verified",
            "Chunks received that verified and were stored, by the sending peer's role",
            ["role"],
            registry=registry,
        )
        failed = Counter(
            f"{PREFIX}_chunks_failed_verification",
            "Chunks received whose digest did not match, by the sending peer's role",
            ["role"],
            registry=registry,
        )
        banned = Counter(
            f"{PREFIX}_peers_banned",
            "Peers banned (corrupt chunk, protocol error, oversized frame, flood), by role and why",
            ["role", "reason"],
            registry=registry,
        )
        dropped = Counter(
            f"{PREFIX}_connections_dropped",
            "Peer connections refused or cut: banned, over a cap, timed out, or TLS refused",
            ["reason"],
            registry=registry,
        )
        latency = Histogram(
            f"{PREFIX}_chunk_fetch_duration_seconds",
            "Seconds from a chunk's first request until it is verified and stored",
            ["role"],
            buckets=CHUNK_LATENCY_BUCKETS,
            registry=registry,
        )
        self._template_seconds = Histogram(
            f"{PREFIX}_template_fetch_duration_seconds",
            "Seconds from a template's first chunk request until the whole image verified",
            buckets=TEMPLATE_SECONDS_BUCKETS,
            registry=registry,
        )
        # Bound children up front: both roles show from the first scrape, and no lookup per chunk.
        self._received = {r: received.labels(r) for r in ROLES}
        self._sent = {r: sent.labels(r) for r in ROLES}
        self._verified = {r: verified.labels(r) for r in ROLES}
        self._failed = {r: failed.labels(r) for r in ROLES}
        self._banned = {(r, w): banned.labels(r, w) for r in ROLES for w in BAN_REASONS}
        self._dropped = {r: dropped.labels(r) for r in DROP_REASONS}
        self._latency = {r: latency.labels(r) for r in ROLES}

    def chunk_verified(self, template: str, role: str, size: int, latency: float | None) -> None:
        role = _role(role)
        self._received[role].inc(size)
        self._verified[role].inc()
        if latency is not None:
            self._latency[role].observe(latency)

    def chunk_failed(self, template: str, role: str) -> None:
        self._failed[_role(role)].inc()

    def peer_banned(self, template: str, role: str, reason: str = "corrupt_chunk") -> None:
        # A connection banned before it said who it is counts as a host: centers are known.
        self._banned[(_role(role), reason if reason in BAN_REASONS else "protocol_error")].inc()

    def connection_dropped(self, reason: str) -> None:
        child = self._dropped.get(reason)
        if child is not None:
            child.inc()

    def chunk_sent(self, template: str, role: str, size: int) -> None:
        self._sent[_role(role)].inc(size)

    def template_complete(self, template: str, seconds: float) -> None:
        self._template_seconds.observe(seconds)


class NodeState(Protocol):
    """What the node collector reads of a daemon (node.Node has these)."""

    @property
    def role(self) -> Role: ...

    @property
    def data_dir(self) -> Path: ...

    @property
    def templates(self) -> Mapping[bytes, TemplateDownload]: ...

    @property
    def vms(self) -> VmService | None: ...

    @property
    def streams(self) -> TemplateStreams | None: ...


def _template_label(download: TemplateDownload) -> str:
    return f"{download.manifest.name}:{download.manifest.version}"


class NodeCollector:
    """A daemon's current state, read at each scrape."""

    def __init__(self, node: NodeState) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        downloads = list(self._node.templates.values())
        yield from self._templates(downloads)
        yield self._connected(downloads)
        yield from self._disk(downloads)
        vms = self._node.vms
        if vms is not None:
            yield from vm_metrics(vms)
        streams = self._node.streams
        if streams is not None:
            yield from nbd_metrics(streams.status())

    def _templates(self, downloads: list[TemplateDownload]) -> Iterator[Metric]:
        ratio = GaugeMetricFamily(
            f"{PREFIX}_template_completion_ratio",
            "Share (0..1) of the template's non-zero bytes wanted here that are here",
            labels=["template"],
        )
        missing = GaugeMetricFamily(
            f"{PREFIX}_template_missing_chunks",
            "Chunks of the template wanted here (zero chunks excluded) not held yet",
            labels=["template"],
        )
        # Two template ids under one name:version would repeat a series: add them up instead.
        done: dict[str, list[int]] = {}
        for download in downloads:
            progress = download.progress()
            totals = done.setdefault(_template_label(download), [0, 0, 0])
            totals[0] += progress.done_bytes
            totals[1] += progress.total_bytes
            totals[2] += download.missing_chunks
        for label, (done_bytes, total_bytes, missing_chunks) in sorted(done.items()):
            ratio.add_metric([label], 1.0 if total_bytes == 0 else done_bytes / total_bytes)
            missing.add_metric([label], missing_chunks)
        yield ratio
        yield missing

    def _connected(self, downloads: list[TemplateDownload]) -> Metric:
        peers: dict[str, set[str]] = {r: set() for r in ROLES}
        for download in downloads:
            for peer in download.status()["peers"]:
                peers[role_label(Role(peer["role"]))].add(peer["peer_id"])
        connected = GaugeMetricFamily(
            f"{PREFIX}_connected_peers",
            "Distinct peers this daemon has a swarm link with, by their role",
            labels=["role"],
        )
        for role in ROLES:
            connected.add_metric([role], len(peers[role]))
        return connected

    def _disk(self, downloads: list[TemplateDownload]) -> Iterator[Metric]:
        stored = GaugeMetricFamily(
            f"{PREFIX}_stored_bytes",
            "Bytes of verified non-zero template chunks this daemon holds on disk",
        )
        stored.add_metric([], stored_bytes(self._node.role, downloads))
        yield stored
        try:
            fs = os.statvfs(self._node.data_dir)
        except OSError as exc:  # the data dir vanished: report what is still known
            log.warning("metrics: cannot statvfs %s: %s", self._node.data_dir, exc)
            return
        free = GaugeMetricFamily(
            f"{PREFIX}_disk_free_bytes",
            "Bytes free to unprivileged users on the data directory's filesystem",
        )
        free.add_metric([], fs.f_bavail * fs.f_frsize)
        yield free


_NBD_SERIES = (
    ("reads", "nbd_reads_total", "Read requests the template's NBD export answered", True),
    ("bytes_read", "nbd_read_bytes_total", "Bytes the template's NBD export returned", True),
    ("eio_count", "nbd_read_errors_total", "NBD reads answered EIO (a chunk never came)", True),
    ("clients", "nbd_clients", "Clients (qemu) connected to the template's NBD export", False),
)


def nbd_metrics(exports: list[dict[str, object]]) -> list[Metric]:
    """Per streamed template: what its NBD export served (status() of daemon.streaming)."""
    families: list[Metric] = []
    for key, name, documentation, counter in _NBD_SERIES:
        kind = CounterMetricFamily if counter else GaugeMetricFamily
        family = kind(f"{PREFIX}_{name}", documentation, labels=["template"])
        for export in exports:
            value = export.get(key, 0)
            family.add_metric(
                [str(export["template"])], float(value) if isinstance(value, int | float) else 0.0
            )
        families.append(family)
    return families


def stored_bytes(role: Role, downloads: Iterable[TemplateDownload]) -> int:
    """Non-zero chunk bytes held: per image file on a host, per distinct digest on a center."""
    if role is Role.HOST:
        # A host's progress counts exactly the non-zero bytes of its one image file.
        return sum(d.progress().done_bytes for d in downloads)
    sizes: dict[bytes, int] = {}
    for download in downloads:
        manifest = download.manifest
        for index in download.data.have():
            if index not in manifest.zero_chunks:
                sizes[manifest.chunk_digests[index]] = manifest.chunk_range(index)[1]
    return sum(sizes.values())


def vm_metrics(vms: VmService) -> list[Metric]:
    """Each VM's latest sample (taken by the VM service's own loop); nothing before it opens."""
    labels = ["vm"]
    cpu = CounterMetricFamily(
        f"{PREFIX}_vm_cpu_seconds", "CPU seconds the VM's vCPUs used", labels=labels
    )
    memory = GaugeMetricFamily(
        f"{PREFIX}_vm_memory_bytes",
        "Memory the VM uses (guest-reported or qemu RSS)",
        labels=labels,
    )
    rx = CounterMetricFamily(
        f"{PREFIX}_vm_network_receive_bytes", "Bytes the VM's NICs received", labels=labels
    )
    tx = CounterMetricFamily(
        f"{PREFIX}_vm_network_transmit_bytes", "Bytes the VM's NICs sent", labels=labels
    )
    read = CounterMetricFamily(
        f"{PREFIX}_vm_disk_read_bytes", "Bytes the VM read from its disks", labels=labels
    )
    written = CounterMetricFamily(
        f"{PREFIX}_vm_disk_written_bytes", "Bytes the VM wrote to its disks", labels=labels
    )
    families = [cpu, memory, rx, tx, read, written]
    try:
        instances = list(vms.store)
    except RpcError:  # the VM service is still opening its records
        return families
    seen: set[str] = set()
    for instance in instances:
        entry = vms.vm_entry(instance)
        name = str(entry["name"])
        if name in seen:
            continue
        seen.add(name)
        cpu.add_metric([name], float(entry["cpu_seconds"]))
        memory.add_metric([name], float(entry["memory_bytes"]))
        rx.add_metric([name], float(entry["net_rx_bytes"]))
        tx.add_metric([name], float(entry["net_tx_bytes"]))
        read.add_metric([name], float(entry["disk_read_bytes"]))
        written.add_metric([name], float(entry["disk_write_bytes"]))
    return families


def node_registry(node: NodeState) -> tuple[CollectorRegistry, MetricsEvents]:
    """A daemon's registry, and the events object its downloads report to."""
    registry = new_registry()
    events = MetricsEvents(registry)
    registry.register(NodeCollector(node))
    return registry, events


class TrackerMetrics:
    """The tracker's counters: announces by role, placement decisions by reason."""

    def __init__(self, registry: CollectorRegistry) -> None:
        announces = Counter(
            f"{PREFIX}_tracker_announces",
            "Announces accepted from daemons, by the announcing daemon's role",
            ["role"],
            registry=registry,
        )
        decisions = Counter(
            f"{PREFIX}_tracker_placement_decisions",
            "VM placement decisions: the chosen host's reason, or why no host fitted",
            ["reason"],
            registry=registry,
        )
        self._announces = {r: announces.labels(r) for r in ROLES}
        self._decisions = {r: decisions.labels(r) for r in (*PLACEMENT_REASONS, "other")}

    def announced(self, role: Role) -> None:
        self._announces[role_label(role)].inc()

    def placed(self, reason: str) -> None:
        self._decisions[reason if reason in PLACEMENT_REASONS else "other"].inc()


class TrackerCollector:
    """The tracker's live peers, overall and per catalog template, read at each scrape."""

    def __init__(
        self,
        announces: AnnounceTable,
        catalog: Catalog,
        now: Callable[[], float] = trio.current_time,
    ) -> None:
        self._announces = announces
        self._catalog = catalog
        self._now = now

    def collect(self) -> Iterator[Metric]:
        live = self._announces.live(self._now())
        peers = GaugeMetricFamily(
            f"{PREFIX}_tracker_live_peers",
            "Daemons whose last announce has not expired, by role",
            labels=["role"],
        )
        by_role = dict.fromkeys(ROLES, 0)
        for announce in live:
            by_role[role_label(announce.role)] += 1
        for role in ROLES:
            peers.add_metric([role], by_role[role])
        yield peers
        active = GaugeMetricFamily(
            f"{PREFIX}_tracker_active_peers",
            "Live daemons that announced holding part of the template, by role",
            labels=["template", "role"],
        )
        # Only catalog templates get a series: announced ids are client input, not a bounded set.
        counts: dict[tuple[str, str], int] = {}
        labels: dict[bytes, str] = {}
        for entry in self._catalog.entries():
            label = f"{entry.name}:{entry.version}"
            labels[entry.template_id] = label
            for role in ROLES:
                counts[(label, role)] = 0
        for announce in live:
            role = role_label(announce.role)
            for template_id in announce.holdings:
                label_or_none = labels.get(template_id)
                if label_or_none is not None:
                    counts[(label_or_none, role)] += 1
        for (label, role), count in sorted(counts.items()):
            active.add_metric([label, role], count)
        yield active


__all__ = [
    "MetricsEvents",
    "NodeCollector",
    "TrackerCollector",
    "TrackerMetrics",
    "new_registry",
    "node_registry",
    "stored_bytes",
    "vm_metrics",
]
