"""Fuzz target: the peer Connection state machine, fed valid, invalid and corrupted frames.

The input is a script: a configuration, then operations (a peer frame, garbage, a corrupted or
flooded frame, delivery of some pending bytes by `receive_data` or `payload_buffer`, a send of
ours, the end of the stream). Properties: receiving raises nothing but RemoteProtocolError,
every event is a legal move of the peer with checked fields, sending raises nothing but
LocalProtocolError, and a drained connection holds a bounded number of bytes.
"""

from __future__ import annotations

from typing import Any

from vmswarm.swarm.connection import (
    CLOSED,
    NEED_DATA,
    SUPPORTED_VERSIONS,
    TRANSITIONS,
    Connection,
    ConnectionClosed,
    State,
)
from vmswarm.swarm.errors import LocalProtocolError, RemoteProtocolError
from vmswarm.swarm.framing import (
    CHUNK_HEADER,
    CHUNK_OVERHEAD,
    PEER_CODEC,
    MessageCodec,
)
from vmswarm.swarm.messages import (
    CHUNK_TYPE,
    MAX_INDEX,
    PEER_MESSAGES,
    PROTOCOL_VERSION,
    Bitfield,
    Cancel,
    Chunk,
    Goodbye,
    Handshake,
    Have,
    KeepAlive,
    Message,
    Reject,
    Request,
    Role,
)

from .checks import corrupt, frame, hostile_value, not_a_safety_net, reader_bound, require
from .script import Input, InputWriter

NAME = "connection"
MAX_LEN = 4096
TEMPLATE = bytes(range(32))
OTHER_TEMPLATE = bytes(range(1, 33))
SMALL_CODEC = MessageCodec(PEER_MESSAGES, max_control_size=1024)
CODECS = (PEER_CODEC, SMALL_CODEC)
CHUNK_SIZES = (1, 16, 256)
CHUNK_COUNTS = (0, 1, 7, 8, 9, 64, 1000)
CODES = tuple(sorted(PEER_MESSAGES))
SEND_KINDS: tuple[type[Message], ...] = (
    Handshake,
    Bitfield,
    Have,
    Request,
    Cancel,
    Reject,
    KeepAlive,
    Goodbye,
    Chunk,
)
OP_FRAME, OP_RAW, OP_CORRUPT, OP_FLOOD, OP_DELIVER, OP_IN_PLACE, OP_SEND, OP_EOF = range(8)
MAX_RAW = 1024
MAX_DELIVER = 1 << 14
MAX_FLOOD = 128


