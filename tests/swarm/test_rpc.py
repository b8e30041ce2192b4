"""The RPC session: order of calls and answers, and hostile bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.swarm.errors import LocalProtocolError, RemoteProtocolError
from vmswarm.swarm.messages import Goodbye, Handshake, Role
from vmswarm.swarm.rpc import (
    WIRE_CODEC,
    Call,
    Fail,
    Notice,
    Reply,
    RpcConnection,
    RpcSide,
    RpcState,
    is_rpc_frame_type,
)


def pair() -> tuple[RpcConnection, RpcConnection]:
    return RpcConnection(RpcSide.CLIENT), RpcConnection(RpcSide.SERVER)


def relay(sender: RpcConnection, receiver: RpcConnection, message: object) -> object:
    receiver.receive_data(sender.send(message))  # type: ignore[arg-type]
    return receiver.next_event()


def test_call_notices_and_reply_round_trip() -> None:
    client, server = pair()
    call = Call(7, "fetch", {"name": "debian", "version": None, "blob": b"\x00\x01"})
    assert relay(client, server, call) == call
    assert server.state is RpcState.IN_CALL
    notice = Notice(7, "progress", {"percent": 12.5})
    assert relay(server, client, notice) == notice
    reply = Reply(7, {"path": "/x", "sizes": [1, 2]})
    assert relay(server, client, reply) == reply
    assert (client.state, server.state) == (RpcState.IDLE, RpcState.IDLE)
    fail_call = Call(8, "lookup", {})
    relay(client, server, fail_call)
    fail = Fail(8, "unknown_template", "no template named x")
    assert relay(server, client, fail) == fail


def test_second_call_before_answer_is_refused_locally() -> None:
    client, _ = pair()
    client.send(Call(1, "a", {}))
    with pytest.raises(LocalProtocolError, match="may not send Call"):
        client.send(Call(2, "b", {}))


def test_server_may_not_answer_a_call_that_was_never_made() -> None:
    client, server = pair()
    with pytest.raises(LocalProtocolError):
        server.send(Reply(1, {}))
    client.receive_data(WIRE_CODEC.encode(Reply(1, {})))
    with pytest.raises(RemoteProtocolError, match="may not send Reply"):
        client.next_event()
    assert client.state is RpcState.ERROR
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_answer_for_another_call_id_is_a_protocol_error() -> None:
    client, server = pair()
    relay(client, server, Call(5, "status", {}))
    client.receive_data(WIRE_CODEC.encode(Reply(6, {})))
    with pytest.raises(RemoteProtocolError, match="call 5 is open"):
        client.next_event()


def test_peer_messages_are_not_rpc() -> None:
    _, server = pair()
    handshake = Handshake(1, b"t" * 32, b"p" * 16, None, Role.HOST)
    server.receive_data(WIRE_CODEC.encode(handshake))
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    assert is_rpc_frame_type(WIRE_CODEC.encode(Call(1, "x", {}))[4])
    assert not is_rpc_frame_type(WIRE_CODEC.encode(handshake)[4])


def test_clean_close_and_close_mid_call() -> None:
    client, server = pair()
    relay(client, server, Goodbye("done"))
    server.receive_data(b"")
    assert server.next_event() == "closed"
    client2, server2 = pair()
    relay(client2, server2, Call(1, "fetch", {}))
    client2.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="mid-call"):
        client2.next_event()


def test_bad_fields_are_remote_errors() -> None:
    import msgpack

    body = msgpack.packb([1, "", {}], use_bin_type=True)
    frame = (1 + len(body)).to_bytes(4, "big") + bytes([0x20]) + body
    _, server = pair()
    server.receive_data(frame)
    with pytest.raises(RemoteProtocolError, match="bad Call"):
        server.next_event()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans(), st.sampled_from(list(RpcSide)))
def test_any_bytes_parse_or_raise_remote_protocol_error(
    data: bytes, byte_by_byte: bool, side: RpcSide
) -> None:
    conn = RpcConnection(side)
    pieces = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    try:
        for piece in [*pieces, b""]:
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if event in ("need-data", "closed"):
                    break
    except RemoteProtocolError:
        pass
