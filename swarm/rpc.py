"""Request/response messages for the tracker and the operator API, on the peer protocol's framing.

A client sends `Call`s one at a time; the server may stream `Notice`s (progress) before it
answers with exactly one `Reply` or `Fail`. `RpcConnection` enforces that order from one table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal, Self

from .errors import LocalProtocolError, RemoteProtocolError, ends_stream
from .framing import FrameReader, MessageCodec, frame_parts
from .messages import PEER_MESSAGES, ControlMessage, Goodbye, KeepAlive, Message

MAX_METHOD_LENGTH = 64
MAX_CODE_LENGTH = 64
MAX_MESSAGE_LENGTH = 4096
# RPC frames carry manifests and catalog listings, so they may be larger than peer control frames.
MAX_RPC_FRAME = 1 << 25
MAX_CALL_ID = (1 << 63) - 1


def _fail(cls: type, problem: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"bad {cls.__name__}: {problem}")


def _text(value: object, name: str, limit: int) -> str:
    if type(value) is not str or not value or len(value) > limit:
        raise LocalProtocolError(f"{name} must be a non-empty str of at most {limit} chars")
    return value


def _call_id(value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_CALL_ID:
        raise LocalProtocolError(f"call_id must be an int in 0..{MAX_CALL_ID}")
    return value


def _mapping(value: object, name: str) -> dict[str, Any]:
    if type(value) is not dict or not all(type(k) is str for k in value):
        raise LocalProtocolError(f"{name} must be a dict with str keys")
    return value


def _from_fields(cls: type[Any], fields: Any, count: int) -> Any:
    if type(fields) is not list or len(fields) != count:
        raise _fail(cls, f"needs a list of {count} fields")
    try:
        return cls(*fields)
    except LocalProtocolError as exc:
        raise _fail(cls, str(exc)) from exc


@dataclass(frozen=True, slots=True)
class Call(ControlMessage):
    """Ask the server to run `method` with `params`."""

    # RPC bodies carry manifests and listings: bounded by the RPC frame limit only.
    max_body: ClassVar[int | None] = None

    call_id: int
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _call_id(self.call_id)
        _text(self.method, "method", MAX_METHOD_LENGTH)
        _mapping(self.params, "params")

    def to_fields(self) -> list[Any]:
        return [self.call_id, self.method, self.params]

    @classmethod
    def from_fields(cls, fields: list[Any]) -> Self:
        result: Self = _from_fields(cls, fields, 3)
        return result


@dataclass(frozen=True, slots=True)
class Reply(ControlMessage):
    """The successful result of call `call_id`."""

    # RPC bodies carry manifests and listings: bounded by the RPC frame limit only.
    max_body: ClassVar[int | None] = None

    call_id: int
    result: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _call_id(self.call_id)
        _mapping(self.result, "result")

    def to_fields(self) -> list[Any]:
        return [self.call_id, self.result]

    @classmethod
    def from_fields(cls, fields: list[Any]) -> Self:
        result: Self = _from_fields(cls, fields, 2)
        return result


@dataclass(frozen=True, slots=True)
class Fail(ControlMessage):
    """Call `call_id` failed: a machine-readable `code` and a message for the operator."""

    # RPC bodies carry manifests and listings: bounded by the RPC frame limit only.
    max_body: ClassVar[int | None] = None

    call_id: int
    code: str
    message: str

    def __post_init__(self) -> None:
        _call_id(self.call_id)
        _text(self.code, "code", MAX_CODE_LENGTH)
        if type(self.message) is not str or len(self.message) > MAX_MESSAGE_LENGTH:
            raise LocalProtocolError(f"message must be a str of at most {MAX_MESSAGE_LENGTH}")

    def to_fields(self) -> list[Any]:
        return [self.call_id, self.code, self.message]

    @classmethod
    def from_fields(cls, fields: list[Any]) -> Self:
        result: Self = _from_fields(cls, fields, 3)
        return result


@dataclass(frozen=True, slots=True)
class Notice(ControlMessage):
    """Progress of call `call_id` while it runs."""

    # RPC bodies carry manifests and listings: bounded by the RPC frame limit only.
    max_body: ClassVar[int | None] = None

    call_id: int
    event: str
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _call_id(self.call_id)
        _text(self.event, "event", MAX_METHOD_LENGTH)
        _mapping(self.data, "data")

    def to_fields(self) -> list[Any]:
        return [self.call_id, self.event, self.data]

    @classmethod
    def from_fields(cls, fields: list[Any]) -> Self:
        result: Self = _from_fields(cls, fields, 3)
        return result


RPC_MESSAGES: Mapping[int, type[ControlMessage]] = MappingProxyType(
    {0x20: Call, 0x21: Reply, 0x22: Fail, 0x23: Notice}
)
RPC_TYPE_CODES = frozenset(RPC_MESSAGES)
# One codec knows both protocols, so a listener can read a first frame and then choose; the
# RPC limit is larger than the peer codec's, so it is built anew rather than with `extended`.
_CLASHES = sorted(set(PEER_MESSAGES) & set(RPC_MESSAGES))
if _CLASHES:
    raise LocalProtocolError(f"RPC type codes clash with peer messages: {_CLASHES}")
WIRE_CODEC = MessageCodec({**PEER_MESSAGES, **RPC_MESSAGES}, max_control_size=MAX_RPC_FRAME)


def is_rpc_frame_type(code: int) -> bool:
    """Whether a frame's type byte opens an RPC session rather than a peer link."""
    return code in RPC_TYPE_CODES


