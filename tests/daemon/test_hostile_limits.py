"""Hostile peers against a real daemon over loopback: each defence, and a test that needs it.

Hostile clients dial from 127.0.0.2 and up (Linux routes all of 127/8 to loopback), so bans by
address hit them and never the honest peers, which dial from 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from vmswarm.daemon.bans import BanList, offence_of
from vmswarm.daemon.download import PeerAddress, TemplateDownload
from vmswarm.daemon.limits import AddressLimits
from vmswarm.daemon.node import Node, NodeConfig
from vmswarm.daemon.peer_link import (
    MAX_JUNK_PER_PERIOD,
    HandshakeError,
    LinkDown,
    LinkOptions,
    LinkRefused,
    LinkUp,
    LocalPeer,
    PeerLink,
    connect,
)
from vmswarm.daemon.serving import ChunkServer
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.connection import Connection
from vmswarm.swarm.errors import RemoteProtocolError
from vmswarm.swarm.framing import CHUNK_OVERHEAD, PEER_CODEC, FrameReader
from vmswarm.swarm.manifest import Manifest
from vmswarm.swarm.messages import (
    CHUNK_TYPE,
    PROTOCOL_VERSION,
    Chunk,
    Handshake,
    Have,
    KeepAlive,
    Reject,
    Request,
    Role,
)

from .test_download import FAST, center_store, fetch, host_store, make_image, until
from .test_peer_link import CHUNK, MemoryTemplate, image, link_pair

# 12 chunks, one of them all zeros (never served).
PATTERN = "DDDDD0DDDDDD"
SAFETY = 20.0  # seconds a test may wait for what must happen; never asserted as a duration


@dataclass
class Center:
    node: Node
    address: tuple[str, int]
    data: bytes
    manifest: Manifest

    def sample(self, name: str, **labels: str) -> float:
        value = self.node.metrics_registry.get_sample_value(name, labels)
        assert value is not None, f"no sample {name}{labels}"
        return value

    def banned(self, reason: str) -> float:
        return self.sample("vmswarm_peers_banned_total", role="host", reason=reason)

    def dropped(self, reason: str) -> float:
        return self.sample("vmswarm_connections_dropped_total", reason=reason)


@asynccontextmanager
async def center(tmp_path: Path, **overrides: object) -> AsyncIterator[Center]:
    """A storage-center daemon holding every chunk of one template, without a tracker."""
    data, manifest = make_image(PATTERN, seed=5)
    directory = tmp_path / "center"
    (directory / "chunks").mkdir(parents=True)
    center_store(directory / "chunks", data, manifest, list(range(manifest.chunk_count)))
    config = NodeConfig(
        role=Role.STORAGE,
        data_dir=directory,
        control_path=tmp_path / "center.sock",
        download=FAST,
        allow_unsigned=True,
    )
    node = Node(replace(config, **overrides))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        address = await nursery.start(node.run)
        yield Center(node, address, data, manifest)
        nursery.cancel_scope.cancel()


async def dial_from(source: str, address: tuple[str, int]) -> trio.SocketStream:
    """A TCP connection from a chosen loopback address."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(address)
    return trio.SocketStream(sock)


async def until_closed(stream: trio.abc.Stream, within: float = SAFETY) -> bytes:
    """Everything the daemon sends until it closes the connection (reset counts as closed).

    `within` only bounds the wait: a daemon that never hangs up fails the test.
    """
    got = b""
    with trio.fail_after(within):
        while True:
            try:
                data = await stream.receive_some(1 << 16)
            except trio.BrokenResourceError:
                return got
            if not data:
                return got
            got += data


async def eventually(condition: Callable[[], bool]) -> None:
    with trio.fail_after(SAFETY):
        await until(condition)


def handshake_bytes(manifest: Manifest, peer_id: bytes) -> bytes:
    hello = Handshake(PROTOCOL_VERSION, manifest.template_id, peer_id, None, Role.HOST)
    return Connection(Role.HOST).send(hello, now=0.0)


async def link_from(source: str, c: Center, peer_id: bytes | None = None) -> PeerLink:
    """A handshaken link to the center, dialed from `source` (LinkRefused if it says no)."""
    stream = await dial_from(source, c.address)
    me = LocalPeer(peer_id or os.urandom(16), Role.HOST, None)
    with trio.fail_after(SAFETY):
        return await connect(
            stream,
            me,
            c.manifest.template_id,
            Bitfield(c.manifest.chunk_count),
            max_chunk_size=c.manifest.chunk_size,
        )


