"""The peer-link state machine: bytes in, events out, and nothing but protocol errors escape."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Self

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.swarm.connection import (
    CLOSED,
    NEED_DATA,
    TRANSITIONS,
    Connection,
    ConnectionClosed,
    Event,
    State,
)
from vmswarm.swarm.errors import LocalProtocolError, RemoteProtocolError
from vmswarm.swarm.framing import MIN_CHUNK_PART, PEER_CODEC, FrameWriter
from vmswarm.swarm.messages import (
    PROTOCOL_VERSION,
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

COUNT = 20
TEMPLATE = b"T" * 32


def hello(
    role: Role = Role.HOST, template: bytes = TEMPLATE, version: int = PROTOCOL_VERSION
) -> Handshake:
    return Handshake(version, template, b"P" * 16, ("10.0.0.2", 7000), role)


def full_bits(count: int = COUNT) -> bytes:
    return bytes(
        b"\xff" * (count // 8) + (bytes([0xFF << (8 - count % 8) & 0xFF]) if count % 8 else b"")
    )


def wire(message: Message) -> bytes:
    """A well-formed frame for `message`, with no state machine in the way."""
    return b"".join(FrameWriter(PEER_CODEC).parts(message))


def pair() -> tuple[Connection, Connection]:
    return Connection(Role.HOST, chunk_count=COUNT), Connection(Role.STORAGE)


def drain(conn: Connection) -> list[Event]:
    """Every event available now; sets the chunk count as a daemon would after the handshake."""
    out: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is CLOSED:
            return out
        out.append(event)
        if isinstance(event, Handshake) and conn.chunk_count is None:
            conn.set_chunk_count(COUNT)


def split(blob: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c % (len(blob) + 1) for c in cuts), len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(points)]


def feed(conn: Connection, pieces: list[bytes], *, eof: bool = False) -> list[Event]:
    events: list[Event] = []
    for piece in pieces:
        if piece:
            conn.receive_data(piece, now=1.0)
            events.extend(drain(conn))
    if eof:
        conn.receive_data(b"", now=1.0)
        events.extend(drain(conn))
    return events


def outcome(pieces: list[bytes], *, eof: bool = False) -> tuple[list[Event], str | None]:
    """Events, and the error if any, from feeding peer bytes (then maybe EOF) to a connection."""
    conn = Connection(Role.STORAGE, chunk_count=COUNT)
    events: list[Event] = []
    try:
        for piece in [*(p for p in pieces if p), *([b""] if eof else [])]:
            conn.receive_data(piece, now=1.0)
            while (event := conn.next_event()) is not NEED_DATA and event is not CLOSED:
                events.append(event)
    except RemoteProtocolError as exc:
        # Once broken, the connection stays broken.
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        assert conn.their_state is State.ERROR
        return events, str(exc)
    return events, None


indices = st.integers(0, COUNT - 1)
traffic: st.SearchStrategy[Message] = st.one_of(
    st.builds(Have, indices),
    st.builds(Request, indices),
    st.builds(Cancel, indices),
    st.builds(Reject, indices, st.text(max_size=20)),
    st.just(KeepAlive()),
    st.builds(Chunk, indices, st.binary(min_size=1, max_size=200)),
)
sessions = st.tuples(
    st.booleans(),
    st.lists(traffic, max_size=10),
    st.none() | st.builds(Goodbye, st.text(max_size=20)),
)


def session_messages(session: tuple[bool, list[Message], Goodbye | None]) -> list[Message]:
    with_bitfield, body, goodbye = session
    msgs: list[Message] = [hello()]
    if with_bitfield:
        msgs.append(Bitfield(full_bits()))
    msgs.extend(body)
    if goodbye is not None:
        msgs.append(goodbye)
    return msgs


@settings(max_examples=150)
@given(sessions, st.lists(st.integers(0, 1 << 14), max_size=25))
def test_every_message_round_trips_through_two_connections(
    session: tuple[bool, list[Message], Goodbye | None], cuts: list[int]
) -> None:
    sender, receiver = pair()
    msgs = session_messages(session)
    blob = b"".join(sender.send(m, now=0.5) for m in msgs)
    events = feed(receiver, split(blob, cuts), eof=True)
    assert events == [*msgs, ConnectionClosed(clean=session[2] is not None)]
    assert receiver.their_handshake == msgs[0]
    assert receiver.next_event() is CLOSED


@settings(max_examples=200)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=20))
def test_arbitrary_bytes_parse_or_raise_remote_error_whatever_the_split(
    blob: bytes, cuts: list[int]
) -> None:
    for eof in (False, True):
        whole = outcome([blob], eof=eof)
        assert outcome([blob[i : i + 1] for i in range(len(blob))], eof=eof) == whole
        assert outcome(split(blob, cuts), eof=eof) == whole


@settings(max_examples=200)
@given(
    sessions,
    st.lists(st.tuples(st.integers(0, 1 << 14), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 1 << 14),
)
def test_corrupted_valid_streams_parse_or_raise_remote_error(
    session: tuple[bool, list[Message], Goodbye | None],
    flips: list[tuple[int, int]],
    cut: int,
) -> None:
    sender = Connection(Role.HOST, chunk_count=COUNT)
    blob = bytearray(b"".join(sender.send(m, now=0.0) for m in session_messages(session)))
    for position, value in flips:
        blob[position % len(blob)] = value
    data = bytes(blob[: len(blob) - cut % len(blob)])
    whole = outcome([data], eof=True)
    assert outcome([data[i : i + 1] for i in range(len(data))], eof=True) == whole


def test_huge_length_prefix_raises_at_once_and_nothing_is_allocated() -> None:
    conn = Connection(Role.STORAGE)
    conn.receive_data(b"\xff\xff\xff\xff\x02\x91", now=0.0)
    with pytest.raises(RemoteProtocolError, match="frame length 4294967295"):
        conn.next_event()
    assert conn.buffered_bytes <= 6
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_eof_mid_frame_is_a_remote_error() -> None:
    sender, receiver = pair()
    blob = sender.send(hello(), now=0.0) + sender.send(Chunk(1, b"x" * 100), now=0.0)
    receiver.receive_data(blob[:-1], now=0.0)
    assert isinstance(receiver.next_event(), Handshake)
    receiver.set_chunk_count(COUNT)
    assert receiver.next_event() is NEED_DATA
    receiver.receive_data(b"", now=0.0)
    with pytest.raises(RemoteProtocolError, match="mid-frame"):
        receiver.next_event()


def test_eof_without_goodbye_is_an_unclean_close_then_closed_forever() -> None:
    sender, receiver = pair()
    receiver.receive_data(sender.send(hello(), now=0.0), now=0.0)
    receiver.receive_data(b"", now=0.0)
    assert isinstance(receiver.next_event(), Handshake)
    receiver.set_chunk_count(COUNT)
    assert receiver.next_event() == ConnectionClosed(clean=False)
    assert receiver.their_state is State.CLOSED
    assert receiver.next_event() is CLOSED
    assert receiver.next_event() is CLOSED
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        receiver.receive_data(b"more", now=0.0)


def test_goodbye_before_handshake_is_allowed_and_clean() -> None:
    _, receiver = pair()
    sender = Connection(Role.HOST)
    blob = sender.send(Goodbye("busy"), now=0.0)
    assert sender.our_state is State.CLOSED
    assert feed(receiver, [blob], eof=True) == [Goodbye("busy"), ConnectionClosed(clean=True)]


UNMAPPED: list[tuple[list[Message], Message]] = [
    ([], Have(1)),
    ([], Bitfield(full_bits())),
    ([], KeepAlive()),
    ([], Chunk(0, b"x")),
    ([hello()], hello()),
    ([hello(), Have(1)], Bitfield(full_bits())),
    ([hello(), Bitfield(full_bits())], Bitfield(full_bits())),
    ([hello(), Goodbye("bye")], Have(1)),
    ([Goodbye("bye")], hello()),
]


@pytest.mark.parametrize(("before", "message"), UNMAPPED)
def test_unmapped_transition_is_a_local_error_when_we_send(
    before: list[Message], message: Message
) -> None:
    conn = Connection(Role.HOST, chunk_count=COUNT)
    for m in before:
        conn.send(m, now=0.0)
    with pytest.raises(LocalProtocolError, match="cannot send"):
        conn.send(message, now=0.0)
    assert conn.our_state is State.ERROR
    with pytest.raises(LocalProtocolError):
        conn.send(KeepAlive(), now=0.0)


@pytest.mark.parametrize(("before", "message"), UNMAPPED)
def test_unmapped_transition_is_a_remote_error_when_they_send(
    before: list[Message], message: Message
) -> None:
    blob = b"".join(wire(m) for m in before)
    last = wire(message)
    receiver = Connection(Role.STORAGE, chunk_count=COUNT)
    events = feed(receiver, [blob])
    assert events == before
    receiver.receive_data(last, now=0.0)
    with pytest.raises(RemoteProtocolError, match=f"peer sent {type(message).__name__} in state"):
        receiver.next_event()
    assert receiver.their_state is State.ERROR


def test_transition_table_is_the_single_source_of_legal_moves() -> None:
    assert TRANSITIONS[(State.AWAIT_HANDSHAKE, Handshake)] is State.HANDSHAKEN
    assert TRANSITIONS[(State.HANDSHAKEN, Bitfield)] is State.ACTIVE
    assert (State.ACTIVE, Bitfield) not in TRANSITIONS
    assert all(state is not State.CLOSED for state, _ in TRANSITIONS)
    assert all(state is not State.ERROR for state, _ in TRANSITIONS)


def active_receiver(count: int | None = COUNT) -> Connection:
    receiver = Connection(Role.STORAGE, chunk_count=count)
    receiver.receive_data(wire(hello()), now=0.0)
    assert receiver.next_event() == hello()
    return receiver


@pytest.mark.parametrize(
    "bits",
    [full_bits(COUNT - 8), full_bits(COUNT) + b"\x00", b"\xff\xff\xff", b""],
    ids=["short", "long", "spare-bits-set", "empty"],
)
def test_bad_bitfield_is_rejected_in_both_directions(bits: bytes) -> None:
    receiver = active_receiver()
    receiver.receive_data(wire(Bitfield(bits)), now=0.0)
    with pytest.raises(RemoteProtocolError, match="bitfield"):
        receiver.next_event()
    sender = Connection(Role.HOST, chunk_count=COUNT)
    sender.send(hello(), now=0.0)
    with pytest.raises(LocalProtocolError, match="bitfield"):
        sender.send(Bitfield(bits), now=0.0)


def test_exact_bitfield_is_accepted() -> None:
    receiver = active_receiver()
    receiver.receive_data(wire(Bitfield(full_bits())), now=0.0)
    assert receiver.next_event() == Bitfield(full_bits())
    assert receiver.their_state is State.ACTIVE


@pytest.mark.parametrize(
    "message",
    [Have(COUNT), Request(COUNT), Cancel(COUNT + 5), Reject(COUNT, "no"), Chunk(COUNT, b"x")],
)
def test_index_past_the_chunk_count_is_rejected_in_both_directions(message: Message) -> None:
    receiver = active_receiver()
    receiver.receive_data(wire(message), now=0.0)
    with pytest.raises(RemoteProtocolError, match="out of range"):
        receiver.next_event()
    sender = Connection(Role.HOST, chunk_count=COUNT)
    sender.send(hello(), now=0.0)
    with pytest.raises(LocalProtocolError, match="out of range"):
        sender.send(message, now=0.0)


def test_reading_past_the_handshake_needs_the_chunk_count() -> None:
    receiver = active_receiver(count=None)
    receiver.receive_data(wire(Have(3)), now=0.0)
    with pytest.raises(LocalProtocolError, match="set_chunk_count"):
        receiver.next_event()
    receiver.set_chunk_count(COUNT)  # the daemon's fix: look up the template, then read on
    assert receiver.next_event() == Have(3)
    with pytest.raises(LocalProtocolError, match="already set"):
        receiver.set_chunk_count(COUNT + 1)


def test_unsupported_protocol_version_is_a_remote_error_that_says_so() -> None:
    receiver = Connection(Role.STORAGE)
    receiver.receive_data(wire(hello(version=PROTOCOL_VERSION + 1)), now=0.0)
    with pytest.raises(
        RemoteProtocolError, match=f"unsupported protocol version {PROTOCOL_VERSION + 1}"
    ):
        receiver.next_event()
    assert receiver.their_handshake is None
    with pytest.raises(
        LocalProtocolError, match=f"unsupported protocol version {PROTOCOL_VERSION + 1}"
    ):
        Connection(Role.HOST).send(hello(version=PROTOCOL_VERSION + 1), now=0.0)


def test_handshakes_must_name_the_same_template() -> None:
    initiator = Connection(Role.HOST, chunk_count=COUNT)
    initiator.send(hello(), now=0.0)
    initiator.receive_data(wire(hello(Role.STORAGE, template=b"U" * 32)), now=0.0)
    with pytest.raises(RemoteProtocolError, match="different templates"):
        initiator.next_event()
    acceptor = Connection(Role.STORAGE, chunk_count=COUNT)
    acceptor.receive_data(wire(hello()), now=0.0)
    assert acceptor.next_event() == hello()
    with pytest.raises(LocalProtocolError, match="different templates"):
        acceptor.send(hello(Role.STORAGE, template=b"U" * 32), now=0.0)


def test_our_handshake_must_state_our_role() -> None:
    conn = Connection(Role.STORAGE)
    with pytest.raises(LocalProtocolError, match="role host"):
        conn.send(hello(Role.HOST), now=0.0)


def test_send_parts_keeps_chunk_payload_separate_and_uncopied() -> None:
    conn = Connection(Role.STORAGE, chunk_count=COUNT, max_chunk_size=1024)
    conn.send(hello(Role.STORAGE), now=0.0)
    payload = memoryview(bytearray(b"z" * 1024))
    parts = conn.send_parts(Chunk(2, payload), now=0.0)
    assert len(parts) == 2
    assert parts[1] is payload
    assert conn.send(Have(2), now=0.0) == b"".join(conn.send_parts(Have(2), now=0.0))
    with pytest.raises(LocalProtocolError, match=r"outside 1\.\.1024"):
        conn.send(Chunk(2, b"z" * 1025), now=0.0)


def test_oversized_chunk_from_peer_is_rejected_at_its_header() -> None:
    receiver = Connection(Role.STORAGE, chunk_count=COUNT, max_chunk_size=1024)
    receiver.receive_data(wire(hello()), now=0.0)
    assert receiver.next_event() == hello()
    receiver.receive_data(wire(Chunk(1, b"x" * 2048))[:20], now=0.0)
    with pytest.raises(RemoteProtocolError, match="chunk payload of 2048 bytes"):
        receiver.next_event()
    assert receiver.buffered_bytes <= 20


def test_time_only_enters_as_now() -> None:
    conn = Connection(Role.HOST, chunk_count=COUNT, now=100.0)
    assert conn.idle_for(130.0) == 30.0
    assert not conn.keepalive_due(200.0, 10.0)  # nothing but a handshake may go out yet
    conn.send(hello(), now=101.0)
    assert conn.last_sent_at == 101.0
    assert not conn.keepalive_due(110.0, 10.0)
    assert conn.keepalive_due(111.0, 10.0)
    conn.receive_data(wire(hello(Role.STORAGE)), now=105.0)
    assert conn.last_received_at == 105.0
    assert conn.idle_for(112.5) == 7.5
    conn.send(KeepAlive(), now=111.0)
    assert not conn.keepalive_due(111.0, 10.0)
    conn.send(Goodbye("done"), now=112.0)
    assert not conn.keepalive_due(500.0, 10.0)


def test_only_wire_messages_can_be_sent() -> None:
    conn = Connection(Role.HOST)
    with pytest.raises(LocalProtocolError):
        conn.send(ConnectionClosed(clean=True), now=0.0)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Fragile(ControlMessage):
    """An extension message whose decoder has a bug."""

    def to_fields(self) -> list[Any]:
        return []

    @classmethod
    def from_fields(cls, fields: list[Any]) -> Self:
        raise KeyError("decoder bug")


def test_any_failure_while_parsing_peer_bytes_becomes_a_remote_error() -> None:
    codec = PEER_CODEC.extended({0x30: Fragile})
    receiver = Connection(Role.STORAGE, codec=codec)
    receiver.receive_data(codec.encode(Fragile()), now=0.0)
    with pytest.raises(RemoteProtocolError, match="decoder bug") as caught:
        receiver.next_event()
    assert isinstance(caught.value.__cause__, KeyError)
    assert receiver.their_state is State.ERROR


@settings(max_examples=100)
@given(sessions, st.lists(st.integers(0, 1 << 14), max_size=25))
def test_receiving_payloads_in_place_gives_the_same_events(
    session: tuple[bool, list[Message], Goodbye | None], cuts: list[int]
) -> None:
    msgs = session_messages(session)
    blob = b"".join(wire(m) for m in msgs)
    conn = Connection(Role.STORAGE)
    events: list[Event] = []
    for piece in split(blob, cuts):
        view = memoryview(piece)
        while view:
            target = conn.payload_buffer()
            if target is None:
                conn.receive_data(view, now=2.0)
                view = view[len(view) :]
            else:
                count = min(len(target), len(view))
                target[:count] = view[:count]
                conn.payload_received(count, now=2.0)
                view = view[count:]
            events.extend(drain(conn))
    assert events == msgs
    assert conn.payload_buffer() is None


def test_payload_received_moves_the_idle_clock_and_eof_ends_in_place_receiving() -> None:
    conn = Connection(Role.STORAGE, chunk_count=COUNT)
    blob = wire(hello()) + wire(Chunk(3, b"z" * 500))
    conn.receive_data(blob[:100], now=1.0)
    assert drain(conn) == [hello()]
    target = conn.payload_buffer()
    assert target is not None
    rest = blob[100:]
    target[: len(rest)] = rest
    conn.payload_received(len(rest), now=7.5)
    assert conn.idle_for(8.0) == 0.5
    assert drain(conn) == [Chunk(3, b"z" * 500)]
    conn.receive_data(wire(Chunk(4, b"y" * 500))[:20], now=9.0)
    assert drain(conn) == []
    assert conn.payload_buffer() is not None
    conn.receive_data(b"", now=9.0)
    assert conn.payload_buffer() is None
    with pytest.raises(LocalProtocolError):
        conn.payload_received(1, now=9.0)
    with pytest.raises(RemoteProtocolError, match="mid-frame"):
        conn.next_event()


# -- chunks in parts ---------------------------------------------------------------------------

PART = MIN_CHUNK_PART


def parts_sender() -> Connection:
    sender = Connection(Role.STORAGE, chunk_count=COUNT, max_chunk_size=4 * PART)
    sender.send(hello(Role.STORAGE), now=0.0)
    return sender


def test_a_chunk_sent_in_parts_with_control_between_arrives_after_the_control() -> None:
    sender = parts_sender()
    payload = bytes(range(256)) * (3 * PART // 256 + 1)  # three full parts and a short fourth
    out = []
    for offset in range(0, len(payload), PART):
        length = min(PART, len(payload) - offset)
        out.append(sender.send_chunk_part_header(5, len(payload), offset, length, now=1.0))
        out.append(payload[offset : offset + length])
        assert sender.mid_chunk == (offset + length < len(payload))
        out.append(sender.send(Have(offset // PART), now=1.0))
    receiver = active_receiver()
    events = feed(receiver, split(b"".join(out), [7, PART + 3, 2 * PART + 40]))
    assert events == [Have(0), Have(1), Have(2), Chunk(5, payload), Have(3)]


def test_parts_must_continue_the_chunk_in_order() -> None:
    sender = parts_sender()
    sender.send_chunk_part_header(1, 3 * PART, 0, PART, now=0.0)
    with pytest.raises(LocalProtocolError, match=r"chunk 1 .*next part is at 16384"):
        sender.send_chunk_part_header(1, 3 * PART, 2 * PART, PART, now=0.0)
    assert sender.our_state is State.ERROR


def test_no_other_chunk_may_cut_into_a_chunk_being_sent() -> None:
    sender = parts_sender()
    sender.send_chunk_part_header(1, 3 * PART, 0, PART, now=0.0)
    with pytest.raises(LocalProtocolError, match="in the middle of chunk 1"):
        sender.send_parts(Chunk(2, b"x"), now=0.0)
    with pytest.raises(LocalProtocolError, match="does not continue"):
        sender.send_chunk_part_header(2, 3 * PART, PART, PART, now=0.0)


def test_no_part_after_our_goodbye() -> None:
    sender = parts_sender()
    sender.send_chunk_part_header(1, 3 * PART, 0, PART, now=0.0)
    sender.send(Goodbye("stopping"), now=0.0)
    with pytest.raises(LocalProtocolError, match="state CLOSED"):
        sender.send_chunk_part_header(1, 3 * PART, PART, PART, now=0.0)


def test_a_chunk_left_unfinished_by_a_goodbye_is_a_clean_close() -> None:
    sender = parts_sender()
    blob = sender.send_chunk_part_header(1, 3 * PART, 0, PART, now=0.0) + b"a" * PART
    blob += sender.send(Goodbye("stopping"), now=0.0)
    events = feed(active_receiver(), [blob], eof=True)
    assert events == [Goodbye("stopping"), ConnectionClosed(clean=True)]


def test_a_stream_that_ends_between_parts_without_goodbye_is_cut() -> None:
    sender = parts_sender()
    blob = sender.send_chunk_part_header(1, 3 * PART, 0, PART, now=0.0) + b"a" * PART
    events, error = outcome([wire(hello()), blob], eof=True)
    assert events == [hello()]
    assert error is not None and "mid-frame" in error
