"""`GET /metrics` over a minimal HTTP/1.1 server on trio: one request per connection, no threads.

A client gets READ_TIMEOUT seconds to send its request head and read the answer, at most
MAX_REQUEST_BYTES of head, and at most MAX_CONNECTIONS are served at once, so a slow or hostile
client can hold neither the daemon nor the endpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..swarm.address import format_address

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
MAX_REQUEST_BYTES = 8192
READ_TIMEOUT = 10.0
MAX_CONNECTIONS = 16
# After answering: how long, and how many bytes, to drain a client's leftover input.
LINGER_SECONDS = 1.0
MAX_LINGER_BYTES = 1 << 16
_ALLOWED = "GET, HEAD"
_LINK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _BadRequest(Exception):
    """The request cannot be answered; args are (status, reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


def _response(
    status: int,
    reason: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    extra: tuple[tuple[str, str], ...] = (),
    head_only: bool = False,
) -> bytes:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *extra,
    ]
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("ascii") + b"\r\n" + (b"" if head_only else body)


def _error(status: int, reason: str, *, head_only: bool = False) -> bytes:
    extra = (("Allow", _ALLOWED),) if status == 405 else ()
    return _response(
        status, reason, f"{status} {reason}\n".encode(), extra=extra, head_only=head_only
    )


async def read_request_head(
    stream: trio.abc.ReceiveStream, limit: int = MAX_REQUEST_BYTES
) -> bytes:
    """The bytes up to the blank line ending the request head; _BadRequest if over `limit`."""
    data = bytearray()
    while True:
        end = data.find(b"\r\n\r\n")
        if end > limit:
            raise _BadRequest(431, "Request Header Fields Too Large")
        if end >= 0:
            return bytes(data[:end])
        if len(data) >= limit + 4:
            raise _BadRequest(431, "Request Header Fields Too Large")
        more = await stream.receive_some(limit + 4 - len(data))
        if not more:
            raise _BadRequest(400, "Bad Request")
        data += more


def parse_request_line(head: bytes) -> tuple[str, str]:
    """(method, path without query) of an HTTP/1.x request head; _BadRequest if malformed."""
    line = head.split(b"\r\n", 1)[0]
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise _BadRequest(400, "Bad Request") from None
    if not version.startswith("HTTP/1.") or not method.isalpha() or not target:
        raise _BadRequest(400, "Bad Request")
    return method, target.split("?", 1)[0]


def answer(method: str, path: str, registry: CollectorRegistry) -> bytes:
    """The whole response to a well-formed request."""
    head_only = method == "HEAD"
    if method not in ("GET", "HEAD"):
        return _error(405, "Method Not Allowed")
    if path != METRICS_PATH:
        return _error(404, "Not Found", head_only=head_only)
    body = generate_latest(registry)
    return _response(200, "OK", body, CONTENT_TYPE_LATEST, head_only=head_only)


async def _close_gently(stream: trio.SocketStream) -> None:
    """Half-close, then read what the client still sends (bounded) before closing.

    Closing a socket with unread input resets the connection, and the client would lose the
    answer it has not read yet (a 431 after an oversized head, say).
    """
    with contextlib.suppress(*_LINK_ERRORS), trio.move_on_after(LINGER_SECONDS):
        await stream.send_eof()
        drained = 0
        while drained < MAX_LINGER_BYTES:
            data = await stream.receive_some(1 << 14)
            if not data:
                break
            drained += len(data)
    await trio.aclose_forcefully(stream)


async def _serve_one(
    registry: CollectorRegistry, limiter: trio.CapacityLimiter, stream: trio.SocketStream
) -> None:
    try:
        limiter.acquire_nowait()
    except trio.WouldBlock:
        # Best effort: the client is told why, or simply dropped.
        with trio.move_on_after(LINGER_SECONDS), contextlib.suppress(*_LINK_ERRORS):
            await stream.send_all(_error(503, "Service Unavailable"))
        await _close_gently(stream)
        return
    try:
        with trio.move_on_after(READ_TIMEOUT):
            try:
                head = await read_request_head(stream)
                method, path = parse_request_line(head)
                reply = answer(method, path, registry)
            except _BadRequest as exc:
                reply = _error(exc.status, exc.reason)
            await stream.send_all(reply)
            await _close_gently(stream)
    except _LINK_ERRORS:
        pass  # the client went away; nothing to tell it
    finally:
        limiter.release()
        await trio.aclose_forcefully(stream)


async def serve_metrics(
    host: str,
    port: int,
    registry: CollectorRegistry,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `registry` at http://HOST:PORT/metrics until cancelled; `started` gets the address."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
    except OSError as exc:  # say which endpoint: the daemon's own port may be fine
        raise OSError(
            exc.errno, f"cannot serve metrics on {format_address(host, port)}: {exc.strerror}"
        ) from None
    sockname = listeners[0].socket.getsockname()
    bound = (str(sockname[0]), int(sockname[1]))
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    handler = functools.partial(_serve_one, registry, limiter)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        log.info("metrics at http://%s%s", format_address(*bound), METRICS_PATH)
        task_status.started(bound)


__all__ = [
    "MAX_REQUEST_BYTES",
    "METRICS_PATH",
    "READ_TIMEOUT",
    "answer",
    "parse_request_line",
    "read_request_head",
    "serve_metrics",
]