class Harness:
    """One Connection plus a model of what the peer may legally have done so far."""

    def __init__(self, inp: Input) -> None:
        self.role = inp.choice((Role.HOST, Role.STORAGE))
        self.codec = inp.choice(CODECS)
        self.max_chunk = inp.choice(CHUNK_SIZES)
        self.count = inp.choice(CHUNK_COUNTS)
        self.count_known = inp.flag()  # else it is set once the peer's handshake arrives
        self.conn = Connection(
            self.role,
            max_chunk_size=self.max_chunk,
            chunk_count=self.count if self.count_known else None,
            codec=self.codec,
        )
        max_frame = max(self.codec.max_control_size, CHUNK_OVERHEAD + self.max_chunk)
        self.bound = reader_bound(max_frame, self.max_chunk)
        self.theirs = State.AWAIT_HANDSHAKE
        self.ours = State.AWAIT_HANDSHAKE
        self.sent_template: bytes | None = None
        self.pending = bytearray()
        self.last_frame = b""
        self.eof = False
        self.done = False
        self.now = 0.0
        self.trace: list[str] = []

    # -- the peer's side: bytes on the wire ------------------------------------------------

    def deliver(self, count: int, *, in_place: bool) -> None:
        if self.eof or not self.pending:
            return
        self.now += 1.0
        view = self.conn.payload_buffer() if in_place else None
        if view is not None:
            taken = min(len(view), count, len(self.pending))
            view[:taken] = self.pending[:taken]
            self.conn.payload_received(taken, now=self.now)
        else:
            taken = min(count, len(self.pending))
            self.conn.receive_data(bytes(self.pending[:taken]), now=self.now)
            require(self.conn.last_received_at == self.now, "receiving did not move the clock")
        del self.pending[:taken]
        self.drain()

    def end(self) -> None:
        if not self.eof:
            self.eof = True
            self.conn.receive_data(b"", now=self.now)
            self.drain()

    def drain(self) -> None:
        while not self.done:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as error:
                not_a_safety_net(error)
                self._broken()
                return
            if event is NEED_DATA:
                held = self.conn.buffered_bytes
                require(held <= self.bound, f"{held} bytes held, bound {self.bound}")
                return
            if event is CLOSED:
                require(self.theirs is State.CLOSED, f"CLOSED reported in {self.theirs}")
                self.done = True
                return
            if isinstance(event, ConnectionClosed):
                require(self.eof, "ConnectionClosed before the end of the stream")
                require(event.clean == (self.theirs is State.CLOSED), f"clean={event.clean} wrong")
                self.theirs = State.CLOSED
                self.trace.append("ConnectionClosed")
                continue
            assert isinstance(event, Message)
            self._check_event(event)

    def _broken(self) -> None:
        require(self.conn.their_state is State.ERROR, "a protocol error left the state alone")
        try:
            again = self.conn.next_event()
        except RemoteProtocolError:
            again = None
        require(again is None, f"a broken connection produced {again!r}")
        self.trace.append("RemoteProtocolError")
        self.done = True  # the daemon drops the link here

    def _check_event(self, event: Message) -> None:
        kind = type(event)
        expected = TRANSITIONS.get((self.theirs, kind))
        require(expected is not None, f"accepted {kind.__name__} in {self.theirs}")
        assert expected is not None
        require(self.conn.their_state is expected, f"{self.conn.their_state} after {kind}")
        self.theirs = expected
        self.trace.append(kind.__name__)
        if isinstance(event, Handshake):
            require(event.protocol_version in SUPPORTED_VERSIONS, "unsupported version accepted")
            if self.sent_template is not None:
                require(event.template_id == self.sent_template, "template mismatch accepted")
            if not self.count_known:
                self.conn.set_chunk_count(self.count)
                self.count_known = True
        elif isinstance(event, Bitfield):
            require(len(event.bits) == (self.count + 7) // 8, "bitfield of the wrong size")
        elif isinstance(event, Have | Request | Cancel | Reject | Chunk):
            require(event.index < self.count, f"index {event.index} of {self.count} accepted")
        if isinstance(event, Chunk):
            require(1 <= event.size <= self.max_chunk, f"{event.size}-byte chunk accepted")

    def queue(self, frame: bytes) -> None:
        self.pending += frame
        self.last_frame = frame

    # -- our side: sends -------------------------------------------------------------------

    def send(self, kind: type[Message], arg: int) -> None:
        try:
            message = _our_message(kind, arg, self.role, self.count)
        except LocalProtocolError:
            return  # our own constructor refused the fields: nothing reached the connection
        before = self.ours
        try:
            parts = self.conn.send_parts(message, now=self.now)
        except LocalProtocolError:
            require(self.conn.our_state is State.ERROR, "a refused send left our state alone")
            self.ours = State.ERROR
            return
        expected = TRANSITIONS.get((before, kind))
        require(expected is not None, f"sent {kind.__name__} in {before}")
        require(self.conn.our_state is expected, f"our state {self.conn.our_state}")
        assert expected is not None
        self.ours = expected
        require(len(parts) >= 1, "a send produced nothing")
        if isinstance(message, Handshake):
            self.sent_template = message.template_id


def _our_message(kind: type[Message], arg: int, role: Role, count: int) -> Message:
    """One of our messages from a single number, so seeds can name sends compactly."""
    index = arg % (count + 2)  # in range, or just past it
    if kind is Handshake:
        template = OTHER_TEMPLATE if arg & 1 else TEMPLATE
        other_role = Role.STORAGE if role is Role.HOST else Role.HOST
        return Handshake(
            1 + (arg >> 3 & 1), template, b"o" * 16, None, other_role if arg & 2 else role
        )
    if kind is Bitfield:
        size = (count + 7) // 8 + (arg & 1)
        return Bitfield(bytes(size))
    if kind is Reject:
        return Reject(index, "busy")
    if kind is Goodbye:
        return Goodbye("bye")
    if kind is KeepAlive:
        return KeepAlive()
    if kind is Chunk:
        return Chunk(index, b"c" * (1 + (arg >> 8) % 300))
    assert kind in (Have, Request, Cancel)
    return kind(index)


# -- the peer's frames, mostly well-formed -------------------------------------------------


def _index(inp: Input, count: int) -> Any:
    pick = inp.int(0, 7)
    if pick < 4:
        return inp.int(0, max(count - 1, 0))
    if pick == 4:
        return count
    if pick == 5:
        return inp.choice((MAX_INDEX, MAX_INDEX + 1, -1, True))
    return hostile_value(inp)


def _field(inp: Input, good: Any) -> Any:
    """`good` most of the time, else something hostile."""
    return good if inp.int(0, 3) else hostile_value(inp)


def peer_frame(inp: Input, harness: Harness) -> bytes:
    count = harness.count
    kind = inp.int(0, len(CODES) + 2)
    if kind == len(CODES):
        size = inp.int(0, harness.max_chunk + 1)
        payload = inp.bytes(size).ljust(size, b"\x00")
        index = _index_int(inp, count)
        header = CHUNK_HEADER.pack(CHUNK_OVERHEAD + size, CHUNK_TYPE, index, size, 0)
        return header + payload
    if kind > len(CODES):
        return frame(inp.int(0, 0xFF), hostile_value(inp))
    code = CODES[kind]
    cls = PEER_MESSAGES[code]
    fields: list[Any]
    if cls is Handshake:
        listen = inp.choice((None, ["10.0.0.1", 7000], ["", 1], ["h", 0], ["h" * 256, 80]))
        role = inp.choice(("host", "storage", "tracker"))
        template = inp.choice((TEMPLATE, OTHER_TEMPLATE, TEMPLATE[:31]))
        version = inp.choice((1, 0, 2, 0xFFFF, 0x10000))
        fields = [version, template, b"p" * 16, listen, role]
        fields = [_field(inp, f) for f in fields]
    elif cls is Bitfield:
        size = (count + 7) // 8 + inp.int(-1, 1)
        fields = [_field(inp, inp.bytes(max(size, 0)).ljust(max(size, 0), b"\x00"))]
    elif cls is Reject:
        fields = [_index(inp, count), _field(inp, "x" * inp.int(0, 1030))]
    elif cls is Goodbye:
        fields = [_field(inp, "x" * inp.int(0, 1030))]
    elif cls is KeepAlive:
        fields = []
    else:
        fields = [_index(inp, count)]
    shape = inp.int(0, 7)
    if shape == 0:
        fields.append(hostile_value(inp))
    elif shape == 1 and fields:
        fields.pop()
    elif shape == 2:
        return frame(code, hostile_value(inp))
    return frame(code, fields)


def _index_int(inp: Input, count: int) -> int:
    return inp.int(0, count) if inp.int(0, 3) else inp.int(0, MAX_INDEX)


def fuzz_one(data: bytes) -> list[str]:
    inp = Input(data)
    harness = Harness(inp)
    while inp.remaining() and not harness.done:
        op = inp.int(0, OP_EOF)
        if op == OP_FRAME:
            harness.queue(peer_frame(inp, harness))
        elif op == OP_RAW:
            harness.queue(inp.sized_bytes(MAX_RAW))
        elif op == OP_CORRUPT:
            harness.queue(corrupt(inp, peer_frame(inp, harness)))
        elif op == OP_FLOOD:
            harness.pending += harness.last_frame * inp.int(1, MAX_FLOOD)
        elif op in (OP_DELIVER, OP_IN_PLACE):
            harness.deliver(inp.int(1, MAX_DELIVER), in_place=op == OP_IN_PLACE)
        elif op == OP_SEND:
            harness.send(inp.choice(SEND_KINDS), inp.int(0, 0xFFFF))
        else:
            harness.deliver(len(harness.pending), in_place=False)
            harness.end()
    if not harness.done:
        harness.deliver(len(harness.pending), in_place=False)
        harness.end()
    return harness.trace


# -- seeds: real exchanges, written through the RAW and DELIVER operations -------------------


def _session(role: Role, count: int, max_chunk: int, count_known: bool) -> InputWriter:
    writer = InputWriter().choice((Role.HOST, Role.STORAGE), role).choice(CODECS, PEER_CODEC)
    writer.choice(CHUNK_SIZES, max_chunk).choice(CHUNK_COUNTS, count).flag(count_known)
    return writer


def _raw(writer: InputWriter, frame: bytes) -> None:
    writer.int(0, OP_EOF, OP_RAW).sized_bytes(MAX_RAW, frame)


def _deliver(writer: InputWriter, size: int, *, in_place: bool = False) -> None:
    writer.int(0, OP_EOF, OP_IN_PLACE if in_place else OP_DELIVER).int(1, MAX_DELIVER, size)


def _send(writer: InputWriter, kind: type[Message], arg: int = 0) -> None:
    writer.int(0, OP_EOF, OP_SEND).choice(SEND_KINDS, kind).int(0, 0xFFFF, arg)


def seeds() -> list[bytes]:
    peer_role = {Role.HOST: Role.STORAGE, Role.STORAGE: Role.HOST}
    out = []
    for role, count, max_chunk, known in (
        (Role.HOST, 9, 16, True),
        (Role.STORAGE, 64, 256, False),
        (Role.HOST, 1, 1, False),
    ):
        listen = ("10.0.0.9", 7001)
        hello = Handshake(PROTOCOL_VERSION, TEMPLATE, b"p" * 16, listen, peer_role[role])
        bits = bytearray((count + 7) // 8)
        bits[0] = 0x80
        frames = [
            PEER_CODEC.encode(hello),
            PEER_CODEC.encode(Bitfield(bytes(bits))),
            PEER_CODEC.encode(Have(0)),
            PEER_CODEC.encode(Request(count - 1)),
            CHUNK_HEADER.pack(CHUNK_OVERHEAD + max_chunk, CHUNK_TYPE, 0, max_chunk, 0)
            + b"z" * max_chunk,
            PEER_CODEC.encode(Reject(0, "no")),
            PEER_CODEC.encode(Cancel(0)),
            PEER_CODEC.encode(KeepAlive()),
            PEER_CODEC.encode(Goodbye("done")),
        ]
        writer = _session(role, count, max_chunk, known)
        _send(writer, Handshake)
        _send(writer, Bitfield)
        for data in frames:
            _raw(writer, data)
            _deliver(writer, 3)
            _deliver(writer, 10, in_place=True)
            _deliver(writer, len(data))
        _send(writer, Have, 1)
        writer.int(0, OP_EOF, OP_EOF)
        out.append(writer.build())
    # A flood of keep-alives, then garbage.
    writer = _session(Role.HOST, 8, 16, True)
    hello = Handshake(PROTOCOL_VERSION, TEMPLATE, b"p" * 16, None, Role.STORAGE)
    _raw(writer, PEER_CODEC.encode(hello))
    _raw(writer, PEER_CODEC.encode(KeepAlive()))
    writer.int(0, OP_EOF, OP_FLOOD).int(1, MAX_FLOOD, MAX_FLOOD)
    _deliver(writer, MAX_DELIVER)
    _raw(writer, b"\x00\x00\x00\x02\x07\xc1")
    out.append(writer.build())
    return out


DICTIONARY = [b"\x00\x00\x00", b"\x04", b"\x91", b"\x95", b"\xc4\x20", b"\xa4host", b"\xa7storage"]
