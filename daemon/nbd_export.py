"""A template that is still being fetched, served read-only over NBD on a Unix socket.

`NbdExport` speaks the protocol of `swarm.nbd` to many clients at once (qemu, qemu-img,
qemu-io) and answers reads from an `ExportSource`: zero chunks at once, verified chunks from the
store, and a missing chunk only after the source has made it top priority, fetched and verified
it. A read that cannot be served within `read_timeout` gets EIO and a logged reason; never
unverified bytes. A client that breaks the protocol is dropped; the others carry on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import trio

from ..swarm.errors import ProtocolError
from ..swarm.nbd import (
    EIO,
    NEED_DATA,
    Disconnect,
    Flush,
    NbdServer,
    Negotiated,
    ReadRequest,
    Refused,
)
from .storeerrors import StoreError

log = logging.getLogger(__name__)

SOCKET_MODE = 0o666  # qemu runs as another user (libvirt-qemu); the export is read-only
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_CLIENTS = 16
# Requests one client may have in flight; qemu pipelines at most 16.
DEFAULT_MAX_IN_FLIGHT = 16
RECEIVE_SIZE = 1 << 18


class ChunkUnavailable(Exception):
    """A chunk cannot be delivered now; the message is the reason, for the EIO log line."""


class NbdExportError(Exception):
    """The export's socket cannot be set up; the message names the path and why."""


class ExportSource(Protocol):
    """Where an export's bytes come from: a template's chunks, fetched or fetching."""

    @property
    def size(self) -> int:
        """The export's size in bytes."""
        ...

    @property
    def chunk_size(self) -> int: ...

    def is_zero(self, index: int) -> bool:
        """Whether chunk `index` is all zeros (answered at once, never fetched)."""
        ...

    def is_ready(self, index: int) -> bool:
        """Whether chunk `index` is verified and stored here."""
        ...

    async def wait_ready(self, index: int) -> None:
        """Make chunk `index` top priority; return once it is verified and stored.

        May raise ChunkUnavailable(reason).
        """
        ...

    async def read(self, offset: int, length: int) -> bytes:
        """Bytes of ready, non-zero chunks only; may raise ChunkUnavailable, OSError, StoreError."""
        ...

    def why_missing(self, index: int) -> str:
        """Why chunk `index` is not here yet, e.g. "no connected peer holds it"."""
        ...