async def honest_fetch(tmp_path: Path, c: Center, nursery: trio.Nursery) -> None:
    """A host fetches the whole template from the center (from 127.0.0.1) and gets it right."""
    target = host_store(tmp_path / "honest", c.data, c.manifest, [])
    listen = PeerAddress(*c.address, c.node.peer_id, Role.STORAGE)
    download = await fetch(nursery, target, [listen])
    assert download.complete
    assert target.store.path.read_bytes() == c.data


# -- maximum frame size ------------------------------------------------------------------------


def test_a_huge_length_prefix_is_refused_before_any_allocation() -> None:
    allocations: list[int] = []

    def allocate(size: int) -> bytearray:
        allocations.append(size)
        return bytearray(size)

    for code in (CHUNK_TYPE, 0x03):
        reader = FrameReader(PEER_CODEC, max_chunk_size=1 << 20, allocate=allocate)
        reader.feed((0xFFFFFFF0).to_bytes(4, "big") + bytes([code]))
        with pytest.raises(RemoteProtocolError, match="frame length"):
            reader.next_message()
        assert allocations == [] and reader.allocated < 64
    # A chunk just over the ceiling is refused as well, still before its buffer is taken.
    reader = FrameReader(PEER_CODEC, max_chunk_size=1 << 16, allocate=allocate)
    reader.feed((CHUNK_OVERHEAD + (1 << 16) + 1).to_bytes(4, "big") + bytes([CHUNK_TYPE]))
    with pytest.raises(RemoteProtocolError):
        reader.next_message()
    assert allocations == []
    assert offence_of("frame length 4294967280 outside 1..1048581") == "oversized_frame"


async def test_an_oversized_frame_before_the_handshake_is_cut_counted_and_banned(
    tmp_path: Path,
) -> None:
    async with center(tmp_path) as c, trio.open_nursery() as nursery:
        hostile = await dial_from("127.0.0.2", c.address)
        # Claims a 4 GiB handshake: cut at once, nothing waits for (or buffers) the body.
        await hostile.send_all((0xFFFFFFF0).to_bytes(4, "big") + b"\x00")
        assert await until_closed(hostile) == b""
        ban = c.node.bans.banned(trio.current_time(), host="127.0.0.2")
        assert ban is not None and ban.reason == "oversized_frame"
        assert c.banned("oversized_frame") == 1
        # Banned for a while: the next connection from there is dropped unheard.
        again = await dial_from("127.0.0.2", c.address)
        await again.send_all(handshake_bytes(c.manifest, os.urandom(16)))
        assert await until_closed(again) == b""
        assert c.dropped("banned") == 1
        # Everyone else is still served.
        await honest_fetch(tmp_path, c, nursery)
        nursery.cancel_scope.cancel()


async def test_an_oversized_frame_on_a_link_bans_the_peer_id_and_its_address(
    tmp_path: Path,
) -> None:
    async with center(tmp_path) as c, trio.open_nursery() as nursery:
        peer_id = os.urandom(16)
        link = await link_from("127.0.0.3", c, peer_id)
        await link.stream.send_all((0xFFFFFFF0).to_bytes(4, "big") + bytes([CHUNK_TYPE]))
        said = await until_closed(link.stream)
        assert b"frame length" in said  # the Goodbye names the reason
        ban = c.node.bans.banned(trio.current_time(), peer_id=peer_id)
        assert ban is not None and ban.reason == "oversized_frame" and ban.host == "127.0.0.3"
        assert c.banned("oversized_frame") == 1
        # The same peer id from another address is refused by id.
        with pytest.raises(LinkRefused, match="banned"):
            await link_from("127.0.0.4", c, peer_id)
        await honest_fetch(tmp_path, c, nursery)
        nursery.cancel_scope.cancel()


# -- garbage and out-of-state messages ----------------------------------------------------------


async def test_garbage_instead_of_a_handshake_bans_the_address(tmp_path: Path) -> None:
    async with center(tmp_path) as c:
        hostile = await dial_from("127.0.0.2", c.address)
        await hostile.send_all(b"\x00\x00\x00\x05\x7fjunk")  # an unknown message type
        await until_closed(hostile)
        ban = c.node.bans.banned(trio.current_time(), host="127.0.0.2")
        assert ban is not None and ban.reason == "bad_handshake"
        assert c.banned("bad_handshake") == 1
        # The address is banned: the daemon hangs up on its next handshake unheard.
        with pytest.raises(HandshakeError):
            await link_from("127.0.0.2", c)


