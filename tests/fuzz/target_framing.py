"""Fuzz target: FrameReader + MessageCodec on arbitrary bytes in arbitrary splits.

Properties: only RemoteProtocolError escapes; the messages (and whether the stream fails) do not
depend on how the bytes were split or whether payloads went through `payload_buffer`; a drained
reader holds no more than a bounded number of bytes; every decoded message re-encodes stably.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmswarm.swarm.errors import RemoteProtocolError
from vmswarm.swarm.framing import (
    CHUNK_HEADER,
    CHUNK_OVERHEAD,
    MAX_CHUNK_SIZE,
    PEER_CODEC,
    FrameReader,
    MessageCodec,
)
from vmswarm.swarm.messages import (
    CHUNK_TYPE,
    MAX_INDEX,
    PEER_MESSAGES,
    Bitfield,
    Cancel,
    Chunk,
    ControlMessage,
    Goodbye,
    Handshake,
    Have,
    KeepAlive,
    Reject,
    Request,
    Role,
)
from vmswarm.swarm.rpc import WIRE_CODEC, Call, Fail, Notice, Reply

from .checks import EDGE_INTS, Finding, check_round_trip, hostile_frame, reader_bound, require
from .script import Input, InputWriter

NAME = "framing"
MAX_LEN = 4096
# A small control limit makes the size checks and the compaction reachable in a short input.
SMALL_CODEC = MessageCodec(PEER_MESSAGES, max_control_size=256)
CODECS = (PEER_CODEC, SMALL_CODEC, WIRE_CODEC)
CHUNK_SIZES = (1, 7, 64, 4096, MAX_CHUNK_SIZE)
MAX_STREAM = 2048
# Most streams play once; a long repeat pushes the buffer past its compaction threshold.
REPEATS = (1, 1, 1, 1, 2, 3, 8, 64)
MAX_PIECE = 1 << 12
MODE_RAW, MODE_FRAMES = 0, 1

Outcome = tuple[list[tuple[str, int, bytes]], bool]


def fuzz_one(data: bytes) -> Outcome:
    inp = Input(data)
    codec = inp.choice(CODECS)
    max_chunk = inp.choice(CHUNK_SIZES)
    spare = inp.int(0, 3)  # a pool may hand out a larger buffer than asked for
    if inp.int(0, 1) == MODE_RAW:
        stream = inp.sized_bytes(MAX_STREAM)
    else:
        stream = b"".join(hostile_frame(inp, codec, max_chunk) for _ in range(inp.int(1, 16)))
    stream *= inp.choice(REPEATS)
    pieces: list[tuple[int, bool]] = []
    while inp.remaining():
        pieces.append((inp.int(0, MAX_PIECE), inp.flag()))
    whole = _run(codec, max_chunk, spare, stream, [(len(stream), False)])
    split = _run(codec, max_chunk, spare, stream, pieces)
    if split != whole:  # not require(): formatting both outcomes on every run is costly
        raise Finding(f"split feeding changed the outcome: {split!r:.2000} vs {whole!r:.2000}")
    return whole


def _run(
    codec: MessageCodec,
    max_chunk: int,
    spare: int,
    stream: bytes,
    pieces: Sequence[tuple[int, bool]],
) -> Outcome:
    """Feed `stream` cut into `pieces` (size, through payload_buffer?); the rest goes in last."""
    reader = FrameReader(codec, max_chunk_size=max_chunk, allocate=lambda n: bytearray(n + spare))
    max_frame = max(codec.max_control_size, CHUNK_OVERHEAD + max_chunk)
    bound = reader_bound(max_frame, max_chunk, spare)
    seen: list[tuple[str, int, bytes]] = []
    pos = 0
    cuts = [*pieces, (len(stream), False)]
    for size, in_place in cuts:
        piece = stream[pos : pos + size]
        pos += len(piece)
        view = reader.payload_buffer() if in_place else None
        if view is not None:
            taken = min(len(view), len(piece))
            view[:taken] = piece[:taken]
            reader.payload_received(taken)
            piece = piece[taken:]
        if piece:
            reader.feed(piece)
        try:
            _drain(reader, codec, max_chunk, seen)
        except RemoteProtocolError:
            return seen, True
        require(reader.buffered <= max_frame + 4, f"{reader.buffered} bytes buffered when drained")
        require(reader.allocated <= bound, f"{reader.allocated} bytes held, bound {bound}")
        if pos >= len(stream):
            break
    return seen, False


def _drain(
    reader: FrameReader, codec: MessageCodec, max_chunk: int, seen: list[tuple[str, int, bytes]]
) -> None:
    while (message := reader.next_message()) is not None:
        if isinstance(message, Chunk):
            require(1 <= message.size <= max_chunk, f"chunk of {message.size} bytes let through")
            require(0 <= message.index <= MAX_INDEX, f"chunk index {message.index}")
            seen.append(("Chunk", message.index, bytes(message.data)))
        else:
            require(isinstance(message, ControlMessage), f"decoded a {type(message)}")
            assert isinstance(message, ControlMessage)
            check_round_trip(codec, message)
            seen.append((type(message).__name__, 0, codec.encode(message)))


def _chunk_frame(index: int, payload: bytes) -> bytes:
    size = len(payload)
    return CHUNK_HEADER.pack(CHUNK_OVERHEAD + size, CHUNK_TYPE, index, size, 0) + payload


def _peer_exchange(codec: MessageCodec) -> bytes:
    messages: list[ControlMessage] = [
        Handshake(1, bytes(range(32)), b"p" * 16, ("10.0.0.2", 7000), Role.HOST),
        Bitfield(b"\xa0"),
        Have(2),
        Request(1),
        Cancel(1),
        Reject(0, "busy"),
        KeepAlive(),
        Goodbye("done"),
    ]
    frames = [codec.encode(m) for m in messages]
    frames.insert(4, _chunk_frame(1, b"chunk-one"))
    return b"".join(frames)


def seeds() -> list[bytes]:
    """Real streams: a whole peer exchange, an RPC call and answer, some cut mid-frame."""
    rpc = b"".join(
        WIRE_CODEC.encode(m)
        for m in (
            Call(1, "fetch", {"name": "debian", "size": 1 << 40, "blob": b"\x00"}),
            Notice(1, "progress", {"percent": 12.5}),
            Reply(1, {"path": "/x", "sizes": [1, 2]}),
            Fail(2, "unknown", "no such template"),
        )
    )
    out = []
    for codec, max_chunk, stream, cuts in (
        (PEER_CODEC, 64, _peer_exchange(PEER_CODEC), [(3, False), (17, False), (40, True)]),
        (SMALL_CODEC, 7, _peer_exchange(SMALL_CODEC), [(1, False)] * 12),
        (SMALL_CODEC, 4096, _chunk_frame(0, bytes(300)) * 3, [(20, False), (200, True)]),
        (WIRE_CODEC, 1, rpc, [(5, False), (60, False)]),
        (PEER_CODEC, MAX_CHUNK_SIZE, bytes.fromhex("ffffffff00"), []),
    ):
        writer = InputWriter().choice(CODECS, codec).choice(CHUNK_SIZES, max_chunk)
        writer.int(0, 3, 0).int(0, 1, MODE_RAW).sized_bytes(MAX_STREAM, stream)
        writer.choice(REPEATS, 1)
        for size, in_place in cuts:
            writer.int(0, MAX_PIECE, size).flag(in_place)
        out.append(writer.build())
    # Structured mode: a Have(1) and a KeepAlive, written the way hostile_frame reads them.
    codes = sorted(PEER_CODEC.messages)
    writer = InputWriter().choice(CODECS, PEER_CODEC).choice(CHUNK_SIZES, 64).int(0, 3, 0)
    writer.int(0, 1, MODE_FRAMES).int(1, 16, 2)
    writer.int(0, len(codes) + 1, codes.index(0x02)).int(0, 7, 1).int(0, 5, 1)
    writer.int(0, 11, 3).choice(EDGE_INTS, 1)
    writer.int(0, len(codes) + 1, codes.index(0x07)).int(0, 7, 1).int(0, 5, 0)
    writer.choice(REPEATS, 1).int(0, MAX_PIECE, 4).flag(False)
    out.append(writer.build())
    return out


DICTIONARY = [b"\x00\x00\x00", b"\x04", b"\x91", b"\x95", b"\xc4\x20", b"\xcd", b"\xce", b"\xdc"]
