"""TemplateDownload over real loopback links: seeders, corrupt peers, timeouts, resume, subsets."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio
from vmswarm.daemon.chunkstore import ChunkStore
from vmswarm.daemon.download import (
    DownloadConfig,
    DownloadFailed,
    PeerAddress,
    PeerFinder,
    TemplateDownload,
)
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.daemon.peer_link import LocalPeer, read_handshake
from vmswarm.daemon.ratelimit import RateLimiter
from vmswarm.daemon.template_sources import CenterTemplate, HostTemplate, TemplateData
from vmswarm.daemon.transfer_events import TransferEvents
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.connection import Connection
from vmswarm.swarm.manifest import Manifest, build_manifest
from vmswarm.swarm.messages import Role
from vmswarm.swarm.picker import PickerConfig

CHUNK = 1 << 16


def make_image(pattern: str, seed: int = 0) -> tuple[bytes, Manifest]:
    """One chunk per letter: 'D' random data, '0' zeros."""
    rng = random.Random(seed)
    data = b"".join(bytes(CHUNK) if c == "0" else rng.randbytes(CHUNK) for c in pattern)
    return data, build_manifest(data, "tmpl", f"v{seed}", chunk_size=CHUNK)


def host_store(
    directory: Path, data: bytes, manifest: Manifest, chunks: range | list[int]
) -> HostTemplate:
    store = ImageStore(directory, manifest)
    for i in chunks:
        if i not in manifest.zero_chunks:
            store.write_chunk(i, data[i * CHUNK : (i + 1) * CHUNK])
    return HostTemplate(store)


def center_store(
    directory: Path, data: bytes, manifest: Manifest, chunks: list[int]
) -> CenterTemplate:
    store = ChunkStore(directory)
    store.put_manifest(manifest.encode())
    for i in chunks:
        if i not in manifest.zero_chunks:
            store.put(manifest.chunk_digests[i], data[i * CHUNK : (i + 1) * CHUNK])
    return CenterTemplate(store, manifest)


def peer(role: Role = Role.HOST, port: int | None = None) -> LocalPeer:
    return LocalPeer(random.randbytes(16), role, None if port is None else ("127.0.0.1", port))


FAST = DownloadConfig(tick_interval=0.05, no_source_timeout=1.0, discovery_interval=0.1)


@dataclass
class Seeder:
    download: TemplateDownload
    address: PeerAddress


@asynccontextmanager
async def seeding(
    nursery: trio.Nursery,
    data: TemplateData,
    role: Role = Role.HOST,
    *,
    config: DownloadConfig = FAST,
    corrupt: bool = False,
    upload_limit: RateLimiter | None = None,
) -> AsyncIterator[Seeder]:
    """A TemplateDownload that only serves, behind a loopback listener."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    local = peer(role, port)
    source: TemplateData = CorruptingSource(data) if corrupt else data
    download = TemplateDownload(
        source,
        local,
        upload_slots=trio.Semaphore(4),
        upload_limit=upload_limit,
        want=(),
        want_all=False,
        config=config,
    )
    await nursery.start(download.run)

    async def handle(stream: trio.SocketStream) -> None:
        conn = Connection(role)
        their = await read_handshake(stream, conn)
        await download.accept(stream, conn, their)

    await nursery.start(trio.serve_listeners, handle, listeners)
    yield Seeder(download, PeerAddress("127.0.0.1", port, local.peer_id, role))


class Wrapped:
    """A TemplateData that forwards everything to another one; subclasses override reads."""

    def __init__(self, inner: TemplateData) -> None:
        self._inner = inner

    @property
    def manifest(self) -> Manifest:
        return self._inner.manifest

    @property
    def path(self) -> Path | None:
        return self._inner.path

    def has(self, index: int) -> bool:
        return self._inner.has(index)

    def have(self) -> Bitfield:
        return self._inner.have()

    def read_chunk(self, index: int) -> memoryview:
        return self._inner.read_chunk(index)

    def write_chunk(self, index: int, data: bytes | bytearray | memoryview) -> list[int]:
        return self._inner.write_chunk(index, data)

    def verify_image(self) -> bool:
        return self._inner.verify_image()

    def close(self) -> None:
        self._inner.close()


async def until(condition: Callable[[], bool]) -> None:
    while True:
        if condition():
            return
        await trio.sleep(0.02)