async def test_an_out_of_state_message_ends_the_link_and_bans_the_peer(tmp_path: Path) -> None:
    async with center(tmp_path) as c, trio.open_nursery() as nursery:
        peer_id = os.urandom(16)
        link = await link_from("127.0.0.2", c, peer_id)
        # A second Handshake on a live link is a message the state machine never allows.
        await link.stream.send_all(handshake_bytes(c.manifest, peer_id))
        said = await until_closed(link.stream)
        assert b"Handshake" in said
        ban = c.node.bans.banned(trio.current_time(), peer_id=peer_id)
        assert ban is not None and ban.reason == "protocol_error"
        assert c.banned("protocol_error") == 1
        await honest_fetch(tmp_path, c, nursery)
        nursery.cancel_scope.cancel()


async def test_a_second_handshake_instead_of_a_bitfield_bans_the_peer(tmp_path: Path) -> None:
    async with center(tmp_path) as c:
        peer_id = os.urandom(16)
        hostile = await dial_from("127.0.0.2", c.address)
        await hostile.send_all(handshake_bytes(c.manifest, peer_id) * 2)
        await until_closed(hostile)
        await eventually(
            lambda: c.node.bans.banned(trio.current_time(), peer_id=peer_id) is not None
        )
        ban = c.node.bans.banned(trio.current_time(), host="127.0.0.2")
        assert ban is not None and ban.reason == "bad_handshake"
        assert c.banned("bad_handshake") == 1


# -- outstanding requests per peer --------------------------------------------------------------


async def _flood(link: PeerLink, indices: list[int]) -> tuple[list[object], str | None]:
    """Post Requests for `indices` in one write; the events until each got an answer or the end."""
    send, receive = trio.open_memory_channel[tuple[PeerLink, object]](64)
    events: list[object] = []
    down: str | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run, send)
        with trio.fail_after(SAFETY):
            first = await receive.receive()
            assert isinstance(first[1], LinkUp)
            for index in indices:
                link.post(Request(index))  # the writer sends all queued messages at once
            answered = 0
            while answered < len(indices):
                _, event = await receive.receive()
                if isinstance(event, LinkDown):
                    down = event.reason
                    break
                events.append(event)
                answered += isinstance(event, Chunk | Reject)
        nursery.cancel_scope.cancel()
    return events, down


async def test_a_request_flood_gets_rejects_and_a_worse_one_a_ban(tmp_path: Path) -> None:
    queue = 4
    config = replace(FAST, max_queued_requests=queue)
    async with center(tmp_path, download=config) as c:
        real = [i for i in range(c.manifest.chunk_count) if i not in c.manifest.zero_chunks]
        # Two over the queue: rejected, and the link carries on serving the rest.
        mild = await link_from("127.0.0.2", c)
        events, down = await _flood(mild, real[: queue + 2])
        assert down is None
        rejects = [e for e in events if isinstance(e, Reject)]
        chunks = [e for e in events if isinstance(e, Chunk)]
        assert len(rejects) == 2 and all("too many queued" in r.reason for r in rejects)
        assert len(chunks) == queue
        assert c.node.bans.banned(trio.current_time(), host="127.0.0.2") is None
        # Twice the queue and more: a flood, so the peer is cut off and banned.
        worse = await link_from("127.0.0.3", c)
        _, down = await _flood(worse, real)
        assert down is not None and "flood" in down
        ban = c.node.bans.banned(trio.current_time(), peer_id=worse.our.peer_id)
        assert ban is not None and ban.reason == "request_flood"
        assert c.banned("request_flood") == 1


