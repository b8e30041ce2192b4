"""Frames and the message codec, below the connection state machine."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Self

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.swarm.errors import LocalProtocolError, RemoteProtocolError
from vmswarm.swarm.framing import (
    CHUNK_HEADER,
    CHUNK_OVERHEAD,
    COMPACT_AT,
    FRAME_HEADER,
    MAX_CHUNK_SIZE,
    MAX_CONTROL_SIZE,
    MIN_CHUNK_PART,
    PEER_CODEC,
    FrameReader,
    MessageCodec,
    chunk_part_header,
    frame_parts,
)
from vmswarm.swarm.messages import (
    CHUNK_TYPE,
    PEER_MESSAGES,
    Bitfield,
    Cancel,
    Chunk,
    ControlMessage,
    Goodbye,
    Handshake,
    Have,
    KeepAlive,
    Message,
    Reject,
    Request,
    Role,
)

HAVE_CODE = 0x02
HANDSHAKE_CODE = 0x00

indices = st.integers(0, (1 << 32) - 1)
reasons = st.text(max_size=40)
handshakes = st.builds(
    Handshake,
    st.integers(0, 0xFFFF),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=16, max_size=16),
    st.none() | st.tuples(st.text(min_size=1, max_size=30), st.integers(1, 0xFFFF)),
    st.sampled_from(Role),
)
control_messages: st.SearchStrategy[ControlMessage] = st.one_of(
    handshakes,
    st.builds(Bitfield, st.binary(max_size=64)),
    st.builds(Have, indices),
    st.builds(Request, indices),
    st.builds(Cancel, indices),
    st.builds(Reject, indices, reasons),
    st.just(KeepAlive()),
    st.builds(Goodbye, reasons),
)
chunks = st.builds(Chunk, indices, st.binary(min_size=1, max_size=300))
messages: st.SearchStrategy[Message] = control_messages | chunks


def encode(message: Message) -> bytes:
    return b"".join(frame_parts(message, PEER_CODEC, max_chunk_size=MAX_CHUNK_SIZE))


def control_frame(code: int, body: bytes) -> bytes:
    return FRAME_HEADER.pack(1 + len(body), code) + body


def read_all(reader: FrameReader) -> list[Message]:
    out = []
    while (message := reader.next_message()) is not None:
        out.append(message)
    return out


def split(blob: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c % (len(blob) + 1) for c in cuts), len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(points)]


@given(control_messages)
def test_every_control_message_round_trips_through_the_codec(message: ControlMessage) -> None:
    frame = PEER_CODEC.encode(message)
    length, code = FRAME_HEADER.unpack_from(frame)
    assert length == len(frame) - 4
    assert PEER_CODEC.decode(code, frame[FRAME_HEADER.size :]) == message


@settings(max_examples=150)
@given(st.lists(messages, max_size=12), st.lists(st.integers(0, 1 << 16), max_size=30))
def test_messages_survive_any_split_of_the_stream(msgs: list[Message], cuts: list[int]) -> None:
    blob = b"".join(encode(m) for m in msgs)
    reader = FrameReader(PEER_CODEC)
    got: list[Message] = []
    for piece in split(blob, cuts):
        reader.feed(piece)
        got.extend(read_all(reader))
    assert got == msgs
    assert not reader.mid_frame
    assert reader.buffered == 0


def test_chunk_header_is_fixed_struct_and_payload_is_raw() -> None:
    payload = bytes(range(256)) * 4
    parts = frame_parts(Chunk(7, payload), PEER_CODEC, max_chunk_size=MAX_CHUNK_SIZE)
    assert len(parts) == 2
    assert parts[1] is payload  # passed through, never copied or re-encoded
    # length, type, index, the chunk's size, this part's offset: one part holds it all
    assert CHUNK_HEADER.unpack(parts[0]) == (1 + 12 + len(payload), CHUNK_TYPE, 7, len(payload), 0)


def test_huge_length_prefix_is_rejected_before_any_allocation() -> None:
    reader = FrameReader(PEER_CODEC)
    reader.feed(b"\xff\xff\xff\xff" + b"\x02abc")
    with pytest.raises(RemoteProtocolError, match="frame length"):
        reader.next_message()
    assert reader.allocated <= 8


def test_control_frame_longer_than_the_control_limit_is_rejected_at_the_type_byte() -> None:
    reader = FrameReader(PEER_CODEC)
    reader.feed(FRAME_HEADER.pack(MAX_CONTROL_SIZE + 1, HAVE_CODE))
    with pytest.raises(RemoteProtocolError, match="control frame"):
        reader.next_message()
    assert reader.allocated == FRAME_HEADER.size


@pytest.mark.parametrize("payload_size", [0, 1001])
def test_chunk_payload_size_is_checked_before_the_payload_buffer_exists(payload_size: int) -> None:
    reader = FrameReader(PEER_CODEC, max_chunk_size=1000)
    reader.feed(CHUNK_HEADER.pack(CHUNK_OVERHEAD + payload_size, CHUNK_TYPE, 0, 1, 0)[:5])
    with pytest.raises(RemoteProtocolError):
        reader.next_message()
    assert reader.allocated == 5


def test_zero_length_frame_and_unknown_type_are_rejected() -> None:
    reader = FrameReader(PEER_CODEC)
    reader.feed(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError, match="frame length 0"):
        reader.next_message()
    reader = FrameReader(PEER_CODEC)
    reader.feed(control_frame(0x77, b"\x90"))
    with pytest.raises(RemoteProtocolError, match="unknown message type 0x77"):
        reader.next_message()


def test_chunk_payload_fills_one_preallocated_buffer_in_socket_sized_slices() -> None:
    size = 1 << 20
    payload = bytes(range(256)) * (size // 256)
    blob = encode(Chunk(3, payload)) + encode(Have(3))
    reader = FrameReader(PEER_CODEC)
    got: list[Message] = []
    peak = 0
    for offset in range(0, len(blob), 1 << 16):
        reader.feed(blob[offset : offset + (1 << 16)])
        peak = max(peak, reader.allocated)
        got.extend(read_all(reader))
    assert got == [Chunk(3, payload), Have(3)]
    chunk = got[0]
    assert isinstance(chunk, Chunk)
    assert isinstance(chunk.data, memoryview)
    assert chunk.data.readonly
    # One payload-sized buffer plus at most one slice of spill-over, never a growing copy.
    assert peak <= size + (1 << 16)


def test_payload_buffers_come_from_the_injected_allocator() -> None:
    pool = [bytearray(4096)]
    reader = FrameReader(PEER_CODEC, allocate=lambda size: pool[0])
    blob = encode(Chunk(9, b"abc" * 1000))
    reader.feed(blob[:100])
    assert reader.next_message() is None
    reader.feed(blob[100:])
    chunk = reader.next_message()
    assert chunk == Chunk(9, b"abc" * 1000)
    assert isinstance(chunk, Chunk) and isinstance(chunk.data, memoryview)
    assert chunk.data.obj is pool[0]  # the payload was received in place, not copied out
    stingy = FrameReader(PEER_CODEC, allocate=lambda size: bytearray(size - 1))
    stingy.feed(blob[:100])
    with pytest.raises(LocalProtocolError, match="allocator"):
        stingy.next_message()


def test_many_small_frames_keep_the_receive_buffer_bounded() -> None:
    blob = b"".join(encode(Have(i)) for i in range(50_000))
    assert len(blob) > 4 * COMPACT_AT
    reader = FrameReader(PEER_CODEC)
    peak = 0
    count = 0
    for offset in range(0, len(blob), 4096):
        reader.feed(blob[offset : offset + 4096])
        peak = max(peak, reader.allocated)
        count += len(read_all(reader))
    assert count == 50_000
    # Consumed bytes are dropped in batches, so memory is bounded whatever the stream's length.
    assert peak <= 2 * COMPACT_AT + 4096


@pytest.mark.parametrize(
    ("code", "body"),
    [
        (HAVE_CODE, msgpack.packb([True])),  # bool is not an index
        (HAVE_CODE, msgpack.packb([-1])),
        (HAVE_CODE, msgpack.packb([1 << 32])),
        (HAVE_CODE, msgpack.packb([1.0])),
        (HAVE_CODE, msgpack.packb([1, 2])),
        (HAVE_CODE, msgpack.packb({"index": 1})),
        (HAVE_CODE, msgpack.packb([1]) + b"\x00"),  # trailing bytes
        (HAVE_CODE, b"\x91"),  # truncated array
        (HAVE_CODE, b"\xc1"),  # never-used msgpack byte
        (HAVE_CODE, msgpack.packb(msgpack.ExtType(1, b"x"))),
        (0x01, msgpack.packb(["not bytes"])),
        (0x08, b"\x91\xa2\xff\xfe"),  # invalid UTF-8 reason
        (0x08, msgpack.packb(["x" * 2000])),
        (HANDSHAKE_CODE, msgpack.packb([1, b"t" * 31, b"p" * 16, None, "host"])),
        (HANDSHAKE_CODE, msgpack.packb([1, b"t" * 32, b"p" * 16, None, "tracker"])),
        (HANDSHAKE_CODE, msgpack.packb([1, b"t" * 32, b"p" * 16, ["h", 0], "host"])),
        (HANDSHAKE_CODE, msgpack.packb([1, b"t" * 32, b"p" * 16, ["h"], "host"])),
        (HANDSHAKE_CODE, msgpack.packb([1, "t" * 32, b"p" * 16, None, "host"])),
        (0x07, msgpack.packb([None])),
    ],
)
def test_strict_decoding_rejects_malformed_bodies(code: int, body: bytes) -> None:
    reader = FrameReader(PEER_CODEC)
    reader.feed(control_frame(code, body))
    with pytest.raises(RemoteProtocolError):
        reader.next_message()


def test_msgpack_lengths_are_bounded() -> None:
    codec = MessageCodec(PEER_MESSAGES, max_array_len=4)
    with pytest.raises(RemoteProtocolError):
        codec.decode(HAVE_CODE, msgpack.packb([0] * 5))


def test_constructing_an_invalid_message_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="index"):
        Have(-1)
    with pytest.raises(LocalProtocolError, match="template_id"):
        Handshake(1, b"short", b"p" * 16, None, Role.HOST)
    with pytest.raises(LocalProtocolError, match="listen port"):
        Handshake(1, b"t" * 32, b"p" * 16, ("h", 70000), Role.HOST)
    with pytest.raises(LocalProtocolError, match="reason"):
        Goodbye("x" * 5000)


def test_control_message_too_big_for_a_frame_cannot_be_sent() -> None:
    with pytest.raises(LocalProtocolError, match="control frame"):
        PEER_CODEC.encode(Bitfield(bytes(MAX_CONTROL_SIZE)))


def test_chunk_sizes_are_checked_when_sending() -> None:
    with pytest.raises(LocalProtocolError):
        frame_parts(Chunk(0, b""), PEER_CODEC, max_chunk_size=16)
    with pytest.raises(LocalProtocolError):
        frame_parts(Chunk(0, b"x" * 17), PEER_CODEC, max_chunk_size=16)


@dataclass(frozen=True, slots=True)
class Announce(ControlMessage):
    """A tracker-style message defined outside the peer protocol's module."""

    template_id: bytes
    port: int

    def to_fields(self) -> list[Any]:
        return [self.template_id, self.port]

    @classmethod
    def from_fields(cls, fields: list[Any]) -> Self:
        if type(fields) is not list or len(fields) != 2:
            raise RemoteProtocolError("Announce needs 2 fields")
        template_id, port = fields
        if type(template_id) is not bytes or type(port) is not int:
            raise RemoteProtocolError("bad Announce")
        return cls(template_id, port)


