"""A link goes dead silently: every packet between a host and one storage center is dropped (no
RST, no FIN; the sockets stay open). The host's request timeouts move what that center was asked
for to the other center, and the fetch completes byte-identical.

The drop is two iptables rules on loopback matching the center's port (root only).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from vmswarm.daemon.cluster import LocalCluster, Node

from ..ci import unavailable
from .faults_common import (
    Status,
    check_identical,
    finish_fetch,
    make_image,
    publish,
    start_fetch,
    template_status,
    wait_progress,
)

pytestmark = pytest.mark.e2e

IMAGE_SIZE = 16 << 20
# The healthy center is slow enough that the rest outlasts a request timeout (10 s and up), so
# the timeouts, not just the endgame, must move the dead link's requests.
HEALTHY_LIMIT = "512KB"
SILENCED_LIMIT = "2MB"
SILENCE_AT_PERCENT = 15.0


def _rules(port: int) -> list[list[str]]:
    base = ["INPUT", "-p", "tcp", "-s", "127.0.0.1", "-d", "127.0.0.1"]
    return [
        [*base, "--dport", str(port), "-j", "DROP"],
        [*base, "--sport", str(port), "-j", "DROP"],
    ]


@contextmanager
def silenced(port: int) -> Iterator[None]:
    """Drop every loopback packet to or from `port` while inside."""
    iptables = shutil.which("iptables")
    if iptables is None:
        unavailable("test a silently dead link", "no iptables to drop packets with")
    added: list[list[str]] = []
    try:
        for rule in _rules(port):
            result = subprocess.run(
                [str(iptables), "-I", *rule], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                unavailable(
                    "test a silently dead link", f"iptables refused a rule: {result.stderr.strip()}"
                )
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run([str(iptables), "-D", *rule], capture_output=True, check=False)


def _peer_on(status: Status, center: Node) -> Status | None:
    found = [
        p for p in status["peers"] if p["listen"] is not None and p["listen"][1] == center.port
    ]
    return found[0] if found else None


def test_silently_dead_link_requests_time_out_and_move_to_another_center(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster.start_tracker()
    dead = cluster.start_center("c0", "--upload-limit", SILENCED_LIMIT)
    healthy = cluster.start_center("c1", "--upload-limit", HEALTHY_LIMIT)
    host = cluster.start_host("h0")
    image = make_image(tmp_path / "disk.raw", IMAGE_SIZE)
    template_id = publish(cluster, image, replicas=2)

    fetch = start_fetch(cluster, host)
    at = wait_progress(cluster, host, template_id, SILENCE_AT_PERCENT, [fetch])
    assert not at["complete"]
    link = _peer_on(at, dead)
    assert link is not None and link["bytes_in"] > 0, "the host was not fetching from c0"
    assert _peer_on(at, healthy) is not None, "the host has no link to c1"
    with silenced(dead.port):
        result = finish_fetch(fetch)
        check_identical(result, host, template_id, image)
        final = template_status(host, template_id)
    assert final is not None and final["complete"]
    # Requests to the dead link expired and were sent elsewhere.
    assert final["timeouts"] > 0
    # The dead center never saw a RST or FIN: its process is fine, its socket still open.
    assert dead.process.running