class _ReadFailed(Exception):
    """A read is answered with EIO: `index` is the chunk at fault, the message the reason."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index


class NbdExport:
    """Serve `source` read-only on the Unix socket `socket_path` until cancelled."""

    def __init__(
        self,
        source: ExportSource,
        socket_path: Path | str,
        *,
        export_name: str,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        on_first_read: Callable[[int], object] | None = None,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if source.chunk_size < 1:
            raise ValueError(f"chunk size must be positive, got {source.chunk_size}")
        if read_timeout <= 0 or handshake_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if max_clients < 1 or max_in_flight < 1:
            raise ValueError("max_clients and max_in_flight must be at least 1")
        self.source = source
        self.socket_path = Path(socket_path)
        self.export_name = export_name
        self.read_timeout = read_timeout
        self.handshake_timeout = handshake_timeout
        self.max_clients = max_clients
        self.max_in_flight = max_in_flight
        self._on_first_read = on_first_read
        self._seen: set[int] = set()
        self._client_ids = itertools.count(1)
        # Checked once: a bad name or size should fail at setup, not at the first client.
        NbdServer(export_name, source.size)
        self.reads = 0  # read requests answered with data
        self.bytes_read = 0
        self.eio_count = 0
        self.clients = 0  # connected now
        self.clients_total = 0
        self.clients_dropped = 0  # protocol errors and handshake timeouts

    def status(self) -> dict[str, int]:
        """The counters, for status output and tests."""
        return {
            "reads": self.reads,
            "bytes_read": self.bytes_read,
            "eio_count": self.eio_count,
            "clients": self.clients,
            "clients_total": self.clients_total,
            "clients_dropped": self.clients_dropped,
        }

    def _fields(self, client: int | None = None, **more: object) -> dict[str, object]:
        fields: dict[str, object] = {"export": self.export_name}
        if client is not None:
            fields["nbd_client"] = client
        fields.update(more)
        return fields

    # -- listening --------------------------------------------------------------------------

    def _bind(self) -> tuple[socket.socket, int]:
        """The listening socket and its inode; a stale socket file is replaced."""
        path = self.socket_path
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise NbdExportError(f"cannot serve NBD on {path}: it exists and is not a socket")
            path.unlink()  # stale: left by an export that did not clean up
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            sock.bind(str(path))
            os.chmod(path, SOCKET_MODE)
            sock.listen(64)
            inode = os.stat(path).st_ino
        except OSError as exc:
            sock.close()
            raise NbdExportError(f"cannot serve NBD on {path}: {exc.strerror or exc}") from exc
        return sock, inode

    def _unlink(self, inode: int) -> None:
        # Only our own socket: a later export may already have taken the path over.
        with contextlib.suppress(OSError):
            if os.stat(self.socket_path).st_ino == inode:
                self.socket_path.unlink()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve clients until cancelled; the socket file is removed on exit."""
        raw, inode = self._bind()
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
        try:
            async with listener, trio.open_nursery() as nursery:
                log.info("NBD export on %s", self.socket_path, extra=self._fields())
                task_status.started()
                while True:
                    stream = await listener.accept()
                    if self.clients >= self.max_clients:
                        log.warning(
                            "NBD client refused: %d clients already connected",
                            self.clients,
                            extra=self._fields(),
                        )
                        await stream.aclose()
                        continue
                    self.clients += 1
                    nursery.start_soon(self._client, stream, next(self._client_ids))
        finally:
            self._unlink(inode)

    # -- one client -------------------------------------------------------------------------

    async def _client(self, stream: trio.SocketStream, client: int) -> None:
        self.clients_total += 1
        conn = NbdServer(self.export_name, self.source.size)
        try:
            async with stream:
                negotiated: bool | None = None
                with trio.move_on_after(self.handshake_timeout):
                    negotiated = await self._negotiate(stream, conn)
                if negotiated is None:
                    self.clients_dropped += 1
                    log.warning(
                        "NBD client dropped: no negotiation within %ss",
                        self.handshake_timeout,
                        extra=self._fields(client),
                    )
                    return
                if negotiated:
                    await self._transmit(stream, conn, client)
        except ProtocolError as exc:
            self.clients_dropped += 1
            log.warning("NBD client dropped: %s", exc, extra=self._fields(client))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("NBD client connection lost: %s", exc, extra=self._fields(client))
        except Exception:
            # A bug while serving one client must not take the export from the others.
            self.clients_dropped += 1
            log.exception("NBD client dropped after an internal error", extra=self._fields(client))
        finally:
            self.clients -= 1

    async def _negotiate(self, stream: trio.SocketStream, conn: NbdServer) -> bool:
        """Run the option haggling; True once transmission starts, False if the client left."""
        while True:
            event = conn.next_event()
            out = conn.data_to_send()
            if isinstance(event, Disconnect):
                if out:  # the ACK of NBD_OPT_ABORT; the client need not wait for it
                    with contextlib.suppress(trio.BrokenResourceError):
                        await stream.send_all(out)
                return False
            if out:
                await stream.send_all(out)
            if event is NEED_DATA:
                conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
            elif isinstance(event, Negotiated):
                return True
            else:
                raise ProtocolError(f"unexpected {event!r} during negotiation")

    async def _transmit(self, stream: trio.SocketStream, conn: NbdServer, client: int) -> None:
        """Take requests and answer them concurrently; replies go out whole, one at a time."""
        send_lock = trio.Lock()
        slots = trio.Semaphore(self.max_in_flight)

        async def send(data: bytes) -> None:
            async with send_lock:
                await stream.send_all(data)

        async with trio.open_nursery() as nursery:
            failure: BaseException | None = None
            try:
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
                    elif isinstance(event, ReadRequest):
                        # Backpressure: no more requests are parsed while every slot is busy.
                        await slots.acquire()
                        nursery.start_soon(self._answer_read, conn, event, send, slots, client)
                    elif isinstance(event, Flush):
                        await send(conn.reply(event.handle, 0))
                    elif isinstance(event, Refused):
                        await send(conn.reply(event.handle, event.error))
                    elif isinstance(event, Disconnect):
                        if not event.graceful:
                            nursery.cancel_scope.cancel()  # nobody is left to read replies
                        break
            except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                failure = exc
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _answer_read(
        self,
        conn: NbdServer,
        request: ReadRequest,
        send: Callable[[bytes], Awaitable[None]],
        slots: trio.Semaphore,
        client: int,
    ) -> None:
        try:
            try:
                data = await self._read(request.offset, request.length)
            except Exception as exc:
                if not isinstance(exc, _ReadFailed):
                    # A bug in the source must cost this read, not the whole export.
                    log.exception("NBD read failed", extra=self._fields(client))
                    exc = _ReadFailed(request.offset // self.source.chunk_size, repr(exc))
                self.eio_count += 1
                log.warning(
                    "NBD read failed with EIO: chunk %d: %s",
                    exc.index,
                    exc,
                    extra=self._fields(
                        client, chunk=exc.index, offset=request.offset, length=request.length
                    ),
                )
                reply = conn.reply(request.handle, EIO)
            else:
                self.reads += 1
                self.bytes_read += len(data)
                reply = conn.reply(request.handle, 0, data)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await send(reply)  # a lost client is noticed by the receiving side
        finally:
            # Only once sent: a client that never reads its replies cannot pile them up here.
            slots.release()

    # -- reading ----------------------------------------------------------------------------

    def _note_first_reads(self, first: int, last: int) -> None:
        for index in range(first, last + 1):
            if index in self._seen:
                continue
            self._seen.add(index)
            if self._on_first_read is not None:
                try:
                    self._on_first_read(index)
                except Exception:
                    # The prefetch profile is a hint: its recorder must not break a read.
                    log.exception("on_first_read(%d) failed", index, extra=self._fields())

    async def _read(self, offset: int, length: int) -> bytes:
        """The verified bytes of [offset, offset + length); _ReadFailed if they cannot be had."""
        source = self.source
        size = source.chunk_size
        first, last = offset // size, (offset + length - 1) // size
        self._note_first_reads(first, last)
        missing = [
            index
            for index in range(first, last + 1)
            if not source.is_zero(index) and not source.is_ready(index)
        ]
        if missing:
            await self._wait_ready(missing)
        # Zero chunks are made here; each run of stored chunks is one read from the source.
        end = offset + length
        parts: list[bytes] = []
        run_start: int | None = None
        for index in range(first, last + 1):
            lo = max(offset, index * size)
            if not source.is_zero(index):
                if run_start is None:
                    run_start = lo
                continue
            if run_start is not None:
                parts.append(await self._read_run(run_start, lo - run_start))
                run_start = None
            parts.append(bytes(min(end, (index + 1) * size) - lo))
        if run_start is not None:
            parts.append(await self._read_run(run_start, end - run_start))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _wait_ready(self, missing: list[int]) -> None:
        """Wait until every chunk in `missing` is verified and stored (all asked for at once)."""
        failures: list[_ReadFailed] = []

        async def wait(index: int, cancel_scope: trio.CancelScope) -> None:
            try:
                await self.source.wait_ready(index)
            except ChunkUnavailable as exc:
                failures.append(_ReadFailed(index, str(exc) or "chunk unavailable"))
                cancel_scope.cancel()

        try:
            with trio.fail_after(self.read_timeout):
                async with trio.open_nursery() as nursery:
                    for index in missing:
                        nursery.start_soon(wait, index, nursery.cancel_scope)
        except trio.TooSlowError:
            index = next((i for i in missing if not self.source.is_ready(i)), missing[0])
            raise _ReadFailed(
                index,
                f"not verified within {self.read_timeout:g}s: {self.source.why_missing(index)}",
            ) from None
        if failures:
            raise failures[0]

    async def _read_run(self, offset: int, length: int) -> bytes:
        index = offset // self.source.chunk_size
        try:
            data = await self.source.read(offset, length)
        except (ChunkUnavailable, OSError, StoreError) as exc:
            raise _ReadFailed(index, f"reading the store failed: {exc}") from exc
        if len(data) != length:
            raise _ReadFailed(index, f"the store returned {len(data)} of {length} bytes")
        return bytes(data)
