"""Prometheus metrics: names and labels by the rules, values from real swarms, the HTTP endpoint."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from vmswarm.daemon.announces import AnnounceTable, Holding, PeerAnnounce
from vmswarm.daemon.catalog import Catalog
from vmswarm.daemon.download import PeerAddress, TemplateDownload
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.daemon.metrics import (
    MetricsEvents,
    NodeCollector,
    TrackerCollector,
    TrackerMetrics,
    new_registry,
    node_registry,
)
from vmswarm.daemon.metrics_http import (
    MAX_CONNECTIONS,
    MAX_REQUEST_BYTES,
    READ_TIMEOUT,
    serve_metrics,
)
from vmswarm.daemon.node import Node, NodeConfig
from vmswarm.daemon.peer_link import read_handshake
from vmswarm.daemon.rpc import RpcError
from vmswarm.daemon.template_sources import HostTemplate
from vmswarm.daemon.tracker import Tracker
from vmswarm.daemon.vm_service import VmService
from vmswarm.swarm.connection import Connection
from vmswarm.swarm.manifest import Manifest, build_manifest
from vmswarm.swarm.messages import Role

from tests.ci import unavailable

from . import test_placement_service as placement_test
from .test_download import (
    CHUNK,
    FAST,
    PATTERN,
    center_store,
    host_store,
    make_image,
    peer,
    seeding,
    start_download,
    until,
)
from .test_vm_service import host

# Every label the metrics may carry, each bounded: roles, reasons, templates and VMs that exist.
BOUNDED_LABELS = {"role", "template", "vm", "reason", "le"}
ROLE_VALUES = {"center", "host"}


@dataclass
class FakeNode:
    """The NodeState the collector reads, over real downloads."""

    data_dir: Path
    role: Role = Role.HOST
    templates: dict[bytes, TemplateDownload] = field(default_factory=dict)
    vms: VmService | None = None
    streams: Any = None  # a TemplateStreams, or what stands in for its status()


@dataclass
class FakeStreams:
    exports: list[dict[str, object]]

    def status(self) -> list[dict[str, object]]:
        return self.exports


def real_bytes(manifest: Manifest) -> int:
    return sum(
        manifest.chunk_range(i)[1]
        for i in range(manifest.chunk_count)
        if i not in manifest.zero_chunks
    )


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    assert found is not None, f"no sample {name}{labels}"
    return found


def check_naming_rules(text: str) -> set[str]:
    """Assert Prometheus's naming rules on an exposition; the sample names."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("vmswarm_"), family.name
        assert family.documentation, family.name
        if family.type == "counter":
            # The parser strips `_total` from a counter family; every sample must carry it.
            assert all(s.name == f"{family.name}_total" for s in family.samples), family.name
        else:
            assert not family.name.endswith("_total"), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        # Base units only: no milli-, kilo- or mega- anything.
        for unit in ("_milliseconds", "_ms", "_kilobytes", "_megabytes", "_mib", "_percent"):
            assert unit not in family.name, family.name
        for sample in family.samples:
            names.add(sample.name)
            assert set(sample.labels) <= BOUNDED_LABELS, (sample.name, sample.labels)
            if "role" in sample.labels:
                assert sample.labels["role"] in ROLE_VALUES
    return names


async def test_a_fetch_from_two_centers_is_counted_by_role(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=21)
    n = manifest.chunk_count
    registry = new_registry()
    events = MetricsEvents(registry)
    async with trio.open_nursery() as nursery:
        c1 = center_store(tmp_path / "c1", data, manifest, [i for i in range(n) if i % 2 == 0])
        c2 = center_store(tmp_path / "c2", data, manifest, [i for i in range(n) if i % 2 == 1])
        async with (
            seeding(nursery, c1, Role.STORAGE) as s1,
            seeding(nursery, c2, Role.STORAGE) as s2,
        ):
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
            download = await start_download(
                nursery, target, [s1.address, s2.address], events=events
            )
            with trio.fail_after(20):
                await download.wait_done()
            node = FakeNode(tmp_path, templates={download.template_id: download})
            registry.register(NodeCollector(node))
            chunks = sum(1 for i in range(n) if i not in manifest.zero_chunks)
            assert value(registry, "vmswarm_received_bytes_total", role="center") == real_bytes(
                manifest
            )
            assert value(registry, "vmswarm_received_bytes_total", role="host") == 0
            assert value(registry, "vmswarm_chunks_verified_total", role="center") == chunks
            assert value(registry, "vmswarm_chunks_failed_verification_total", role="center") == 0
            assert (
                value(registry, "vmswarm_peers_banned_total", role="center", reason="corrupt_chunk")
                == 0
            )
            assert value(registry, "vmswarm_chunk_fetch_duration_seconds_count", role="center") == (
                chunks
            )
            assert value(registry, "vmswarm_template_fetch_duration_seconds_count") == 1
            label = f"{manifest.name}:{manifest.version}"
            assert value(registry, "vmswarm_template_completion_ratio", template=label) == 1.0
            assert value(registry, "vmswarm_template_missing_chunks", template=label) == 0
            assert value(registry, "vmswarm_stored_bytes") == real_bytes(manifest)
            assert value(registry, "vmswarm_disk_free_bytes") > 0
            check_naming_rules(generate_latest(registry).decode())
            nursery.cancel_scope.cancel()