class CorruptingSource(Wrapped):
    """Serves every chunk with one byte flipped (a liar that speaks the real protocol)."""

    def read_chunk(self, index: int) -> memoryview:
        view = self._inner.read_chunk(index)
        buf = bytearray(view)
        buf[0] ^= 0xFF
        return memoryview(buf)


def finder(addresses: list[PeerAddress]) -> PeerFinder:
    async def find(template_id: bytes, bits: Bitfield) -> list[PeerAddress]:
        return list(addresses)

    return find


async def start_download(
    nursery: trio.Nursery,
    target: TemplateData,
    sources: list[PeerAddress],
    *,
    config: DownloadConfig = FAST,
    slots: int = 4,
    events: TransferEvents | None = None,
) -> TemplateDownload:
    """A host's TemplateDownload of `target` from `sources`, running in `nursery`."""
    download = TemplateDownload(
        target,
        peer(),
        upload_slots=trio.Semaphore(slots),
        find_peers=finder(sources),
        config=config,
        events=events,
    )
    await nursery.start(download.run)
    return download


async def fetch(
    nursery: trio.Nursery,
    target: TemplateData,
    sources: list[PeerAddress],
    *,
    config: DownloadConfig = FAST,
) -> TemplateDownload:
    download = await start_download(nursery, target, sources, config=config)
    with trio.fail_after(20):
        await download.wait_done()
    return download


PATTERN = "DD0DDDD00DDDDDDD0DDD"


async def test_download_from_two_seeders_is_byte_identical(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN)
    n = manifest.chunk_count
    async with trio.open_nursery() as nursery:
        one = host_store(tmp_path / "a", data, manifest, range(n))
        two = host_store(tmp_path / "b", data, manifest, range(n))
        async with seeding(nursery, one) as a, seeding(nursery, two) as b:
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
            download = await fetch(nursery, target, [a.address, b.address])
            assert download.complete
            assert target.path is not None
            assert target.path.read_bytes() == data
            progress = download.progress()
            real = sum(1 for c in PATTERN if c == "D") * CHUNK
            assert progress.bytes_from_peers == real
            assert progress.bytes_from_centers == 0
            assert progress.done_bytes == progress.total_bytes == real
            served = a.download.status()["bytes_up"] + b.download.status()["bytes_up"]
            assert served >= real
            nursery.cancel_scope.cancel()


async def test_centers_serve_only_their_subset_and_are_counted(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=1)
    n = manifest.chunk_count
    evens = [i for i in range(n) if i % 2 == 0]
    odds = [i for i in range(n) if i % 2 == 1]
    async with trio.open_nursery() as nursery:
        c1 = center_store(tmp_path / "c1", data, manifest, evens)
        c2 = center_store(tmp_path / "c2", data, manifest, odds)
        assert set(c1.have()) == set(evens) | manifest.zero_chunks
        async with (
            seeding(nursery, c1, Role.STORAGE) as s1,
            seeding(nursery, c2, Role.STORAGE) as s2,
        ):
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
            download = await fetch(nursery, target, [s1.address, s2.address])
            assert target.path is not None and target.path.read_bytes() == data
            progress = download.progress()
            assert progress.bytes_from_peers == 0
            assert progress.bytes_from_centers == progress.total_bytes
            assert progress.sources == 2
            up1 = s1.download.status()["bytes_up"]
            up2 = s2.download.status()["bytes_up"]
            even_bytes = sum(CHUNK for i in evens if i not in manifest.zero_chunks)
            odd_bytes = sum(CHUNK for i in odds if i not in manifest.zero_chunks)
            # Each center sent its own chunks (plus small control frames), never the other's.
            assert even_bytes <= up1 < even_bytes + odd_bytes
            assert odd_bytes <= up2 < even_bytes + odd_bytes
            nursery.cancel_scope.cancel()


async def test_corrupt_peer_is_banned_and_chunks_come_from_elsewhere(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=2)
    n = manifest.chunk_count
    async with trio.open_nursery() as nursery:
        liar = host_store(tmp_path / "liar", data, manifest, range(n))
        good = host_store(tmp_path / "good", data, manifest, range(n))
        async with seeding(nursery, liar, corrupt=True) as bad, seeding(nursery, good) as ok:
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
            # One request at a time per peer: the liar is asked too, whichever link comes up first.
            one_each = replace(FAST, pipeline_bytes=CHUNK)
            download = await fetch(nursery, target, [bad.address, ok.address], config=one_each)
            assert target.path is not None and target.path.read_bytes() == data
            status = download.status()
            liar_id = bad.address.peer_id
            assert liar_id is not None
            assert [b["peer_id"] for b in status["banned"]] == [liar_id.hex()]
            assert status["corrupt_chunks"] >= 1
            assert all(p["peer_id"] != liar_id.hex() for p in status["peers"])
            nursery.cancel_scope.cancel()