def test_a_later_module_can_register_more_control_messages() -> None:
    codec = PEER_CODEC.extended({0x20: Announce})
    message = Announce(b"t" * 32, 7000)
    reader = FrameReader(codec)
    reader.feed(codec.encode(message) + codec.encode(Have(1)))
    assert read_all(reader) == [message, Have(1)]
    assert not PEER_CODEC.knows(0x20)  # the peer codec itself is unchanged
    with pytest.raises(LocalProtocolError, match="not registered"):
        PEER_CODEC.encode(message)


def test_registry_refuses_taken_reserved_and_invalid_codes() -> None:
    with pytest.raises(LocalProtocolError, match="already registered"):
        PEER_CODEC.extended({HAVE_CODE: Announce})
    with pytest.raises(LocalProtocolError, match="reserved for chunks"):
        PEER_CODEC.extended({CHUNK_TYPE: Announce})
    with pytest.raises(LocalProtocolError, match="registered twice"):
        PEER_CODEC.extended({0x20: Have})
    with pytest.raises(LocalProtocolError, match="byte"):
        PEER_CODEC.extended({256: Announce})


def receive_like_a_socket(reader: FrameReader, pieces: list[bytes]) -> list[Message]:
    """Deliver each piece as a daemon would: into the payload buffer while one is open."""
    got: list[Message] = []
    for piece in pieces:
        view = memoryview(piece)
        while view:
            target = reader.payload_buffer()
            if target is None:
                reader.feed(view)
                view = view[len(view) :]
            else:
                count = min(len(target), len(view))
                target[:count] = view[:count]
                reader.payload_received(count)
                view = view[count:]
            got.extend(read_all(reader))
    return got


