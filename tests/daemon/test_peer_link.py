"""PeerLink and ChunkServer over in-memory stream pairs (MockClock where time matters)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio
import trio.testing
from vmswarm.daemon.peer_link import (
    BufferPool,
    LinkDown,
    LinkOptions,
    LinkRefused,
    LinkUp,
    LocalPeer,
    PeerLink,
    accept,
    connect,
    read_handshake,
    refuse,
)
from vmswarm.daemon.serving import ChunkServer
from vmswarm.daemon.storeerrors import ChunkAbsent, ChunkMismatch
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.connection import Connection
from vmswarm.swarm.framing import MIN_CHUNK_PART
from vmswarm.swarm.manifest import Manifest, build_manifest
from vmswarm.swarm.messages import Cancel, Chunk, Have, Reject, Request, Role

CHUNK = 1 << 16


class MemoryTemplate:
    """A TemplateData held in memory: which chunks are present is a set."""

    def __init__(self, data: bytes, manifest: Manifest, present: set[int]) -> None:
        self.data = data
        self.manifest = manifest
        self.present = set(present) | set(manifest.zero_chunks)
        self.reads = 0

    @property
    def path(self) -> Path | None:
        return None

    def has(self, index: int) -> bool:
        return index in self.present

    def have(self) -> Bitfield:
        return Bitfield.from_indices(self.manifest.chunk_count, self.present)

    def read_chunk(self, index: int) -> memoryview:
        if index not in self.present:
            raise ChunkAbsent(f"chunk {index} absent")
        self.reads += 1
        offset, length = self.manifest.chunk_range(index)
        return memoryview(bytearray(self.data[offset : offset + length]))

    def write_chunk(self, index: int, data: bytes | bytearray | memoryview) -> list[int]:
        if not self.manifest.chunk_matches(index, data):
            raise ChunkMismatch(f"chunk {index} does not match")
        if index in self.present:
            return []
        self.present.add(index)
        return [index]

    def verify_image(self) -> bool:
        return len(self.present) == self.manifest.chunk_count

    def close(self) -> None:
        return None


def image(pattern: str) -> tuple[bytes, Manifest]:
    rng = random.Random(pattern)
    data = b"".join(bytes(CHUNK) if c == "0" else rng.randbytes(CHUNK) for c in pattern)
    return data, build_manifest(data, "mem", "1", chunk_size=CHUNK)


def me(role: Role = Role.HOST) -> LocalPeer:
    return LocalPeer(os.urandom(16), role, ("127.0.0.1", 7000))


async def link_pair(
    manifest: Manifest,
    left_have: Bitfield,
    right_have: Bitfield,
    *,
    options: LinkOptions | None = None,
    sockets: bool = False,
) -> tuple[PeerLink, PeerLink]:
    """Two linked ends: `left` dialed, `right` accepted (over a real socket pair if asked)."""
    left_stream: trio.abc.Stream
    right_stream: trio.abc.Stream
    if sockets:
        a, b = trio.socket.socketpair()
        left_stream, right_stream = trio.SocketStream(a), trio.SocketStream(b)
    else:
        left_stream, right_stream = trio.testing.memory_stream_pair()
    left_peer, right_peer = me(), me(Role.STORAGE)
    out: list[PeerLink] = []

    async def answer() -> None:
        conn = Connection(Role.STORAGE)
        their = await read_handshake(right_stream, conn)
        out.append(await accept(right_stream, conn, their, right_peer, right_have, options=options))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        left = await connect(
            left_stream,
            left_peer,
            manifest.template_id,
            left_have,
            max_chunk_size=manifest.chunk_size,
            options=options,
        )
    return left, out[0]


async def test_handshake_exchanges_ids_roles_and_bitfields() -> None:
    _, manifest = image("DD0D")
    left, right = await link_pair(
        manifest, Bitfield.from_string("0010"), Bitfield.from_string("1110")
    )
    assert left.peer_id == right.our.peer_id and right.peer_id == left.our.peer_id
    assert left.role is Role.STORAGE and right.role is Role.HOST
    assert list(left.their_bitfield) == [0, 1, 2]
    assert list(right.their_bitfield) == [2]
    assert left.outbound and not right.outbound
    assert left.template_id == right.template_id == manifest.template_id


async def test_refused_handshake_raises_with_the_reason() -> None:
    left_stream, right_stream = trio.testing.memory_stream_pair()

    async def answer() -> None:
        conn = Connection(Role.STORAGE)
        await read_handshake(right_stream, conn)
        await refuse(right_stream, conn, "unknown template abc")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        with pytest.raises(LinkRefused, match="unknown template abc"):
            await connect(left_stream, me(), b"\x07" * 32, Bitfield(3))


async def test_requested_chunks_arrive_and_missing_or_zero_ones_are_rejected() -> None:
    data, manifest = image("DD0D")
    server_data = MemoryTemplate(data, manifest, {0, 1})
    left, right = await link_pair(manifest, Bitfield(4), server_data.have())
    send, receive = trio.open_memory_channel[tuple[PeerLink, object]](16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(left.run, send)
        server = ChunkServer(right, server_data, trio.Semaphore(2))
        nursery.start_soon(right.run, None, server)
        first = await receive.receive()
        assert isinstance(first[1], LinkUp)
        for index in (1, 2, 3, 0):
            left.post(Request(index))
        got: dict[int, bytes] = {}
        rejects: dict[int, str] = {}
        while len(got) + len(rejects) < 4:
            _, event = await receive.receive()
            if isinstance(event, Chunk):
                got[event.index] = bytes(event.data)
            elif isinstance(event, Reject):
                rejects[event.index] = event.reason
        assert got == {0: data[:CHUNK], 1: data[CHUNK : 2 * CHUNK]}
        assert "zeros" in rejects[2]
        assert "not here" in rejects[3]
        assert left.bytes_in >= 2 * CHUNK and right.bytes_out >= 2 * CHUNK
        # A Have is delivered to the owner and recorded in the peer's bitfield.
        right.post(Have(3))
        _, event = await receive.receive()
        assert event == Have(3) and 3 in left.their_bitfield
        left.close("done")
        _, event = await receive.receive()
        assert isinstance(event, LinkDown) and event.reason == "done"
        nursery.cancel_scope.cancel()


async def test_cancel_drops_requests_that_have_not_started() -> None:
    data, manifest = image("DDDD")
    server_data = MemoryTemplate(data, manifest, {0, 1, 2, 3})
    left, right = await link_pair(manifest, Bitfield(4), server_data.have())
    slots = trio.Semaphore(1)
    send, receive = trio.open_memory_channel[tuple[PeerLink, object]](16)
    async with trio.open_nursery() as nursery:
        await slots.acquire()  # hold the only upload slot: nothing can start
        nursery.start_soon(left.run, send)
        server = ChunkServer(right, server_data, slots)
        nursery.start_soon(right.run, None, server)
        await receive.receive()  # LinkUp
        for index in range(4):
            left.post(Request(index))
        await trio.testing.wait_all_tasks_blocked()
        left.post(Cancel(1))
        left.post(Cancel(3))
        await trio.testing.wait_all_tasks_blocked()
        slots.release()
        got: list[int] = []
        while len(got) < 2:
            _, event = await receive.receive()
            if isinstance(event, Chunk):
                got.append(event.index)
        await trio.testing.wait_all_tasks_blocked()
        # Chunk 0 was already waiting on the slot when the cancels came; 1 and 3 never start.
        assert sorted(got) == [0, 2]
        assert server_data.reads == 2
        nursery.cancel_scope.cancel()


async def test_silent_peer_is_dropped_after_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _, manifest = image("DD")
    options = LinkOptions(keepalive_interval=10.0, idle_timeout=60.0)
    left, _ = await link_pair(manifest, Bitfield(2), Bitfield(2), options=options)
    send, receive = trio.open_memory_channel[tuple[PeerLink, object]](16)
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        nursery.start_soon(left.run, send)
        # The right end never runs: no keep-alives come back.
        await receive.receive()  # LinkUp
        _, event = await receive.receive()
        assert isinstance(event, LinkDown) and "idle" in event.reason
        assert trio.current_time() - started >= 60.0
        nursery.cancel_scope.cancel()


async def test_keepalives_hold_an_idle_link_open(autojump_clock: trio.testing.MockClock) -> None:
    _, manifest = image("DD")
    options = LinkOptions(keepalive_interval=10.0, idle_timeout=60.0)
    left, right = await link_pair(manifest, Bitfield(2), Bitfield(2), options=options)
    send, receive = trio.open_memory_channel[tuple[PeerLink, object]](16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(left.run, send)
        nursery.start_soon(right.run)
        await receive.receive()  # LinkUp
        with trio.move_on_after(600):
            await receive.receive()
            pytest.fail("the link went down although both ends sent keep-alives")
        nursery.cancel_scope.cancel()


async def test_garbage_from_the_peer_ends_the_link_with_a_protocol_error() -> None:
    _, manifest = image("DD")
    left, right = await link_pair(manifest, Bitfield(2), Bitfield(2))
    send, receive = trio.open_memory_channel[tuple[PeerLink, object]](16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(left.run, send)
        await receive.receive()  # LinkUp
        await right.stream.send_all(b"\x00\x00\x00\x02\x7f\x00")  # unknown message type
        _, event = await receive.receive()
        assert isinstance(event, LinkDown) and "protocol error" in event.reason
        nursery.cancel_scope.cancel()


def test_buffer_pool_reuses_buffers_and_ignores_strangers_and_repeats() -> None:
    pool = BufferPool(1024, keep=2)
    first = pool.take(1000)
    assert len(first) == 1024 and pool.allocated == 1
    pool.give(memoryview(first)[:1000])  # a view of a pooled buffer returns the buffer
    pool.give(first)  # given twice: kept once
    assert pool.free == 1
    assert pool.take(10) is first and pool.free == 0
    pool.give(bytearray(512))  # the wrong size
    pool.give(b"x" * 1024)  # not a bytearray
    assert pool.free == 0
    big = pool.take(4096)  # larger than the pool's buffers: a fresh one, never kept
    assert len(big) == 4096
    pool.give(big)
    assert pool.free == 0
    for buf in [pool.take(1), pool.take(1), pool.take(1)]:
        pool.give(buf)
    assert pool.free == 2  # never more than `keep`


class ReusableTemplate(MemoryTemplate):
    """A MemoryTemplate that can also read into a caller's buffer (like the real stores)."""

    def read_chunk_into(self, index: int, buf: bytearray) -> memoryview:
        data = self.read_chunk(index)
        view = memoryview(buf)[: len(data)]
        view[:] = data
        return view


