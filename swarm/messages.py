"""Peer-protocol messages: frozen dataclasses that validate themselves on construction.

A message built by our code with a bad field raises LocalProtocolError; the decoder turns the
same failure on a peer's bytes into RemoteProtocolError. Control messages convert to and from
a flat list of msgpack-friendly fields; a `Chunk` is framed separately as raw bytes.
"""

from __future__ import annotations

import enum
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Self

from .errors import LocalProtocolError, RemoteProtocolError

# 2: chunks travel in part frames that control frames may cut between.
PROTOCOL_VERSION = 2
# Every index travels as a 4-byte unsigned int in a chunk header, so that is the ceiling.
MAX_INDEX = (1 << 32) - 1
MAX_REASON_LENGTH = 1024
MAX_HOST_LENGTH = 255
TEMPLATE_ID_LENGTH = 32
PEER_ID_LENGTH = 16


class Role(enum.Enum):
    """What the sender of a handshake is."""

    HOST = "host"
    STORAGE = "storage"


_ROLES: Mapping[str, Role] = MappingProxyType({role.value: role for role in Role})


# reprlib stops at a few levels: repr() of a peer's 1000-deep list raises RecursionError.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 60


def _show(value: object) -> str:
    """A short repr for error messages, so a huge or deep peer-sent value cannot flood a log."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_int(value: object, name: str, low: int, high: int) -> None:
    # bool is an int subclass; msgpack's True must not pass as index 1.
    if type(value) is not int or not low <= value <= high:
        raise LocalProtocolError(f"{name} must be an int in {low}..{high}, got {_show(value)}")


def _check_bytes(value: object, name: str, length: int) -> None:
    if type(value) is not bytes or len(value) != length:
        raise LocalProtocolError(f"{name} must be {length} bytes, got {_show(value)}")


def _check_text(value: object, name: str, max_length: int) -> None:
    if type(value) is not str or len(value) > max_length:
        raise LocalProtocolError(f"{name} must be a str of at most {max_length} chars")


def _check_arity(cls: type, fields: object, count: int) -> list[Any]:
    if type(fields) is not list or len(fields) != count:
        raise RemoteProtocolError(
            f"{cls.__name__} needs a list of {count} fields, got {_show(fields)}"
        )
    return fields


@dataclass(frozen=True, slots=True)
class Message:
    """Base of everything that travels in one frame."""


@dataclass(frozen=True, slots=True)
class ControlMessage(Message):
    """A small message sent as a msgpack array; subclasses register a type code with a codec."""

    # Longest body a peer may send, checked before decoding: a byte of msgpack can become a
    # 70-byte Python object, so a frame of nested empty arrays must stay small. None: the
    # codec's frame limit only (messages whose bodies are legitimately big).
    max_body: ClassVar[int | None] = 8192
    # If set, a body must start with one of these (checked before decoding, like max_body).
    body_prefixes: ClassVar[tuple[bytes, ...]] = ()

    def to_fields(self) -> list[Any]:
        """The msgpack array this message is sent as."""
        raise NotImplementedError

    @classmethod
    def from_fields(cls, fields: list[Any]) -> Self:
        """Rebuild from a peer's decoded array; anything invalid raises RemoteProtocolError."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Handshake(ControlMessage):
    """First message on every link: who we are and which template we trade."""

    protocol_version: int
    template_id: bytes
    peer_id: bytes
    listen: tuple[str, int] | None
    role: Role

    def __post_init__(self) -> None:
        _check_int(self.protocol_version, "protocol_version", 0, 0xFFFF)
        _check_bytes(self.template_id, "template_id", TEMPLATE_ID_LENGTH)
        _check_bytes(self.peer_id, "peer_id", PEER_ID_LENGTH)
        _check_listen(self.listen)
        if not isinstance(self.role, Role):
            raise LocalProtocolError(f"role must be a Role, got {_show(self.role)}")

    def to_fields(self) -> list[Any]:
        listen = None if self.listen is None else list(self.listen)
        return [self.protocol_version, self.template_id, self.peer_id, listen, self.role.value]

    @classmethod
    def from_fields(cls, fields: list[Any]) -> Self:
        version, template_id, peer_id, listen, role = _check_arity(cls, fields, 5)
        if listen is not None:
            if type(listen) is not list or len(listen) != 2:
                raise RemoteProtocolError(f"listen must be [host, port], got {_show(listen)}")
            listen = (listen[0], listen[1])
        # Only a str can name a role; Role(x) would put repr(x) of any other value in its error.
        if type(role) is not str or role not in _ROLES:
            raise RemoteProtocolError(f"unknown role {_show(role)}")
        parsed_role = _ROLES[role]
        try:
            return cls(version, template_id, peer_id, listen, parsed_role)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"bad Handshake: {exc}") from exc


