"""Length-prefixed frames: a 4-byte big-endian length, one type byte, then the body.

The length counts the type byte and the body. Control bodies are msgpack arrays decoded
strictly by a `MessageCodec`. A chunk travels as one or more part frames, in order: each body is
the chunk's index, its whole size and the part's offset (4 bytes each), then raw payload that is
received straight into one buffer of the chunk's size and never re-encoded. Control frames may
come between the parts, so a Request or Have never waits behind a whole chunk upload.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from .errors import LocalProtocolError, RemoteProtocolError
from .messages import CHUNK_TYPE, PEER_MESSAGES, Chunk, ControlMessage, Message

LENGTH = struct.Struct(">I")
FRAME_HEADER = struct.Struct(">IB")
# length, type, chunk index, chunk size, offset of this part's payload in the chunk
CHUNK_HEADER = struct.Struct(">IBIII")
_PART_FIELDS = struct.Struct(">III")
# Frame length (type byte + body) of the largest control message: a bitfield of 8M chunks fits.
MAX_CONTROL_SIZE = 1 << 20
MAX_CHUNK_SIZE = 1 << 24
# Bytes a chunk frame's length counts besides the payload: the type byte, index, size, offset.
CHUNK_OVERHEAD = CHUNK_HEADER.size - LENGTH.size
# Every part but a chunk's last carries at least this much: tiny parts would only burn CPU.
MIN_CHUNK_PART = 16 << 10
# What `FrameReader._chunk_part` returns once it took a part's header and the chunk goes on.
_PART_TAKEN = object()
# Compact the receive buffer once this many consumed bytes sit at its front.
COMPACT_AT = 1 << 16


class MessageCodec:
    """Control-message types by code, and the strict msgpack rules for their bodies.

    Built from a table; `extended` returns a new codec with more messages, so the tracker and
    the operator API can reuse the framing without touching the peer protocol's table.
    """

    def __init__(
        self,
        messages: Mapping[int, type[ControlMessage]],
        *,
        max_control_size: int = MAX_CONTROL_SIZE,
        max_str_len: int = 1 << 16,
        max_array_len: int = 4096,
        max_map_len: int = 4096,
    ) -> None:
        if not 1 <= max_control_size < 1 << 32:
            raise LocalProtocolError(f"max_control_size out of range: {max_control_size}")
        by_type: dict[type[ControlMessage], int] = {}
        for code, cls in messages.items():
            if type(code) is not int or not 0 <= code <= 0xFF:
                raise LocalProtocolError(f"type code must be a byte, got {code!r}")
            if code == CHUNK_TYPE:
                raise LocalProtocolError(f"type code {code:#04x} is reserved for chunks")
            if not (isinstance(cls, type) and issubclass(cls, ControlMessage)):
                raise LocalProtocolError(f"{cls!r} is not a ControlMessage subclass")
            if cls in by_type:
                raise LocalProtocolError(f"{cls.__name__} registered twice")
            by_type[cls] = code
        self._by_code: dict[int, type[ControlMessage]] = dict(messages)
        self._by_type = by_type
        self.max_control_size = max_control_size
        self._limits: dict[str, Any] = {
            "max_str_len": max_str_len,
            "max_bin_len": max_control_size,
            "max_array_len": max_array_len,
            "max_map_len": max_map_len,
            "max_ext_len": 0,
        }
        # Strict: str must be UTF-8, map keys str/bytes, every length bounded, no ext types.
        self._unpack: Callable[[bytes], Any] = functools.partial(
            msgpack.unpackb, raw=False, strict_map_key=True, **self._limits
        )

    def extended(self, messages: Mapping[int, type[ControlMessage]]) -> MessageCodec:
        """A new codec with `messages` added; a code that is already taken is an error."""
        taken = sorted(set(messages) & set(self._by_code))
        if taken:
            raise LocalProtocolError(f"type codes already registered: {taken}")
        return MessageCodec(
            {**self._by_code, **messages},
            max_control_size=self.max_control_size,
            max_str_len=self._limits["max_str_len"],
            max_array_len=self._limits["max_array_len"],
            max_map_len=self._limits["max_map_len"],
        )

    @property
    def messages(self) -> Mapping[int, type[ControlMessage]]:
        return dict(self._by_code)

    def knows(self, code: int) -> bool:
        return code in self._by_code

    def encode(self, message: ControlMessage, pack: Callable[[Any], bytes] | None = None) -> bytes:
        """The whole frame for a control message; `pack` is a reusable msgpack packer."""
        code = self._by_type.get(type(message))
        if code is None:
            raise LocalProtocolError(f"{type(message).__name__} is not registered with this codec")
        fields = message.to_fields()
        try:
            body = pack(fields) if pack else msgpack.packb(fields, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError(f"cannot encode {type(message).__name__}: {exc}") from exc
        if 1 + len(body) > self.max_control_size:
            raise LocalProtocolError(
                f"{type(message).__name__} needs {1 + len(body)} bytes, "
                f"more than the {self.max_control_size} a control frame may hold"
            )
        return FRAME_HEADER.pack(1 + len(body), code) + body

    def decode(self, code: int, body: bytes) -> ControlMessage:
        """Parse a peer's control body; everything wrong with it is a RemoteProtocolError."""
        cls = self._by_code.get(code)
        if cls is None:
            raise RemoteProtocolError(f"unknown message type {code:#04x}")
        if cls.max_body is not None and len(body) > cls.max_body:
            raise RemoteProtocolError(
                f"{cls.__name__} body of {len(body)} bytes is over its {cls.max_body}-byte limit"
            )
        if cls.body_prefixes and not body.startswith(cls.body_prefixes):
            raise RemoteProtocolError(f"malformed {cls.__name__} body: not the expected layout")
        try:
            fields = self._unpack(body)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"malformed {cls.__name__} body: {exc}") from exc
        return cls.from_fields(fields)