BIG = 1 << 20  # far more than one receive: the payload lands in its buffer in many slices


async def test_chunks_travel_through_pooled_buffers_on_both_sides() -> None:
    rng = random.Random(7)
    data = rng.randbytes(4 * BIG)
    manifest = build_manifest(data, "big", "1", chunk_size=BIG)
    server_data = ReusableTemplate(data, manifest, {0, 1, 2, 3})
    left, right = await link_pair(manifest, Bitfield(4), server_data.have(), sockets=True)
    receiving = BufferPool(BIG, keep=4)
    sending = BufferPool(BIG, keep=4)
    handed: list[bytearray] = []

    def take(size: int) -> bytearray:
        handed.append(receiving.take(size))
        return handed[-1]

    left.conn.set_allocator(take)
    send, receive = trio.open_memory_channel[tuple[PeerLink, object]](16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(left.run, send)
        server = ChunkServer(right, server_data, trio.Semaphore(2), buffers=sending)
        nursery.start_soon(right.run, None, server)
        await receive.receive()  # LinkUp
        got: dict[int, bytes] = {}
        for round_ in range(3):
            for index in range(4):
                left.post(Request(index))
            while len(got) < 4 * (round_ + 1):
                _, event = await receive.receive()
                assert isinstance(event, Chunk)
                assert isinstance(event.data, memoryview)
                # Received in place into a pooled buffer, not copied out of the reader.
                assert any(event.data.obj is buf for buf in handed)
                got[4 * round_ + event.index] = bytes(event.data)
                receiving.give(event.data)  # what the writer does once the chunk is stored
        assert all(got[i] == data[(i % 4) * BIG : (i % 4 + 1) * BIG] for i in range(12))
        # Twelve chunks each way, but only a handful of buffers ever allocated.
        assert receiving.allocated <= 2
        assert sending.allocated <= 3
        assert server.served_chunks == 12
        nursery.cancel_scope.cancel()


async def test_a_have_posted_during_a_chunk_upload_overtakes_the_rest_of_the_chunk() -> None:
    rng = random.Random(11)
    data = rng.randbytes(2 * BIG)
    manifest = build_manifest(data, "big", "1", chunk_size=BIG)
    options = LinkOptions(chunk_part_size=MIN_CHUNK_PART)
    left, right = await link_pair(manifest, Bitfield(2), Bitfield(2), options=options, sockets=True)
    send, receive = trio.open_memory_channel[tuple[PeerLink, object]](16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(right.run)
        nursery.start_soon(right.send_chunk, 0, memoryview(data)[:BIG])
        # Nobody reads the left end yet: the upload stalls mid-chunk on full socket buffers.
        await trio.testing.wait_all_tasks_blocked()
        assert right.conn.mid_chunk
        right.post(Have(1))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(left.run, send)
        events = [(await receive.receive())[1] for _ in range(3)]
        assert isinstance(events[0], LinkUp)
        assert events[1] == Have(1)  # it went out between two parts of chunk 0
        assert isinstance(events[2], Chunk) and bytes(events[2].data) == data[:BIG]
        nursery.cancel_scope.cancel()


async def test_closing_mid_chunk_ends_the_link_with_a_goodbye_not_a_protocol_error() -> None:
    data = random.Random(12).randbytes(2 * BIG)
    manifest = build_manifest(data, "big", "1", chunk_size=BIG)
    options = LinkOptions(chunk_part_size=MIN_CHUNK_PART)
    left, right = await link_pair(manifest, Bitfield(2), Bitfield(2), options=options, sockets=True)
    send, receive = trio.open_memory_channel[tuple[PeerLink, object]](16)
    sent: list[bool] = []

    async def upload() -> None:
        sent.append(await right.send_chunk(0, memoryview(data)[:BIG]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(right.run)
        nursery.start_soon(upload)
        await trio.testing.wait_all_tasks_blocked()
        assert right.conn.mid_chunk
        right.close("shutting down")
        nursery.start_soon(left.run, send)
        events = [(await receive.receive())[1] for _ in range(2)]
        assert isinstance(events[0], LinkUp)
        assert isinstance(events[1], LinkDown)
        assert events[1].reason == "peer said goodbye: shutting down"
        assert left.offence is None
    assert sent == [False]


async def test_parts_grow_to_the_whole_chunk_once_the_link_proves_fast() -> None:
    data = random.Random(13).randbytes(2 * BIG)
    manifest = build_manifest(data, "big", "1", chunk_size=BIG)
    options = LinkOptions(chunk_part_size=MIN_CHUNK_PART)
    left, right = await link_pair(manifest, Bitfield(2), Bitfield(2), options=options, sockets=True)
    parts: list[tuple[int, int]] = []
    real = right.conn.send_chunk_part_header

    def counting(index: int, size: int, offset: int, length: int, *, now: float) -> bytes:
        parts.append((index, length))
        return real(index, size, offset, length, now=now)

    right.conn.send_chunk_part_header = counting  # type: ignore[method-assign]
    send, receive = trio.open_memory_channel[tuple[PeerLink, object]](16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(right.run)
        nursery.start_soon(left.run, send)
        assert isinstance((await receive.receive())[1], LinkUp)
        for index in (0, 1):
            assert await right.send_chunk(index, memoryview(data)[index * BIG : (index + 1) * BIG])
            got = (await receive.receive())[1]
            assert (
                isinstance(got, Chunk) and bytes(got.data) == data[index * BIG : (index + 1) * BIG]
            )
        nursery.cancel_scope.cancel()
    # Nothing measured yet: the first chunk in the smallest parts; over a socket pair (GB/s)
    # the second takes far less than a part's time, so it goes in one piece.
    assert [length for index, length in parts if index == 0] == [MIN_CHUNK_PART] * 64
    assert [length for index, length in parts if index == 1] == [BIG]
