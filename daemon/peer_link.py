"""One peer link on a trio stream: handshake, a reader that reports events, one send lock.

The reader task turns bytes into events: Requests and Cancels go straight to the link's
`RequestSink` (the chunk server), everything the template's owner must know goes into its
bounded memory channel as `(link, event)`. Control messages the owner sends are queued with
`post` (never blocks the owner) and written by the link's own writer task; chunk payloads go
through `send_chunk`, header and payload as separate buffers. Time is trio's clock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import trio

from ..swarm.bitfield import Bitfield as ChunkSet
from ..swarm.connection import NEED_DATA, Connection, ConnectionClosed, Sentinel
from ..swarm.errors import LocalProtocolError, RemoteProtocolError
from ..swarm.framing import MAX_CHUNK_SIZE, MIN_CHUNK_PART
from ..swarm.messages import (
    PROTOCOL_VERSION,
    Bitfield,
    Cancel,
    Chunk,
    ControlMessage,
    Goodbye,
    Handshake,
    Have,
    KeepAlive,
    Message,
    Reject,
    Request,
    Role,
)
from .bans import offence_of
from .limits import socket_of
from .ratelimit import RateLimiter, limiter_for

log = logging.getLogger(__name__)

# Small on purpose: chunk payloads are received in place, this buffer only sees what lies between.
RECEIVE_SIZE = 1 << 16
# While a chunk payload arrives, wake only when this much (or the rest of it) is buffered: on a
# slow link each packet would otherwise wake the loop, which costs far more than the copy.
PAYLOAD_LOW_WATER = 256 << 10
# Over a wrapped stream (TLS): take all a refill decrypted, not a socket-sized slice of it.
STREAM_RECEIVE_SIZE = 1 << 20
# A chunk goes out in parts, so a Request or Have waits behind one part instead of a whole
# chunk upload: parts last about PART_SECONDS at the link's recent send rate, and are never
# smaller than CHUNK_PART_SIZE (0.17 s at a 12 Mbit/s fair share). On a fast link a chunk goes
# in one piece, for per-part work would cost more than the wait it saves.
CHUNK_PART_SIZE = 256 << 10
PART_SECONDS = 0.15
HANDSHAKE_TIMEOUT = 10.0
KEEPALIVE_INTERVAL = 30.0
IDLE_TIMEOUT = 120.0
# Messages that carry nothing (KeepAlive, a Have already known, a late Bitfield) a peer may send
# per keep-alive period; a sane peer sends about one, so more is a flood.
MAX_JUNK_PER_PERIOD = 1000
# How long a closing link may spend flushing its Goodbye to a peer that does not read.
CLOSE_GRACE = 2.0

# Linux's TCP_NOTSENT_LOWAT (socket module exports it only on some builds).
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _stream_failure(exc: BaseException) -> BaseException | None:
    """`exc` if it is a broken stream, or a group made only of those (nurseries wrap errors in
    groups); None for anything else, which must propagate."""
    if isinstance(exc, _STREAM_ERRORS):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_stream_failure(inner) for inner in exc.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None


class HandshakeError(Exception):
    """The peer did not complete the handshake; the message says why."""


class LinkRefused(HandshakeError):
    """The peer said Goodbye instead of a handshake (unknown template, banned, full, ...)."""


@dataclass(frozen=True)
class LocalPeer:
    """Who we are on the wire."""

    peer_id: bytes
    role: Role
    listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class LinkOptions:
    """Per-link tunables."""

    receive_size: int = RECEIVE_SIZE
    keepalive_interval: float = KEEPALIVE_INTERVAL
    idle_timeout: float = IDLE_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    # Bytes per second to and from this one peer; 0 is unlimited (and costs nothing).
    upload_limit: float = 0.0
    download_limit: float = 0.0
    chunk_part_size: int = CHUNK_PART_SIZE


@dataclass(frozen=True)
class LinkUp:
    """The link is ready; `bitfield` is the peer's, `sent` the one we announced."""

    bitfield: ChunkSet
    sent: ChunkSet


@dataclass(frozen=True)
class LinkDown:
    """The link is gone (closed by either side, broken, or a protocol error)."""

    reason: str


LinkEvent = LinkUp | LinkDown | Have | Chunk | Reject


class RequestSink(Protocol):
    """Where a link hands the Requests and Cancels it reads (the chunk server)."""

    def request(self, index: int) -> None: ...

    def cancel(self, index: int) -> None: ...

    async def run(self) -> None: ...


