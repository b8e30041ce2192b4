"""A host daemon is SIGKILLed while it is writing chunks, twice, and restarted each time: nothing
verified is lost, nothing verified is fetched again, and the byte counts prove it.

Each kill lands while chunks stream in and are written: two consecutive status polls just before
it show the written bytes growing. After each kill the test opens the store as the restarted
daemon will (journal replay, re-verification) and checks every chunk it marks present.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from vmswarm.daemon.cluster import LocalCluster, Node
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.swarm.manifest import Manifest

from .faults_common import (
    Status,
    check_identical,
    fetch,
    make_image,
    nonzero_bytes,
    publish,
    sigkill,
    start_fetch,
    stored_manifest,
    template_status,
    wait_for,
)

pytestmark = pytest.mark.e2e

IMAGE_SIZE = 16 << 20
CENTER_UPLOAD_LIMIT = "2MB"
KILL_AT_PERCENT = (30.0, 65.0)


def _writing(cluster: LocalCluster, host: Node, template_id: str, percent: float) -> Status:
    """Past `percent`, at a moment chunks are being written (done bytes grew since last poll)."""
    last: list[int] = []

    def check() -> Status | None:
        found = template_status(host, template_id)
        if found is None:
            return None
        growing = bool(last) and found["done_bytes"] > last[-1]
        last.append(found["done_bytes"])
        return found if growing and found["percent"] >= percent and not found["complete"] else None

    return wait_for(
        cluster, f"writes past {percent}% on {host.name}", check, processes=[host.process]
    )


def _durable_and_right(host: Node, manifest: Manifest) -> set[int]:
    """What the restarted daemon will find present; every such chunk hashes right in the image."""
    directory = host.data_dir / "templates"
    with ImageStore(directory, manifest) as store:
        present = set(store.have)
        path = store.path
    fd = os.open(path, os.O_RDONLY)
    try:
        for index in present:
            offset, length = manifest.chunk_range(index)
            data = os.pread(fd, length, offset)
            assert manifest.chunk_matches(index, data), f"chunk {index} is marked but wrong"
    finally:
        os.close(fd)
    return present


def test_host_killed_during_writes_resumes_without_losing_or_refetching(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster.start_tracker()
    # r=1 over two centers and one host: each chunk has one source, so none can arrive twice.
    for i in range(2):
        cluster.start_center(f"c{i}", "--upload-limit", CENTER_UPLOAD_LIMIT)
    host = cluster.start_host("h0")
    image = make_image(tmp_path / "disk.raw", IMAGE_SIZE)
    template_id = publish(cluster, image, replicas=1)

    first = start_fetch(cluster, host)
    held_before: set[int] = set()
    for percent in KILL_AT_PERCENT:
        before = _writing(cluster, host, template_id, percent)
        sigkill(host.process)
        manifest = stored_manifest(host, template_id)
        durable = _durable_and_right(host, manifest)
        # Nothing reported verified before the kill, nor held after an earlier one, was lost.
        assert len(durable) >= before["chunks_held"]
        assert held_before <= durable
        held_before = durable
        # The restarted daemon resumes the download on its own.
        cluster.restart(host)
    first.communicate(timeout=30)
    assert first.returncode != 0

    missing = [i for i in range(manifest.chunk_count) if i not in held_before]
    missing_bytes = nonzero_bytes(manifest, missing)
    assert 0 < missing_bytes < nonzero_bytes(manifest), "the last kill did not land mid-fetch"
    check_identical(fetch(cluster, host), host, template_id, image)

    final = template_status(host, template_id)
    assert final is not None and final["complete"]
    # Exactly the chunks the store lacked moved after the last restart: none twice, none again.
    assert final["wasted_bytes"] == 0 and final["corrupt_chunks"] == 0
    assert final["bytes_from_centers"] + final["bytes_from_peers"] == missing_bytes
