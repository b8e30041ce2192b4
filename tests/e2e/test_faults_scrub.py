"""A chunk rots on a storage center's disk: a scrub finds it, the center stops serving it and
repairs it from a replica (another center holding it), through the real CLI and daemons.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import blake3
import pytest
from vmswarm.daemon.cluster import LocalCluster, Node

from .faults_common import (
    TEMPLATE,
    Status,
    center_manifest,
    check_identical,
    chunk_path,
    fetch,
    make_image,
    publish,
    template_status,
    wait_for,
)

pytestmark = pytest.mark.e2e

IMAGE_SIZE = 4 << 20


def _rot(center: Node, template_id: str) -> tuple[bytes, list[int]]:
    """Flip a byte inside one stored chunk, keeping size and mtime (as bit rot does)."""
    manifest = center_manifest(center, template_id)
    index = next(i for i in range(manifest.chunk_count) if not manifest.is_zero(i))
    digest = manifest.chunk_digests[index]
    path = chunk_path(center, digest)
    before = path.stat()
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, 100)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), 100)
    finally:
        os.close(fd)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    same = [i for i, d in enumerate(manifest.chunk_digests) if d == digest]
    return digest, same


def _repaired(center: Node, template_id: str, digest: bytes) -> Status | None:
    """The center's template status once the chunk is back intact and counted again."""
    path = chunk_path(center, digest)
    if not path.is_file() or blake3.blake3(path.read_bytes()).digest() != digest:
        return None
    found = template_status(center, template_id)
    return found if found is not None and found["chunks_held"] == found["chunks"] else None


def test_scrub_finds_a_rotten_chunk_stops_serving_it_and_repairs_it_from_a_replica(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster.start_tracker()
    c0, c1 = cluster.start_center("c0"), cluster.start_center("c1")
    image = make_image(tmp_path / "disk.raw", IMAGE_SIZE)
    template_id = publish(cluster, image, replicas=2)
    # The replica is away while the rot is found: nothing can repair it yet.
    c1.process.terminate_and_wait()
    digest, indices = _rot(c0, template_id)

    scrubbed = json.loads(cluster.run_cli("scrub", "--json", node=c0).stdout)
    assert scrubbed["corrupt"] == [digest.hex()]
    assert scrubbed["repairing"] == [{"name": "disk", "version": "1", "chunks": indices}]
    assert not chunk_path(c0, digest).exists()
    held = template_status(c0, template_id)
    assert held is not None and held["chunks_held"] == held["chunks"] - len(indices)

    # It is no longer offered: a host with only c0 to ask cannot get that chunk (and no rot).
    host = cluster.start_host("h0", "--no-source-timeout", "2")
    failed = cluster.run_cli("fetch", TEMPLATE, node=host, check=False)
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("vmswarm: error")]
    assert len(errors) == 1 and f"no source holds chunk {indices[0]}" in errors[0], failed.stderr

    # The replica comes back: c0 fetches the chunk from it on its own.
    cluster.restart(c1)
    wait_for(
        cluster,
        "c0 repairing the chunk from c1",
        lambda: _repaired(c0, template_id, digest),
        processes=[c0.process, c1.process],
    )
    assert "scrub of" in c0.process.log_tail(200)

    # With the replica gone again, c0 alone serves a byte-identical image.
    c1.process.terminate_and_wait()
    check_identical(fetch(cluster, host), host, template_id, image)
    again = json.loads(cluster.run_cli("scrub", "--json", node=c0).stdout)
    assert again["corrupt"] == [] and again["repairing"] == []


def test_periodic_scrub_repairs_without_being_asked(tmp_path: Path) -> None:
    # Every daemon of this cluster scrubs each second (the default is once a day).
    env = {"VMSWARM_DAEMON_SCRUB_INTERVAL": "1"}
    with LocalCluster(tmp_path / "cluster", env=env) as cluster:
        cluster.start_tracker()
        c0, c1 = cluster.start_center("c0"), cluster.start_center("c1")
        image = make_image(tmp_path / "disk.raw", IMAGE_SIZE)
        template_id = publish(cluster, image, replicas=2)
        digest, _ = _rot(c0, template_id)

        def found_and_repaired() -> Status | None:
            if "corrupt chunks deleted" not in c0.process.log_tail(400):
                return None
            return _repaired(c0, template_id, digest)

        wait_for(
            cluster,
            "c0's own scrub finding and repairing the chunk",
            found_and_repaired,
            processes=[c0.process, c1.process],
        )
        assert "corrupt chunks deleted" not in c1.process.log_tail(400)