EventSender = trio.MemorySendChannel[tuple["PeerLink", LinkEvent]]


class BufferPool:
    """Chunk buffers for reuse: a fresh multi-MiB allocation costs a memset and page faults.

    Only the trio thread takes and gives. A buffer must be given back only once nothing reads
    it any more; giving one twice is ignored, and foreign objects are simply dropped.
    """

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._free: list[bytearray] = []
        self._free_ids: set[int] = set()
        self.allocated = 0

    def take(self, size: int) -> bytearray:
        """A buffer of at least `size` bytes (its contents are stale)."""
        if size > self.size:
            return bytearray(size)
        if self._free:
            buf = self._free.pop()
            self._free_ids.discard(id(buf))
            return buf
        self.allocated += 1
        return bytearray(self.size)

    def give(self, data: object) -> None:
        """Return the buffer behind `data` (a bytearray or a memoryview of one)."""
        buf = data.obj if isinstance(data, memoryview) else data
        if type(buf) is not bytearray or len(buf) != self.size:
            return
        if id(buf) in self._free_ids or len(self._free) >= self.keep:
            return
        self._free.append(buf)
        self._free_ids.add(id(buf))

    @property
    def free(self) -> int:
        return len(self._free)


def _now() -> float:
    return trio.current_time()


@dataclass(frozen=True)
class ChunkFile:
    """A verified chunk's bytes in a file: `length` bytes at `offset` of the open `fd`."""

    fd: int
    offset: int
    length: int
    # Close `fd` when sent (a per-chunk file), or leave it (a whole image's shared fd).
    owned: bool


