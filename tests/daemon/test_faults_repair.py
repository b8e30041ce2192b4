"""Fault defences at the swarm level: a center re-fetches what a scrub dropped; a host whose disk
filled up stops asking, and asks again for what it could not store once it is told to retry.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio
from vmswarm.daemon.download import DownloadConfig, TemplateDownload
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.daemon.storeerrors import StoreFullError
from vmswarm.daemon.template_sources import HostTemplate
from vmswarm.swarm.messages import Role
from vmswarm.swarm.picker import PickerConfig

from .test_download import (
    FAST,
    PATTERN,
    Wrapped,
    center_store,
    finder,
    host_store,
    make_image,
    peer,
    seeding,
    start_download,
    until,
)

# Requests never time out within a test: only the defence under test can move them.
PATIENT = DownloadConfig(
    tick_interval=0.05,
    no_source_timeout=30.0,
    discovery_interval=0.1,
    picker=PickerConfig(timeout_base=600.0),
)


async def test_center_refetches_chunks_a_scrub_dropped(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=11)
    everything = list(range(manifest.chunk_count))
    async with trio.open_nursery() as nursery:
        replica = center_store(tmp_path / "replica", data, manifest, everything)
        async with seeding(nursery, replica, Role.STORAGE) as source:
            center = center_store(tmp_path / "center", data, manifest, everything)
            # As after a restart: the center wants nothing beyond what it holds.
            download = TemplateDownload(
                center,
                peer(Role.STORAGE),
                upload_slots=trio.Semaphore(2),
                want=(),
                want_all=False,
                find_peers=finder([source.address]),
                config=FAST,
            )
            await nursery.start(download.run)
            index = next(i for i in everything if i not in manifest.zero_chunks)
            digest = manifest.chunk_digests[index]
            path = center.store.path_for(digest)
            fd = os.open(path, os.O_RDWR)
            os.pwrite(fd, b"\x00\xff", 10)
            os.close(fd)

            bad = center.store.scrub()
            assert bad == [digest]
            lost = center.forget(bad)
            assert index in lost and not center.has(index)
            download.lost(lost)
            with trio.fail_after(10):
                await until(lambda: center.has(index))
            assert (
                center.store.get(digest)
                == data[index * len(data) // manifest.chunk_count :][
                    : manifest.chunk_range(index)[1]
                ]
            )
            assert center.store.scrub() == []
            nursery.cancel_scope.cancel()


async def test_center_repairs_from_a_replica_that_got_the_chunk_after_the_link_came_up(
    tmp_path: Path,
) -> None:
    # The replica fetches everything from the center over one link, so the center held each chunk
    # before the replica did; it must still hear the replica's Have, or it cannot repair later.
    data, manifest = make_image(PATTERN, seed=14)
    everything = list(range(manifest.chunk_count))
    center = center_store(tmp_path / "center", data, manifest, everything)
    async with trio.open_nursery() as nursery, seeding(nursery, center, Role.STORAGE) as source:
        replica = TemplateDownload(
            center_store(tmp_path / "replica", data, manifest, []),
            peer(Role.STORAGE),
            upload_slots=trio.Semaphore(2),
            want=everything,
            want_all=False,
            find_peers=finder([source.address]),
            config=PATIENT,
        )
        await nursery.start(replica.run)
        with trio.fail_after(10):
            await replica.wait_done()
        assert replica.bytes_from_centers > 0

        index = next(i for i in everything if i not in manifest.zero_chunks)
        digest = manifest.chunk_digests[index]
        assert center.store.delete(digest)
        source.download.lost(center.forget([digest]))
        with trio.fail_after(10):
            await until(lambda: center.has(index))
        assert source.download.error is None
        assert center.store.scrub() == []
        nursery.cancel_scope.cancel()


class FillingDisk(Wrapped):
    """A host store whose disk is full while `full` is set."""

    full = True
    refused = 0

    def write_chunk(self, index: int, data: bytes | bytearray | memoryview) -> list[int]:
        if self.full:
            self.refused += 1
            raise StoreFullError(f"chunk {index} in /nowhere", len(data), 0)
        return self._inner.write_chunk(index, data)


async def test_full_disk_fails_the_fetch_then_retry_asks_again_for_what_was_not_stored(
    tmp_path: Path,
) -> None:
    data, manifest = make_image(PATTERN, seed=12)
    async with trio.open_nursery() as nursery:
        seed = host_store(tmp_path / "seed", data, manifest, range(manifest.chunk_count))
        async with seeding(nursery, seed) as source:
            target = FillingDisk(HostTemplate(ImageStore(tmp_path / "leech", manifest)))
            download = await start_download(nursery, target, [source.address], config=PATIENT)
            with trio.fail_after(10):
                await until(lambda: download.error is not None)
            assert download.error is not None and "need" in download.error
            assert not download.complete
            # Nothing more is asked for: what was in flight arrives, fails to store, and stops.
            seeder = source.address.peer_id
            assert seeder is not None
            with trio.fail_after(10):
                await until(
                    lambda: not download._writing and not download._picker.outstanding(seeder)
                )

            target.full = False
            await download.retry()
            # The refused chunks' requests were released: they are asked for again at once,
            # not after their (here very long) timeout.
            with trio.fail_after(20):
                await download.wait_done()
            inner = target._inner
            assert inner.path is not None and inner.path.read_bytes() == data
            nonzero = sum(
                manifest.chunk_range(i)[1]
                for i in range(manifest.chunk_count)
                if i not in manifest.zero_chunks
            )
            assert download.bytes_from_peers == nonzero
            assert target.refused >= 1
            nursery.cancel_scope.cancel()


def test_center_keeps_a_templates_signature_beside_its_manifest(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=13)
    center = center_store(tmp_path / "center", data, manifest, [])
    store = center.store
    assert store.get_signature(manifest.template_id) is None
    store.put_signature(manifest.template_id, b"envelope")
    assert store.get_signature(manifest.template_id) == b"envelope"
    # The signature file is not mistaken for a manifest.
    assert [m.template_id for m in store.manifests()] == [manifest.template_id]