async def test_serving_a_host_counts_sent_bytes_and_peers(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=22)
    n = manifest.chunk_count
    seed_registry = new_registry()
    seed_events = MetricsEvents(seed_registry)
    leech_registry = new_registry()
    leech_events = MetricsEvents(leech_registry)
    async with trio.open_nursery() as nursery:
        # The seeder is a host with a MetricsEvents of its own; the leech links to it.
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        source = host_store(tmp_path / "seed", data, manifest, range(n))
        seeder = TemplateDownload(
            source,
            peer(port=port),
            upload_slots=trio.Semaphore(4),
            want=(),
            want_all=False,
            config=FAST,
            events=seed_events,
        )
        await nursery.start(seeder.run)

        async def handle(stream: trio.SocketStream) -> None:
            conn = Connection(Role.HOST)
            their = await read_handshake(stream, conn)
            await seeder.accept(stream, conn, their)

        await nursery.start(trio.serve_listeners, handle, listeners)
        address = PeerAddress("127.0.0.1", port, seeder.local.peer_id, Role.HOST)
        target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
        download = await start_download(nursery, target, [address], events=leech_events)
        with trio.fail_after(20):
            await download.wait_done()
        node = FakeNode(tmp_path, templates={download.template_id: download})
        leech_registry.register(NodeCollector(node))
        assert value(seed_registry, "vmswarm_sent_bytes_total", role="host") == real_bytes(manifest)
        assert value(seed_registry, "vmswarm_sent_bytes_total", role="center") == 0
        assert value(leech_registry, "vmswarm_received_bytes_total", role="host") == real_bytes(
            manifest
        )
        nursery.cancel_scope.cancel()


async def test_connected_peers_and_progress_of_a_fetch_under_way(tmp_path: Path) -> None:
    data, manifest = make_image("DDDDDDDD", seed=27)
    # Each center holds the first half only, so the fetch stays under way with both linked.
    patient = dataclasses.replace(FAST, no_source_timeout=60.0)
    registry = new_registry()
    events = MetricsEvents(registry)
    async with trio.open_nursery() as nursery:
        c1 = center_store(tmp_path / "c1", data, manifest, [0, 1, 2, 3])
        c2 = center_store(tmp_path / "c2", data, manifest, [0, 1, 2, 3])
        async with (
            seeding(nursery, c1, Role.STORAGE, config=patient) as s1,
            seeding(nursery, c2, Role.STORAGE, config=patient) as s2,
        ):
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
            download = await start_download(
                nursery, target, [s1.address, s2.address], config=patient, events=events
            )
            registry.register(NodeCollector(FakeNode(tmp_path, templates={b"t": download})))
            label = f"{manifest.name}:{manifest.version}"
            with trio.fail_after(20):
                await until(
                    lambda: (
                        registry.get_sample_value(
                            "vmswarm_template_missing_chunks", {"template": label}
                        )
                        == 4
                        and registry.get_sample_value("vmswarm_connected_peers", {"role": "center"})
                        == 2
                    )
                )
            assert value(registry, "vmswarm_template_completion_ratio", template=label) == 0.5
            assert value(registry, "vmswarm_connected_peers", role="host") == 0
            assert value(registry, "vmswarm_received_bytes_total", role="center") == 4 * CHUNK
            assert value(registry, "vmswarm_template_fetch_duration_seconds_count") == 0
            nursery.cancel_scope.cancel()


