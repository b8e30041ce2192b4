"""The server side of the NBD protocol as a sans-IO state machine: bytes in, events out.

One read-only export per connection, fixed newstyle negotiation, simple replies only. The
negotiation is answered here in full (its replies queue up for `data_to_send`); in the
transmission phase every request becomes an event, and `reply` encodes the answer, so the caller
may answer requests in any order and from concurrent tasks. Values follow the NBD spec
(NetworkBlockDevice/nbd doc/proto.md); errno values there are fixed, not the host's.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Literal

from .errors import LocalProtocolError, RemoteProtocolError, ends_stream

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_CAN_MULTI_CONN = 1 << 8
TRANSMISSION_FLAGS = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option reply types.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

# Information types of NBD_REP_INFO.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands and command flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
KNOWN_CMD_FLAGS = (
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO
)

# Errors in simple replies (the protocol's own numbering).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# Limits: an option's data, a read's length (qemu's default maximum), a name (the spec's cap).
MAX_OPTION_LENGTH = 4096
MAX_READ = 32 << 20
MAX_WRITE = 32 << 20
MAX_NAME_LENGTH = 4096
MIN_BLOCK_SIZE = 1
DEFAULT_PREFERRED_BLOCK_SIZE = 4096
# Export sizes are signed 64-bit in practice (qemu, the kernel).
MAX_EXPORT_SIZE = (1 << 63) - 1

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
INFO_EXPORT_BODY = struct.Struct(">HQH")
INFO_BLOCK_SIZE_BODY = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
ZERO_PAD = bytes(124)
# Compact the receive buffer once this many consumed bytes sit at its front.
_COMPACT_AT = 1 << 16


class NbdProtocolError(RemoteProtocolError):
    """The client broke the NBD protocol; the message says how. Drop the connection."""


class Phase(enum.Enum):
    """Where the connection is."""

    CLIENT_FLAGS = "CLIENT_FLAGS"
    OPTIONS = "OPTIONS"
    TRANSMISSION = "TRANSMISSION"
    CLOSED = "CLOSED"


class Sentinel(enum.Enum):
    """Non-event result of `NbdServer.next_event`."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Literal[Sentinel.NEED_DATA] = Sentinel.NEED_DATA


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Negotiation is over; requests follow. `export_name` is the name the client asked for."""

    export_name: str


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Read `length` bytes at `offset` (already checked to lie inside the export)."""

    handle: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Flush:
    """FLUSH or CACHE: nothing to do on a read-only export; reply with success."""

    handle: int


