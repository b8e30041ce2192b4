"""Answer a peer's Requests: read each chunk off the store in a worker thread, verified, then send.

One `ChunkServer` per link. Its loader reads the next requested chunk while its sender writes
the previous one, so disk, hashing and the socket overlap. A chunk the store already verified
(see `TemplateData.chunk_file`) skips the read: it goes out with sendfile, straight from the file.
A node-wide `trio.Semaphore` of upload slots caps the chunks being uploaded at once (and so the
memory they hold).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import ssl
from collections.abc import Callable

import trio

from ..swarm.connection import Connection
from ..swarm.framing import MAX_CHUNK_SIZE
from ..swarm.messages import Reject
from .peer_link import (
    BufferPool,
    ChunkFile,
    HandshakeError,
    LinkOptions,
    LocalPeer,
    PeerLink,
    accept,
    read_handshake,
    refuse,
)
from .ratelimit import RateLimiter
from .storeerrors import ChunkAbsent, ChunkCorrupt, StoreError
from .template_sources import TemplateData
from .tls import TlsError, TlsRole
from .tls import accept as tls_accept

log = logging.getLogger(__name__)

# A chunk to send: its verified bytes in a buffer, or its verified place in a file.
_Payload = memoryview | ChunkFile

# Requests a peer may queue with us; more are rejected (a sane peer pipelines far fewer).
MAX_QUEUED_REQUESTS = 64
DEFAULT_UPLOAD_SLOTS = 8


class ChunkServer:
    """Serves one link's Requests; plug it into `PeerLink.run` as the request sink."""

    def __init__(
        self,
        link: PeerLink,
        data: TemplateData,
        upload_slots: trio.Semaphore,
        *,
        max_queued: int = MAX_QUEUED_REQUESTS,
        flood_rejects: int | None = None,
        on_lost: Callable[[int], None] | None = None,
        rate_limit: RateLimiter | None = None,
        buffers: BufferPool | None = None,
        on_sent: Callable[[int], None] | None = None,
    ) -> None:
        self.link = link
        self.on_sent = on_sent
        self.rate_limit = rate_limit
        self.buffers = buffers
        self.data = data
        self.upload_slots = upload_slots
        self.max_queued = max_queued
        # Full-queue rejects over the link's life before the peer counts as flooding us: a sane
        # peer never overfills the queue, so as many again as the queue holds is no accident.
        self.flood_rejects = max_queued if flood_rejects is None else flood_rejects
        self.overflowed = 0
        self.on_lost = on_lost
        self.served_chunks = 0
        self.served_bytes = 0
        self.rejected = 0
        self._queue: dict[int, None] = {}  # requested, not started: ordered, O(1) cancel
        self._started: set[int] = set()  # being read or waiting to be sent
        self._cancelled: set[int] = set()
        self._wakeup = trio.Event()

    def request(self, index: int) -> None:
        """The peer asked for chunk `index` (called by the link's reader, never blocks)."""
        self._cancelled.discard(index)
        if index in self._queue or index in self._started:
            return
        if len(self._queue) >= self.max_queued:
            self.overflowed += 1
            if self.overflowed > self.flood_rejects:
                self.link.offend("request_flood", f"request flood: over {self.max_queued} queued")
                return
            self._reject(index, f"too many queued requests (at most {self.max_queued})")
            return
        self._queue[index] = None
        self._wakeup.set()

    def cancel(self, index: int) -> None:
        """The peer no longer wants chunk `index`."""
        if index in self._queue:
            del self._queue[index]
        elif index in self._started:
            self._cancelled.add(index)

    def _reject(self, index: int, reason: str) -> None:
        self.rejected += 1
        self.link.post(Reject(index, reason))

    def _log_fields(self, index: int) -> dict[str, object]:
        manifest = self.data.manifest
        return {
            "template": f"{manifest.name}:{manifest.version}",
            "peer": self.link.peer_id.hex()[:16],
            "chunk": index,
        }

    async def _next_request(self) -> int:
        while not self._queue:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
        index = next(iter(self._queue))
        del self._queue[index]
        return index

    async def run(self) -> None:
        """Load and send chunks until cancelled (the link's nursery owns this task)."""
        send, receive = trio.open_memory_channel[tuple[int, _Payload]](1)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender, receive)
                await self._loader(send)
        finally:
            # A chunk loaded but never picked up by the sender still holds its slot.
            while True:
                try:
                    _, payload = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                self._give_back(payload)
                self.upload_slots.release()

    async def _loader(self, send: trio.MemorySendChannel[tuple[int, _Payload]]) -> None:
        manifest = self.data.manifest
        while True:
            index = await self._next_request()
            if index in manifest.zero_chunks:
                self._reject(index, f"chunk {index} is all zeros: never sent")
                continue
            if not self.data.has(index):
                self._reject(index, f"chunk {index} is not here")
                continue
            self._started.add(index)
            await self.upload_slots.acquire()
            handed_over = False
            payload: _Payload | None = None
            try:
                payload = await self._read(index)
                if index in self._cancelled:
                    continue
                await send.send((index, payload))
                handed_over = True
            except (ChunkAbsent, ChunkCorrupt) as exc:
                log.warning("cannot serve chunk %d: %s", index, exc, extra=self._log_fields(index))
                self._reject(index, f"chunk {index} is not readable here")
                if self.on_lost is not None:
                    self.on_lost(index)
            except StoreError as exc:
                log.error("cannot serve chunk %d: %s", index, exc, extra=self._log_fields(index))
                self._reject(index, f"chunk {index}: storage error here")
            finally:
                if not handed_over:
                    self._started.discard(index)
                    self._cancelled.discard(index)
                    if payload is not None:
                        self._give_back(payload)
                    self.upload_slots.release()

    async def _read(self, index: int) -> _Payload:
        """Read and verify a chunk in a worker thread, into a pooled buffer when the store can.

        A chunk the store has verified before comes back as its place in a file, unread.
        """
        chunk_file = getattr(self.data, "chunk_file", None)
        if chunk_file is not None and self.link.can_send_files:
            # Memory and one fstat at most: cheap enough for the trio thread.
            found: ChunkFile | None = chunk_file(index)
            if found is not None:
                return found
        read_into = getattr(self.data, "read_chunk_into", None)
        if self.buffers is None or read_into is None:
            return await trio.to_thread.run_sync(self.data.read_chunk, index)
        buf = self.buffers.take(self.data.manifest.chunk_range(index)[1])
        try:
            view: memoryview = await trio.to_thread.run_sync(read_into, index, buf)
        except BaseException:
            self.buffers.give(buf)
            raise
        return view

    def _give_back(self, payload: _Payload) -> None:
        if isinstance(payload, ChunkFile):
            if payload.owned:
                os.close(payload.fd)
        elif self.buffers is not None:
            self.buffers.give(payload)

    async def _sender(self, receive: trio.MemoryReceiveChannel[tuple[int, _Payload]]) -> None:
        async for index, payload in receive:
            try:
                if index in self._cancelled:
                    continue
                size = _size(payload)
                if self.rate_limit is not None:
                    # Shared by every upload of the node: paced before the bytes go out.
                    await self.rate_limit.acquire(size)
                if self.link.upload_limiter is not None:
                    await self.link.upload_limiter.acquire(size)
                if index not in self._cancelled and await self._send(index, payload):
                    self.served_chunks += 1
                    self.served_bytes += size
                    if self.on_sent is not None:
                        self.on_sent(size)
            finally:
                self._started.discard(index)
                self._cancelled.discard(index)
                # Sent (the kernel has its copy) or dropped: the buffer is free again.
                self._give_back(payload)
                self.upload_slots.release()

    async def _send(self, index: int, payload: _Payload) -> bool:
        if isinstance(payload, ChunkFile):
            return await self.link.send_chunk_file(index, payload)
        return await self.link.send_chunk(index, payload)


