"""The NBD export against real clients (qemu-io, qemu-img) and a raw socket client.

An in-memory `FakeSource` stands in for a download: chunks become ready when a test says so,
and every read it serves is checked to touch ready or zero chunks only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import trio
from vmswarm.daemon.nbd_export import ChunkUnavailable, NbdExport, NbdExportError
from vmswarm.swarm import nbd

NAME = "tiny-template"
CS = 64 << 10  # chunk size
WAIT = 20.0  # a guard against hanging, never a measurement
WHY = "no connected peer holds it"


class FakeSource:
    """A template in memory; chunks outside `ready` arrive when `mark_ready` is called."""

    def __init__(
        self,
        data: bytes,
        *,
        ready: Iterable[int] | None = None,
        unavailable: dict[int, str] | None = None,
    ) -> None:
        self.data = data
        self.count = -(-len(data) // CS)
        chunks = [data[i * CS : (i + 1) * CS] for i in range(self.count)]
        self.zero = {i for i, chunk in enumerate(chunks) if not any(chunk)}
        self.ready = set(range(self.count)) if ready is None else set(ready)
        self.unavailable = unavailable or {}
        self.waited: list[int] = []
        self.violations: list[str] = []
        self._events: dict[int, trio.Event] = {}

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def chunk_size(self) -> int:
        return CS

    def is_zero(self, index: int) -> bool:
        return index in self.zero

    def is_ready(self, index: int) -> bool:
        return index in self.ready

    def _event(self, index: int) -> trio.Event:
        return self._events.setdefault(index, trio.Event())

    async def wait_ready(self, index: int) -> None:
        self.waited.append(index)
        if index in self.unavailable:
            raise ChunkUnavailable(self.unavailable[index])
        if index not in self.ready:
            await self._event(index).wait()

    def mark_ready(self, index: int) -> None:
        self.ready.add(index)
        self._event(index).set()

    async def read(self, offset: int, length: int) -> bytes:
        for index in range(offset // CS, (offset + length - 1) // CS + 1):
            if index not in self.ready:
                self.violations.append(f"read of chunk {index}, which is not ready")
            if index in self.zero:
                self.violations.append(f"read of zero chunk {index} from the store")
        await trio.lowlevel.checkpoint()
        return self.data[offset : offset + length]

    def why_missing(self, index: int) -> str:
        return WHY


def patterned(count: int, zero: Iterable[int] = (), tail: int = CS) -> bytes:
    """Chunk i filled with byte i + 1 (zero chunks all 0); the last chunk `tail` bytes long."""
    zeros = set(zero)
    chunks = [bytes([0 if i in zeros else i + 1]) * CS for i in range(count)]
    chunks[-1] = chunks[-1][:tail]
    return b"".join(chunks)


@contextlib.asynccontextmanager
async def serving(source: FakeSource, path: Path, **options: Any) -> AsyncIterator[NbdExport]:
    export = NbdExport(source, path, export_name=NAME, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(export.serve)
        yield export
        nursery.cancel_scope.cancel()


def uri(path: Path) -> str:
    return f"nbd+unix:///?socket={path}"


async def qemu_io(path: Path, *commands: str, read_only: bool = True) -> tuple[int, str]:
    argv = ["qemu-io", "-f", "raw", *(["-r"] if read_only else []), uri(path)]
    for command in commands:
        argv += ["-c", command]
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, (done.stdout + done.stderr).decode()


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT):
        while True:
            if condition():
                return
            await trio.sleep(0.01)


# -- a raw client -----------------------------------------------------------------------------


async def receive_exactly(stream: trio.SocketStream, count: int) -> bytes:
    buf = bytearray()
    while len(buf) < count:
        data = await stream.receive_some(count - len(buf))
        if not data:
            raise EOFError(f"end of stream after {len(buf)} of {count} bytes")
        buf += data
    return bytes(buf)


async def closed_by_server(stream: trio.SocketStream) -> bool:
    """Whether the server closes the connection (all it still sends is drained)."""
    with trio.fail_after(WAIT):
        while True:
            try:
                data = await stream.receive_some(1 << 16)
            except trio.BrokenResourceError:
                return True
            if not data:
                return True


async def raw_client(path: Path) -> trio.SocketStream:
    """A client through NBD_OPT_GO, ready for requests."""
    stream = await trio.open_unix_socket(str(path))
    greeting = await receive_exactly(stream, nbd.GREETING.size)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    name = NAME.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    await stream.send_all(
        struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
        + nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.OPT_GO, len(data))
        + data
    )
    while True:
        _, _, kind, length = nbd.OPTION_REPLY_HEADER.unpack(
            await receive_exactly(stream, nbd.OPTION_REPLY_HEADER.size)
        )
        await receive_exactly(stream, length)
        if kind == nbd.REP_ACK:
            return stream
        assert kind == nbd.REP_INFO


async def send_request(
    stream: trio.SocketStream,
    command: int,
    handle: int,
    offset: int = 0,
    length: int = 0,
    payload: bytes = b"",
) -> None:
    header = nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, command, handle, offset, length)
    await stream.send_all(header + payload)


async def receive_reply(
    stream: trio.SocketStream, lengths: dict[int, int]
) -> tuple[int, int, bytes]:
    """(handle, error, data); `lengths` maps the handles of reads to their lengths."""
    magic, error, handle = nbd.SIMPLE_REPLY.unpack(
        await receive_exactly(stream, nbd.SIMPLE_REPLY.size)
    )
    assert magic == nbd.SIMPLE_REPLY_MAGIC
    length = lengths.get(handle, 0) if error == 0 else 0
    return handle, error, await receive_exactly(stream, length)


async def raw_read(stream: trio.SocketStream, offset: int, length: int, handle: int = 1) -> bytes:
    await send_request(stream, nbd.CMD_READ, handle, offset, length)
    got, error, data = await receive_reply(stream, {handle: length})
    assert (got, error) == (handle, 0)
    return data


# -- real clients -----------------------------------------------------------------------------


async def test_qemu_io_reads_patterns_and_zeros(qemu: None, short_dir: Path) -> None:
    source = FakeSource(patterned(16, zero=[3, 9]))
    async with serving(source, short_dir / "e.sock") as export:
        code, out = await qemu_io(
            short_dir / "e.sock",
            f"read -P 0x02 {CS} 4096",
            f"read -P 0x0b {10 * CS + 512} {CS - 512}",
            f"read -P 0x00 {3 * CS} {CS}",
            f"read -P 0x10 {16 * CS - 512} 512",
        )
        assert code == 0, out
        assert "Pattern verification failed" not in out
        assert out.count("read ") == 4
        assert export.reads == 4
        assert export.eio_count == 0
    assert source.violations == []


async def test_qemu_img_convert_copies_the_whole_export(qemu: None, short_dir: Path) -> None:
    rng = random.Random(8)
    chunks = [bytes(CS) if i in (0, 5, 6) else rng.randbytes(CS) for i in range(12)]
    data = b"".join(chunks)[: 11 * CS + 4096]  # a short last chunk
    source = FakeSource(data)
    async with serving(source, short_dir / "e.sock") as export:
        done = await trio.run_process(
            [
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                uri(short_dir / "e.sock"),
                str(short_dir / "out.raw"),
            ],
            capture_stderr=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert (short_dir / "out.raw").read_bytes() == data
        assert export.bytes_read >= len(data) - 3 * CS  # qemu may skip zero ranges it finds
        assert export.eio_count == 0
    assert source.violations == []


async def test_qemu_img_info_reports_the_size(qemu: None, short_dir: Path) -> None:
    source = FakeSource(patterned(7, tail=512))
    async with serving(source, short_dir / "e.sock"):
        done = await trio.run_process(
            ["qemu-img", "info", "--output=json", uri(short_dir / "e.sock")],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["virtual-size"] == 6 * CS + 512
    assert info["format"] == "raw"


async def test_writes_are_refused(qemu: None, short_dir: Path) -> None:
    source = FakeSource(patterned(4))
    path = short_dir / "e.sock"
    async with serving(source, path):
        # qemu sees NBD_FLAG_READ_ONLY and refuses to write (or even to open read-write).
        code, out = await qemu_io(path, "write -P 0x11 0 512", read_only=False)
        assert code != 0
        assert "Permission denied" in out or "read-only" in out, out
        code, out = await qemu_io(path, "write -P 0x11 0 512")
        assert code != 0
        assert "read-only" in out, out
        # A client that writes anyway gets EPERM, and its payload is not taken for requests.
        stream = await raw_client(path)
        payload = nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 0, 0, 0) * 100
        await send_request(stream, nbd.CMD_WRITE, 1, 0, len(payload), payload)
        assert await receive_reply(stream, {}) == (1, nbd.EPERM, b"")
        await send_request(stream, nbd.CMD_TRIM, 2, 0, 512)
        assert await receive_reply(stream, {}) == (2, nbd.EPERM, b"")
        await send_request(stream, nbd.CMD_WRITE_ZEROES, 3, 0, 512)
        assert await receive_reply(stream, {}) == (3, nbd.EPERM, b"")
        await send_request(stream, nbd.CMD_FLUSH, 4)
        assert await receive_reply(stream, {}) == (4, 0, b"")
        assert await raw_read(stream, CS, 16) == b"\x02" * 16
        await stream.aclose()
    assert source.data == patterned(4)


async def test_a_read_of_a_missing_chunk_waits_until_it_is_verified(
    qemu: None, short_dir: Path
) -> None:
    source = FakeSource(patterned(8), ready=[0, 1, 2, 3, 4, 6, 7])
    async with serving(source, short_dir / "e.sock") as export, trio.open_nursery() as nursery:
        result: list[tuple[int, str]] = []

        async def read() -> None:
            result.append(await qemu_io(short_dir / "e.sock", f"read -P 0x06 {5 * CS + 100} 1000"))

        nursery.start_soon(read)
        await until(lambda: source.waited == [5])
        await trio.sleep(0.1)  # the read is parked, not answered
        assert result == []
        assert export.reads == 0
        source.mark_ready(5)
        await until(lambda: bool(result))
        code, out = result[0]
        assert code == 0, out
        assert "read 1000/1000 bytes" in out
        assert "Pattern verification failed" not in out
    assert source.violations == []


async def test_a_chunk_that_never_arrives_gets_eio_and_a_logged_reason(
    qemu: None, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = FakeSource(patterned(8), ready=[0, 1])
    with caplog.at_level(logging.WARNING, logger="vmswarm.daemon.nbd_export"):
        async with serving(source, short_dir / "e.sock", read_timeout=0.3) as export:
            code, out = await qemu_io(short_dir / "e.sock", f"read {6 * CS} 4096")
            assert code != 0
            assert "Input/output error" in out, out
            assert export.eio_count >= 1
            # The export still serves what it has.
            code, out = await qemu_io(short_dir / "e.sock", f"read -P 0x02 {CS} 4096")
            assert code == 0, out
    lines = [r.getMessage() for r in caplog.records if "EIO" in r.getMessage()]
    assert lines
    assert all("chunk 6" in line and WHY in line for line in lines), lines
    assert caplog.records[-1].chunk == 6  # type: ignore[attr-defined]
    assert source.violations == []


async def test_a_chunk_the_source_gives_up_on_gets_eio_at_once(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = FakeSource(patterned(8), ready=[0], unavailable={2: "every copy failed verification"})
    with caplog.at_level(logging.WARNING, logger="vmswarm.daemon.nbd_export"):
        async with serving(source, short_dir / "e.sock", read_timeout=WAIT * 10) as export:
            stream = await raw_client(short_dir / "e.sock")
            # Chunks 1..3: 2 fails, so the read fails even though 1 and 3 would arrive.
            await send_request(stream, nbd.CMD_READ, 9, CS, 3 * CS)
            with trio.fail_after(WAIT):
                assert await receive_reply(stream, {9: 3 * CS}) == (9, nbd.EIO, b"")
            assert export.eio_count == 1
            await stream.aclose()
    assert sorted(source.waited) == [1, 2, 3]
    assert any(
        "chunk 2" in r.getMessage() and "every copy failed verification" in r.getMessage()
        for r in caplog.records
    )


async def test_zero_chunks_are_answered_without_waiting(qemu: None, short_dir: Path) -> None:
    source = FakeSource(patterned(8, zero=[2, 3, 4]), ready=[])
    async with serving(source, short_dir / "e.sock", read_timeout=WAIT * 10) as export:
        code, out = await qemu_io(short_dir / "e.sock", f"read -P 0x00 {2 * CS + 7} {3 * CS - 7}")
        assert code == 0, out
        assert export.eio_count == 0
    assert source.waited == []
    assert source.violations == []


async def test_a_read_across_zero_ready_and_missing_chunks(short_dir: Path) -> None:
    data = patterned(8, zero=[3])
    source = FakeSource(data, ready=[2, 5, 6])
    async with serving(source, short_dir / "e.sock") as export, trio.open_nursery() as nursery:
        stream = await raw_client(short_dir / "e.sock")
        got: list[bytes] = []

        async def read() -> None:
            got.append(await raw_read(stream, 2 * CS + 10, 4 * CS))

        nursery.start_soon(read)
        await until(lambda: sorted(source.waited) == [4])
        source.mark_ready(4)
        await until(lambda: bool(got))
        assert got == [data[2 * CS + 10 : 6 * CS + 10]]
        assert export.bytes_read == 4 * CS
        await stream.aclose()
    assert source.violations == []


async def test_requests_on_one_connection_are_answered_concurrently(short_dir: Path) -> None:
    source = FakeSource(patterned(4), ready=[0, 1, 3])
    async with serving(source, short_dir / "e.sock"):
        stream = await raw_client(short_dir / "e.sock")
        await send_request(stream, nbd.CMD_READ, 1, 2 * CS, 100)  # waits for chunk 2
        await send_request(stream, nbd.CMD_READ, 2, 3 * CS, 100)
        await send_request(stream, nbd.CMD_FLUSH, 3)
        lengths = {1: 100, 2: 100}
        with trio.fail_after(WAIT):
            first = await receive_reply(stream, lengths)
            second = await receive_reply(stream, lengths)
        assert sorted([first, second]) == [(2, 0, b"\x04" * 100), (3, 0, b"")]
        source.mark_ready(2)
        with trio.fail_after(WAIT):
            assert await receive_reply(stream, lengths) == (1, 0, b"\x03" * 100)
        await stream.aclose()


async def test_disc_waits_for_the_reads_in_flight(short_dir: Path) -> None:
    source = FakeSource(patterned(4), ready=[0])
    async with serving(source, short_dir / "e.sock") as export:
        stream = await raw_client(short_dir / "e.sock")
        await send_request(stream, nbd.CMD_READ, 1, CS, 10)
        await send_request(stream, nbd.CMD_DISC, 2)
        await until(lambda: source.waited == [1])
        source.mark_ready(1)
        with trio.fail_after(WAIT):
            assert await receive_reply(stream, {1: 10}) == (1, 0, b"\x02" * 10)
        assert await closed_by_server(stream)
        await until(lambda: export.clients == 0)
        assert export.clients_dropped == 0


# -- bad clients ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff",  # unknown client flags
        struct.pack(">I", 3) + b"NOTANOPTION-MAGIC" + bytes(8),
        struct.pack(">I", 3) + nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.OPT_GO, 1 << 20),
        struct.pack(">I", 3)
        + nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 3)
        + b"bad",
    ],
)
async def test_a_client_sending_garbage_is_dropped_while_another_keeps_working(
    short_dir: Path, garbage: bytes
) -> None:
    path = short_dir / "e.sock"
    source = FakeSource(patterned(4))
    async with serving(source, path) as export:
        good = await raw_client(path)
        bad = await trio.open_unix_socket(str(path))
        await receive_exactly(bad, nbd.GREETING.size)
        await bad.send_all(garbage)
        assert await closed_by_server(bad)
        await until(lambda: export.clients_dropped == 1)
        assert await raw_read(good, 3 * CS, 64) == b"\x04" * 64
        # A client already in transmission that breaks the protocol is dropped too.
        worse = await raw_client(path)
        await worse.send_all(b"\x00" * nbd.REQUEST.size)
        assert await closed_by_server(worse)
        await until(lambda: export.clients_dropped == 2)
        assert await raw_read(good, 0, 64, handle=2) == b"\x01" * 64
        await good.aclose()


async def test_a_silent_client_is_dropped_after_the_handshake_timeout(short_dir: Path) -> None:
    source = FakeSource(patterned(2))
    async with serving(source, short_dir / "e.sock", handshake_timeout=0.2) as export:
        stream = await trio.open_unix_socket(str(short_dir / "e.sock"))
        assert await closed_by_server(stream)
        assert export.clients_dropped == 1
        # A client that has negotiated may stay idle for as long as it likes.
        idle = await raw_client(short_dir / "e.sock")
        await trio.sleep(0.4)
        assert await raw_read(idle, 0, 8) == b"\x01" * 8
        await idle.aclose()


async def test_clients_over_the_limit_are_refused(short_dir: Path) -> None:
    source = FakeSource(patterned(2))
    async with serving(source, short_dir / "e.sock", max_clients=1) as export:
        first = await raw_client(short_dir / "e.sock")
        extra = await trio.open_unix_socket(str(short_dir / "e.sock"))
        assert await closed_by_server(extra)
        assert await raw_read(first, 0, 8) == b"\x01" * 8
        await first.aclose()
        await until(lambda: export.clients == 0)
        again = await raw_client(short_dir / "e.sock")
        assert await raw_read(again, CS, 8) == b"\x02" * 8
        await again.aclose()
        assert export.clients_total == 2


# -- the prefetch profile hook ----------------------------------------------------------------


async def test_on_first_read_sees_each_chunk_once_in_first_read_order(short_dir: Path) -> None:
    seen: list[int] = []
    source = FakeSource(patterned(10, zero=[8]))
    async with serving(source, short_dir / "e.sock", on_first_read=seen.append):
        stream = await raw_client(short_dir / "e.sock")
        await raw_read(stream, 7 * CS, 10)
        await raw_read(stream, 2 * CS + 5, 10)
        await raw_read(stream, 7 * CS + 100, 10)
        await raw_read(stream, CS, 3 * CS)  # chunks 1, 2, 3
        await raw_read(stream, 8 * CS, 10)  # a zero chunk counts too
        await stream.aclose()
        other = await raw_client(short_dir / "e.sock")
        await raw_read(other, 0, 2 * CS)  # 0 is new, 1 is not, whoever reads it
        await other.aclose()
    assert seen == [7, 2, 1, 3, 8, 0]


async def test_a_failing_on_first_read_does_not_fail_the_read(short_dir: Path) -> None:
    def broken(index: int) -> None:
        raise RuntimeError("recorder bug")

    source = FakeSource(patterned(2))
    async with serving(source, short_dir / "e.sock", on_first_read=broken):
        stream = await raw_client(short_dir / "e.sock")
        assert await raw_read(stream, 0, 8) == b"\x01" * 8
        await stream.aclose()


# -- the socket file --------------------------------------------------------------------------


async def test_socket_mode_stale_file_and_cleanup(short_dir: Path) -> None:
    path = short_dir / "nbd" / "e.sock"
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))
    source = FakeSource(patterned(2))
    async with serving(source, path):
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o666
        stream = await raw_client(path)
        assert await raw_read(stream, 0, 8) == b"\x01" * 8
        await stream.aclose()
    assert not await trio.Path(path).exists()


async def test_a_path_that_is_not_a_socket_is_refused(short_dir: Path) -> None:
    path = short_dir / "e.sock"
    path.write_bytes(b"precious")
    export = NbdExport(FakeSource(patterned(2)), path, export_name=NAME)
    with pytest.raises(NbdExportError, match="not a socket"):
        await export.serve()
    assert path.read_bytes() == b"precious"


def test_bad_settings_are_refused(short_dir: Path) -> None:
    source = FakeSource(patterned(2))
    for options in ({"read_timeout": 0}, {"max_clients": 0}, {"max_in_flight": 0}):
        with pytest.raises(ValueError):
            NbdExport(source, short_dir / "e.sock", export_name=NAME, **options)  # type: ignore[arg-type]