PEER_CODEC = MessageCodec(PEER_MESSAGES)


def check_chunk_size(max_chunk_size: int) -> int:
    """Validate a configured chunk-size ceiling."""
    if type(max_chunk_size) is not int or not 1 <= max_chunk_size <= MAX_CHUNK_SIZE:
        raise LocalProtocolError(f"max_chunk_size must be in 1..{MAX_CHUNK_SIZE}")
    return max_chunk_size


def chunk_part_header(
    index: int, size: int, offset: int, length: int, max_chunk_size: int
) -> bytes:
    """The frame header of `length` payload bytes at `offset` of the `size`-byte chunk `index`."""
    if not 1 <= size <= max_chunk_size:
        raise LocalProtocolError(f"chunk payload of {size} bytes outside 1..{max_chunk_size}")
    problem = _part_problem(size, offset, length)
    if problem is not None:
        raise LocalProtocolError(problem)
    return CHUNK_HEADER.pack(CHUNK_OVERHEAD + length, CHUNK_TYPE, index, size, offset)


def _part_problem(size: int, offset: int, length: int) -> str | None:
    """Why a part of `length` bytes at `offset` cannot belong to a `size`-byte chunk, or None."""
    if length < 1 or offset < 0 or offset + length > size:
        return f"chunk part of {length} bytes at {offset} does not fit a {size}-byte chunk"
    if length < MIN_CHUNK_PART and offset + length < size:
        return f"chunk part of {length} bytes is under {MIN_CHUNK_PART} and not the chunk's last"
    return None


def frame_parts(
    message: Message,
    codec: MessageCodec,
    *,
    max_chunk_size: int,
    pack: Callable[[Any], bytes] | None = None,
) -> list[bytes | memoryview]:
    """A message as frame pieces to write in order; a chunk's payload is passed through as is."""
    if isinstance(message, Chunk):
        size = message.size
        return [chunk_part_header(message.index, size, 0, size, max_chunk_size), message.data]
    if isinstance(message, ControlMessage):
        return [codec.encode(message, pack)]
    raise LocalProtocolError(f"cannot send {message!r}: not a wire message")


