"""RPC over trio streams: a client that makes one call at a time, and a server loop for handlers."""

from __future__ import annotations

import itertools
import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import trio

from ..swarm.errors import LocalProtocolError, RemoteProtocolError
from ..swarm.messages import Goodbye, KeepAlive
from ..swarm.rpc import Call, Fail, Notice, Reply, RpcConnection, RpcEvent, RpcSide
from .coded_error import CodedError
from .tls import TlsRole
from .tls import connect as tls_connect

log = logging.getLogger(__name__)

RECEIVE_SIZE = 1 << 16
# What a broken or misbehaving link raises out of a call: the other side is gone or confused.
LINK_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    RemoteProtocolError,
    LocalProtocolError,
)
NoticeCallback = Callable[[str, dict[str, Any]], None]


class RpcError(CodedError):
    """A call failed; `code` is machine-readable, the message is for the operator."""


class Notifier:
    """Lets a handler stream progress to its caller before it returns."""

    def __init__(self, send: Callable[[str, dict[str, Any]], Awaitable[None]]) -> None:
        self._send = send

    async def notify(self, event: str, data: dict[str, Any]) -> None:
        await self._send(event, data)


Handler = Callable[[dict[str, Any], Notifier], Awaitable[dict[str, Any]]]


async def _next_event(stream: trio.abc.ReceiveStream, conn: RpcConnection) -> RpcEvent | None:
    """The next message, or None when the other side closed cleanly."""
    while True:
        event = conn.next_event()
        if event == "closed":
            return None
        if event == "need-data":
            conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
            continue
        assert not isinstance(event, str)
        return event


class RpcClient:
    """One RPC session; calls are made one after another."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._conn = RpcConnection(RpcSide.CLIENT)
        self._ids = itertools.count(1)
        self._lock = trio.Lock()

    @classmethod
    async def connect_tcp(
        cls,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        allowed: Collection[TlsRole] | None = None,
    ) -> RpcClient:
        """A session over TCP; with `tls`, mutual TLS to a peer of an `allowed` role (TlsError)."""
        stream = await trio.open_tcp_stream(host, port)
        if tls is None:
            return cls(stream)
        session, _ = await tls_connect(stream, tls, allowed=allowed)
        return cls(session)

    @classmethod
    async def connect_unix(cls, path: str) -> RpcClient:
        return cls(await trio.open_unix_socket(path))

    async def call(
        self, method: str, params: dict[str, Any], on_notice: NoticeCallback | None = None
    ) -> dict[str, Any]:
        """Run `method` remotely; RpcError on Fail, RemoteProtocolError/OSError on a broken link."""
        async with self._lock:
            call_id = next(self._ids)
            await self._stream.send_all(self._conn.send(Call(call_id, method, params)))
            while True:
                event = await _next_event(self._stream, self._conn)
                if event is None:
                    raise RemoteProtocolError(f"server closed the connection during {method}")
                if isinstance(event, Notice):
                    if on_notice is not None:
                        on_notice(event.event, event.data)
                elif isinstance(event, Reply):
                    return event.result
                elif isinstance(event, Fail):
                    raise RpcError(event.code, event.message)
                elif isinstance(event, Goodbye):
                    raise RemoteProtocolError(f"server said goodbye: {event.reason}")

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                if self._conn.current_call is None:
                    await self._stream.send_all(self._conn.send(Goodbye("done")))
            except (
                OSError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                LocalProtocolError,
            ):
                pass
            await self._stream.aclose()

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def serve_rpc(
    stream: trio.abc.Stream,
    handlers: Mapping[str, Handler],
    *,
    first_bytes: bytes = b"",
    idle_timeout: float = math.inf,
) -> None:
    """Answer calls on `stream` until the client leaves; protocol errors end the session, and
    so does waiting more than `idle_timeout` seconds for the next call (a call may run longer)."""
    conn = RpcConnection(RpcSide.SERVER)
    if first_bytes:
        conn.receive_data(first_bytes)
    send_lock = trio.Lock()

    async def send(message: Notice | Reply | Fail | Goodbye | KeepAlive) -> None:
        async with send_lock:
            await stream.send_all(conn.send(message))

    try:
        while True:
            with trio.move_on_after(idle_timeout) as idle:
                event = await _next_event(stream, conn)
            if idle.cancelled_caught:
                log.info("closing an RPC session idle for %gs", idle_timeout)
                return
            if event is None or isinstance(event, Goodbye):
                return
            if not isinstance(event, Call):
                continue
            call = event
            handler = handlers.get(call.method)
            if handler is None:
                await send(Fail(call.call_id, "unknown_method", f"no method {call.method!r}"))
                continue

            async def notice(name: str, data: dict[str, Any], call_id: int = call.call_id) -> None:
                await send(Notice(call_id, name, data))

            try:
                result = await handler(call.params, Notifier(notice))
            except RpcError as exc:
                await send(Fail(call.call_id, exc.code, exc.message[:4000]))
            except (KeyError, TypeError, ValueError) as exc:
                await send(Fail(call.call_id, "bad_request", f"{call.method}: {exc}"[:4000]))
            else:
                await send(Reply(call.call_id, result))
    except RemoteProtocolError as exc:
        log.warning("dropping RPC client: %s", exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
