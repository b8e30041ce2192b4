"""Caps on TCP connections per remote IP address, inbound and outbound together.

The total is `ConnectionBudget`'s (download.py); this one stops a single address from taking all
of it. Counted synchronously on the trio thread: acquire on accept or dial, release on close.
"""

from __future__ import annotations

import socket

import trio

from .tls_stream import TlsStream

DEFAULT_PER_ADDRESS = 32


class AddressLimits:
    """At most `per_address` connections to or from any one host (IP address)."""

    def __init__(self, per_address: int = DEFAULT_PER_ADDRESS) -> None:
        if per_address < 1:
            raise ValueError(f"connections per address must be at least 1, got {per_address}")
        self.per_address = per_address
        self._counts: dict[str, int] = {}

    def try_acquire(self, host: str) -> bool:
        count = self._counts.get(host, 0)
        if count >= self.per_address:
            return False
        self._counts[host] = count + 1
        return True

    def release(self, host: str) -> None:
        count = self._counts.get(host, 0) - 1
        if count > 0:
            self._counts[host] = count
        else:
            self._counts.pop(host, None)

    def count(self, host: str) -> int:
        return self._counts.get(host, 0)


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The TCP socket under a stream (also under TLS), or None (a test's memory stream)."""
    while isinstance(stream, trio.SSLStream | TlsStream):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    return sock if isinstance(sock, trio.socket.SocketType) else None


async def hung_up_silently(stream: trio.abc.Stream) -> bool:
    """Wait for a new connection's first byte without taking it; True if the client closed
    first (a port probe or health check: not worth a refusal in the log)."""
    sock = socket_of(stream)
    if sock is None:
        return False
    try:
        return await sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def remote_host(stream: trio.abc.Stream) -> str | None:
    """The IP address at the other end of a socket stream (IPv4-mapped IPv6 unmapped)."""
    sock = socket_of(stream)
    if sock is None:
        return None
    try:
        name = sock.getpeername()
    except OSError:
        return None
    if not isinstance(name, tuple) or not name:
        return None
    host = str(name[0])
    if host.startswith("::ffff:") and sock.family == socket.AF_INET6:
        return host[len("::ffff:") :]
    return host


__all__ = ["DEFAULT_PER_ADDRESS", "AddressLimits", "remote_host"]
