"""The NBD server state machine: negotiation variants, every command, and malformed input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.swarm import nbd
from vmswarm.swarm.errors import LocalProtocolError
from vmswarm.swarm.nbd import (
    NEED_DATA,
    Disconnect,
    Event,
    Flush,
    NbdProtocolError,
    NbdServer,
    Negotiated,
    Phase,
    ReadRequest,
    Refused,
)

NAME = "debian-12"
SIZE = 1 << 20


def option(code: int, data: bytes = b"") -> bytes:
    return nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, code, len(data)) + data


def go_data(name: bytes = NAME.encode(), infos: tuple[int, ...] = ()) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def request(
    command: int, handle: int = 1, offset: int = 0, length: int = 0, flags: int = 0
) -> bytes:
    return nbd.REQUEST.pack(nbd.REQUEST_MAGIC, flags, command, handle, offset, length)


def events(server: NbdServer) -> list[Event]:
    """Every event until NEED_DATA (or the session's end)."""
    out: list[Event] = []
    while True:
        event = server.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)
        if isinstance(event, Disconnect):
            return out


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, data) of each option reply in `data`; nothing may be left over."""
    replies = []
    while data:
        magic, code, kind, length = nbd.OPTION_REPLY_HEADER.unpack_from(data)
        assert magic == nbd.OPTION_REPLY_MAGIC
        start = nbd.OPTION_REPLY_HEADER.size
        replies.append((code, kind, data[start : start + length]))
        data = data[start + length :]
    return replies


def greeted(client_flags: int = nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES) -> NbdServer:
    server = NbdServer(NAME, SIZE)
    server.data_to_send()
    server.receive_data(struct.pack(">I", client_flags))
    assert events(server) == []
    assert server.phase is Phase.OPTIONS
    return server


def transmitting() -> NbdServer:
    server = greeted()
    server.receive_data(option(nbd.OPT_GO, go_data()))
    assert events(server) == [Negotiated(NAME)]
    server.data_to_send()
    return server


# -- negotiation ------------------------------------------------------------------------------


def test_greeting_offers_fixed_newstyle_and_no_zeroes() -> None:
    server = NbdServer(NAME, SIZE)
    assert server.data_to_send() == (
        b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES)
    )
    assert server.data_to_send() == b""
    assert server.next_event() is NEED_DATA


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, 0xFFFFFFFF])
def test_unknown_client_flags_end_the_session(flags: int) -> None:
    server = NbdServer(NAME, SIZE)
    server.receive_data(struct.pack(">I", flags))
    with pytest.raises(NbdProtocolError, match="unknown client flags"):
        server.next_event()


@pytest.mark.parametrize("name", ["", NAME])
def test_go_answers_the_export_info_and_starts_transmission(name: str) -> None:
    server = greeted()
    server.receive_data(option(nbd.OPT_GO, go_data(name.encode())))
    assert events(server) == [Negotiated(name)]
    assert server.phase is Phase.TRANSMISSION
    replies = option_replies(server.data_to_send())
    assert replies == [
        (
            nbd.OPT_GO,
            nbd.REP_INFO,
            struct.pack(">HQH", nbd.INFO_EXPORT, SIZE, nbd.TRANSMISSION_FLAGS),
        ),
        (nbd.OPT_GO, nbd.REP_ACK, b""),
    ]
    flags = nbd.TRANSMISSION_FLAGS
    assert flags & nbd.FLAG_HAS_FLAGS and flags & nbd.FLAG_READ_ONLY
    assert flags & nbd.FLAG_SEND_FLUSH and flags & nbd.FLAG_CAN_MULTI_CONN


def test_go_with_block_size_and_name_requests() -> None:
    server = greeted()
    server.receive_data(
        option(nbd.OPT_GO, go_data(b"", (nbd.INFO_BLOCK_SIZE, nbd.INFO_NAME, nbd.INFO_DESCRIPTION)))
    )
    assert events(server) == [Negotiated("")]
    replies = option_replies(server.data_to_send())
    assert replies[1] == (nbd.OPT_GO, nbd.REP_INFO, struct.pack(">HIII", 3, 1, 4096, 32 << 20))
    assert replies[2] == (nbd.OPT_GO, nbd.REP_INFO, struct.pack(">H", 1) + NAME.encode())
    assert [kind for _, kind, _ in replies] == [nbd.REP_INFO] * 3 + [nbd.REP_ACK]


def test_info_answers_and_stays_in_negotiation() -> None:
    server = greeted()
    server.receive_data(option(nbd.OPT_INFO, go_data()))
    assert events(server) == []
    assert server.phase is Phase.OPTIONS
    replies = option_replies(server.data_to_send())
    assert [(code, kind) for code, kind, _ in replies] == [
        (nbd.OPT_INFO, nbd.REP_INFO),
        (nbd.OPT_INFO, nbd.REP_ACK),
    ]
    server.receive_data(option(nbd.OPT_GO, go_data()))
    assert events(server) == [Negotiated(NAME)]


def test_an_unknown_export_is_refused_and_the_client_may_retry() -> None:
    server = greeted()
    server.receive_data(option(nbd.OPT_GO, go_data(b"other")))
    assert events(server) == []
    assert option_replies(server.data_to_send()) == [
        (nbd.OPT_GO, nbd.REP_ERR_UNKNOWN, b"no such export")
    ]
    server.receive_data(option(nbd.OPT_GO, go_data(b"")))
    assert events(server) == [Negotiated("")]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0\0\0",
        struct.pack(">I", 100) + b"abc\0\0",  # name longer than the data
        go_data()[:-1],  # count field cut short
        go_data(infos=(3,))[:-1],  # an info request cut short
        go_data() + b"x",  # trailing byte
    ],
)
def test_malformed_go_data_is_invalid(data: bytes) -> None:
    server = greeted()
    server.receive_data(option(nbd.OPT_GO, data))
    assert events(server) == []
    [(code, kind, _)] = option_replies(server.data_to_send())
    assert (code, kind) == (nbd.OPT_GO, nbd.REP_ERR_INVALID)
    assert server.phase is Phase.OPTIONS


@pytest.mark.parametrize(
    ("client_flags", "padding"),
    [
        (nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES, b""),
        (nbd.FLAG_C_FIXED_NEWSTYLE, bytes(124)),
    ],
)
def test_export_name_honours_no_zeroes(client_flags: int, padding: bytes) -> None:
    server = greeted(client_flags)
    server.receive_data(option(nbd.OPT_EXPORT_NAME, NAME.encode()))
    assert events(server) == [Negotiated(NAME)]
    assert server.data_to_send() == struct.pack(">QH", SIZE, nbd.TRANSMISSION_FLAGS) + padding


def test_a_client_without_fixed_newstyle_still_gets_the_export() -> None:
    server = greeted(0)
    server.receive_data(option(nbd.OPT_EXPORT_NAME))
    assert events(server) == [Negotiated("")]
    assert len(server.data_to_send()) == 8 + 2 + 124


def test_export_name_of_an_unknown_export_hangs_up() -> None:
    server = greeted()
    server.receive_data(option(nbd.OPT_EXPORT_NAME, b"nope"))
    with pytest.raises(NbdProtocolError, match="unknown export"):
        server.next_event()


def test_list_names_the_export() -> None:
    server = greeted()
    server.receive_data(option(nbd.OPT_LIST))
    assert events(server) == []
    assert option_replies(server.data_to_send()) == [
        (nbd.OPT_LIST, nbd.REP_SERVER, struct.pack(">I", len(NAME)) + NAME.encode()),
        (nbd.OPT_LIST, nbd.REP_ACK, b""),
    ]
    server.receive_data(option(nbd.OPT_LIST, b"x"))
    assert events(server) == []
    [(_, kind, _)] = option_replies(server.data_to_send())
    assert kind == nbd.REP_ERR_INVALID


def test_abort_is_acknowledged_and_ends_the_session() -> None:
    server = greeted()
    server.receive_data(option(nbd.OPT_ABORT) + b"ignored")
    assert events(server) == [Disconnect("client aborted the negotiation", graceful=True)]
    assert option_replies(server.data_to_send()) == [(nbd.OPT_ABORT, nbd.REP_ACK, b"")]
    assert server.phase is Phase.CLOSED
    assert isinstance(server.next_event(), Disconnect)


@pytest.mark.parametrize(
    "code",
    [
        nbd.OPT_STARTTLS,
        nbd.OPT_STRUCTURED_REPLY,
        nbd.OPT_LIST_META_CONTEXT,
        nbd.OPT_SET_META_CONTEXT,
        4,
        11,
        0,
        0xFFFFFFFF,
    ],
)
def test_other_options_are_unsupported(code: int) -> None:
    server = greeted()
    server.receive_data(option(code, b"some data"))
    assert events(server) == []
    [(replied, kind, _)] = option_replies(server.data_to_send())
    assert (replied, kind) == (code, nbd.REP_ERR_UNSUP)
    server.receive_data(option(nbd.OPT_GO, go_data()))
    assert events(server) == [Negotiated(NAME)]


def test_an_oversized_option_is_refused_before_it_arrives() -> None:
    server = greeted()
    server.receive_data(nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.OPT_GO, nbd.MAX_OPTION_LENGTH + 1))
    with pytest.raises(NbdProtocolError, match="over the 4096 limit"):
        server.next_event()


def test_an_option_of_exactly_the_limit_is_read() -> None:
    server = greeted()
    server.receive_data(option(nbd.OPT_STRUCTURED_REPLY, bytes(nbd.MAX_OPTION_LENGTH)))
    assert events(server) == []
    assert server.buffered_bytes == 0


def test_bad_option_magic_ends_the_session() -> None:
    server = greeted()
    server.receive_data(b"GARBAGE!" + bytes(8))
    with pytest.raises(NbdProtocolError, match="bad option magic"):
        server.next_event()


def test_negotiation_byte_by_byte() -> None:
    server = NbdServer(NAME, SIZE)
    wire = struct.pack(">I", 3) + option(nbd.OPT_LIST) + option(nbd.OPT_GO, go_data())
    seen: list[Event] = []
    for i in range(len(wire)):
        server.receive_data(wire[i : i + 1])
        seen += events(server)
    assert seen == [Negotiated(NAME)]


def test_end_of_stream_during_negotiation() -> None:
    server = greeted()
    server.receive_data(b"")
    assert events(server) == [Disconnect("client closed the connection", graceful=False)]
    server = greeted()
    server.receive_data(option(nbd.OPT_GO, go_data())[:10])
    server.receive_data(b"")
    with pytest.raises(NbdProtocolError, match="mid-message"):
        server.next_event()


# -- transmission -----------------------------------------------------------------------------


def test_read_becomes_an_event_and_its_reply_carries_the_data() -> None:
    server = transmitting()
    server.receive_data(request(nbd.CMD_READ, handle=7, offset=512, length=4))
    assert events(server) == [ReadRequest(7, 512, 4)]
    assert server.in_flight == 1
    assert server.reply(7, 0, b"abcd") == struct.pack(">IIQ", 0x67446698, 0, 7) + b"abcd"
    assert server.in_flight == 0


def test_a_failed_read_replies_without_data() -> None:
    server = transmitting()
    server.receive_data(request(nbd.CMD_READ, handle=7, length=4))
    events(server)
    assert server.reply(7, nbd.EIO) == struct.pack(">IIQ", 0x67446698, 5, 7)


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (SIZE - 511, 512),  # runs past the end
        (SIZE, 1),  # starts at the end
        (1 << 63, 1),  # far beyond
        (0, 0),  # zero length
    ],
)
def test_reads_outside_the_export_are_einval(offset: int, length: int) -> None:
    server = transmitting()
    server.receive_data(request(nbd.CMD_READ, handle=3, offset=offset, length=length))
    assert events(server) == [Refused(3, nbd.EINVAL)]
    assert server.reply(3, nbd.EINVAL) == struct.pack(">IIQ", 0x67446698, 22, 3)


def test_a_read_over_the_cap_is_einval() -> None:
    server = NbdServer(NAME, 1 << 30)
    server.receive_data(struct.pack(">I", 3) + option(nbd.OPT_GO, go_data()))
    events(server)
    server.receive_data(request(nbd.CMD_READ, handle=3, length=nbd.MAX_READ + 1))
    server.receive_data(request(nbd.CMD_READ, handle=4, length=nbd.MAX_READ))
    assert events(server) == [Refused(3, nbd.EINVAL), ReadRequest(4, 0, nbd.MAX_READ)]


def test_read_of_the_last_byte() -> None:
    server = transmitting()
    server.receive_data(request(nbd.CMD_READ, handle=3, offset=SIZE - 1, length=1))
    assert events(server) == [ReadRequest(3, SIZE - 1, 1)]


def test_write_payload_is_consumed_then_refused_with_eperm() -> None:
    server = transmitting()
    payload = bytes(range(256)) * 40
    # The payload even looks like requests: none of it may be parsed as one.
    payload = request(nbd.CMD_READ, handle=99, length=8) * 100 + payload
    wire = (
        request(nbd.CMD_WRITE, handle=1, length=len(payload))
        + payload
        + request(nbd.CMD_READ, handle=2, length=8)
    )
    seen: list[Event] = []
    for i in range(0, len(wire), 1000):
        server.receive_data(wire[i : i + 1000])
        seen += events(server)
    assert seen == [Refused(1, nbd.EPERM), ReadRequest(2, 0, 8)]
    assert server.reply(1, nbd.EPERM) == struct.pack(">IIQ", 0x67446698, 1, 1)


def test_a_write_without_payload_and_a_huge_write() -> None:
    server = transmitting()
    server.receive_data(request(nbd.CMD_WRITE, handle=1, length=0))
    assert events(server) == [Refused(1, nbd.EPERM)]
    server.receive_data(request(nbd.CMD_WRITE, handle=2, length=nbd.MAX_WRITE + 1))
    with pytest.raises(NbdProtocolError, match="write of"):
        server.next_event()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (nbd.CMD_TRIM, Refused(5, nbd.EPERM)),
        (nbd.CMD_WRITE_ZEROES, Refused(5, nbd.EPERM)),
        (nbd.CMD_FLUSH, Flush(5)),
        (nbd.CMD_CACHE, Flush(5)),
        (nbd.CMD_BLOCK_STATUS, Refused(5, nbd.EINVAL)),
        (8, Refused(5, nbd.EINVAL)),
        (0xFFFF, Refused(5, nbd.EINVAL)),
    ],
)
def test_other_commands(command: int, expected: Event) -> None:
    server = transmitting()
    server.receive_data(request(command, handle=5, length=4096))
    assert events(server) == [expected]
    error = expected.error if isinstance(expected, Refused) else 0
    assert server.reply(5, error) == struct.pack(">IIQ", 0x67446698, error, 5)


def test_unknown_command_flags_are_einval() -> None:
    server = transmitting()
    server.receive_data(request(nbd.CMD_READ, handle=5, length=8, flags=1 << 9))
    server.receive_data(request(nbd.CMD_READ, handle=6, length=8, flags=nbd.CMD_FLAG_FUA))
    assert events(server) == [Refused(5, nbd.EINVAL), ReadRequest(6, 0, 8)]


def test_disc_ends_the_session_and_later_bytes_are_ignored() -> None:
    server = transmitting()
    server.receive_data(request(nbd.CMD_READ, handle=1, length=8) + request(nbd.CMD_DISC))
    server.receive_data(b"trailing garbage")
    assert events(server) == [
        ReadRequest(1, 0, 8),
        Disconnect("client sent NBD_CMD_DISC", graceful=True),
    ]
    # A request in flight may still be answered.
    assert server.reply(1, 0, bytes(8)).endswith(bytes(8))
    server.receive_data(b"more")
    assert isinstance(server.next_event(), Disconnect)


def test_bad_request_magic_ends_the_session() -> None:
    server = transmitting()
    server.receive_data(b"\x25\x60\x95\x14" + bytes(24))
    with pytest.raises(NbdProtocolError, match="bad request magic"):
        server.next_event()


def test_a_handle_already_in_flight_ends_the_session() -> None:
    server = transmitting()
    server.receive_data(request(nbd.CMD_READ, handle=1, length=8) * 2)
    assert server.next_event() == ReadRequest(1, 0, 8)
    with pytest.raises(NbdProtocolError, match="already in flight"):
        server.next_event()


def test_a_handle_may_be_reused_after_its_reply() -> None:
    server = transmitting()
    server.receive_data(request(nbd.CMD_READ, handle=1, length=8))
    events(server)
    server.reply(1, 0, bytes(8))
    server.receive_data(request(nbd.CMD_FLUSH, handle=1))
    assert events(server) == [Flush(1)]


def test_end_of_stream_in_transmission() -> None:
    server = transmitting()
    server.receive_data(b"")
    assert events(server) == [Disconnect("client closed the connection", graceful=False)]
    server = transmitting()
    server.receive_data(request(nbd.CMD_READ)[:27])
    server.receive_data(b"")
    with pytest.raises(NbdProtocolError, match="mid-message"):
        server.next_event()
    server = transmitting()
    server.receive_data(request(nbd.CMD_WRITE, length=100) + bytes(50))
    server.receive_data(b"")
    with pytest.raises(NbdProtocolError, match="mid-message"):
        server.next_event()


def test_requests_pipelined_in_one_buffer_and_split_anywhere() -> None:
    server = transmitting()
    wire = b"".join(request(nbd.CMD_READ, handle=h, offset=h * 512, length=512) for h in range(50))
    seen: list[Event] = []
    for i in range(0, len(wire), 13):
        server.receive_data(wire[i : i + 13])
        seen += events(server)
    assert seen == [ReadRequest(h, h * 512, 512) for h in range(50)]
    assert server.in_flight == 50
    # Replies in any order.
    for h in reversed(range(50)):
        server.reply(h, 0, bytes(512))
    assert server.in_flight == 0
    assert server.buffered_bytes == 0


# -- our own misuse ---------------------------------------------------------------------------


def test_reply_checks_the_handle_and_the_data_length() -> None:
    server = transmitting()
    server.receive_data(request(nbd.CMD_READ, handle=1, length=8))
    events(server)
    with pytest.raises(LocalProtocolError, match="no request"):
        server.reply(2, 0, bytes(8))
    with pytest.raises(LocalProtocolError, match="carries 4 bytes"):
        server.reply(1, 0, bytes(4))
    with pytest.raises(LocalProtocolError, match="carries 8 bytes"):
        server.reply(1, nbd.EIO, bytes(8))
    server.reply(1, 0, bytes(8))
    with pytest.raises(LocalProtocolError, match="no request"):
        server.reply(1, 0, bytes(8))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"export_name": "x" * 4097, "size": 1},
        {"export_name": "a\0b", "size": 1},
        {"export_name": "ok", "size": -1},
        {"export_name": "ok", "size": 1 << 63},
        {"export_name": "ok", "size": 1, "preferred_block_size": 3000},
        {"export_name": "ok", "size": 1, "preferred_block_size": 256},
        {"export_name": "ok", "size": 1, "max_read": 0},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        NbdServer(**kwargs)  # type: ignore[arg-type]


# -- anything at all --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    phase=st.sampled_from(["greeting", "options", "transmission"]),
    junk=st.lists(st.binary(min_size=1, max_size=64), max_size=8),
    eof=st.booleans(),
)
def test_arbitrary_input_only_ever_raises_protocol_errors(
    phase: str, junk: list[bytes], eof: bool
) -> None:
    if phase == "greeting":
        server = NbdServer(NAME, SIZE)
    elif phase == "options":
        server = greeted()
    else:
        server = transmitting()
    try:
        for piece in [*junk, b""] if eof else junk:
            server.receive_data(piece)
            for event in events(server):
                if isinstance(event, ReadRequest):
                    server.reply(event.handle, 0, bytes(event.length))
                elif isinstance(event, Flush | Refused):
                    server.reply(event.handle, getattr(event, "error", 0))
            server.data_to_send()
    except NbdProtocolError:
        return
    assert server.buffered_bytes < nbd.OPTION_HEADER.size + nbd.MAX_OPTION_LENGTH + 1024
