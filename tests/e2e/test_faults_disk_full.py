"""The disk under a host's templates fills up mid-fetch (a real, size-limited tmpfs).

The fetch fails with one clear line naming the directory and the space needed; the daemon stops
asking for chunks it cannot store; nothing it marks present is wrong; and once space is freed the
fetch resumes (on the same daemon, or after a crash and restart) without fetching again what it
had verified.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vmswarm.daemon.cluster import LocalCluster, Node
from vmswarm.daemon.imagestore import ImageStore

from ..tmpfs import tmpfs_mounter
from .faults_common import (
    check_identical,
    fetch,
    make_image,
    nonzero_bytes,
    publish,
    sigkill,
    start_fetch,
    stored_manifest,
    template_status,
    wait_progress,
)

pytestmark = pytest.mark.e2e

IMAGE_SIZE = 16 << 20
# Room for the whole image (the store checks that up front), then a ballast takes it away.
TMPFS_SIZE = "24m"
CENTER_UPLOAD_LIMIT = "2MB"
FILL_AT_PERCENT = 30.0


@pytest.fixture
def templates_on_tmpfs() -> Iterator[Callable[[Path], Path]]:
    """Mount a small tmpfs where a host will keep its templates; unmounted afterwards."""
    with tmpfs_mounter() as mount:
        yield lambda target: mount(target, TMPFS_SIZE)


def _fill(directory: Path) -> Path:
    """Write a ballast file until the filesystem is full (ENOSPC); its path."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 20, 4096):  # whole MiBs, then the last partial one
            block = b"\xa5" * size
            with contextlib.suppress(OSError):
                while os.write(fd, block) == size:
                    pass
    finally:
        os.close(fd)
    return ballast


def _setup(
    cluster: LocalCluster, tmp_path: Path, mount: Callable[[Path], Path]
) -> tuple[Node, Path, str, Path]:
    cluster.start_tracker()
    for i in range(2):
        cluster.start_center(f"c{i}", "--upload-limit", CENTER_UPLOAD_LIMIT)
    templates = mount(cluster.workdir / "h0" / "templates")
    host = cluster.start_host("h0")
    image = make_image(tmp_path / "disk.raw", IMAGE_SIZE)
    # r=1: each chunk has one source, so no chunk can arrive twice and counts are exact.
    template_id = publish(cluster, image, replicas=1)
    return host, templates, template_id, image


def _fail_on_full_disk(
    cluster: LocalCluster, host: Node, template_id: str, templates: Path
) -> Path:
    """Fill the disk mid-fetch; check the fetch's one-line error; the ballast's path."""
    process = start_fetch(cluster, host)
    wait_progress(cluster, host, template_id, FILL_AT_PERCENT, [process])
    ballast = _fill(templates)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("vmswarm: error:")]
    assert len(errors) == 1, err
    line = errors[0]
    assert "not enough disk space" in line and str(templates) in line and "need " in line, line
    return ballast


def test_disk_full_mid_fetch_fails_clearly_and_resumes_once_space_is_freed(
    cluster: LocalCluster, tmp_path: Path, templates_on_tmpfs: Callable[[Path], Path]
) -> None:
    host, templates, template_id, image = _setup(cluster, tmp_path, templates_on_tmpfs)
    ballast = _fail_on_full_disk(cluster, host, template_id, templates)
    stalled = template_status(host, template_id)
    assert stalled is not None and not stalled["complete"]
    assert "not enough disk space" in stalled["error"]

    ballast.unlink()
    check_identical(fetch(cluster, host), host, template_id, image)
    final = template_status(host, template_id)
    assert final is not None and final["complete"] and final["error"] is None
    # Every chunk was stored exactly once: the ones that hit the full disk were fetched again,
    # none of those stored before was.
    manifest = stored_manifest(host, template_id)
    assert final["bytes_from_centers"] + final["bytes_from_peers"] == nonzero_bytes(manifest)
    assert final["corrupt_chunks"] == 0


def test_host_killed_on_a_full_disk_keeps_only_right_chunks_and_resumes(
    cluster: LocalCluster, tmp_path: Path, templates_on_tmpfs: Callable[[Path], Path]
) -> None:
    host, templates, template_id, image = _setup(cluster, tmp_path, templates_on_tmpfs)
    ballast = _fail_on_full_disk(cluster, host, template_id, templates)
    sigkill(host.process)
    ballast.unlink()

    # What the restart will find present (after journal replay) is right, chunk by chunk.
    manifest = stored_manifest(host, template_id)
    with ImageStore(templates, manifest) as store:
        present = set(store.have)
        path = store.path
    data = path.read_bytes()
    for index in present:
        offset, length = manifest.chunk_range(index)
        assert manifest.chunk_matches(index, data[offset : offset + length]), index
    missing_bytes = nonzero_bytes(
        manifest, [i for i in range(manifest.chunk_count) if i not in present]
    )
    assert 0 < missing_bytes < nonzero_bytes(manifest)

    cluster.restart(host)
    check_identical(fetch(cluster, host), host, template_id, image)
    final = template_status(host, template_id)
    assert final is not None and final["complete"]
    assert final["wasted_bytes"] == 0
    assert final["bytes_from_centers"] + final["bytes_from_peers"] == missing_bytes
