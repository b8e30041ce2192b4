"""Every storage center dies after some hosts hold every chunk: the other hosts still complete,
byte-identical, from those hosts alone (real processes through the CLI).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vmswarm.daemon.cluster import LocalCluster

from .faults_common import (
    center_manifest,
    check_identical,
    fetch,
    finish_fetch,
    make_image,
    nonzero_bytes,
    publish,
    sigkill,
    start_fetch,
    template_status,
)

pytestmark = pytest.mark.e2e

IMAGE_SIZE = 16 << 20


def test_hosts_complete_from_peers_after_every_center_died(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster.start_tracker()
    centers = [cluster.start_center(f"c{i}") for i in range(2)]
    seeds = [cluster.start_host(f"h{i}") for i in range(2)]
    image = make_image(tmp_path / "disk.raw", IMAGE_SIZE)
    template_id = publish(cluster, image, replicas=2)
    for seed in seeds:
        check_identical(fetch(cluster, seed), seed, template_id, image)
    manifest = center_manifest(centers[0], template_id)

    for center in centers:
        sigkill(center.process)

    late = [cluster.start_host(f"h{i}") for i in range(2, 4)]
    fetches = [start_fetch(cluster, host) for host in late]
    results = [finish_fetch(process) for process in fetches]
    for host, result in zip(late, results, strict=True):
        check_identical(result, host, template_id, image)
        # Every chunk came from a host; none could have come from a dead center.
        assert result["bytes_from_centers"] == 0
        assert result["bytes_from_peers"] == nonzero_bytes(manifest)
        status = template_status(host, template_id)
        assert status is not None and status["complete"] and status["corrupt_chunks"] == 0
    assert all(not center.process.running for center in centers)
    for seed in seeds:
        served = template_status(seed, template_id)
        assert served is not None and served["bytes_up"] > 0