@settings(max_examples=150)
@given(st.lists(messages, max_size=12), st.lists(st.integers(0, 1 << 16), max_size=30))
def test_receiving_into_the_payload_buffer_gives_the_same_messages(
    msgs: list[Message], cuts: list[int]
) -> None:
    blob = b"".join(encode(m) for m in msgs)
    reader = FrameReader(PEER_CODEC)
    assert receive_like_a_socket(reader, split(blob, cuts)) == msgs
    assert not reader.mid_frame and reader.buffered == 0
    assert reader.payload_buffer() is None


def test_payload_buffer_is_the_unfilled_tail_of_the_pooled_buffer() -> None:
    storage = bytearray(8192)
    reader = FrameReader(PEER_CODEC, allocate=lambda size: storage)
    payload = bytes(range(256)) * 16
    blob = encode(Chunk(5, payload)) + encode(Have(5))
    assert reader.payload_buffer() is None
    reader.feed(blob[: CHUNK_HEADER.size + 100])
    assert reader.next_message() is None
    target = reader.payload_buffer()
    assert target is not None and not target.readonly
    assert len(target) == len(payload) - 100
    rest = blob[CHUNK_HEADER.size + 100 : CHUNK_HEADER.size + len(payload)]
    target[: len(rest)] = rest
    reader.payload_received(len(rest))
    assert reader.payload_buffer() is None
    chunk = reader.next_message()
    assert chunk == Chunk(5, payload)
    assert isinstance(chunk, Chunk) and isinstance(chunk.data, memoryview)
    assert chunk.data.obj is storage  # received in place: never copied through the reader
    reader.feed(blob[CHUNK_HEADER.size + len(payload) :])
    assert reader.next_message() == Have(5)