async def test_resume_fetches_only_the_missing_half(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=3)
    n = manifest.chunk_count
    first_half = list(range(n // 2))
    async with trio.open_nursery() as nursery:
        seed = host_store(tmp_path / "seed", data, manifest, range(n))
        async with seeding(nursery, seed) as s:
            host_store(tmp_path / "leech", data, manifest, first_half).close()
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))  # reopened
            download = await fetch(nursery, target, [s.address])
            assert target.path is not None and target.path.read_bytes() == data
            expected = sum(CHUNK for i in range(n // 2, n) if i not in manifest.zero_chunks)
            assert download.progress().bytes_from_peers == expected
            assert download.wasted_bytes == 0
            nursery.cancel_scope.cancel()


async def test_silent_peer_times_out_and_request_goes_elsewhere(tmp_path: Path) -> None:
    data, manifest = make_image("DDDD", seed=4)
    n = manifest.chunk_count
    config = DownloadConfig(
        tick_interval=0.05,
        no_source_timeout=5.0,
        discovery_interval=0.1,
        picker=PickerConfig(timeout_base=0.3, min_rate_bytes_per_s=1e12),
    )
    async with trio.open_nursery() as nursery:
        good = host_store(tmp_path / "good", data, manifest, range(n))
        mute = host_store(tmp_path / "mute", data, manifest, range(n))
        gate = trio.Event()
        stalling = StallingSource(mute, gate)
        async with seeding(nursery, good) as ok, seeding(nursery, stalling) as st:
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
            download = await start_download(nursery, target, [st.address], config=config, slots=2)
            with trio.fail_after(10):
                await until(lambda: download.timeouts > 0)
                await download.add_sources([ok.address])
                await download.wait_done()
            assert target.path is not None and target.path.read_bytes() == data
            assert download.status()["bytes_from_peers"] == 4 * CHUNK
            gate.set()
            nursery.cancel_scope.cancel()


class StallingSource(Wrapped):
    """Holds every read until `gate` is set: a peer that accepts requests and never answers."""

    def __init__(self, inner: TemplateData, gate: trio.Event) -> None:
        super().__init__(inner)
        self._gate = gate

    def read_chunk(self, index: int) -> memoryview:
        trio.from_thread.run(self._gate.wait)
        return self._inner.read_chunk(index)


async def test_no_source_fails_the_wait_with_the_chunk_index(tmp_path: Path) -> None:
    data, manifest = make_image("DDDD", seed=5)
    async with trio.open_nursery() as nursery:
        partial = center_store(tmp_path / "c", data, manifest, [0, 1, 3])
        async with seeding(nursery, partial, Role.STORAGE) as s:
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
            download = await start_download(nursery, target, [s.address], slots=2)
            with (
                trio.fail_after(10),
                pytest.raises(DownloadFailed, match="no source holds chunk 2"),
            ):
                await download.wait_done()
            assert list(target.have().missing()) == [2]
            nursery.cancel_scope.cancel()


async def test_center_replicates_a_subset_from_a_seeder(tmp_path: Path) -> None:
    data, manifest = make_image(PATTERN, seed=6)
    n = manifest.chunk_count
    wanted = [i for i in range(n) if i % 3 == 0]
    async with trio.open_nursery() as nursery:
        seed = host_store(tmp_path / "seed", data, manifest, range(n))
        async with seeding(nursery, seed) as s:
            center = center_store(tmp_path / "center", data, manifest, [])
            download = TemplateDownload(
                center,
                peer(Role.STORAGE),
                upload_slots=trio.Semaphore(2),
                want=(),
                want_all=False,
                config=FAST,
            )
            await nursery.start(download.run)
            await download.want(wanted)
            await download.add_sources([s.address])
            with trio.fail_after(10):
                await download.wait_done()
            present = set(center.have()) - manifest.zero_chunks
            assert present == {i for i in wanted if i not in manifest.zero_chunks}
            nursery.cancel_scope.cancel()