async def test_a_corrupt_peer_is_counted_as_failed_and_banned(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=23)
    n = manifest.chunk_count
    registry = new_registry()
    events = MetricsEvents(registry)
    async with trio.open_nursery() as nursery:
        liar = host_store(tmp_path / "liar", data, manifest, range(n))
        good = host_store(tmp_path / "good", data, manifest, range(n))
        async with seeding(nursery, liar, corrupt=True) as bad, seeding(nursery, good) as ok:
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
            download = await start_download(
                nursery, target, [bad.address, ok.address], events=events
            )
            with trio.fail_after(20):
                await download.wait_done()
            failed = value(registry, "vmswarm_chunks_failed_verification_total", role="host")
            assert failed == download.status()["corrupt_chunks"] >= 1
            assert (
                value(registry, "vmswarm_peers_banned_total", role="host", reason="corrupt_chunk")
                == 1
            )
            # Only verified chunks count as received: exactly the image's non-zero bytes.
            assert value(registry, "vmswarm_received_bytes_total", role="host") == real_bytes(
                manifest
            )
            nursery.cancel_scope.cancel()


async def test_a_partial_template_reports_its_ratio_and_missing_chunks(tmp_path: Path) -> None:
    data, manifest = make_image("DDDD0DDD", seed=24)
    held = [0, 1, 2]
    target = host_store(tmp_path / "partial", data, manifest, held)
    download = TemplateDownload(target, peer(), upload_slots=trio.Semaphore(1), config=FAST)
    registry = new_registry()
    registry.register(NodeCollector(FakeNode(tmp_path, templates={b"x": download})))
    label = f"{manifest.name}:{manifest.version}"
    assert value(registry, "vmswarm_template_missing_chunks", template=label) == 4
    assert value(registry, "vmswarm_template_completion_ratio", template=label) == 3 / 7
    assert value(registry, "vmswarm_stored_bytes") == 3 * CHUNK
    # A template that is gone takes its series with it.
    registry2 = new_registry()
    registry2.register(NodeCollector(FakeNode(tmp_path)))
    text = generate_latest(registry2).decode()
    assert "template=" not in text


async def test_a_storage_center_counts_each_shared_chunk_once(tmp_path: Path) -> None:
    data, manifest = make_image("DDD0", seed=25)
    # The same content under another version: every chunk file is shared by digest.
    other = build_manifest(data, "tmpl", "again", chunk_size=CHUNK)
    store_a = center_store(tmp_path / "c", data, manifest, [0, 1, 2, 3])
    store_b = center_store(tmp_path / "c", data, other, [0, 1])
    downloads: dict[bytes, TemplateDownload] = {}
    for store in (store_a, store_b):
        d = TemplateDownload(
            store, peer(Role.STORAGE), upload_slots=trio.Semaphore(1), want=(), want_all=False
        )
        downloads[d.template_id] = d
    registry = new_registry()
    registry.register(NodeCollector(FakeNode(tmp_path, Role.STORAGE, downloads)))
    assert value(registry, "vmswarm_stored_bytes") == 3 * CHUNK
    text = generate_latest(registry).decode()
    # A center wants only its share (nothing here): none of it is missing.
    assert value(registry, "vmswarm_template_missing_chunks", template="tmpl:again") == 0
    check_naming_rules(text)


async def test_a_node_registry_is_its_own_and_follows_the_rules(tmp_path: Path) -> None:
    config = NodeConfig(role=Role.HOST, data_dir=tmp_path / "n", control_path=tmp_path / "c.sock")
    one, two = Node(config), Node(config)
    assert one.metrics_registry is not two.metrics_registry
    one.metrics_events.chunk_sent("t:1", "center", 10)
    assert value(one.metrics_registry, "vmswarm_sent_bytes_total", role="center") == 10
    assert value(two.metrics_registry, "vmswarm_sent_bytes_total", role="center") == 0
    registry, events = node_registry(FakeNode(tmp_path))
    events.chunk_failed("t:1", "center")
    events.peer_banned("t:1", "center")
    events.chunk_verified("t:1", "host", 5, None)  # no latency: no observation
    events.template_complete("t:1", 2.0)
    names = check_naming_rules(generate_latest(registry).decode())
    for name in (
        "vmswarm_received_bytes_total",
        "vmswarm_sent_bytes_total",
        "vmswarm_chunks_verified_total",
        "vmswarm_chunks_failed_verification_total",
        "vmswarm_peers_banned_total",
        "vmswarm_connected_peers",
        "vmswarm_chunk_fetch_duration_seconds_bucket",
        "vmswarm_template_fetch_duration_seconds_sum",
        "vmswarm_stored_bytes",
        "vmswarm_disk_free_bytes",
    ):
        assert name in names, name
    assert value(registry, "vmswarm_chunk_fetch_duration_seconds_count", role="host") == 0
    assert value(registry, "vmswarm_template_fetch_duration_seconds_sum") == 2.0