def test_payload_received_refuses_more_than_was_offered() -> None:
    reader = FrameReader(PEER_CODEC)
    with pytest.raises(LocalProtocolError, match="no chunk payload"):
        reader.payload_received(1)
    blob = encode(Chunk(1, b"x" * 1000))
    reader.feed(blob[:50])
    assert reader.next_message() is None
    target = reader.payload_buffer()
    assert target is not None
    with pytest.raises(LocalProtocolError, match="to go"):
        reader.payload_received(len(target) + 1)


def test_allocator_can_be_replaced_between_chunks() -> None:
    first, second = bytearray(4096), bytearray(4096)
    reader = FrameReader(PEER_CODEC, allocate=lambda size: first)
    blob = encode(Chunk(1, b"a" * 2000))
    reader.feed(blob[:100])
    assert reader.next_message() is None  # the header is parsed: the payload has its buffer
    reader.set_allocator(lambda size: second)
    reader.feed(blob[100:])
    one = reader.next_message()
    reader.feed(blob[:100])
    assert reader.next_message() is None
    reader.feed(blob[100:])
    two = reader.next_message()
    assert isinstance(one, Chunk) and isinstance(one.data, memoryview)
    assert isinstance(two, Chunk) and isinstance(two.data, memoryview)
    assert one.data.obj is first and two.data.obj is second


