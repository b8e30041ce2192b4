"""A hostile client hammers a real storage center while an honest host fetches from it.

The attacker dials from other loopback addresses (127.0.0.2 and up), so the bans by address it
earns never touch the honest host on 127.0.0.1. The fetch must complete byte-identical, and the
center's /metrics must count the bans by reason and the connections it dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from vmswarm.daemon.cluster import LocalCluster, free_port, vmswarm_script
from vmswarm.daemon.mixed_image import write_mixed_image
from vmswarm.swarm.connection import Connection
from vmswarm.swarm.messages import PROTOCOL_VERSION, Handshake, KeepAlive, Role

pytestmark = pytest.mark.e2e

IMAGE_SIZE = 16 << 20
PER_ADDRESS = 4


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "cluster") as c:
        c.start_tracker()
        yield c


def handshake(template_id: bytes, then_keepalives: int = 0) -> bytes:
    hello = Handshake(PROTOCOL_VERSION, template_id, os.urandom(16), None, Role.HOST)
    conn = Connection(Role.HOST)
    return conn.send(hello, now=0.0) + conn.send(KeepAlive(), now=0.0) * then_keepalives


def attacks(template_id: bytes) -> list[tuple[str, Callable[[], bytes]]]:
    """(source address, what it sends) for each kind of hostile connection."""
    return [
        # A 4 GiB frame announced before the handshake.
        ("127.0.0.2", lambda: (0xFFFFFFF0).to_bytes(4, "big") + b"\x00"),
        # Garbage: an unknown message type.
        ("127.0.0.3", lambda: b"\x00\x00\x00\x09\x7fgarbage!"),
        # Out of state: a second Handshake where the Bitfield must come.
        ("127.0.0.4", lambda: handshake(template_id) * 2),
        # A real handshake, then an oversized chunk frame on the live link.
        ("127.0.0.5", lambda: handshake(template_id) + (0xFFFFFFF0).to_bytes(4, "big") + b"\x04"),
        # A flood of messages that carry nothing.
        ("127.0.0.7", lambda: handshake(template_id, then_keepalives=5000)),
    ]


def hit(address: tuple[str, int], source: str, payload: bytes) -> None:
    """One hostile connection: send, then read until the daemon hangs up (or 3 s pass)."""
    try:
        with socket.create_connection(address, timeout=3, source_address=(source, 0)) as sock:
            sock.sendall(payload)
            while sock.recv(1 << 16):
                pass
    except OSError:
        pass  # refused, reset or timed out: all fine for an attacker being shown the door


def hammer(address: tuple[str, int], template_id: bytes, stop: threading.Event) -> None:
    kinds = attacks(template_id)
    while not stop.is_set():
        for source, payload in kinds:
            hit(address, source, payload())


def hold_silent(address: tuple[str, int], count: int) -> list[socket.socket]:
    """Connections from one address that never say anything (until the handshake timeout)."""
    held = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            held.append(
                socket.create_connection(address, timeout=3, source_address=("127.0.0.6", 0))
            )
    return held


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **want: str) -> float:
    return sum(
        value
        for (sample, labels), value in samples.items()
        if sample == name and all((k, v) in labels for k, v in want.items())
    )


def test_an_honest_fetch_completes_while_a_hostile_client_hammers_the_center(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    metrics_port = free_port()
    center = cluster.start_center(
        "c1",
        "--metrics",
        f"127.0.0.1:{metrics_port}",
        "--max-connections-per-address",
        str(PER_ADDRESS),
        "--handshake-timeout",
        "5",
    )
    host = cluster.start_host("h1")
    image = tmp_path / "disk.raw"
    write_mixed_image(image, IMAGE_SIZE, zero_fraction=0.3, seed=3)
    published = json.loads(
        cluster.run_cli(
            "publish",
            str(image),
            "--name",
            "disk",
            "--version",
            "1",
            "--tracker",
            cluster.tracker_address,
            "--replicas",
            "1",
            "--chunk-size",
            "256KiB",
            "--json",
        ).stdout
    )
    template_id = bytes.fromhex(str(published["template_id"]))
    address = (center.host, center.port)

    # One address tries to hold more connections than it may.
    held = hold_silent(address, PER_ADDRESS + 3)
    stop = threading.Event()
    attacker = threading.Thread(target=hammer, args=(address, template_id, stop), daemon=True)
    attacker.start()
    try:
        fetch = subprocess.run(
            [str(vmswarm_script()), "fetch", "disk:1", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            env=cluster.cli_env(host),
            check=False,
        )
    finally:
        stop.set()
        attacker.join(timeout=30)
        for sock in held:
            sock.close()
    assert fetch.returncode == 0, fetch.stderr
    result = json.loads(fetch.stdout)
    assert Path(result["path"]).read_bytes() == image.read_bytes()
    assert center.process.running

    samples = scrape(metrics_port)
    banned = "vmswarm_peers_banned_total"
    assert total(samples, banned, reason="oversized_frame") >= 2  # before and after a handshake
    assert total(samples, banned, reason="bad_handshake") >= 2  # garbage, out-of-state
    assert total(samples, banned, reason="message_flood") >= 1
    dropped = "vmswarm_connections_dropped_total"
    assert total(samples, dropped, reason="banned") >= 1  # the hammering went on, unheard
    assert total(samples, dropped, reason="per_address_limit") >= 3
    status = json.loads(cluster.run_cli("status", "--json", node=center).stdout)
    banned_hosts = {entry["host"] for entry in status["banned"]}
    assert {"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.7"} <= banned_hosts
    assert "127.0.0.1" not in banned_hosts