def _size(payload: _Payload) -> int:
    return payload.length if isinstance(payload, ChunkFile) else len(payload)


async def serve_link(
    link: PeerLink,
    data: TemplateData,
    upload_slots: trio.Semaphore,
) -> str:
    """Serve one handshaken link until it ends (a pure seeder: no events, no downloading)."""
    return await link.run(None, ChunkServer(link, data, upload_slots))


async def serve_template(
    stream: trio.abc.Stream,
    data: TemplateData,
    our: LocalPeer,
    *,
    upload_slots: trio.Semaphore | None = None,
    first_bytes: bytes = b"",
    options: LinkOptions | None = None,
) -> None:
    """Seed `data` on one inbound stream: handshake, then answer Requests until the peer leaves.

    A handshake for another template gets Goodbye. Never raises for the peer's faults.
    """
    slots = upload_slots if upload_slots is not None else trio.Semaphore(DEFAULT_UPLOAD_SLOTS)
    conn = Connection(our.role, max_chunk_size=min(data.manifest.chunk_size, MAX_CHUNK_SIZE))
    try:
        their = await read_handshake(stream, conn, first_bytes)
    except HandshakeError as exc:
        log.info("inbound handshake failed: %s", exc)
        await trio.aclose_forcefully(stream)
        return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await trio.aclose_forcefully(stream)
        return
    if their.template_id != data.manifest.template_id:
        await refuse(stream, conn, f"unknown template {their.template_id.hex()}")
        return
    try:
        link = await accept(stream, conn, their, our, data.have(), options=options)
    except HandshakeError as exc:
        log.info("inbound handshake failed: %s", exc)
        return
    await serve_link(link, data, slots)


async def run_seeder(
    data: TemplateData,
    our: LocalPeer,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    upload_slots: int = DEFAULT_UPLOAD_SLOTS,
    tls: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A temporary seeding server for one template; `started` gets the bound (host, port).

    Runs until cancelled. Used by `vmswarm publish` to feed the storage centers; with `tls`
    (a server context) only storage-center certificates may connect.
    """
    slots = trio.Semaphore(upload_slots)
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()

    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            session: trio.abc.Stream = stream
            if tls is not None:
                try:
                    session, _ = await tls_accept(stream, tls, allowed={TlsRole.STORAGE})
                except TlsError as exc:
                    log.warning("seeder refused a TLS client: %s", exc)
                    return
            await serve_template(session, data, our, upload_slots=slots)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started((str(sockname[0]), int(sockname[1])))
        await trio.sleep(math.inf)