def _check_listen(listen: object) -> None:
    if listen is None:
        return
    if type(listen) is not tuple or len(listen) != 2:
        raise LocalProtocolError(f"listen must be (host, port) or None, got {_show(listen)}")
    host, port = listen
    _check_text(host, "listen host", MAX_HOST_LENGTH)
    if not host:
        raise LocalProtocolError("listen host must not be empty")
    _check_int(port, "listen port", 1, 0xFFFF)


@dataclass(frozen=True, slots=True)
class Bitfield(ControlMessage):
    """Which chunks the sender has, MSB-first; only allowed right after the handshake."""

    # As big as the frame allows, but only ever one array holding one bin: nothing to amplify.
    max_body: ClassVar[int | None] = None
    body_prefixes: ClassVar[tuple[bytes, ...]] = (b"\x91\xc4", b"\x91\xc5", b"\x91\xc6")

    bits: bytes

    def __post_init__(self) -> None:
        if type(self.bits) is not bytes:
            raise LocalProtocolError(f"bits must be bytes, got {_show(self.bits)}")

    def to_fields(self) -> list[Any]:
        return [self.bits]

    @classmethod
    def from_fields(cls, fields: list[Any]) -> Self:
        (bits,) = _check_arity(cls, fields, 1)
        try:
            return cls(bits)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"bad Bitfield: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _IndexMessage(ControlMessage):
    """A control message that only names one chunk."""

    index: int

    def __post_init__(self) -> None:
        _check_int(self.index, "index", 0, MAX_INDEX)

    def to_fields(self) -> list[Any]:
        return [self.index]

    @classmethod
    def from_fields(cls, fields: list[Any]) -> Self:
        (index,) = _check_arity(cls, fields, 1)
        try:
            return cls(index)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"bad {cls.__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Have(_IndexMessage):
    """The sender now has chunk `index` (verified)."""


@dataclass(frozen=True, slots=True)
class Request(_IndexMessage):
    """Please send the whole chunk `index`."""


@dataclass(frozen=True, slots=True)
class Cancel(_IndexMessage):
    """Forget an earlier Request for `index` (endgame, or the chunk came from elsewhere)."""


@dataclass(frozen=True, slots=True)
class Reject(ControlMessage):
    """The sender will not serve the requested chunk `index`."""

    index: int
    reason: str

    def __post_init__(self) -> None:
        _check_int(self.index, "index", 0, MAX_INDEX)
        _check_text(self.reason, "reason", MAX_REASON_LENGTH)

    def to_fields(self) -> list[Any]:
        return [self.index, self.reason]

    @classmethod
    def from_fields(cls, fields: list[Any]) -> Self:
        index, reason = _check_arity(cls, fields, 2)
        try:
            return cls(index, reason)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"bad Reject: {exc}") from exc


@dataclass(frozen=True, slots=True)
class KeepAlive(ControlMessage):
    """Nothing to say, but the link is alive."""

    def to_fields(self) -> list[Any]:
        return []

    @classmethod
    def from_fields(cls, fields: list[Any]) -> Self:
        _check_arity(cls, fields, 0)
        return cls()


@dataclass(frozen=True, slots=True)
class Goodbye(ControlMessage):
    """The sender closes the link on purpose; nothing may follow."""

    reason: str

    def __post_init__(self) -> None:
        _check_text(self.reason, "reason", MAX_REASON_LENGTH)

    def to_fields(self) -> list[Any]:
        return [self.reason]

    @classmethod
    def from_fields(cls, fields: list[Any]) -> Self:
        (reason,) = _check_arity(cls, fields, 1)
        try:
            return cls(reason)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"bad Goodbye: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Chunk(Message):
    """The payload of chunk `index`, carried as raw bytes after a fixed header."""

    index: int
    data: bytes | memoryview

    def __post_init__(self) -> None:
        _check_int(self.index, "index", 0, MAX_INDEX)
        data: object = self.data
        if isinstance(data, memoryview):
            if not data.c_contiguous or data.itemsize != 1:
                raise LocalProtocolError("chunk data must be a contiguous byte memoryview")
        elif type(data) is not bytes:
            raise LocalProtocolError(f"chunk data must be bytes or memoryview, got {type(data)}")

    @property
    def size(self) -> int:
        data = self.data
        return data.nbytes if isinstance(data, memoryview) else len(data)

    def __repr__(self) -> str:
        # The default repr would dump megabytes of payload into logs and test failures.
        return f"Chunk(index={self.index}, size={self.size})"


# Type code of a chunk frame; codecs refuse to register a control message under it.
CHUNK_TYPE = 0x04

# The peer protocol's control messages by type code; extensions build on top of this table.
PEER_MESSAGES: Mapping[int, type[ControlMessage]] = MappingProxyType(
    {
        0x00: Handshake,
        0x01: Bitfield,
        0x02: Have,
        0x03: Request,
        0x05: Cancel,
        0x06: Reject,
        0x07: KeepAlive,
        0x08: Goodbye,
    }
)