def test_small_messages_refuse_a_big_body_before_decoding_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    codec = MessageCodec(PEER_MESSAGES)
    monkeypatch.setattr(codec, "_unpack", _never_called)
    # 100 KiB of nested empty arrays would become ~7 MB of Python lists.
    body = b"\x91" * 1000 + b"\x90" * (100 << 10)
    code = next(c for c, cls in PEER_MESSAGES.items() if cls is Have)
    with pytest.raises(RemoteProtocolError, match="over its 8192-byte limit"):
        codec.decode(code, body)


def test_a_bitfield_must_be_one_bin_before_it_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = MessageCodec(PEER_MESSAGES)
    code = next(c for c, cls in PEER_MESSAGES.items() if cls is Bitfield)
    good = codec.encode(Bitfield(b"\xff" * 70000))
    assert codec.decode(code, good[FRAME_HEADER.size :]) == Bitfield(b"\xff" * 70000)
    monkeypatch.setattr(codec, "_unpack", _never_called)
    with pytest.raises(RemoteProtocolError, match="not the expected layout"):
        codec.decode(code, b"\x91" + b"\x90" * 50000)


def _never_called(body: bytes) -> object:
    raise AssertionError("decoded a body that should have been refused unread")


# -- chunks in parts ---------------------------------------------------------------------------


def _parts_wire(index: int, payload: bytes, part: int, between: bytes = b"") -> bytes:
    """`payload` as chunk parts of `part` bytes, with `between` after every part but the last."""
    out = []
    for offset in range(0, len(payload), part):
        piece = payload[offset : offset + part]
        out.append(chunk_part_header(index, len(payload), offset, len(piece), MAX_CHUNK_SIZE))
        out.append(piece)
        if offset + part < len(payload):
            out.append(between)
    return b"".join(out)


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=70_000), max_size=12), direct=st.booleans())
def test_a_chunk_sent_in_parts_arrives_whole_and_control_frames_between_them_come_first(
    cuts: list[int], direct: bool
) -> None:
    payload = bytes(range(256)) * 400  # 102400 bytes: 6 parts of 16 KiB and a shorter last
    have = bytes(frame_parts(Have(9), PEER_CODEC, max_chunk_size=MAX_CHUNK_SIZE)[0])
    wire = _parts_wire(3, payload, MIN_CHUNK_PART, have) + have
    reader = FrameReader(PEER_CODEC)
    got: list[Message] = []
    position = 0
    for cut in [*cuts, len(wire)]:
        end = min(position + cut, len(wire))
        while position < end:
            target = reader.payload_buffer() if direct else None
            if target is None:
                reader.feed(wire[position:end])
                position = end
            else:
                # The zero-copy path, as a socket's recv_into would fill it.
                count = min(len(target), end - position)
                target[:count] = wire[position : position + count]
                reader.payload_received(count)
                position += count
            got += read_all(reader)
    # 7 parts with a Have after each but the last, then one more Have after the chunk
    assert got[:6] == [Have(9)] * 6 and got[7:] == [Have(9)]
    chunk = got[6]
    assert isinstance(chunk, Chunk) and chunk.index == 3 and bytes(chunk.data) == payload
    assert not reader.mid_frame and reader.buffered == 0


