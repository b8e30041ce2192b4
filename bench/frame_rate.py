"""Encode+decode rate of the peer framing, against raw memcpy and msgpack alone.

Run: python -m bench.frame_rate [--quick]
Chunk frames are fed to the receiver in 64 KiB slices, like a real recv loop.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
from vmswarm.swarm.connection import NEED_DATA, Connection
from vmswarm.swarm.messages import PROTOCOL_VERSION, Chunk, Handshake, Have, Role

from bench.report import emit

SLICE = 1 << 16
TEMPLATE = b"T" * 32
COLUMNS = ["case", "size", "items", "rate", "unit", "seconds"]


def _best(runs: int, work: Callable[[], None]) -> float:
    """Fastest of `runs` timings, the least noisy estimate on a shared machine."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def _linked_pair(
    chunk_count: int, allocate: Callable[[int], bytearray] = bytearray
) -> tuple[Connection, Connection]:
    """A storage sender and a host receiver, past the handshake."""
    sender = Connection(Role.STORAGE, chunk_count=chunk_count)
    receiver = Connection(Role.HOST, chunk_count=chunk_count, allocate=allocate)
    hello = Handshake(PROTOCOL_VERSION, TEMPLATE, b"S" * 16, None, Role.STORAGE)
    receiver.receive_data(sender.send(hello, now=0.0), now=0.0)
    assert receiver.next_event() == hello
    return sender, receiver


def _slices(blob: bytes, size: int) -> list[bytes]:
    return [blob[i : i + size] for i in range(0, len(blob), size)]


def _row(
    case: str, size: int, items: int, seconds: float, unit: str, volume: float
) -> dict[str, Any]:
    return {
        "case": case,
        "size": size,
        "items": items,
        "seconds": seconds,
        "unit": unit,
        "rate": volume / seconds if seconds > 0 else float("inf"),
    }


def control_rows(count: int, runs: int) -> list[dict[str, Any]]:
    """Messages per second for Have frames: msgpack alone, then our encode, decode and both."""
    chunk_count = 1 << 20
    messages = [Have(i % chunk_count) for i in range(count)]

    def msgpack_only() -> None:
        for i in range(count):
            msgpack.unpackb(msgpack.packb([i]))

    sender, _ = _linked_pair(chunk_count)
    blob = b"".join(sender.send(m, now=0.0) for m in messages)
    pieces = _slices(blob, SLICE)

    def encode() -> None:
        conn, _ = _linked_pair(chunk_count)
        for m in messages:
            conn.send(m, now=0.0)

    def decode() -> None:
        _, conn = _linked_pair(chunk_count)
        got = 0
        for piece in pieces:
            conn.receive_data(piece, now=0.0)
            while conn.next_event() is not NEED_DATA:
                got += 1
        assert got == count

    def both() -> None:
        tx, rx = _linked_pair(chunk_count)
        for m in messages:
            rx.receive_data(tx.send(m, now=0.0), now=0.0)
            rx.next_event()

    frame = len(blob) // count
    return [
        _row(
            "msgpack packb+unpackb (baseline)",
            frame,
            count,
            _best(runs, msgpack_only),
            "msg/s",
            count,
        ),
        _row("control encode", frame, count, _best(runs, encode), "msg/s", count),
        _row("control decode (64 KiB slices)", frame, count, _best(runs, decode), "msg/s", count),
        _row("control send->receive, one by one", frame, count, _best(runs, both), "msg/s", count),
    ]


def chunk_rows(chunk_size: int, total: int, runs: int) -> list[dict[str, Any]]:
    """MB/s for chunk frames of `chunk_size` fed in 64 KiB slices, with memcpy baselines."""
    count = max(1, total // chunk_size)
    payload = bytes(range(256)) * (chunk_size // 256) + bytes(chunk_size % 256)
    sender, _ = _linked_pair(count)
    # What the socket would hand the receiver: one frame, in recv-sized pieces.
    pieces = _slices(sender.send(Chunk(0, payload), now=0.0), SLICE)
    megabytes = count * chunk_size / 1e6

    def copy_into_bytearray() -> None:
        for _ in range(count):
            buf = bytearray()
            for piece in pieces:
                buf += piece
            bytes(buf)

    def bytes_join() -> None:
        for _ in range(count):
            b"".join(pieces)

    def pipeline(allocate: Callable[[int], bytearray]) -> Callable[[], None]:
        def work() -> None:
            tx, rx = _linked_pair(count, allocate)
            for i in range(count):
                tx.send_parts(Chunk(i, payload), now=0.0)
                got = None
                for piece in pieces:
                    rx.receive_data(piece, now=0.0)
                    event = rx.next_event()
                    if event is not NEED_DATA:
                        got = event
                assert isinstance(got, Chunk) and got.size == chunk_size

        return work

    # A pool of one: the consumer here is done with each chunk before the next arrives.
    recycled = bytearray(chunk_size)
    cases: list[tuple[str, Callable[[], None]]] = [
        ("bytes join of slices (memcpy baseline)", bytes_join),
        ("bytearray += slices, bytes() (baseline)", copy_into_bytearray),
        ("chunk send_parts + receive, fresh buffer", pipeline(bytearray)),
        ("chunk send_parts + receive, recycled buffer", pipeline(lambda _size: recycled)),
    ]
    return [
        _row(name, chunk_size, count, _best(runs, work), "MB/s", megabytes) for name, work in cases
    ]


def run(
    *,
    control_count: int = 200_000,
    chunk_sizes: tuple[int, ...] = (1 << 20, 4 << 20),
    chunk_total: int = 512 << 20,
    runs: int = 3,
) -> list[dict[str, Any]]:
    """All rows of the benchmark; small arguments make a quick smoke run."""
    rows = control_rows(control_count, runs)
    for size in chunk_sizes:
        rows.extend(chunk_rows(size, chunk_total, runs))
    return rows


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    settings: dict[str, Any] = {
        "control_count": 20_000 if quick else 200_000,
        "chunk_total": (64 << 20) if quick else (512 << 20),
        "runs": 3,
    }
    rows = run(**settings)
    emit(
        "frame_rate",
        rows,
        COLUMNS,
        extra={"settings": settings, "slice": SLICE, "note": "best of runs; one core"},
    )


if __name__ == "__main__":
    main(sys.argv[1:])
