"""One peer link as a sans-IO state machine: bytes in, events out; messages in, bytes out.

Each side (ours and theirs) moves through the same `TRANSITIONS` table; a message that the
table does not map from the sender's current state is a protocol error on that side.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from .errors import LocalProtocolError, RemoteProtocolError, ends_stream
from .framing import (
    MAX_CHUNK_SIZE,
    PEER_CODEC,
    FrameReader,
    FrameWriter,
    MessageCodec,
    check_chunk_size,
    chunk_part_header,
)
from .messages import (
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

SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})


# A stand-in payload for `send_chunk_part_header`; bytes(n) is calloc'd, so it costs no memory.
_LENGTH_ONLY = memoryview(bytes(MAX_CHUNK_SIZE))


class State(enum.Enum):
    """Where one side of the link is."""

    AWAIT_HANDSHAKE = "AWAIT_HANDSHAKE"
    HANDSHAKEN = "HANDSHAKEN"
    ACTIVE = "ACTIVE"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


class Sentinel(enum.Enum):
    """Non-event results of `Connection.next_event`."""

    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA: Literal[Sentinel.NEED_DATA] = Sentinel.NEED_DATA
CLOSED: Literal[Sentinel.CLOSED] = Sentinel.CLOSED


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer's byte stream ended; `clean` if it said Goodbye first."""

    clean: bool


Event = Message | ConnectionClosed

_TRAFFIC: tuple[type[Message], ...] = (Have, Request, Chunk, Cancel, Reject, KeepAlive)

# Every legal move of one side: (state, message type sent by that side) -> next state.
TRANSITIONS: Mapping[tuple[State, type[Message]], State] = MappingProxyType(
    {
        (State.AWAIT_HANDSHAKE, Handshake): State.HANDSHAKEN,
        (State.AWAIT_HANDSHAKE, Goodbye): State.CLOSED,
        (State.HANDSHAKEN, Bitfield): State.ACTIVE,
        **{(State.HANDSHAKEN, kind): State.ACTIVE for kind in _TRAFFIC},
        **{(State.ACTIVE, kind): State.ACTIVE for kind in _TRAFFIC},
        (State.HANDSHAKEN, Goodbye): State.CLOSED,
        (State.ACTIVE, Goodbye): State.CLOSED,
    }
)

# TRANSITIONS regrouped by state, so the hot path hashes a type instead of an enum member.
_MOVES: Mapping[State, Mapping[type[Message], State]] = MappingProxyType(
    {
        state: {kind: target for (origin, kind), target in TRANSITIONS.items() if origin is state}
        for state in State
    }
)
_INDEXED = (Have, Request, Chunk, Cancel, Reject)


