"""What every target shares: the finding type, memory bounds, round trips and hostile values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
from vmswarm.swarm.errors import RemoteProtocolError
from vmswarm.swarm.framing import (
    CHUNK_HEADER,
    CHUNK_OVERHEAD,
    COMPACT_AT,
    FRAME_HEADER,
    LENGTH,
    MessageCodec,
)
from vmswarm.swarm.messages import CHUNK_TYPE, ControlMessage

from .script import Input


class Finding(AssertionError):
    """An invariant of a decoder broke: the fuzzer reports it like an escaped exception."""


def require(condition: bool, what: str) -> None:
    # Not `assert`: findings must not vanish under `python -O`.
    if not condition:
        raise Finding(what)


def reader_bound(max_frame: int, max_chunk: int, spare: int = 0) -> int:
    """Most bytes a drained FrameReader may hold: consumed prefix, one partial frame, a payload.

    A prefix below COMPACT_AT, or smaller than the unparsed rest, is kept to save copies.
    """
    partial = LENGTH.size + max_frame
    return COMPACT_AT + 2 * partial + max_chunk + spare


def check_round_trip(codec: MessageCodec, message: ControlMessage) -> None:
    """A decoded message re-encodes, and that encoding is a fixpoint of decode + encode."""
    frame = codec.encode(message)
    code = frame[LENGTH.size]
    again = codec.decode(code, frame[FRAME_HEADER.size :])
    require(type(again) is type(message), f"{type(message).__name__} decoded as {type(again)}")
    require(codec.encode(again) == frame, f"{type(message).__name__} does not re-encode stably")


EDGE_INTS = (0, 1, -1, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32)
# Nesting depths around Python's recursion limit (1000) and msgpack's unpacker limit (1024).
DEPTHS = (1, 2, 50, 500, 900, 980, 990, 995, 1000, 1010, 1020, 1022, 1023, 1024, 1025, 1100)


def not_a_safety_net(error: RemoteProtocolError) -> None:
    """Connection and RpcConnection turn any stray exception into a RemoteProtocolError with
    these words; reaching that net means a decoder let an unexpected exception out."""
    text = str(error)
    netted = text.startswith(("unparseable data from peer", "unparseable RPC data"))
    # Only the cause's type: msgpack's ExtraData holds the whole decoded value in its args.
    cause = type(error.__cause__).__name__
    require(not netted, f"the catch-all caught a decoder bug: {text} (cause {cause})")


def hostile_value(inp: Input, depth: int = 0) -> Any:
    """A msgpack-encodable value, often of the wrong type or shape for the field it fills."""
    kind = inp.int(0, 11)
    if kind == 0:
        return None
    if kind == 1:
        return inp.flag()
    if kind == 2:
        value = inp.int(0, (1 << 64) - 1)  # msgpack's uint64, or as int64 below
        return value - (1 << 63) if inp.flag() else value
    if kind == 3:
        return inp.choice(EDGE_INTS)
    if kind == 4:
        return float(inp.int(-(1 << 31), 1 << 31)) / 7.0
    if kind == 5:
        return inp.sized_bytes(64).decode("utf-8", "replace")
    if kind == 6:
        return inp.sized_bytes(64)
    if kind == 7:
        return msgpack.ExtType(inp.int(0, 127), inp.sized_bytes(8))
    if kind == 8 and depth < 3:
        return [hostile_value(inp, depth + 1) for _ in range(inp.int(0, 4))]
    if kind == 9 and depth < 3:
        return {
            inp.sized_bytes(8).hex(): hostile_value(inp, depth + 1) for _ in range(inp.int(0, 3))
        }
    if kind == 10:
        # Deep nesting: each level is one byte on the wire, but recursion for whoever walks it.
        return Raw(b"\x91" * inp.choice(DEPTHS) + pack(inp.int(0, 3)))
    return inp.sized_bytes(8).hex()


@dataclass(frozen=True)
class Raw:
    """Bytes spliced verbatim into `pack`'s output (msgpack's packer refuses deep nesting)."""

    data: bytes


def pack(value: Any) -> bytes:
    """msgpack bytes for `value`, which may hold `Raw` pieces at any level."""
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, list):
        return _HEADERS.pack_array_header(len(value)) + b"".join(pack(v) for v in value)
    if isinstance(value, dict):
        items = (pack(k) + pack(v) for k, v in value.items())
        return _HEADERS.pack_map_header(len(value)) + b"".join(items)
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


_HEADERS = msgpack.Packer(autoreset=True)


def frame(code: int, fields: Any) -> bytes:
    """One control frame whose body is `fields` packed, whatever they are."""
    body = pack(fields)
    return FRAME_HEADER.pack(1 + len(body), code) + body


def hostile_frame(inp: Input, codec: MessageCodec, max_chunk: int) -> bytes:
    """A frame of a known or unknown type with hostile fields, or a chunk of a hostile size."""
    codes = sorted(codec.messages)
    kind = inp.int(0, len(codes) + 1)
    if kind == len(codes):
        size = inp.choice((0, 1, max_chunk, max_chunk + 1, inp.int(0, 300)))
        index = inp.int(0, (1 << 32) - 1)
        # Mostly a whole chunk in one part; sometimes a part claiming another size or offset.
        total = inp.choice((size, size, 0, max_chunk + 1, inp.int(0, 1 << 20)))
        offset = inp.choice((0, 0, 1, size, inp.int(0, (1 << 32) - 1)))
        header = CHUNK_HEADER.pack(CHUNK_OVERHEAD + size, CHUNK_TYPE, index, total, offset)
        return header + inp.bytes(size).ljust(size, b"\x00")
    code = codes[kind] if kind < len(codes) else inp.int(0, 0xFF)
    if inp.int(0, 7) == 0:
        return frame(code, hostile_value(inp))
    return frame(code, [hostile_value(inp) for _ in range(inp.int(0, 5))])


def corrupt(inp: Input, data: bytes) -> bytes:
    """`data` cut short, with one byte changed, or with bytes inserted."""
    if not data:
        return data
    spot = inp.int(0, len(data) - 1)
    how = inp.int(0, 2)
    if how == 0:
        return data[:spot]
    if how == 1:
        return data[:spot] + bytes([inp.int(0, 255)]) + data[spot + 1 :]
    return data[:spot] + inp.sized_bytes(16) + data[spot:]
