"""Mutual TLS on peer links and the daemons' TCP RPC, with real processes: a TLS cluster
publishes and fetches, and every attack (plain TCP, a foreign CA, a certificate of the wrong
role) fails with a clear reason while the daemons keep serving."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from vmswarm.daemon import peer_link
from vmswarm.daemon.cluster import LocalCluster, Node, free_port
from vmswarm.daemon.mixed_image import write_mixed_image
from vmswarm.daemon.pki import CA_CERT_NAME, TlsRole, init_ca, issue
from vmswarm.daemon.rpc import RpcClient, RpcError
from vmswarm.daemon.tls import TlsError, TlsFiles, check_files, client_context
from vmswarm.daemon.tls import connect as tls_connect
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.connection import Connection
from vmswarm.swarm.messages import PEER_ID_LENGTH, PROTOCOL_VERSION, Handshake, Role

from .faults_common import file_digest, publish

pytestmark = pytest.mark.e2e

TEMPLATE = "disk:1"
IMAGE_SIZE = 6 << 20
CHUNK_SIZE = 1 << 20
# Bounds on waiting for something observable; never asserted as durations.
DEADLINE = 30.0
FETCH_TIMEOUT = 120.0
TLS_ON = "mutual TLS on every link"
DROPPED = "vmswarm_connections_dropped_total"


@dataclass(frozen=True)
class Swarm:
    """One TLS cluster with a published template, shared by the tests of this module."""

    cluster: LocalCluster
    centers: list[Node]
    hosts: list[Node]
    template_id: bytes
    chunks: int
    image: Path
    metrics_url: str  # the first center's /metrics
    probe: TlsFiles  # a proper host certificate, to check that the centers still serve


def cluster_files(cluster: LocalCluster, role: TlsRole, name: str) -> TlsFiles:
    """Fresh files of a certificate of `role` from the cluster's CA."""
    assert cluster.ca_dir is not None
    made = cluster.issue_certificate(role, name)
    return TlsFiles(cluster.ca_dir / CA_CERT_NAME, made.cert, made.key)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    workdir = tmp_path_factory.mktemp("peer_tls")
    with LocalCluster(workdir / "cluster", tls=True) as cluster:
        cluster.start_tracker()
        metrics_port = free_port()
        centers = [
            cluster.start_center("c1", "--metrics", f"127.0.0.1:{metrics_port}"),
            cluster.start_center("c2"),
        ]
        hosts = [cluster.start_host(f"h{i}") for i in (1, 2, 3)]
        image = workdir / "disk.raw"
        write_mixed_image(image, IMAGE_SIZE, zero_fraction=0.2, seed=11)
        template_id = publish(cluster, image, replicas=2, chunk_size=CHUNK_SIZE)
        yield Swarm(
            cluster,
            centers,
            hosts,
            bytes.fromhex(template_id),
            -(-IMAGE_SIZE // CHUNK_SIZE),
            image,
            f"http://127.0.0.1:{metrics_port}/metrics",
            cluster_files(cluster, TlsRole.HOST, "probe"),
        )


# -- helpers ------------------------------------------------------------------------------------


def fetch(swarm: Swarm, host: Node) -> dict[str, Any]:
    out = swarm.cluster.run_cli("fetch", TEMPLATE, "--json", node=host, timeout=FETCH_TIMEOUT)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def check_identical(swarm: Swarm, result: dict[str, Any]) -> None:
    assert result["template_id"] == swarm.template_id.hex()
    assert result["size"] == IMAGE_SIZE
    assert file_digest(Path(result["path"])) == file_digest(swarm.image)


def log_text(node: Node) -> str:
    return node.process.log_path.read_text(errors="replace")


def wait_until(what: str, check: Callable[[], bool], swarm: Swarm) -> None:
    """Poll `check` until it holds; fail with the nodes' logs if it never does."""
    limit = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > limit:
            logs = "\n".join(f"--- {name}\n{tail}" for name, tail in swarm.cluster.iter_logs())
            pytest.fail(f"no {what} within {DEADLINE}s\n{logs}")
        time.sleep(0.05)


def wait_for_log(swarm: Swarm, node: Node, text: str, before: int) -> None:
    """Wait until `node`'s log holds more than `before` lines containing `text`."""
    wait_until(
        f"{text!r} in {node.name}'s log",
        lambda: log_text(node).count(text) > before,
        swarm,
    )


def new_lines(node: Node, text: str, before: int) -> list[str]:
    """The lines of `node`'s log containing `text`, past the first `before` of them."""
    return [line for line in log_text(node).splitlines() if text in line][before:]


def dropped(swarm: Swarm, reason: str) -> float:
    """The first center's vmswarm_connections_dropped_total{reason=...}."""
    with urllib.request.urlopen(swarm.metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    pattern = rf'^{DROPPED}\{{reason="{reason}"\}} (\S+)$'
    found = re.search(pattern, text, re.MULTILINE)
    assert found is not None, f"no {DROPPED} for {reason} in:\n{text}"
    return float(found.group(1))


def material(swarm: Swarm, role: TlsRole, name: str) -> TlsFiles:
    return cluster_files(swarm.cluster, role, name)


async def call_rpc(node: Node, files: TlsFiles, method: str, params: dict[str, Any]) -> None:
    """One RPC call on a daemon's TCP port under `files`' certificate."""
    client = await RpcClient.connect_tcp(
        node.host, node.port, tls=client_context(check_files(files)), allowed=None
    )
    try:
        await client.call(method, params)
    finally:
        await client.aclose()


async def open_link(swarm: Swarm, node: Node, files: TlsFiles, claim: Role) -> peer_link.PeerLink:
    """A peer link to `node` over TLS under `files`' certificate, claiming role `claim`."""
    stream = await trio.open_tcp_stream(node.host, node.port)
    session, identity = await tls_connect(stream, client_context(check_files(files)))
    assert identity.role is TlsRole.STORAGE  # the center showed its own certificate
    our = peer_link.LocalPeer(os.urandom(PEER_ID_LENGTH), claim, None)
    return await peer_link.connect(session, our, swarm.template_id, Bitfield(swarm.chunks))


def assert_centers_serve(swarm: Swarm) -> None:
    """Every center is alive and still opens a link to a proper host certificate."""

    async def probe() -> None:
        for center in swarm.centers:
            assert center.process.running, center.process.log_tail(20)
            link = await open_link(swarm, center, swarm.probe, Role.HOST)
            assert link.role is Role.STORAGE and link.template_id == swarm.template_id
            await trio.aclose_forcefully(link.stream)

    trio.run(probe)


# -- the cluster works under TLS ----------------------------------------------------------------


def refusal_counted_and_centers_serve(swarm: Swarm, dropped_before: float) -> None:
    """The refusal shows in the metric, and the centers go on serving proper peers."""
    wait_until(
        "a tls_refused drop counted",
        lambda: dropped(swarm, "tls_refused") > dropped_before,
        swarm,
    )
    assert_centers_serve(swarm)


def test_a_tls_cluster_publishes_and_fetches_identical_images(swarm: Swarm) -> None:
    first, second, third = swarm.hosts
    from_centers = fetch(swarm, first)
    check_identical(swarm, from_centers)
    assert from_centers["bytes_from_centers"] > 0
    # With the centers down, the second host can only take the image over a host-host TLS link.
    for center in swarm.centers:
        center.process.terminate_and_wait()
    from_peer = fetch(swarm, second)
    check_identical(swarm, from_peer)
    assert from_peer["bytes_from_centers"] == 0
    assert from_peer["bytes_from_peers"] == from_centers["bytes_from_centers"]
    for center in swarm.centers:
        swarm.cluster.restart(center)
    check_identical(swarm, fetch(swarm, third))
    for node in [*swarm.centers, *swarm.hosts]:
        assert TLS_ON in log_text(node), node.process.log_tail(20)
        assert "running WITHOUT mutual TLS" not in log_text(node)


# -- attacks ------------------------------------------------------------------------------------


GARBAGE = bytes(range(256)) * 16


def plain_handshake(swarm: Swarm) -> bytes:
    hello = Handshake(
        PROTOCOL_VERSION, swarm.template_id, os.urandom(PEER_ID_LENGTH), None, Role.HOST
    )
    return Connection(Role.HOST).send(hello, now=0.0)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the other side sends before it closes (a reset counts as closed)."""
    sock.settimeout(DEADLINE)
    received = b""
    try:
        while data := sock.recv(1 << 16):
            received += data
    except ConnectionResetError:
        pass
    return received


@pytest.mark.parametrize("payload", ["handshake", "garbage"])
def test_a_plain_tcp_client_is_refused(swarm: Swarm, payload: str) -> None:
    center = swarm.centers[0]
    # Not "the other side hung up": that is LocalCluster's readiness probe.
    refused = "refused TLS from 127.0.0.1: the other side does not speak TLS"
    refused_before = log_text(center).count(refused)
    dropped_before = dropped(swarm, "tls_refused")
    data = plain_handshake(swarm) if payload == "handshake" else GARBAGE
    with socket.create_connection((center.host, center.port), timeout=DEADLINE) as sock:
        sock.sendall(data)
        answer = read_until_closed(sock)
    # At most a TLS alert record (content type 21), never a handshake or anything plain.
    assert answer == b"" or answer[0] == 0x15, answer[:64]
    wait_for_log(swarm, center, refused, refused_before)
    refusal_counted_and_centers_serve(swarm, dropped_before)


def test_a_port_probe_is_no_refusal(swarm: Swarm) -> None:
    # Health checks connect and hang up: neither logged as a refusal nor counted as one.
    center = swarm.centers[0]
    refused_before = log_text(center).count("refused TLS from")
    dropped_before = dropped(swarm, "tls_refused")
    for _ in range(3):
        socket.create_connection((center.host, center.port), timeout=DEADLINE).close()
    assert_centers_serve(swarm)
    assert log_text(center).count("refused TLS from") == refused_before
    assert dropped(swarm, "tls_refused") == dropped_before


def test_a_certificate_of_another_ca_is_refused(swarm: Swarm, tmp_path: Path) -> None:
    cluster = swarm.cluster
    assert cluster.ca_dir is not None and cluster.tracker is not None
    other = tmp_path / "other-ca"
    init_ca(other, "some other CA")
    made = issue(other, TlsRole.HOST, "intruder", tmp_path / "issued")
    # It trusts both CAs, so the refusal is the cluster's, of its certificate.
    bundle = tmp_path / "both.crt"
    bundle.write_bytes(
        (other / CA_CERT_NAME).read_bytes() + (cluster.ca_dir / CA_CERT_NAME).read_bytes()
    )
    foreign = TlsFiles(bundle, made.cert, made.key)

    # A host daemon under it (its flags come last, so they win) cannot fetch.
    tracker_refusals = log_text(cluster.tracker).count("refused TLS client")
    intruder = cluster.start_host(
        "intruder",
        "--tls-ca",
        str(bundle),
        "--tls-cert",
        str(made.cert),
        "--tls-key",
        str(made.key),
    )
    assert f"{TLS_ON} (CA {bundle}, host certificate 'intruder')" in log_text(intruder)
    failed = cluster.run_cli(
        "fetch", TEMPLATE, "--json", node=intruder, check=False, timeout=FETCH_TIMEOUT
    )
    assert failed.returncode != 0, failed.stdout
    assert failed.stderr.startswith("vmswarm: error:"), failed.stderr
    assert failed.stderr.strip().count("\n") == 0, failed.stderr
    wait_for_log(swarm, cluster.tracker, "refused TLS client", tracker_refusals)
    refusal = new_lines(cluster.tracker, "refused TLS client", tracker_refusals)[-1]
    assert "the peer's certificate was refused" in refusal, refusal
    intruder.process.terminate_and_wait()

    # The same certificate straight at a center: refused in the TLS handshake.
    center = swarm.centers[0]
    refused_before = log_text(center).count("refused TLS from")
    dropped_before = dropped(swarm, "tls_refused")

    async def attack() -> None:
        stream = await trio.open_tcp_stream(center.host, center.port)
        session, _ = await tls_connect(stream, client_context(check_files(foreign)))
        link = peer_link.LocalPeer(os.urandom(PEER_ID_LENGTH), Role.HOST, None)
        await peer_link.connect(session, link, swarm.template_id, Bitfield(swarm.chunks))

    with pytest.raises((TlsError, peer_link.HandshakeError)):
        trio.run(attack)
    wait_for_log(swarm, center, "refused TLS from", refused_before)
    refusal = new_lines(center, "refused TLS from", refused_before)[-1]
    assert "the peer's certificate was refused" in refusal, refusal
    refusal_counted_and_centers_serve(swarm, dropped_before)


def test_a_host_certificate_may_not_make_a_center_replicate(swarm: Swarm) -> None:
    files = material(swarm, TlsRole.HOST, "replicator")
    params = {"template_id": swarm.template_id.hex(), "sources": [["127.0.0.1", 9]]}
    with pytest.raises(RpcError) as refused:
        trio.run(call_rpc, swarm.centers[0], files, "replicate", params)
    assert refused.value.code == "forbidden", refused.value
    assert "host certificates may not call replicate" in refused.value.message
    assert_centers_serve(swarm)


@pytest.mark.parametrize("method", ["vms", "launch"])
def test_an_operator_certificate_may_not_call_a_host_vm_method(swarm: Swarm, method: str) -> None:
    files = material(swarm, TlsRole.OPERATOR, f"operator-{method}")
    params: dict[str, Any] = {} if method == "vms" else {"template": TEMPLATE, "flavor": "small"}
    with pytest.raises(RpcError) as refused:
        trio.run(call_rpc, swarm.hosts[0], files, method, params)
    assert refused.value.code == "forbidden", refused.value
    assert f"operator certificates may not call {method}" in refused.value.message
    assert swarm.hosts[0].process.running


def test_a_host_certificate_may_not_link_as_a_storage_center(swarm: Swarm) -> None:
    center = swarm.centers[0]
    files = material(swarm, TlsRole.HOST, "poser")
    warned_before = log_text(center).count("refusing a link from")
    dropped_before = dropped(swarm, "tls_refused")
    with pytest.raises(peer_link.LinkRefused, match="a host certificate may not link as a storage"):
        trio.run(open_link, swarm, center, files, Role.STORAGE)
    wait_for_log(swarm, center, "refusing a link from", warned_before)
    refusal_counted_and_centers_serve(swarm, dropped_before)


# -- and afterwards -----------------------------------------------------------------------------


def test_after_the_attacks_a_new_host_still_fetches(swarm: Swarm) -> None:
    late = swarm.cluster.start_host("late")
    check_identical(swarm, fetch(swarm, late))
    for node in swarm.cluster.nodes:
        if node.name != "intruder":
            assert node.process.running, f"{node.name} died:\n{node.process.log_tail(20)}"
