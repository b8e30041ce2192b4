"""Chunks a reader waits on jump the queue; a boot profile orders the rest; the NBD source reads."""

from __future__ import annotations

from pathlib import Path

import trio
from vmswarm.daemon.download_source import DownloadSource
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.daemon.template_sources import HostTemplate, TemplateData

from .test_download import (
    CHUNK,
    Wrapped,
    host_store,
    make_image,
    seeding,
    start_download,
)

PATTERN = "DDDDDDDDDD0DDDDDDDDD"


class RecordingSource(Wrapped):
    """Remembers the order in which chunks were asked of this seeder."""

    def __init__(self, inner: TemplateData) -> None:
        super().__init__(inner)
        self.reads: list[int] = []

    def read_chunk(self, index: int) -> memoryview:
        self.reads.append(index)
        return self._inner.read_chunk(index)


async def test_a_waited_chunk_is_requested_before_any_other(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=11)
    last = manifest.chunk_count - 1
    async with trio.open_nursery() as nursery:
        seed = RecordingSource(host_store(tmp_path / "seed", data, manifest, range(last + 1)))
        async with seeding(nursery, seed) as s:
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
            download = await start_download(nursery, target, [])
            waited = trio.Event()

            async def reader() -> None:
                await download.wait_chunk(last)
                waited.set()

            nursery.start_soon(reader)
            await trio.sleep(0.1)  # the wait is registered before any source exists
            assert not waited.is_set()
            assert "none of the 0 linked peers" in download.why_missing(last)
            await download.add_sources([s.address])
            with trio.fail_after(20):
                await waited.wait()
                assert target.has(last)
                await download.wait_done()
            assert seed.reads[0] == last
            assert target.path is not None and target.path.read_bytes() == data
            nursery.cancel_scope.cancel()


async def test_a_profile_orders_the_first_requests(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=12)
    order = [17, 3, 12]
    async with trio.open_nursery() as nursery:
        seed = RecordingSource(host_store(tmp_path / "seed", data, manifest, range(20)))
        async with seeding(nursery, seed) as s:
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
            download = await start_download(nursery, target, [])
            await download.prefer(order)
            await download.add_sources([s.address])
            with trio.fail_after(20):
                await download.wait_done()
            assert seed.reads[:3] == order
            assert target.path is not None and target.path.read_bytes() == data
            nursery.cancel_scope.cancel()


async def test_present_and_zero_chunks_need_no_wait(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=13)
    async with trio.open_nursery() as nursery:
        target = host_store(tmp_path / "leech", data, manifest, [0, 1])
        download = await start_download(nursery, target, [])
        with trio.fail_after(5):
            await download.wait_chunk(1)  # held
            await download.wait_chunk(10)  # all zeros
        assert download.why_missing(1) == "it is here"
        nursery.cancel_scope.cancel()


async def test_download_source_reads_verified_bytes_across_chunks(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=14)
    async with trio.open_nursery() as nursery:
        target = host_store(tmp_path / "leech", data, manifest, range(9, 12))
        download = await start_download(nursery, target, [])
        source = DownloadSource(download)
        assert source.size == len(data) and source.chunk_size == CHUNK
        assert source.is_zero(10) and not source.is_zero(9)
        assert source.is_ready(9) and not source.is_ready(8)
        start, end = 9 * CHUNK + 100, 12 * CHUNK - 7  # through a zero chunk
        assert await source.read(start, end - start) == data[start:end]
        nursery.cancel_scope.cancel()


async def test_a_reopened_store_is_verified_before_it_is_read(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=15)
    host_store(tmp_path / "leech", data, manifest, [2]).close()
    async with trio.open_nursery() as nursery:
        target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
        download = await start_download(nursery, target, [])
        source = DownloadSource(download)
        assert await source.read(2 * CHUNK, CHUNK) == data[2 * CHUNK : 3 * CHUNK]
        assert target.chunk_file(2) is not None  # verified by that read
        nursery.cancel_scope.cancel()


async def test_the_chunks_after_a_waited_one_are_asked_for_right_behind_it(
    tmp_path: Path,
) -> None:
    data, manifest = make_image(PATTERN, seed=16)
    async with trio.open_nursery() as nursery:
        seed = RecordingSource(host_store(tmp_path / "seed", data, manifest, range(20)))
        async with seeding(nursery, seed) as s:
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
            download = await start_download(nursery, target, [])
            nursery.start_soon(download.wait_chunk, 8)
            await trio.sleep(0.1)
            await download.add_sources([s.address])
            with trio.fail_after(20):
                await download.wait_done()
            # 8 waited on, then 9 (10 is all zeros: never fetched): a boot reads on in order.
            assert seed.reads[:2] == [8, 9]
            nursery.cancel_scope.cancel()
