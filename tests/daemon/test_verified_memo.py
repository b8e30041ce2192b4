"""Chunks verified once by this process go out by sendfile; anything changed is hashed again."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio
from vmswarm.daemon.chunkstore import ChunkStore
from vmswarm.daemon.download import DownloadFailed, TemplateDownload
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.daemon.storeerrors import ChunkCorrupt
from vmswarm.daemon.template_sources import HostTemplate
from vmswarm.swarm.manifest import build_manifest

from tests.daemon.test_download import FAST, center_store, make_image, peer, seeding

CHUNK = 1 << 16


def _read_fd(fd: int, offset: int, length: int) -> bytes:
    return os.pread(fd, length, offset)


def test_a_put_chunk_is_served_from_its_file_until_the_file_changes(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    data = random.randbytes(CHUNK)
    digest = build_manifest(data, "t", "1", chunk_size=CHUNK).chunk_digests[0]
    store.put(digest, data)
    found = store.open_verified(digest)
    assert found is not None
    fd, size = found
    try:
        assert size == CHUNK and _read_fd(fd, 0, size) == data
    finally:
        os.close(fd)
    # Rewritten in place (bit rot by a tool): the identity changes, so it must be hashed again.
    path = store.path_for(digest)
    path.write_bytes(b"\xff" + data[1:])
    os.utime(path, ns=(0, 1))
    assert store.open_verified(digest) is None
    with pytest.raises(ChunkCorrupt):
        store.get_into(digest, bytearray(CHUNK))
    assert not store.has(digest)


def test_a_restarted_store_verifies_before_it_trusts(tmp_path: Path) -> None:
    data = random.randbytes(CHUNK)
    digest = build_manifest(data, "t", "1", chunk_size=CHUNK).chunk_digests[0]
    ChunkStore(tmp_path).put(digest, data)
    again = ChunkStore(tmp_path)
    assert again.open_verified(digest) is None
    assert again.get_into(digest, bytearray(CHUNK)) == CHUNK
    found = again.open_verified(digest)
    assert found is not None
    os.close(found[0])


def test_image_store_trusts_only_what_this_process_verified(tmp_path: Path) -> None:
    data, manifest = make_image("DD0D")
    with ImageStore(tmp_path, manifest) as store:
        store.write_chunk(0, data[:CHUNK])
        found = store.verified_range(0)
        assert found is not None and found[1:] == (0, CHUNK)
        assert store.verified_range(1) is None  # not here
        assert store.verified_range(2) is None  # zeros are never sent
    with ImageStore(tmp_path, manifest) as store:
        assert 0 in store and store.verified_range(0) is None
        store.read_chunk(0)
        assert store.verified_range(0) is not None
        # Corrupted on disk: a scrub finds it and it is no longer offered for sendfile.
        fd = os.open(store.path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x00\x01", 10)
        finally:
            os.close(fd)
        assert store.scrub() == [0]
        assert store.verified_range(0) is None


async def test_a_center_whose_chunk_file_was_replaced_does_not_send_it(tmp_path: Path) -> None:
    data, manifest = make_image("DDDD", seed=7)
    bad = center_store(tmp_path / "bad", data, manifest, list(range(4)))
    # Swap chunk 1's file for garbage under a new inode after it was verified and memoized.
    path = bad.store.path_for(manifest.chunk_digests[1])
    replacement = path.with_name("replacement")
    replacement.write_bytes(random.randbytes(CHUNK))
    os.replace(replacement, path)
    target = HostTemplate(ImageStore(tmp_path / "host", manifest))
    download = TemplateDownload(
        target, peer(), upload_slots=trio.Semaphore(4), find_peers=None, config=FAST
    )
    async with trio.open_nursery() as nursery, seeding(nursery, bad) as only:
        await nursery.start(download.run)
        await download.add_sources([only.address])
        with trio.fail_after(20), pytest.raises(DownloadFailed, match="chunk 1"):
            await download.wait_done()
        nursery.cancel_scope.cancel()
    # The center hashed the changed file, dropped it and said no: nothing corrupt was sent.
    assert not download.banned and download.corrupt_chunks == 0
    assert not bad.has(1)
    assert sorted(target.have()) == [0, 2, 3]