async def test_a_flood_of_empty_messages_ends_the_link_and_bans_the_peer(tmp_path: Path) -> None:
    async with center(tmp_path) as c, trio.open_nursery() as nursery:
        link = await link_from("127.0.0.2", c)
        keepalive = link.conn.send(KeepAlive(), now=trio.current_time())
        have = link.conn.send(Have(0), now=trio.current_time())
        # Within one keep-alive period: a few are normal, thousands are a flood.
        with contextlib.suppress(trio.BrokenResourceError):
            await link.stream.send_all(keepalive * 3 + have * 2)
            await link.stream.send_all((keepalive + have) * (MAX_JUNK_PER_PERIOD // 2 + 10))
        await until_closed(link.stream)
        ban = c.node.bans.banned(trio.current_time(), peer_id=link.our.peer_id)
        assert ban is not None and ban.reason == "message_flood"
        assert c.banned("message_flood") == 1
        await honest_fetch(tmp_path, c, nursery)
        nursery.cancel_scope.cancel()


# -- handshake timeout ----------------------------------------------------------------------------


async def test_silent_and_half_handshakes_are_cut_after_the_handshake_timeout(
    tmp_path: Path,
) -> None:
    async with center(tmp_path, handshake_timeout=0.3) as c:
        silent = await dial_from("127.0.0.2", c.address)
        # Bounded below the 10 s default, so the configured 0.3 s is what must act.
        assert await until_closed(silent, within=5.0) == b""
        half = await dial_from("127.0.0.2", c.address)
        await half.send_all(handshake_bytes(c.manifest, os.urandom(16))[:12])
        assert await until_closed(half, within=5.0) == b""
        assert c.dropped("handshake_timeout") == 2
        # A Handshake but never the Bitfield: cut as well, once ours has gone out.
        no_bitfield = await dial_from("127.0.0.2", c.address)
        await no_bitfield.send_all(handshake_bytes(c.manifest, os.urandom(16)))
        await until_closed(no_bitfield, within=5.0)
        # Slow is not hostile: no ban, the next complete handshake from there is taken.
        assert c.node.bans.banned(trio.current_time(), host="127.0.0.2") is None
        link = await link_from("127.0.0.2", c)
        assert link.their.peer_id == c.node.peer_id
        await link.stream.aclose()


# -- idle timeout -------------------------------------------------------------------------------


async def test_a_link_that_goes_silent_is_closed_after_the_idle_timeout(tmp_path: Path) -> None:
    async with center(tmp_path, idle_timeout=0.3) as c:
        link = await link_from("127.0.0.2", c)  # handshakes, then never says a word
        said = await until_closed(link.stream, within=5.0)
        assert b"idle" in said
        await eventually(lambda: c.dropped("idle_timeout") == 1)
        assert c.node.bans.banned(trio.current_time(), host="127.0.0.2") is None


# -- connection caps -----------------------------------------------------------------------------


async def test_connections_per_address_are_capped(tmp_path: Path) -> None:
    async with center(tmp_path, max_connections_per_address=2, handshake_timeout=30.0) as c:
        held = [await dial_from("127.0.0.2", c.address) for _ in range(2)]
        await eventually(lambda: c.node.address_limits.count("127.0.0.2") == 2)
        third = await dial_from("127.0.0.2", c.address)
        assert await until_closed(third) == b""
        assert c.dropped("per_address_limit") == 1
        # Other addresses are not affected.
        other = await link_from("127.0.0.1", c)
        await other.stream.aclose()
        # Once one closes, that address may connect again.
        await held[0].aclose()
        await eventually(lambda: c.node.address_limits.count("127.0.0.2") == 1)
        again = await link_from("127.0.0.2", c)
        await again.stream.aclose()
        await held[1].aclose()


async def test_connections_in_total_are_capped(tmp_path: Path) -> None:
    async with center(tmp_path, max_peers=2, handshake_timeout=30.0) as c:
        held = [await dial_from(f"127.0.0.{n}", c.address) for n in (2, 3)]
        await eventually(lambda: c.node.address_limits.count("127.0.0.3") == 1)
        extra = await dial_from("127.0.0.4", c.address)
        assert await until_closed(extra) == b""
        assert c.dropped("total_limit") == 1
        for stream in held:
            await stream.aclose()


async def test_dials_respect_the_per_address_cap(tmp_path: Path) -> None:
    async with center(tmp_path) as c, trio.open_nursery() as nursery:
        limits = AddressLimits(1)
        assert limits.try_acquire("127.0.0.1")  # the one allowed connection is taken
        target = host_store(tmp_path / "host", c.data, c.manifest, [])
        download = TemplateDownload(
            target,
            LocalPeer(os.urandom(16), Role.HOST, None),
            upload_slots=trio.Semaphore(2),
            config=FAST,
            address_limits=limits,
        )
        await nursery.start(download.run)
        source = PeerAddress(*c.address, c.node.peer_id, Role.STORAGE)
        await download.add_sources([source])
        await trio.testing.wait_all_tasks_blocked()
        assert download.status()["peers"] == [] and limits.count("127.0.0.1") == 1
        limits.release("127.0.0.1")
        await download.add_sources([source])
        with trio.fail_after(SAFETY):
            await download.wait_done()
        assert target.store.path.read_bytes() == c.data
        nursery.cancel_scope.cancel()


# -- bans are for a while ---------------------------------------------------------------------


def test_bans_expire_and_are_keyed_by_id_and_address() -> None:
    told: list[tuple[str, str]] = []
    bans = BanList(60.0, on_ban=lambda reason, role: told.append((reason, role)))
    bans.ban("protocol_error", 100.0, peer_id=b"p" * 16, host="10.0.0.9", role="host")
    assert bans.banned(100.0, peer_id=b"p" * 16) is not None
    assert bans.banned(159.0, host="10.0.0.9") is not None
    assert bans.banned(159.0, peer_id=b"q" * 16, host="10.0.0.8") is None
    assert bans.banned(160.0, peer_id=b"p" * 16, host="10.0.0.9") is None
    assert told == [("protocol_error", "host")]
    with pytest.raises(ValueError):
        bans.ban("because", 0.0, host="x")
    small = BanList(60.0, max_entries=3)
    for n in range(10):
        small.ban("request_flood", 0.0, host=f"10.0.0.{n}")
    assert len(small.entries(0.0)) == 3  # a flood of addresses cannot grow it without bound


async def test_a_ban_ends_after_ban_seconds(tmp_path: Path) -> None:
    async with center(tmp_path, ban_seconds=0.5) as c:
        hostile = await dial_from("127.0.0.2", c.address)
        await hostile.send_all(b"\x00\x00\x00\x05\x7fjunk")
        await until_closed(hostile)
        assert c.node.bans.banned(trio.current_time(), host="127.0.0.2") is not None
        await eventually(lambda: c.node.bans.banned(trio.current_time(), host="127.0.0.2") is None)
        link = await link_from("127.0.0.2", c)
        await link.stream.aclose()


# -- per-peer rate limits -------------------------------------------------------------------------


async def _trio_seconds_to_fetch_eight_chunks(options: LinkOptions) -> float:
    """Trio seconds one link takes to bring 8 chunks from a ChunkServer, both ends on `options`."""
    data, manifest = image("DDDDDDDD")
    served = MemoryTemplate(data, manifest, set(range(8)))
    left, right = await link_pair(manifest, Bitfield(8), served.have(), options=options)
    send, receive = trio.open_memory_channel[tuple[PeerLink, object]](64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(left.run, send)
        nursery.start_soon(right.run, None, ChunkServer(right, served, trio.Semaphore(8)))
        await receive.receive()  # LinkUp
        began = trio.current_time()
        for index in range(8):
            left.post(Request(index))
        got = 0
        while got < 8:
            _, event = await receive.receive()
            got += isinstance(event, Chunk)
        took = trio.current_time() - began
        nursery.cancel_scope.cancel()
    return took


async def _inline(function: Callable[..., Any], *args: Any, **_: Any) -> Any:
    await trio.lowlevel.checkpoint()
    return function(*args)


async def test_per_peer_upload_and_download_limits_pace_a_link(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunk reads in worker threads would let the mock clock jump while they run.
    monkeypatch.setattr(trio.to_thread, "run_sync", _inline)
    rate = 4 * CHUNK  # bytes per second: 8 chunks need 2 s
    unlimited = await _trio_seconds_to_fetch_eight_chunks(LinkOptions())
    uploads = await _trio_seconds_to_fetch_eight_chunks(LinkOptions(upload_limit=rate))
    downloads = await _trio_seconds_to_fetch_eight_chunks(LinkOptions(download_limit=rate))
    assert unlimited < 1.0
    assert uploads >= 1.9
    assert downloads >= 1.9


def test_the_daemon_puts_its_per_peer_limits_and_timeouts_on_every_link(tmp_path: Path) -> None:
    config = NodeConfig(
        role=Role.HOST,
        data_dir=tmp_path,
        peer_upload_limit=1e6,
        peer_download_limit=2e6,
        handshake_timeout=3.0,
        idle_timeout=7.0,
    )
    options = Node(config).link_options
    assert (options.upload_limit, options.download_limit) == (1e6, 2e6)
    assert (options.handshake_timeout, options.idle_timeout) == (3.0, 7.0)
    # Unset, a test's own link options stay as they were.
    own = replace(FAST, link=LinkOptions(idle_timeout=1.5))
    node = Node(NodeConfig(role=Role.HOST, data_dir=tmp_path, download=own))
    assert node.download_config is own