def test_tracker_metrics_count_announces_decisions_and_active_peers(tmp_path: Path) -> None:
    _, manifest = make_image("DD0D", seed=26)
    catalog = Catalog.open(tmp_path / "catalog")
    try:
        catalog.register(manifest.encode(), {})
        table = AnnounceTable(ttl=30.0)
        clock = [100.0]
        registry = new_registry()
        counters = TrackerMetrics(registry)
        registry.register(TrackerCollector(table, catalog, lambda: clock[0]))
        bits = bytes([0b11110000])
        for i, role in enumerate((Role.HOST, Role.HOST, Role.STORAGE)):
            holdings = {manifest.template_id: Holding(bits, True)}
            # A template the catalog does not know gets no series: its id is client input.
            if i == 0:
                holdings[bytes(32)] = Holding(b"\x80", False)
            table.update(
                PeerAnnounce(bytes([i]) * 16, role, ("127.0.0.1", 9000 + i), None, holdings, 100.0)
            )
            counters.announced(role)
        for reason in ("locality", "least_loaded", "no_capacity", "made-up"):
            counters.placed(reason)
        label = f"{manifest.name}:{manifest.version}"
        assert value(registry, "vmswarm_tracker_announces_total", role="host") == 2
        assert value(registry, "vmswarm_tracker_announces_total", role="center") == 1
        assert value(registry, "vmswarm_tracker_active_peers", template=label, role="host") == 2
        assert value(registry, "vmswarm_tracker_active_peers", template=label, role="center") == 1
        assert value(registry, "vmswarm_tracker_live_peers", role="host") == 2
        for reason in ("locality", "least_loaded", "no_capacity", "other"):
            assert value(registry, "vmswarm_tracker_placement_decisions_total", reason=reason) == 1
        assert value(registry, "vmswarm_tracker_placement_decisions_total", reason="requested") == 0
        text = generate_latest(registry).decode()
        assert text.count("vmswarm_tracker_active_peers{") == 2
        check_naming_rules(text)
        # After the TTL the peers are gone, and so are their counts (the series stay, at 0).
        clock[0] = 131.0
        assert value(registry, "vmswarm_tracker_active_peers", template=label, role="host") == 0
        assert value(registry, "vmswarm_tracker_live_peers", role="center") == 0
    finally:
        catalog.close()


async def test_the_trackers_hooks_feed_its_counters(tmp_path: Path) -> None:
    catalog = Catalog.open(tmp_path / "catalog")
    try:
        catalog.register(placement_test.MANIFEST.encode(), {})
        registry = new_registry()
        counters = TrackerMetrics(registry)
        hosts = placement_test.FakeHosts()
        t = Tracker(
            catalog,
            flavors=placement_test.FLAVORS,
            host_caller=hosts,
            on_announce=counters.announced,
            on_placement=counters.placed,
        )
        registry.register(TrackerCollector(t.announces, catalog))
        placement_test.announce(t, 1)
        placement_test.announce(t, 2, role="storage", capacity=None)
        await placement_test.launch(t)
        with pytest.raises(RpcError):
            await placement_test.launch(t, flavor="big")  # 4 vCPUs fit on no 4-vCPU host
        assert value(registry, "vmswarm_tracker_announces_total", role="host") == 1
        assert value(registry, "vmswarm_tracker_announces_total", role="center") == 1
        decisions = "vmswarm_tracker_placement_decisions_total"
        assert value(registry, decisions, reason="least_loaded") == 1
        assert value(registry, decisions, reason="no_capacity") == 1
        assert value(registry, decisions, reason="locality") == 0
        assert value(registry, "vmswarm_tracker_live_peers", role="host") == 1
    finally:
        catalog.close()


# -- VMs ---------------------------------------------------------------------------------------