class RpcSide(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class RpcState(enum.Enum):
    IDLE = "IDLE"
    IN_CALL = "IN_CALL"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


# Legal moves of the shared call state: (state, sender side, message type) -> next state.
RPC_TRANSITIONS: Mapping[tuple[RpcState, RpcSide, type[Message]], RpcState] = MappingProxyType(
    {
        (RpcState.IDLE, RpcSide.CLIENT, Call): RpcState.IN_CALL,
        (RpcState.IN_CALL, RpcSide.SERVER, Notice): RpcState.IN_CALL,
        (RpcState.IN_CALL, RpcSide.SERVER, Reply): RpcState.IDLE,
        (RpcState.IN_CALL, RpcSide.SERVER, Fail): RpcState.IDLE,
        (RpcState.IDLE, RpcSide.CLIENT, KeepAlive): RpcState.IDLE,
        (RpcState.IN_CALL, RpcSide.SERVER, KeepAlive): RpcState.IN_CALL,
        (RpcState.IDLE, RpcSide.CLIENT, Goodbye): RpcState.CLOSED,
        (RpcState.IDLE, RpcSide.SERVER, Goodbye): RpcState.CLOSED,
        (RpcState.IN_CALL, RpcSide.SERVER, Goodbye): RpcState.CLOSED,
    }
)

RpcEvent = Call | Reply | Fail | Notice | KeepAlive | Goodbye


class RpcConnection:
    """One RPC session, sans-IO: `receive_data` / `next_event` / `send`."""

    def __init__(self, side: RpcSide, *, codec: MessageCodec = WIRE_CODEC) -> None:
        self.side = side
        self._peer_side = RpcSide.SERVER if side is RpcSide.CLIENT else RpcSide.CLIENT
        self._codec = codec
        self._reader = FrameReader(codec, max_chunk_size=1)
        self.state = RpcState.IDLE
        self._call_id: int | None = None
        self._eof = False

    @property
    def current_call(self) -> int | None:
        return self._call_id

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the other side; b"" means it closed its end."""
        if ends_stream(self._eof, data):
            self._eof = True
            return
        self._reader.feed(data)

    def next_event(self) -> RpcEvent | Literal["need-data", "closed"]:
        """The next message from the other side, "need-data", or "closed" at a clean end."""
        if self.state is RpcState.ERROR:
            raise RemoteProtocolError("the other side already broke the RPC protocol")
        try:
            message = self._reader.next_message()
            if message is None:
                if not self._eof:
                    return "need-data"
                if self._reader.mid_frame or self.state is RpcState.IN_CALL:
                    raise RemoteProtocolError("the other side closed the stream mid-call")
                self.state = RpcState.CLOSED
                return "closed"
            self._advance(message, self._peer_side)
        except RemoteProtocolError:
            self.state = RpcState.ERROR
            raise
        except LocalProtocolError as exc:
            self.state = RpcState.ERROR
            raise RemoteProtocolError(str(exc)) from exc
        except Exception as exc:
            # Whatever breaks while parsing the other side's bytes is its fault, by contract.
            self.state = RpcState.ERROR
            raise RemoteProtocolError(f"unparseable RPC data: {exc!r}") from exc
        assert isinstance(message, Call | Reply | Fail | Notice | KeepAlive | Goodbye)
        return message

    def send(self, message: RpcEvent) -> bytes:
        """The bytes to write for `message`; an out-of-order message raises LocalProtocolError."""
        if RPC_TRANSITIONS.get((self.state, self.side, type(message))) is None:
            raise LocalProtocolError(
                f"{self.side.value} may not send {type(message).__name__} in state "
                f"{self.state.value}"
            )
        data = b"".join(frame_parts(message, self._codec, max_chunk_size=1))
        try:
            self._advance(message, self.side)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(str(exc)) from exc
        return data

    def _advance(self, message: Message, sender: RpcSide) -> None:
        new_state = RPC_TRANSITIONS.get((self.state, sender, type(message)))
        if new_state is None:
            raise RemoteProtocolError(
                f"{sender.value} may not send {type(message).__name__} in state {self.state.value}"
            )
        if isinstance(message, Call):
            self._call_id = message.call_id
        elif isinstance(message, Reply | Fail | Notice) and message.call_id != self._call_id:
            raise RemoteProtocolError(
                f"{type(message).__name__} for call {message.call_id}, "
                f"but call {self._call_id} is open"
            )
        if new_state is RpcState.IDLE:
            self._call_id = None
        self.state = new_state