class FrameWriter:
    """`frame_parts` with a reusable msgpack packer, much faster than msgpack.packb per call."""

    def __init__(self, codec: MessageCodec, *, max_chunk_size: int = MAX_CHUNK_SIZE) -> None:
        self._codec = codec
        self._max_chunk_size = check_chunk_size(max_chunk_size)
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack

    def parts(self, message: Message) -> list[bytes | memoryview]:
        """The pieces to write, in order, for `message`."""
        return frame_parts(
            message, self._codec, max_chunk_size=self._max_chunk_size, pack=self._pack
        )


class FrameReader:
    """Turns a byte stream into messages, without quadratic copying or unbounded allocation.

    A chunk payload that is not all here yet goes into a buffer from `allocate(size)` (at least
    `size` bytes; inject a pool to recycle them) and is handed out as a read-only memoryview.
    """

    def __init__(
        self,
        codec: MessageCodec,
        *,
        max_chunk_size: int = MAX_CHUNK_SIZE,
        allocate: Callable[[int], bytearray] = bytearray,
    ) -> None:
        self._codec = codec
        self._max_chunk_size = check_chunk_size(max_chunk_size)
        self._max_frame = max(codec.max_control_size, CHUNK_OVERHEAD + max_chunk_size)
        self._allocate = allocate
        # Unparsed bytes live in _buf[_start:]; consumed bytes are dropped in batches.
        self._buf = bytearray()
        self._start = 0
        # The chunk being received straight into its own buffer, if any: bytes [0, _filled) of
        # `_payload` are here, and the part on the wire now ends at `_part_end`.
        self._payload: memoryview | None = None
        self._filled = 0
        self._part_end = 0
        self._payload_index = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out as messages."""
        return len(self._buf) - self._start + self._filled

    @property
    def allocated(self) -> int:
        """Bytes of buffer this reader holds, consumed or not."""
        return len(self._buf) + (0 if self._payload is None else self._payload.nbytes)

    @property
    def mid_frame(self) -> bool:
        """Whether part of a frame (or of a chunk's parts) has arrived and the rest has not."""
        return self._payload is not None or len(self._buf) > self._start

    def set_allocator(self, allocate: Callable[[int], bytearray]) -> None:
        """Take later chunk payload buffers from `allocate` (e.g. a pool); the current one stays."""
        self._allocate = allocate

    def payload_buffer(self) -> memoryview | None:
        """The still-empty rest of the chunk part being received, writable; None between parts.

        Receive straight into it (`socket.recv_into`), then report the count with
        `payload_received`: the payload then never passes through the shared buffer.
        """
        payload = self._payload
        if payload is None or self._filled == self._part_end:
            return None
        return payload[self._filled : self._part_end]

    def payload_received(self, count: int) -> None:
        """`count` bytes were written at the start of the view `payload_buffer` returned."""
        if self._payload is None:
            raise LocalProtocolError("no chunk payload is being received")
        if not 0 <= count <= self._part_end - self._filled:
            raise LocalProtocolError(
                f"{count} bytes received into a part with {self._part_end - self._filled} to go"
            )
        self._filled += count

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        payload = self._payload
        if payload is not None:
            # Mid-part, nothing else is buffered: the part's header took everything after it.
            filled, part_end = self._filled, self._part_end
            room = part_end - filled
            if room and len(data) <= room:
                payload[filled : filled + len(data)] = data
                self._filled = filled + len(data)
                return
            if room:
                with memoryview(data) as view:
                    payload[filled:part_end] = view[:room]
                    self._filled = part_end
                    self._buf += view[room:]
                return
        self._buf += data

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes arrive."""
        while True:
            payload = self._payload
            if payload is not None:
                if self._filled < self._part_end:
                    return None
                if self._filled == len(payload):
                    return self._finish_payload()
            buf, start = self._buf, self._start
            available = len(buf) - start
            if available < FRAME_HEADER.size:
                if available >= LENGTH.size:
                    self._check_length(LENGTH.unpack_from(buf, start)[0])
                return None
            length, code = FRAME_HEADER.unpack_from(buf, start)
            self._check_length(length)
            end = start + LENGTH.size + length
            if code == CHUNK_TYPE:
                chunk = self._chunk_part(length, end)
                if chunk is None:
                    return None
                if chunk is _PART_TAKEN:
                    continue
                assert isinstance(chunk, Chunk)
                return chunk
            if length > self._codec.max_control_size:
                raise RemoteProtocolError(
                    f"control frame of {length} bytes exceeds {self._codec.max_control_size}"
                )
            if not self._codec.knows(code):
                raise RemoteProtocolError(f"unknown message type {code:#04x}")
            if len(buf) < end:
                return None
            # Control bodies are small: one slice copy is cheaper than a guarded memoryview.
            message = self._codec.decode(code, bytes(buf[start + FRAME_HEADER.size : end]))
            self._consume(end)
            return message

    def _check_length(self, length: int) -> None:
        # Checked as soon as the prefix is here, so a huge length never reaches an allocation.
        if not 1 <= length <= self._max_frame:
            raise RemoteProtocolError(f"frame length {length} outside 1..{self._max_frame}")

    def _chunk_part(self, length: int, end: int) -> Chunk | object | None:
        """A whole single-part chunk, _PART_TAKEN once a part's header is taken, None: need more."""
        size = length - CHUNK_OVERHEAD
        if not 1 <= size <= self._max_chunk_size:
            raise RemoteProtocolError(
                f"chunk payload of {size} bytes outside 1..{self._max_chunk_size}"
            )
        buf, start = self._buf, self._start
        if len(buf) - start < CHUNK_HEADER.size:
            return None
        index, total, offset = _PART_FIELDS.unpack_from(buf, start + FRAME_HEADER.size)
        if not 1 <= total <= self._max_chunk_size:
            raise RemoteProtocolError(f"chunk of {total} bytes outside 1..{self._max_chunk_size}")
        problem = _part_problem(total, offset, size)
        if problem is not None:
            raise RemoteProtocolError(problem)
        payload = self._payload
        if payload is None:
            if offset != 0:
                raise RemoteProtocolError(f"chunk {index} starts at offset {offset}, not 0")
        elif index != self._payload_index or total != len(payload) or offset != self._filled:
            raise RemoteProtocolError(
                f"chunk part ({index}, {total} bytes, at {offset}) does not continue chunk "
                f"{self._payload_index} ({len(payload)} bytes, {self._filled} here)"
            )
        first = start + CHUNK_HEADER.size
        if payload is None and size == total and len(buf) >= end:
            # The whole chunk is here already: one copy out of the shared buffer.
            with memoryview(buf)[first:end] as view:
                data = bytes(view)
            self._consume(end)
            return Chunk(index, data)
        if payload is None:
            # Only now, with the size checked, take a buffer and fill it as the bytes arrive.
            storage = self._allocate(total)
            if len(storage) < total:
                raise LocalProtocolError(
                    f"allocator gave {len(storage)} bytes for a {total}-byte chunk"
                )
            payload = memoryview(storage)[:total]
            self._payload, self._payload_index = payload, index
        have = min(len(buf), end) - first
        with memoryview(buf)[first : first + have] as view:
            payload[offset : offset + have] = view
        self._filled, self._part_end = offset + have, offset + size
        self._consume(first + have)
        return _PART_TAKEN

    def _finish_payload(self) -> Chunk:
        assert self._payload is not None
        chunk = Chunk(self._payload_index, self._payload.toreadonly())
        self._payload, self._filled, self._part_end = None, 0, 0
        return chunk

    def _consume(self, end: int) -> None:
        buf = self._buf
        if end >= len(buf):
            buf.clear()
            self._start = 0
        elif end >= COMPACT_AT and end * 2 >= len(buf):
            del buf[:end]
            self._start = 0
        else:
            self._start = end
