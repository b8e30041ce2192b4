"""TlsStream: bulk bytes both ways at once, clean and abrupt ends, limits, over real sockets."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from vmswarm.daemon import tls
from vmswarm.daemon.pki import CA_CERT_NAME, TlsRole, init_ca, issue
from vmswarm.daemon.tls_stream import TlsStream

PAYLOAD = 6 << 20

Lab = dict[TlsRole, tls.TlsMaterial]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """A CA with a storage and a host certificate."""
    ca: Path = tmp_path_factory.mktemp("pki")
    init_ca(ca)
    made = {role: issue(ca, role, role.value) for role in (TlsRole.STORAGE, TlsRole.HOST)}
    return {
        role: tls.check_files(tls.TlsFiles(ca / CA_CERT_NAME, files.cert, files.key))
        for role, files in made.items()
    }


@asynccontextmanager
async def tls_pair(lab: Lab) -> AsyncIterator[tuple[TlsStream, TlsStream]]:
    """A server and a client TlsStream joined over a loopback TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server_context = tls.server_context(lab[TlsRole.STORAGE])
    client_context = tls.client_context(lab[TlsRole.HOST])
    async with trio.open_nursery() as nursery:
        accepted: list[TlsStream] = []

        async def accept_one() -> None:
            raw = await listeners[0].accept()
            accepted.append((await tls.accept(raw, server_context))[0])

        nursery.start_soon(accept_one)
        raw = await trio.open_tcp_stream("127.0.0.1", port)
        client, identity = await tls.connect(raw, client_context)
        assert identity.role.value == "storage"
    await listeners[0].aclose()
    try:
        yield accepted[0], client
    finally:
        await accepted[0].aclose()
        await client.aclose()


async def receive_exactly(stream: TlsStream, count: int) -> bytes:
    parts = bytearray()
    while len(parts) < count:
        data = await stream.receive_some(256 << 10)
        assert data, "the stream ended early"
        parts += data
    return bytes(parts)


async def test_bulk_bytes_both_ways_at_once_arrive_intact(lab: Lab) -> None:
    up, down = os.urandom(PAYLOAD), os.urandom(PAYLOAD // 2)
    async with tls_pair(lab) as (server, client):
        got: dict[str, bytes] = {}
        async with trio.open_nursery() as nursery:

            async def send_in_pieces(stream: TlsStream, data: bytes) -> None:
                view = memoryview(data)
                for start in range(0, len(data), 1 << 20):
                    await stream.send_all(view[start : start + (1 << 20)])

            async def collect(name: str, stream: TlsStream, count: int) -> None:
                got[name] = await receive_exactly(stream, count)

            nursery.start_soon(send_in_pieces, client, up)
            nursery.start_soon(send_in_pieces, server, down)
            nursery.start_soon(collect, "server", server, len(up))
            nursery.start_soon(collect, "client", client, len(down))
        assert got["server"] == up and got["client"] == down


async def test_receive_respects_max_bytes(lab: Lab) -> None:
    async with tls_pair(lab) as (server, client):
        await client.send_all(b"x" * 100_000)
        first = await server.receive_some(10)
        assert first == b"x" * 10
        assert await receive_exactly(server, 100_000 - 10) == b"x" * 99_990
        with pytest.raises(ValueError):
            await server.receive_some(0)


async def test_a_clean_close_reads_as_end_of_stream(lab: Lab) -> None:
    async with tls_pair(lab) as (server, client):
        await client.send_all(b"last words")
        await client.aclose()
        assert await receive_exactly(server, 10) == b"last words"
        assert await server.receive_some() == b""
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"after close")


async def test_a_connection_cut_without_a_tls_close_is_a_broken_stream(lab: Lab) -> None:
    async with tls_pair(lab) as (server, client):
        await client.transport_stream.aclose()  # no close_notify: truncation, not an end
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()