def test_payload_buffer_covers_only_the_part_on_the_wire() -> None:
    payload = b"x" * (3 * MIN_CHUNK_PART)
    reader = FrameReader(PEER_CODEC)
    reader.feed(chunk_part_header(1, len(payload), 0, MIN_CHUNK_PART, MAX_CHUNK_SIZE))
    assert reader.next_message() is None
    target = reader.payload_buffer()
    assert target is not None and len(target) == MIN_CHUNK_PART
    target[:] = payload[:MIN_CHUNK_PART]
    reader.payload_received(MIN_CHUNK_PART)
    assert reader.next_message() is None
    assert reader.payload_buffer() is None  # between parts: the next header comes through feed
    assert reader.mid_frame


@pytest.mark.parametrize(
    ("header", "error"),
    [
        ((1, 3 * MIN_CHUNK_PART, 2 * MIN_CHUNK_PART), "does not continue chunk 1"),  # skips one
        ((2, 3 * MIN_CHUNK_PART, MIN_CHUNK_PART), "does not continue chunk 1"),  # other chunk
        ((1, 4 * MIN_CHUNK_PART, MIN_CHUNK_PART), "does not continue chunk 1"),  # other size
        ((1, 3 * MIN_CHUNK_PART, 0), "does not continue chunk 1"),  # starts over
    ],
)
def test_a_part_that_does_not_continue_the_chunk_is_a_remote_error(
    header: tuple[int, int, int], error: str
) -> None:
    reader = FrameReader(PEER_CODEC)
    reader.feed(chunk_part_header(1, 3 * MIN_CHUNK_PART, 0, MIN_CHUNK_PART, MAX_CHUNK_SIZE))
    reader.feed(b"a" * MIN_CHUNK_PART)
    index, size, offset = header
    reader.feed(CHUNK_HEADER.pack(CHUNK_OVERHEAD + MIN_CHUNK_PART, CHUNK_TYPE, index, size, offset))
    with pytest.raises(RemoteProtocolError, match=error):
        reader.next_message()


@pytest.mark.parametrize(
    ("size", "offset", "length", "error"),
    [
        (3 * MIN_CHUNK_PART, MIN_CHUNK_PART, MIN_CHUNK_PART, "starts at offset"),
        (3 * MIN_CHUNK_PART, 0, 100, "is under"),  # a tiny part that is not the chunk's last
        (100, 0, 200, "does not fit"),
        (MAX_CHUNK_SIZE + 1, 0, 100, "outside"),
        (0, 0, 100, "outside"),
    ],
)
def test_a_bad_first_part_is_refused_before_any_buffer_is_taken(
    size: int, offset: int, length: int, error: str
) -> None:
    taken: list[int] = []

    def allocate(n: int) -> bytearray:
        taken.append(n)
        return bytearray(n)

    reader = FrameReader(PEER_CODEC, allocate=allocate)
    reader.feed(CHUNK_HEADER.pack(CHUNK_OVERHEAD + length, CHUNK_TYPE, 0, size, offset))
    with pytest.raises(RemoteProtocolError, match=error):
        reader.next_message()
    assert taken == []


@pytest.mark.parametrize(
    ("size", "offset", "length"),
    [(100, 0, 0), (100, 50, 60), (3 * MIN_CHUNK_PART, 0, MIN_CHUNK_PART - 1), (0, 0, 1)],
)
def test_we_cannot_frame_a_part_that_does_not_fit(size: int, offset: int, length: int) -> None:
    with pytest.raises(LocalProtocolError):
        chunk_part_header(0, size, offset, length, MAX_CHUNK_SIZE)