@dataclass(frozen=True, slots=True)
class Refused:
    """A request the protocol already settled: reply with `error` (an NBD errno) and no data."""

    handle: int
    error: int


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The session is over. `graceful` after NBD_CMD_DISC or NBD_OPT_ABORT (finish in-flight
    requests, send `data_to_send`, then close); otherwise the client closed its end."""

    reason: str
    graceful: bool


Event = Negotiated | ReadRequest | Flush | Refused | Disconnect


class NbdServer:
    """One client connection to the read-only export `export_name` of `size` bytes.

    Feed bytes with `receive_data` (b"" at end of stream), pull events with `next_event` until
    NEED_DATA, and send `data_to_send()` after each event (the greeting is queued from the
    start). Answer each transmission request with the bytes `reply` returns. A client that
    breaks the protocol raises NbdProtocolError; a misuse of this object, LocalProtocolError.
    """

    def __init__(
        self,
        export_name: str,
        size: int,
        *,
        preferred_block_size: int = DEFAULT_PREFERRED_BLOCK_SIZE,
        max_read: int = MAX_READ,
    ) -> None:
        if type(export_name) is not str:
            raise LocalProtocolError(f"export name must be a str, got {export_name!r}")
        encoded = export_name.encode()
        if len(encoded) > MAX_NAME_LENGTH or "\0" in export_name:
            raise LocalProtocolError("export name must be at most 4096 bytes, without NUL")
        if type(size) is not int or not 0 <= size <= MAX_EXPORT_SIZE:
            raise LocalProtocolError(f"export size out of range: {size!r}")
        if type(max_read) is not int or not 1 <= max_read <= MAX_READ:
            raise LocalProtocolError(f"max_read must be in 1..{MAX_READ}, got {max_read!r}")
        # The spec: a power of two, at least 512 and the minimum, at most the maximum.
        if (
            type(preferred_block_size) is not int
            or not 512 <= preferred_block_size <= max_read
            or preferred_block_size & (preferred_block_size - 1)
        ):
            raise LocalProtocolError(
                f"preferred block size must be a power of two in 512..{max_read}"
            )
        self.export_name = export_name
        self.size = size
        self.preferred_block_size = preferred_block_size
        self.max_read = max_read
        self._name_bytes = encoded
        self._phase = Phase.CLIENT_FLAGS
        self._no_zeroes = False
        self._buf = bytearray()
        self._start = 0
        self._eof = False
        # Bytes of a refused WRITE's payload still to skip, and the Refused to emit after them.
        self._discard = 0
        self._after_discard: Refused | None = None
        # Handles awaiting a reply -> bytes a successful reply carries (0 unless a read).
        self._in_flight: dict[int, int] = {}
        self._disconnect: Disconnect | None = None
        self._out = bytearray(
            GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        )

    # -- state ------------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def in_flight(self) -> int:
        """Requests received and not yet replied to."""
        return len(self._in_flight)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet parsed (for limits and tests)."""
        return len(self._buf) - self._start

    # -- receiving --------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the client; b"" means it closed its end."""
        if ends_stream(self._eof, data):
            self._eof = True
            return
        if self._phase is Phase.CLOSED:
            return  # after DISC or ABORT nothing the client says matters
        self._buf += data

    def next_event(self) -> Event | Literal[Sentinel.NEED_DATA]:
        """The next event, or NEED_DATA until more bytes arrive."""
        if self._disconnect is not None:
            return self._disconnect
        if self._phase is Phase.TRANSMISSION:
            event = self._next_request()
        elif self._phase is Phase.OPTIONS:
            event = self._next_option()
        elif self._phase is Phase.CLIENT_FLAGS:
            event = self._client_flags()
        else:
            raise LocalProtocolError("the connection is closed")
        if event is NEED_DATA and self._eof:
            if self._discard or self.buffered_bytes:
                raise NbdProtocolError(f"connection closed mid-message in phase {self._phase.name}")
            return self._close("client closed the connection", graceful=False)
        return event

    def _close(self, reason: str, *, graceful: bool) -> Disconnect:
        self._phase = Phase.CLOSED
        self._disconnect = Disconnect(reason, graceful)
        self._buf.clear()
        self._start = 0
        return self._disconnect

    def _take(self, count: int) -> bytes | None:
        """The next `count` bytes, consumed; None if they are not all here yet."""
        start = self._start
        end = start + count
        if len(self._buf) < end:
            return None
        data = bytes(self._buf[start:end])
        if end == len(self._buf):
            self._buf.clear()
            self._start = 0
        elif end >= _COMPACT_AT:
            del self._buf[:end]
            self._start = 0
        else:
            self._start = end
        return data

    def _client_flags(self) -> Event | Literal[Sentinel.NEED_DATA]:
        raw = self._take(CLIENT_FLAGS.size)
        if raw is None:
            return NEED_DATA
        (flags,) = CLIENT_FLAGS.unpack(raw)
        if flags & ~KNOWN_CLIENT_FLAGS:
            raise NbdProtocolError(f"unknown client flags {flags:#010x}")
        # A client without C_FIXED_NEWSTYLE is served fixed newstyle anyway (the spec allows it).
        self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self._phase = Phase.OPTIONS
        return self._next_option()

    # -- negotiation ------------------------------------------------------------------------

    def _next_option(self) -> Event | Literal[Sentinel.NEED_DATA]:
        while True:
            start = self._start
            if len(self._buf) - start < OPTION_HEADER.size:
                return NEED_DATA
            magic, option, length = OPTION_HEADER.unpack_from(self._buf, start)
            if magic != IHAVEOPT:
                raise NbdProtocolError(f"bad option magic {magic:#018x}")
            if length > MAX_OPTION_LENGTH:
                raise NbdProtocolError(
                    f"option {option} carries {length} bytes, over the {MAX_OPTION_LENGTH} limit"
                )
            raw = self._take(OPTION_HEADER.size + length)
            if raw is None:
                return NEED_DATA
            event = self._option(option, raw[OPTION_HEADER.size :])
            if event is not None:
                return event

    def _option(self, option: int, data: bytes) -> Event | None:
        if option == OPT_EXPORT_NAME:
            return self._export_name(data)
        if option == OPT_ABORT:
            self._option_reply(option, REP_ACK)
            return self._close("client aborted the negotiation", graceful=True)
        if option == OPT_LIST:
            if data:
                self._option_reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
            else:
                self._option_reply(
                    option, REP_SERVER, _U32.pack(len(self._name_bytes)) + self._name_bytes
                )
                self._option_reply(option, REP_ACK)
            return None
        if option in (OPT_INFO, OPT_GO):
            return self._info_or_go(option, data)
        self._option_reply(option, REP_ERR_UNSUP, f"option {option} is not supported".encode())
        return None

    def _known_name(self, raw: bytes) -> str | None:
        """The export the client named, or None if it is not ours ("" means the default)."""
        if raw in (b"", self._name_bytes):
            return raw.decode()
        return None

    def _export_name(self, data: bytes) -> Negotiated:
        name = self._known_name(data)
        if name is None:
            # NBD_OPT_EXPORT_NAME cannot be refused with an error: the spec says hang up.
            raise NbdProtocolError(f"unknown export {data[:64]!r} in NBD_OPT_EXPORT_NAME")
        self._out += EXPORT_NAME_REPLY.pack(self.size, TRANSMISSION_FLAGS)
        if not self._no_zeroes:
            self._out += ZERO_PAD
        self._phase = Phase.TRANSMISSION
        return Negotiated(name)

    def _info_or_go(self, option: int, data: bytes) -> Negotiated | None:
        parsed = _parse_info_request(data)
        if parsed is None:
            self._option_reply(option, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO data")
            return None
        raw_name, requests = parsed
        name = self._known_name(raw_name)
        if name is None:
            self._option_reply(option, REP_ERR_UNKNOWN, b"no such export")
            return None
        self._option_reply(
            option, REP_INFO, INFO_EXPORT_BODY.pack(INFO_EXPORT, self.size, TRANSMISSION_FLAGS)
        )
        if INFO_BLOCK_SIZE in requests:
            self._option_reply(
                option,
                REP_INFO,
                INFO_BLOCK_SIZE_BODY.pack(
                    INFO_BLOCK_SIZE, MIN_BLOCK_SIZE, self.preferred_block_size, self.max_read
                ),
            )
        if INFO_NAME in requests:
            self._option_reply(option, REP_INFO, _U16.pack(INFO_NAME) + self._name_bytes)
        self._option_reply(option, REP_ACK)
        if option == OPT_INFO:
            return None
        self._phase = Phase.TRANSMISSION
        return Negotiated(name)

    def _option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    # -- transmission -----------------------------------------------------------------------

    def _next_request(self) -> Event | Literal[Sentinel.NEED_DATA]:
        if self._discard:
            # Skip a refused WRITE's payload without keeping it.
            skip = min(self._discard, len(self._buf) - self._start)
            self._start += skip
            self._discard -= skip
            if self._start == len(self._buf):
                self._buf.clear()
                self._start = 0
            if self._discard:
                return NEED_DATA
            assert self._after_discard is not None
            refused, self._after_discard = self._after_discard, None
            return refused
        raw = self._take(REQUEST.size)
        if raw is None:
            return NEED_DATA
        magic, flags, command, handle, offset, length = REQUEST.unpack(raw)
        if magic != REQUEST_MAGIC:
            raise NbdProtocolError(f"bad request magic {magic:#010x}")
        if command == CMD_DISC:
            return self._close("client sent NBD_CMD_DISC", graceful=True)
        if command == CMD_WRITE and length > MAX_WRITE:
            raise NbdProtocolError(f"write of {length} bytes, over the {MAX_WRITE} limit")
        if handle in self._in_flight:
            # Replies are matched by handle: two in flight at once could not be told apart.
            raise NbdProtocolError(f"handle {handle:#x} is already in flight")
        if command == CMD_WRITE:
            self._in_flight[handle] = 0
            refused = Refused(handle, EPERM)
            if length == 0:
                return refused
            self._discard, self._after_discard = length, refused
            return self._next_request()
        event = self._request(flags, command, handle, offset, length)
        self._in_flight[handle] = event.length if isinstance(event, ReadRequest) else 0
        return event

    def _request(
        self, flags: int, command: int, handle: int, offset: int, length: int
    ) -> ReadRequest | Flush | Refused:
        if flags & ~KNOWN_CMD_FLAGS:
            return Refused(handle, EINVAL)
        if command == CMD_READ:
            if not 1 <= length <= self.max_read or offset + length > self.size:
                return Refused(handle, EINVAL)
            return ReadRequest(handle, offset, length)
        if command in (CMD_FLUSH, CMD_CACHE):
            return Flush(handle)
        if command in (CMD_TRIM, CMD_WRITE_ZEROES):
            return Refused(handle, EPERM)
        return Refused(handle, EINVAL)

    # -- sending ----------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Negotiation bytes queued for the client (the greeting, option replies); then b""."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def reply(self, handle: int, error: int, data: bytes | bytearray | memoryview = b"") -> bytes:
        """The simple reply to the request `handle`: `data` only for a successful read."""
        expected = self._in_flight.get(handle)
        if expected is None:
            raise LocalProtocolError(f"no request with handle {handle:#x} awaits a reply")
        if type(error) is not int or not 0 <= error < 1 << 32:
            raise LocalProtocolError(f"error must be a u32, got {error!r}")
        wanted = 0 if error else expected
        if len(data) != wanted:
            raise LocalProtocolError(
                f"reply to {handle:#x} carries {len(data)} bytes, the request wants {wanted}"
            )
        del self._in_flight[handle]
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle) + data


def _parse_info_request(data: bytes) -> tuple[bytes, list[int]] | None:
    """NBD_OPT_INFO/GO data: (export name, requested info types), or None if malformed."""
    if len(data) < 4:
        return None
    (name_length,) = _U32.unpack_from(data, 0)
    end = 4 + name_length
    if len(data) < end + 2:
        return None
    raw_name = data[4:end]
    (count,) = _U16.unpack_from(data, end)
    if len(data) != end + 2 + 2 * count:
        return None
    requests = [_U16.unpack_from(data, end + 2 + 2 * i)[0] for i in range(count)]
    return raw_name, requests