async def test_vm_series_follow_the_vms_that_exist(tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:  # the VM service makes each VM's qcow2 overlay with it
        unavailable("make VM overlays", "qemu-img is missing (apt-get install qemu-utils)")
    async with host(tmp_path) as h:
        registry = new_registry()
        registry.register(NodeCollector(FakeNode(tmp_path, vms=h.service)))
        one = await h.launch("tiny", vm_name="web")
        await h.launch("tiny", vm_name="db")
        await h.service.vms()  # a fresh sample, as the service's own loop takes
        for vm in ("web", "db"):
            assert value(registry, "vmswarm_vm_cpu_seconds_total", vm=vm) >= 0
            assert value(registry, "vmswarm_vm_memory_bytes", vm=vm) > 0
            for name in ("network_receive", "network_transmit", "disk_read", "disk_written"):
                assert value(registry, f"vmswarm_vm_{name}_bytes_total", vm=vm) >= 0
        check_naming_rules(generate_latest(registry).decode())
        await h.service.delete(one["vm_id"])
        text = generate_latest(registry).decode()
        assert 'vm="db"' in text and 'vm="web"' not in text


# -- the HTTP endpoint -------------------------------------------------------------------------


async def http(address: tuple[str, int], request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, half-close, read to EOF: (status, headers, body)."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(request)
        await stream.send_eof()
        raw = b""
        while chunk := await stream.receive_some(1 << 16):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        key, _, val = line.partition(": ")
        headers[key.lower()] = val
    return status, headers, body


async def until_status(address: tuple[str, int], wanted: int) -> None:
    """GET /metrics again and again until the answer has status `wanted`."""
    while True:
        status, _, _ = await http(address, b"GET /metrics HTTP/1.1\r\n\r\n")
        if status == wanted:
            return
        await trio.sleep(0.01)


def registry_with_traffic() -> CollectorRegistry:
    registry = new_registry()
    MetricsEvents(registry).chunk_sent("t:1", "host", 123)
    return registry


async def test_http_serves_metrics_and_refuses_the_rest(nursery: trio.Nursery) -> None:
    registry = registry_with_traffic()
    address = await nursery.start(serve_metrics, "127.0.0.1", 0, registry)

    status, headers, body = await http(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert int(headers["content-length"]) == len(body)
    assert body == generate_latest(registry)
    assert 'vmswarm_sent_bytes_total{role="host"} 123.0' in body.decode()

    status, _, body = await http(address, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
    assert status == 200 and body.startswith(b"# HELP")
    status, headers, body = await http(address, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0

    status, _, _ = await http(address, b"GET / HTTP/1.1\r\n\r\n")
    assert status == 404
    status, headers, _ = await http(address, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, _, _ = await http(address, b"BREW /metrics HTCPCP/1.0\r\n\r\n")
    assert status == 400
    status, _, _ = await http(address, b"\xff\xfe garbage\r\n\r\n")
    assert status == 400


async def test_http_refuses_an_oversized_request_head(nursery: trio.Nursery) -> None:
    address = await nursery.start(serve_metrics, "127.0.0.1", 0, registry_with_traffic())
    huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_REQUEST_BYTES + 100) + b"\r\n\r\n"
    status, _, body = await http(address, huge)
    assert status == 431 and b"Too Large" in body
    # A head just under the cap is still answered.
    fits = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_REQUEST_BYTES - 100) + b"\r\n\r\n"
    status, _, _ = await http(address, fits)
    assert status == 200


async def test_http_drops_a_client_that_never_finishes(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_metrics, "127.0.0.1", 0, registry_with_traffic())
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
            began = trio.current_time()
            assert await stream.receive_some(1024) == b""
            assert trio.current_time() - began >= READ_TIMEOUT
        # The endpoint still answers others.
        status, _, _ = await http(address, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 200
        nursery.cancel_scope.cancel()


async def test_http_caps_concurrent_connections(nursery: trio.Nursery) -> None:
    address = await nursery.start(serve_metrics, "127.0.0.1", 0, registry_with_traffic())
    idle = [await trio.open_tcp_stream(*address) for _ in range(MAX_CONNECTIONS)]
    # The server takes the idle connections in its own time; it refuses once all slots are held.
    with trio.fail_after(10):
        await until_status(address, 503)
    await idle.pop().aclose()
    with trio.fail_after(10):
        await until_status(address, 200)
    for stream in idle:
        await stream.aclose()


def test_nbd_exports_are_counted_per_template(tmp_path: Path) -> None:
    exports: list[dict[str, object]] = [
        {"template": "big:1", "reads": 325, "bytes_read": 9467904, "eio_count": 2, "clients": 1}
    ]
    registry, _ = node_registry(FakeNode(tmp_path, streams=FakeStreams(exports)))
    check_naming_rules(generate_latest(registry).decode())
    assert value(registry, "vmswarm_nbd_reads_total", template="big:1") == 325
    assert value(registry, "vmswarm_nbd_read_bytes_total", template="big:1") == 9467904
    assert value(registry, "vmswarm_nbd_read_errors_total", template="big:1") == 2
    assert value(registry, "vmswarm_nbd_clients", template="big:1") == 1