class Connection:
    """The peer protocol on one link; the caller does all I/O and supplies the time."""

    def __init__(
        self,
        our_role: Role,
        *,
        max_chunk_size: int = MAX_CHUNK_SIZE,
        chunk_count: int | None = None,
        codec: MessageCodec = PEER_CODEC,
        allocate: Callable[[int], bytearray] = bytearray,
        now: float = 0.0,
    ) -> None:
        if not isinstance(our_role, Role):
            raise LocalProtocolError(f"our_role must be a Role, got {our_role!r}")
        self.our_role = our_role
        self.max_chunk_size = check_chunk_size(max_chunk_size)
        self._codec = codec
        self._reader = FrameReader(codec, max_chunk_size=max_chunk_size, allocate=allocate)
        self._writer = FrameWriter(codec, max_chunk_size=max_chunk_size)
        self._chunk_count: int | None = None
        if chunk_count is not None:
            self.set_chunk_count(chunk_count)
        self._our_state = State.AWAIT_HANDSHAKE
        self._their_state = State.AWAIT_HANDSHAKE
        self._our_moves = _MOVES[State.AWAIT_HANDSHAKE]
        self._their_moves = _MOVES[State.AWAIT_HANDSHAKE]
        self._our_handshake: Handshake | None = None
        self._their_handshake: Handshake | None = None
        self._their_error: RemoteProtocolError | None = None
        self._eof = False
        self._closed_reported = False
        # The chunk we are sending in parts: (index, size, offset of its next part).
        self._sending: tuple[int, int, int] | None = None
        self.last_received_at = now
        self.last_sent_at = now

    # -- state ------------------------------------------------------------------------------

    @property
    def our_state(self) -> State:
        return self._our_state

    @property
    def their_state(self) -> State:
        return self._their_state

    @property
    def their_handshake(self) -> Handshake | None:
        return self._their_handshake

    @property
    def chunk_count(self) -> int | None:
        return self._chunk_count

    @property
    def buffered_bytes(self) -> int:
        """Receive-side memory held right now (for limits and tests)."""
        return self._reader.allocated

    def set_chunk_count(self, count: int) -> None:
        """Fix the template's chunk count; indices and bitfields are checked against it."""
        # The bitfield of `count` chunks must fit in one control frame, with msgpack overhead.
        most = (self._codec.max_control_size - 16) * 8
        if type(count) is not int or not 0 <= count <= most:
            raise LocalProtocolError(f"chunk count must be an int in 0..{most}, got {count!r}")
        if self._chunk_count is not None and self._chunk_count != count:
            raise LocalProtocolError(f"chunk count already set to {self._chunk_count}")
        self._chunk_count = count

    # -- time -------------------------------------------------------------------------------

    def idle_for(self, now: float) -> float:
        """Seconds since the peer last sent us anything (or since the link came up)."""
        return now - self.last_received_at

    def keepalive_due(self, now: float, interval: float) -> bool:
        """Whether we have been silent for `interval` seconds and may send a KeepAlive."""
        return KeepAlive in self._our_moves and now - self.last_sent_at >= interval

    # -- receiving --------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, *, now: float) -> None:
        """Buffer bytes from the peer; b"" means the peer closed its end."""
        if ends_stream(self._eof, data):
            self._eof = True
            return
        self.last_received_at = now
        self._reader.feed(data)

    def set_allocator(self, allocate: Callable[[int], bytearray]) -> None:
        """Where later chunk payload buffers come from (at least the size asked; e.g. a pool)."""
        self._reader.set_allocator(allocate)

    def payload_buffer(self) -> memoryview | None:
        """Where the next bytes from the peer belong when they continue a chunk payload.

        None unless a chunk's header has arrived and its payload has not. Receive into the view
        (never more than its length), then call `payload_received(count, now=...)`; this saves
        copying the payload through `receive_data`. The end of the stream still goes through
        `receive_data(b"")`.
        """
        if self._eof:
            return None
        return self._reader.payload_buffer()

    def payload_received(self, count: int, *, now: float) -> None:
        """`count` bytes were received into the view `payload_buffer` returned."""
        if self._eof:
            raise LocalProtocolError("received data after end of stream")
        self._reader.payload_received(count)
        if count:
            self.last_received_at = now

    def next_event(self) -> Event | Literal[Sentinel.NEED_DATA, Sentinel.CLOSED]:
        """The next event from the peer, NEED_DATA, or CLOSED once the end was reported."""
        if self._their_error is not None:
            raise RemoteProtocolError(
                f"peer already broke the protocol: {self._their_error}"
            ) from self._their_error
        if self._chunk_count is None and self._their_state in (State.HANDSHAKEN, State.ACTIVE):
            raise LocalProtocolError(
                "call set_chunk_count() after the handshake, before reading on"
            )
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._fail_theirs(exc)
            raise
        except LocalProtocolError:
            raise
        except Exception as exc:
            # Whatever breaks while parsing peer bytes is the peer's fault, by contract.
            error = RemoteProtocolError(f"unparseable data from peer: {exc!r}")
            self._fail_theirs(error)
            raise error from exc

    def _set_theirs(self, state: State) -> None:
        self._their_state = state
        self._their_moves = _MOVES[state]

    def _set_ours(self, state: State) -> None:
        self._our_state = state
        self._our_moves = _MOVES[state]

    def _fail_theirs(self, error: RemoteProtocolError) -> None:
        self._set_theirs(State.ERROR)
        self._their_error = error

    def _next_event(self) -> Event | Literal[Sentinel.NEED_DATA, Sentinel.CLOSED]:
        message = self._reader.next_message()
        if message is not None:
            self._receive(message)
            return message
        if not self._eof:
            return NEED_DATA
        # After a Goodbye, an unfinished chunk was abandoned on purpose; otherwise it is a cut.
        if self._reader.mid_frame and self._their_state is not State.CLOSED:
            raise RemoteProtocolError(
                f"peer closed the stream mid-frame, {self._reader.buffered} bytes pending"
            )
        if self._closed_reported:
            return CLOSED
        self._closed_reported = True
        clean = self._their_state is State.CLOSED
        self._set_theirs(State.CLOSED)
        return ConnectionClosed(clean=clean)

    def _receive(self, message: Message) -> None:
        kind = type(message)
        new_state = self._their_moves.get(kind)
        if new_state is None:
            raise RemoteProtocolError(
                f"peer sent {kind.__name__} in state {self._their_state.value}"
            )
        try:
            self._check(message, theirs=True)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(str(exc)) from exc
        if isinstance(message, Handshake):
            self._their_handshake = message
        if new_state is not self._their_state:
            self._set_theirs(new_state)

    # -- sending ----------------------------------------------------------------------------

    def send(self, message: Message, *, now: float) -> bytes:
        """The bytes to write for `message`."""
        parts = self.send_parts(message, now=now)
        first = parts[0]
        if len(parts) == 1 and isinstance(first, bytes):
            return first
        return b"".join(parts)

    def send_parts(self, message: Message, *, now: float) -> list[bytes | memoryview]:
        """Like `send`, but a chunk's header and payload stay separate buffers (no copy)."""
        if isinstance(message, Chunk) and self._sending is not None:
            raise LocalProtocolError(f"cannot send a chunk in the middle of {self._sending_text()}")
        parts = self._record_send(message)
        self.last_sent_at = now
        return parts

    def _record_send(self, message: Message) -> list[bytes | memoryview]:
        """Check `message` against our state, move the state on, and frame it."""
        if self._our_state is State.ERROR:
            raise LocalProtocolError("cannot send: an earlier send broke the protocol")
        try:
            new_state = self._our_moves.get(type(message))
            if new_state is None:
                raise LocalProtocolError(
                    f"cannot send {type(message).__name__} in state {self._our_state.value}"
                )
            self._check(message, theirs=False)
            parts = self._writer.parts(message)
        except LocalProtocolError:
            self._set_ours(State.ERROR)
            raise
        except Exception as exc:
            # A broken extension message must not leak a random exception type to the daemon.
            self._set_ours(State.ERROR)
            raise LocalProtocolError(f"cannot send {type(message).__name__}: {exc!r}") from exc
        if isinstance(message, Handshake):
            self._our_handshake = message
        if new_state is not self._our_state:
            self._set_ours(new_state)
        return parts

    @property
    def mid_chunk(self) -> bool:
        """Whether a chunk sent in parts has parts still to go (nothing but control may cut in)."""
        return self._sending is not None

    def send_chunk_part_header(
        self, index: int, size: int, offset: int, length: int, *, now: float
    ) -> bytes:
        """The frame header of `length` bytes at `offset` of the `size`-byte chunk `index`.

        The caller sends the payload itself (zero-copy senders). Parts go in order, from offset
        0 to the end; control messages may be sent between them, another chunk may not. The
        first part is checked and recorded exactly like `send_parts(Chunk(...))`.
        """
        if not 0 <= size <= self.max_chunk_size:
            raise LocalProtocolError(f"chunk of {size} bytes is over {self.max_chunk_size}")
        if offset and Chunk not in self._our_moves:
            error = LocalProtocolError(f"cannot send a chunk part in state {self._our_state.value}")
            self._set_ours(State.ERROR)
            raise error
        if offset == 0:
            # Only the length of this view is read: the lazily zeroed buffer is never touched.
            self._record_send(Chunk(index, _LENGTH_ONLY[:size]))
        elif self._sending != (index, size, offset):
            self._set_ours(State.ERROR)
            raise LocalProtocolError(
                f"part at {offset} of chunk {index} ({size} bytes) does not continue "
                f"{self._sending_text()}"
            )
        try:
            header = chunk_part_header(index, size, offset, length, self.max_chunk_size)
        except LocalProtocolError:
            self._set_ours(State.ERROR)
            raise
        self._sending = None if offset + length == size else (index, size, offset + length)
        self.last_sent_at = now
        return header

    def _sending_text(self) -> str:
        if self._sending is None:
            return "no chunk: a chunk's first part is at offset 0"
        index, size, offset = self._sending
        return f"chunk {index} ({size} bytes), whose next part is at {offset}"

    # -- validation shared by both directions -----------------------------------------------

    def _check(self, message: Message, *, theirs: bool) -> None:
        """Rules that need connection context; raises LocalProtocolError (callers convert)."""
        if isinstance(message, _INDEXED):
            count = self._need_count(message)
            if message.index >= count:
                raise LocalProtocolError(
                    f"{type(message).__name__} index {message.index} out of range "
                    f"for {count} chunks"
                )
        elif isinstance(message, Handshake):
            self._check_handshake(message, theirs=theirs)
        elif isinstance(message, Bitfield):
            _check_bitfield(message.bits, self._need_count(message))

    def _need_count(self, message: Message) -> int:
        if self._chunk_count is None:
            raise LocalProtocolError(
                f"cannot check {type(message).__name__} before set_chunk_count()"
            )
        return self._chunk_count

    def _check_handshake(self, message: Handshake, *, theirs: bool) -> None:
        if message.protocol_version not in SUPPORTED_VERSIONS:
            raise LocalProtocolError(
                f"unsupported protocol version {message.protocol_version}; "
                f"we speak {sorted(SUPPORTED_VERSIONS)}"
            )
        if not theirs and message.role is not self.our_role:
            raise LocalProtocolError(
                f"handshake says role {message.role.value}, but we are {self.our_role.value}"
            )
        other = self._our_handshake if theirs else self._their_handshake
        if other is not None and other.template_id != message.template_id:
            raise LocalProtocolError(
                f"handshakes name different templates: {message.template_id.hex()} "
                f"vs {other.template_id.hex()}"
            )


def _check_bitfield(bits: bytes, count: int) -> None:
    expected = (count + 7) // 8
    if len(bits) != expected:
        raise LocalProtocolError(
            f"bitfield of {len(bits)} bytes, but {count} chunks need {expected}"
        )
    spare = expected * 8 - count
    if spare and bits[-1] & ((1 << spare) - 1):
        raise LocalProtocolError("bitfield has bits set past the last chunk")
