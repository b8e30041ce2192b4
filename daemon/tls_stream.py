"""A TLS stream for trio on `ssl.SSLObject` and memory BIOs, made for bulk chunk traffic.

trio's own SSLStream returns one TLS record (at most 16 KiB) per `receive_some`, each through
locks and a retry loop: a 2 MiB chunk took 128 trips through Python. Here one `receive_some`
reads up to 256 KiB from the socket and decrypts every record it completed, so a chunk costs a
handful of trips; OpenSSL does the cipher work either way.

One task may receive while another sends (a peer link's reader and writer): SSLObject calls
never span an await, and encrypted bytes leave in the order they were produced (one FIFO lock).
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Literal

import trio

# Bytes read from the socket per refill: many records at once, few wake-ups.
TRANSPORT_READ = 256 << 10
# What `receive_some()` returns at most when the caller names no limit.
DEFAULT_RECEIVE = 1 << 20
# What a dying transport raises while we say goodbye.
_DYING = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class TlsStream(trio.abc.Stream):
    """TLS over `transport` (client or server side); call `do_handshake` before anything else."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.transport_stream = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        self._send_lock = trio.Lock()  # FIFO: ciphertext leaves in the order it was made
        self._receive_guard = trio.Lock()
        self._transport_eof = False
        self._closed = False

    # -- identity ------------------------------------------------------------------------------

    def getpeercert(self, binary_form: Literal[True]) -> bytes | None:
        """The peer's certificate in DER, as ssl.SSLObject.getpeercert(True) gives it."""
        return self._ssl.getpeercert(binary_form=binary_form)

    # -- handshake -----------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake; BrokenResourceError (from the ssl error) if it fails."""
        while True:
            try:
                self._ssl.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False  # awaited below, outside the handler: no ssl error as context
            except ssl.SSLError as exc:
                failure = exc
                break
            await self._flush()
            if done:
                return
            await self._refill()
        await self._flush_quietly()  # the alert tells the peer why
        raise trio.BrokenResourceError(f"TLS handshake failed: {failure}") from failure

    # -- sending -------------------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        try:
            if len(data):
                self._ssl.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS write failed: {exc}") from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def _flush(self) -> None:
        data = self._outgoing.read()
        async with self._send_lock:
            if data:
                await self.transport_stream.send_all(data)

    async def _flush_quietly(self) -> None:
        data = self._outgoing.read()
        if not data:
            return
        with trio.move_on_after(1), contextlib.suppress(*_DYING):
            async with self._send_lock:
                await self.transport_stream.send_all(data)

    # -- receiving -----------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Decrypted bytes (at most `max_bytes`); b"" once the peer closed the TLS session."""
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        limit = DEFAULT_RECEIVE if max_bytes is None else max_bytes
        if limit < 1:
            raise ValueError("max_bytes must be at least 1")
        async with self._receive_guard:
            while True:
                parts = self._decrypt(limit)
                # A read may owe the peer an answer (a KeyUpdate). Never wait for a busy sender
                # here: both ends' readers would then wait on writers that wait on readers.
                if self._outgoing.pending and not self._send_lock.locked():
                    await self._flush()
                if parts is None:
                    return b""
                if parts:
                    return parts[0] if len(parts) == 1 else b"".join(parts)
                await self._refill()

    def _decrypt(self, limit: int) -> list[bytes] | None:
        """Every decrypted byte available now (up to `limit`); None at a clean TLS close."""
        parts: list[bytes] = []
        got = 0
        while got < limit:
            try:
                part = self._ssl.read(limit - got)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                return parts or None
            except ssl.SSLError as exc:
                if parts:
                    break  # hand over what arrived; the error comes back on the next call
                raise trio.BrokenResourceError(f"TLS read failed: {exc}") from exc
            if not part:
                return parts or None
            parts.append(part)
            got += len(part)
        return parts

    async def _refill(self) -> None:
        if self._transport_eof:
            raise trio.BrokenResourceError("the peer closed the connection without a TLS close")
        data = await self.transport_stream.receive_some(TRANSPORT_READ)
        if not data:
            self._transport_eof = True
            self._incoming.write_eof()
            return
        self._incoming.write(data)

    # -- closing -------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Say close_notify if we can (briefly), then close the transport."""
        if self._closed:
            return
        self._closed = True
        try:
            with trio.move_on_after(1 if self._ssl.version() else 0), contextlib.suppress(*_DYING):
                # Our close_notify goes out; we do not wait for the peer's (SSLWantReadError).
                with contextlib.suppress(ssl.SSLError):
                    self._ssl.unwrap()
                await self._flush()
        finally:
            await self.transport_stream.aclose()


__all__ = ["DEFAULT_RECEIVE", "TRANSPORT_READ", "TlsStream"]