class PeerLink:
    """A handshaken link to one peer for one template."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: Connection,
        their: Handshake,
        *,
        our: LocalPeer,
        outbound: bool,
        their_bitfield: ChunkSet,
        our_bitfield: ChunkSet,
        pending: list[Message] | None = None,
        options: LinkOptions | None = None,
    ) -> None:
        options = options or LinkOptions()
        self.stream = stream
        self.conn = conn
        self.their = their
        self.our = our
        self.outbound = outbound
        self.their_bitfield = their_bitfield
        self.our_bitfield = our_bitfield
        self.address = _remote_address(stream)
        self.bytes_in = 0
        self.bytes_out = 0
        self.chunks_in = 0
        self.chunks_out = 0
        self.close_reason: str | None = None
        # Set when the peer misbehaved: a ban reason from bans.BAN_REASONS.
        self.offence: str | None = None
        # Told (once) as soon as the peer misbehaves, before its connection is closed.
        self.on_offence: Callable[[PeerLink], None] | None = None
        self.idle_timed_out = False
        self._junk = 0
        self.upload_limiter: RateLimiter | None = limiter_for(options.upload_limit)
        self._download_limiter = limiter_for(options.download_limit)
        self._pending = list(pending or [])
        self._receive_size = options.receive_size
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._part_size = max(options.chunk_part_size, MIN_CHUNK_PART)
        self._send_rate = 0.0  # bytes/s of this link's recent chunk uploads; 0: none yet
        if self._socket is not None:
            # Unsent bytes the kernel queues ahead of our next control frame: about one part.
            with contextlib.suppress(OSError):
                self._socket.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, self._part_size)
        self._receive_buffer = bytearray(self._receive_size if self._socket is not None else 0)
        self._receive_view = memoryview(self._receive_buffer)
        self._low_water = 1  # the socket's SO_RCVLOWAT as we last set it
        self._keepalive_interval = options.keepalive_interval
        self._idle_timeout = options.idle_timeout
        # Fair (FIFO) locks: the writer waiting for `_send_lock` gets it at the next part.
        self._send_lock = trio.Lock()
        self._chunk_lock = trio.Lock()  # one chunk's parts at a time on this link
        self._outbox: deque[ControlMessage] = deque()
        self._outbox_ready = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._closing = False
        self._goodbye: str | None = None

    # -- identity ------------------------------------------------------------------------------

    @property
    def peer_id(self) -> bytes:
        return self.their.peer_id

    @property
    def role(self) -> Role:
        return self.their.role

    @property
    def template_id(self) -> bytes:
        return self.their.template_id

    @property
    def closing(self) -> bool:
        return self._closing

    def __repr__(self) -> str:
        direction = "to" if self.outbound else "from"
        return f"<PeerLink {direction} {self.peer_id.hex()[:8]} {self.role.value} {self.address}>"

    # -- sending -------------------------------------------------------------------------------

    def post(self, message: ControlMessage) -> None:
        """Queue a control message; the link's writer sends it. Never blocks."""
        if self._closing:
            return
        self._outbox.append(message)
        self._outbox_ready.set()

    async def send_chunk(self, index: int, data: bytes | memoryview) -> bool:
        """Send one chunk, part by part; False if the link is closing.

        Control messages queued meanwhile go out between the parts.
        """
        with memoryview(data) as view:
            size = view.nbytes
            async with self._chunk_lock:
                began = _now()
                for offset, length in self._parts(size):
                    async with self._send_lock:
                        if self._closing:
                            return False
                        header = self.conn.send_chunk_part_header(
                            index, size, offset, length, now=_now()
                        )
                        await self._send_part(header, view[offset : offset + length])
                self._chunk_took(size, _now() - began)
        self.chunks_out += 1
        return True

    def _parts(self, size: int) -> Iterator[tuple[int, int]]:
        """(offset, length) of each part of a `size`-byte chunk, in order, sized as it goes.

        An empty chunk still yields one part, so that framing it raises as it should.
        """
        offset = 0
        while True:
            length = min(size - offset, max(self._part_size, int(self._send_rate * PART_SECONDS)))
            yield offset, length
            offset += length
            if offset >= size:
                return

    def _chunk_took(self, size: int, seconds: float) -> None:
        rate = size / max(seconds, 1e-6)
        self._send_rate = rate if not self._send_rate else (self._send_rate + rate) / 2

    async def _send_part(self, header: bytes, payload: memoryview) -> None:
        if self._socket is None:
            await self.stream.send_all(header)
            await self.stream.send_all(payload)
            self.bytes_out += len(header) + payload.nbytes
            return
        # Header and payload in one syscall: no lone header segment wakes the peer.
        sent = await self._socket.sendmsg([header, payload])
        self.bytes_out += sent
        for part in (memoryview(header), payload):
            if sent < part.nbytes:
                await self.stream.send_all(part[sent:])
                self.bytes_out += part.nbytes - sent
            sent = max(sent - part.nbytes, 0)

    @property
    def can_send_files(self) -> bool:
        """Can `send_chunk_file` use sendfile here (a real socket, not a test stream)?"""
        return self._socket is not None

    async def send_chunk_file(self, index: int, source: ChunkFile) -> bool:
        """Send one chunk straight from a file with sendfile: its bytes never enter Python.

        Part by part, like `send_chunk`. False if the link is closing. The caller keeps `source`
        open until this returns.
        """
        sock = self._socket
        if sock is None:
            raise RuntimeError("send_chunk_file needs a socket stream")
        async with self._chunk_lock:
            began = _now()
            for offset, length in self._parts(source.length):
                async with self._send_lock:
                    if self._closing:
                        return False
                    header = self.conn.send_chunk_part_header(
                        index, source.length, offset, length, now=_now()
                    )
                    # MSG_MORE: the header leaves in the same segment as the payload's start.
                    try:
                        sent = await sock.send(header, socket.MSG_MORE)
                    except OSError as exc:
                        raise trio.BrokenResourceError(str(exc)) from exc
                    if sent < len(header):
                        await self.stream.send_all(header[sent:])
                    self.bytes_out += len(header)
                    await self._sendfile(sock, index, source.fd, source.offset + offset, length)
            self._chunk_took(source.length, _now() - began)
        self.chunks_out += 1
        return True

    async def _sendfile(
        self, sock: trio.socket.SocketType, index: int, fd: int, offset: int, left: int
    ) -> None:
        out = sock.fileno()
        while left:
            try:
                count = os.sendfile(out, fd, offset, left)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    raise trio.BrokenResourceError(str(exc)) from exc
                raise
            if count == 0:
                raise OSError(errno.EIO, f"chunk {index}: its file ended {left} bytes early")
            offset += count
            left -= count
            self.bytes_out += count
            # sendfile never yields to trio on its own; let the other tasks in now and then.
            await trio.lowlevel.checkpoint()

    def offend(self, offence: str, reason: str) -> None:
        """The peer misbehaved (`offence`, a ban reason): close the link and remember why."""
        self.close_reason = self.close_reason or reason
        self._offended(offence)
        self.close(reason)

    def _offended(self, offence: str | None) -> None:
        if offence is None or self.offence is not None:
            return
        self.offence = offence
        if self.on_offence is not None:
            self.on_offence(self)

    def close(self, reason: str) -> None:
        """Say Goodbye(reason) and tear the link down; never blocks."""
        if self._closing:
            return
        self.close_reason = reason
        self._goodbye = reason
        self._closing = True
        self._outbox_ready.set()

    async def _write_loop(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            if self._outbox:
                batch = []
                now = _now()
                while self._outbox:
                    batch.append(self.conn.send(self._outbox.popleft(), now=now))
                data = b"".join(batch)
                async with self._send_lock:
                    await self.stream.send_all(data)
                self.bytes_out += len(data)
            if self._closing:
                await self._say_goodbye()
                return

    async def _say_goodbye(self) -> None:
        reason = self._goodbye or "closing"
        with trio.move_on_after(CLOSE_GRACE):
            async with self._send_lock:
                with contextlib.suppress(LocalProtocolError):
                    await self.stream.send_all(self.conn.send(Goodbye(reason[:1000]), now=_now()))
        if self._scope is not None:
            self._scope.cancel()

    async def _keepalive_loop(self) -> None:
        period = max(min(self._keepalive_interval, self._idle_timeout) / 2, 0.01)
        while True:
            await trio.sleep(period)
            now = _now()
            if self.conn.idle_for(now) >= self._idle_timeout:
                self.idle_timed_out = True
                self.close(f"idle for {self._idle_timeout:g}s")
                return
            if self.conn.keepalive_due(now, self._keepalive_interval) and not self._outbox:
                self.post(KeepAlive())
            self._junk = 0

    # -- receiving -----------------------------------------------------------------------------

    async def _fill(self) -> None:
        sock = self._socket
        if sock is None:
            data = await self.stream.receive_some(STREAM_RECEIVE_SIZE)
            self.bytes_in += len(data)
            self.conn.receive_data(data, now=_now())
            if self._download_limiter is not None:
                await self._download_limiter.acquire(len(data))
            return
        target = self.conn.payload_buffer()
        if target is not None:
            self._set_low_water(sock, min(len(target), PAYLOAD_LOW_WATER))
            # The rest of a chunk goes straight into its own buffer: no copy in user space.
            with target:
                count = await sock.recv_into(target)
            self.bytes_in += count
            if count:
                self.conn.payload_received(count, now=_now())
            else:
                self.conn.receive_data(b"", now=_now())
            if self._download_limiter is not None:
                # Not reading on is what paces the sender: TCP's window closes behind us.
                await self._download_limiter.acquire(count)
            return
        # Control messages are small: any byte may complete one.
        self._set_low_water(sock, 1)
        # One reused buffer: a fresh bytes object per receive costs page faults, not just a copy.
        count = await sock.recv_into(self._receive_buffer)
        self.bytes_in += count
        with self._receive_view[:count] as view:
            self.conn.receive_data(view, now=_now())
        if self._download_limiter is not None:
            await self._download_limiter.acquire(count)

    def _set_low_water(self, sock: trio.socket.SocketType, size: int) -> None:
        if size != self._low_water:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
            except OSError:
                size = self._low_water  # not a TCP socket after all: wake on any byte
            self._low_water = size

    async def _read_loop(
        self,
        events: EventSender | None,
        sink: RequestSink | None,
        chunk_tokens: trio.Semaphore | None,
    ) -> str:
        """Read until the link ends; returns why it ended."""
        pending = self._pending
        self._pending = []
        while True:
            if pending:
                event: object = pending.pop(0)
            else:
                event = self.conn.next_event()
            if event is NEED_DATA:
                await self._fill()
                continue
            if isinstance(event, ConnectionClosed) or event is Sentinel.CLOSED:
                return "peer closed the connection"
            if isinstance(event, Goodbye):
                return f"peer said goodbye: {event.reason}"
            if isinstance(event, Request):
                if sink is None:
                    self.post(Reject(event.index, "this link does not serve chunks"))
                else:
                    sink.request(event.index)
            elif isinstance(event, Cancel):
                if sink is not None:
                    sink.cancel(event.index)
            elif isinstance(event, Have):
                if event.index in self.their_bitfield and self._junked():
                    return self.close_reason or "message flood"
                self.their_bitfield.add(event.index)
                if events is not None:
                    await events.send((self, event))
            elif isinstance(event, Chunk):
                self.chunks_in += 1
                if events is None:
                    continue
                # Bounds the chunks held in memory between this read and their write.
                if chunk_tokens is not None:
                    await chunk_tokens.acquire()
                try:
                    await events.send((self, event))
                except BaseException:
                    if chunk_tokens is not None:
                        chunk_tokens.release()
                    raise
            elif isinstance(event, Reject):
                if events is not None:
                    await events.send((self, event))
            elif self._junked():  # KeepAlive and a late Bitfield carry nothing for the owner
                return self.close_reason or "message flood"

    def _junked(self) -> bool:
        """Count a message that carried nothing; True (and the link closing) once it is a flood."""
        self._junk += 1
        if self._junk <= MAX_JUNK_PER_PERIOD:
            return False
        self.offend("message_flood", f"message flood: over {MAX_JUNK_PER_PERIOD} empty messages")
        return True

    async def run(
        self,
        events: EventSender | None = None,
        sink: RequestSink | None = None,
        *,
        chunk_tokens: trio.Semaphore | None = None,
    ) -> str:
        """Run the link until it ends: LinkUp first, LinkDown last into `events`.

        Each Chunk event pushed holds one of `chunk_tokens`; its consumer releases it.
        Returns why the link ended.
        """
        reason = "link closed"
        try:
            if events is not None:
                await events.send((self, LinkUp(self.their_bitfield.copy(), self.our_bitfield)))
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._guard, self._write_loop)
                nursery.start_soon(self._guard, self._keepalive_loop)
                if sink is not None:
                    nursery.start_soon(self._guard, sink.run)
                reason = await self._read_guarded(events, sink, chunk_tokens)
                nursery.cancel_scope.cancel()
            if self.close_reason is not None:
                reason = self.close_reason
        except BaseException as caught:
            exc = _stream_failure(caught)
            if exc is None:
                raise
            reason = self.close_reason or f"connection lost: {exc or type(exc).__name__}"
        finally:
            self._closing = True
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
                if events is not None:
                    with (
                        trio.move_on_after(CLOSE_GRACE),
                        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                    ):
                        await events.send((self, LinkDown(reason)))
        log.debug("%r down: %s", self, reason)
        return reason

    async def _read_guarded(
        self,
        events: EventSender | None,
        sink: RequestSink | None,
        chunk_tokens: trio.Semaphore | None,
    ) -> str:
        try:
            return await self._read_loop(events, sink, chunk_tokens)
        except RemoteProtocolError as exc:
            reason = f"protocol error: {exc}"
            self.close_reason = reason
            self._offended(offence_of(str(exc)))
            await self._abort(reason)
            return reason
        except _STREAM_ERRORS as exc:
            return self.close_reason or f"connection lost: {exc or type(exc).__name__}"

    async def _guard(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run a link task; a broken stream just ends the link."""
        try:
            await task()
        except BaseException as caught:
            exc = _stream_failure(caught)
            if exc is None:
                raise
            if self.close_reason is None:
                self.close_reason = f"connection lost: {exc or type(exc).__name__}"
            if self._scope is not None:
                self._scope.cancel()

    async def _abort(self, reason: str) -> None:
        self._closing = True
        with (
            trio.move_on_after(CLOSE_GRACE),
            contextlib.suppress(LocalProtocolError, *_STREAM_ERRORS),
        ):
            async with self._send_lock:
                await self.stream.send_all(self.conn.send(Goodbye(reason[:1000]), now=_now()))


def _remote_address(stream: trio.abc.Stream) -> tuple[str, int] | None:
    sock = socket_of(stream)
    if sock is None:
        return None
    try:
        name = sock.getpeername()
    except OSError:
        return None
    if isinstance(name, tuple) and len(name) >= 2:
        return (str(name[0]), int(name[1]))
    return None


# -- handshakes ---------------------------------------------------------------------------------


async def _next_message(stream: trio.abc.Stream, conn: Connection) -> Message:
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            conn.receive_data(data, now=_now())
            continue
        if isinstance(event, ConnectionClosed) or event is Sentinel.CLOSED:
            raise HandshakeError("peer closed the connection during the handshake")
        assert isinstance(event, Message)
        return event


async def read_handshake(
    stream: trio.abc.Stream, conn: Connection, first_bytes: bytes = b""
) -> Handshake:
    """The peer's Handshake (the first frame); LinkRefused if it says Goodbye instead."""
    if first_bytes:
        conn.receive_data(first_bytes, now=_now())
    try:
        message = await _next_message(stream, conn)
    except RemoteProtocolError as exc:
        raise HandshakeError(f"bad handshake: {exc}") from exc
    if isinstance(message, Goodbye):
        raise LinkRefused(message.reason)
    if not isinstance(message, Handshake):
        raise HandshakeError(f"expected a Handshake, got {type(message).__name__}")
    return message


async def _read_bitfield(
    stream: trio.abc.Stream, conn: Connection, chunk_count: int
) -> tuple[ChunkSet, list[Message]]:
    """The peer's Bitfield; a peer that skips it holds nothing, and its first message is kept."""
    try:
        message = await _next_message(stream, conn)
    except RemoteProtocolError as exc:
        raise HandshakeError(f"bad bitfield: {exc}") from exc
    if isinstance(message, Goodbye):
        raise LinkRefused(message.reason)
    if isinstance(message, Bitfield):
        return ChunkSet(chunk_count, message.bits), []
    return ChunkSet(chunk_count), [message]


def _our_handshake(our: LocalPeer, template_id: bytes) -> Handshake:
    return Handshake(PROTOCOL_VERSION, template_id, our.peer_id, our.listen, our.role)


async def connect(
    stream: trio.abc.Stream,
    our: LocalPeer,
    template_id: bytes,
    have: ChunkSet,
    *,
    max_chunk_size: int = MAX_CHUNK_SIZE,
    options: LinkOptions | None = None,
) -> PeerLink:
    """Open a link on a freshly connected stream: send ours, read theirs."""
    conn = Connection(our.role, max_chunk_size=max_chunk_size, chunk_count=have.size, now=_now())
    timeout = (options or LinkOptions()).handshake_timeout
    try:
        with trio.fail_after(timeout):
            hello = conn.send(_our_handshake(our, template_id), now=_now())
            hello += conn.send(Bitfield(have.to_bytes()), now=_now())
            await stream.send_all(hello)
            their = await read_handshake(stream, conn)
            bits, pending = await _read_bitfield(stream, conn, have.size)
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise HandshakeError(f"no handshake within {timeout:g}s") from None
    except (HandshakeError, *_STREAM_ERRORS) as exc:
        await trio.aclose_forcefully(stream)
        if isinstance(exc, HandshakeError):
            raise
        raise HandshakeError(f"connection lost during the handshake: {exc}") from exc
    link = PeerLink(
        stream,
        conn,
        their,
        our=our,
        outbound=True,
        their_bitfield=bits,
        our_bitfield=have,
        pending=pending,
        options=options,
    )
    link.bytes_out += len(hello)
    return link


async def accept(
    stream: trio.abc.Stream,
    conn: Connection,
    their: Handshake,
    our: LocalPeer,
    have: ChunkSet,
    *,
    options: LinkOptions | None = None,
) -> PeerLink:
    """Finish an inbound handshake whose Handshake `read_handshake` already returned."""
    conn.set_chunk_count(have.size)
    timeout = (options or LinkOptions()).handshake_timeout
    try:
        with trio.fail_after(timeout):
            hello = conn.send(_our_handshake(our, their.template_id), now=_now())
            hello += conn.send(Bitfield(have.to_bytes()), now=_now())
            await stream.send_all(hello)
            bits, pending = await _read_bitfield(stream, conn, have.size)
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise HandshakeError(f"no bitfield within {timeout:g}s") from None
    except (HandshakeError, *_STREAM_ERRORS) as exc:
        await trio.aclose_forcefully(stream)
        if isinstance(exc, HandshakeError):
            raise
        raise HandshakeError(f"connection lost during the handshake: {exc}") from exc
    link = PeerLink(
        stream,
        conn,
        their,
        our=our,
        outbound=False,
        their_bitfield=bits,
        our_bitfield=have,
        pending=pending,
        options=options,
    )
    link.bytes_out += len(hello)
    return link


async def refuse(stream: trio.abc.Stream, conn: Connection, reason: str) -> None:
    """Answer a handshake with Goodbye(reason) and close the stream."""
    with trio.move_on_after(CLOSE_GRACE), contextlib.suppress(LocalProtocolError, *_STREAM_ERRORS):
        await stream.send_all(conn.send(Goodbye(reason[:1000]), now=_now()))
    await trio.aclose_forcefully(stream)
