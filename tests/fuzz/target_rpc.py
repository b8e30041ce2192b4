"""Fuzz target: RpcConnection (tracker and operator API sessions) on hostile frames.

Properties: receiving raises nothing but RemoteProtocolError and then keeps refusing; every
event is a legal move of the other side, answers carry the open call's id, and decoded messages
re-encode stably; a refused send raises LocalProtocolError and changes nothing.
"""

from __future__ import annotations

from typing import Any

from vmswarm.swarm.errors import LocalProtocolError, RemoteProtocolError
from vmswarm.swarm.messages import PEER_MESSAGES, ControlMessage, Goodbye, KeepAlive
from vmswarm.swarm.rpc import (
    MAX_CALL_ID,
    RPC_MESSAGES,
    RPC_TRANSITIONS,
    WIRE_CODEC,
    Call,
    Fail,
    Notice,
    Reply,
    RpcConnection,
    RpcEvent,
    RpcSide,
    RpcState,
)

from .checks import check_round_trip, corrupt, frame, hostile_value, not_a_safety_net, require
from .script import Input, InputWriter

NAME = "rpc"
MAX_LEN = 4096
CODES = tuple(sorted({**PEER_MESSAGES, **RPC_MESSAGES}))
SEND_KINDS: tuple[type[RpcEvent], ...] = (Call, Reply, Fail, Notice, KeepAlive, Goodbye)
OP_FRAME, OP_RAW, OP_CORRUPT, OP_FLOOD, OP_DELIVER, OP_SEND, OP_EOF = range(7)
MAX_RAW = 2048
MAX_DELIVER = 1 << 14
MAX_FLOOD = 128


class Harness:
    def __init__(self, inp: Input) -> None:
        self.side = inp.choice((RpcSide.CLIENT, RpcSide.SERVER))
        self.peer = RpcSide.SERVER if self.side is RpcSide.CLIENT else RpcSide.CLIENT
        self.conn = RpcConnection(self.side)
        self.open_call: int | None = None
        self.pending = bytearray()
        self.last_frame = b""
        self.eof = False
        self.done = False
        self.trace: list[str] = []

    def queue(self, frame: bytes) -> None:
        self.pending += frame
        self.last_frame = frame

    def deliver(self, count: int) -> None:
        if self.eof or not self.pending:
            return
        taken = min(count, len(self.pending))
        self.conn.receive_data(bytes(self.pending[:taken]))
        del self.pending[:taken]
        self.drain()

    def end(self) -> None:
        if not self.eof:
            self.eof = True
            self.conn.receive_data(b"")
            self.drain()

    def drain(self) -> None:
        while not self.done:
            before = self.conn.state
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as error:
                not_a_safety_net(error)
                self._broken()
                return
            if event == "need-data":
                require(not self.eof, "need-data after the end of the stream")
                return
            if event == "closed":
                require(self.eof and before is not RpcState.IN_CALL, f"closed in {before}")
                require(self.conn.state is RpcState.CLOSED, "closed but state is not CLOSED")
                self.trace.append("closed")
                self.done = True
                return
            assert not isinstance(event, str)
            self._check_event(before, event)

    def _broken(self) -> None:
        require(self.conn.state is RpcState.ERROR, "a protocol error left the state alone")
        try:
            again: object = self.conn.next_event()
        except RemoteProtocolError:
            again = None
        require(again is None, f"a broken session produced {again!r}")
        self.trace.append("RemoteProtocolError")
        self.done = True

    def _check_event(self, before: RpcState, event: RpcEvent) -> None:
        kind = type(event)
        expected = RPC_TRANSITIONS.get((before, self.peer, kind))
        require(expected is not None, f"accepted {kind.__name__} from {self.peer} in {before}")
        require(self.conn.state is expected, f"{self.conn.state} after {kind.__name__}")
        if isinstance(event, Reply | Fail | Notice):
            require(event.call_id == self.open_call, f"answer to {event.call_id} accepted")
        if isinstance(event, Call):
            self.open_call = event.call_id
        if expected is RpcState.IDLE:
            self.open_call = None
        require(self.conn.current_call == self.open_call, "current_call is wrong")
        check_round_trip(WIRE_CODEC, event)
        self.trace.append(kind.__name__)

    def send(self, kind: type[RpcEvent], arg: int) -> None:
        call_id = self.open_call if self.open_call is not None and arg & 1 else arg
        message: RpcEvent
        if kind is Call:
            message = Call(call_id, "fetch", {"name": "debian", "n": arg})
        elif kind is Reply:
            message = Reply(call_id, {"ok": True})
        elif kind is Fail:
            message = Fail(call_id, "failed", "it broke")
        elif kind is Notice:
            message = Notice(call_id, "progress", {"done": arg})
        elif kind is KeepAlive:
            message = KeepAlive()
        else:
            message = Goodbye("bye")
        before = (self.conn.state, self.conn.current_call)
        try:
            data = self.conn.send(message)
        except LocalProtocolError:
            after = (self.conn.state, self.conn.current_call)
            require(after == before, f"a refused send changed {before} to {after}")
            return
        require(bool(data), "a send produced no bytes")
        if isinstance(message, Call):
            self.open_call = message.call_id
        if self.conn.state is RpcState.IDLE:
            self.open_call = None


def _field(inp: Input, good: Any) -> Any:
    return good if inp.int(0, 3) else hostile_value(inp)


def _call_id(inp: Input, harness: Harness) -> Any:
    pick = inp.int(0, 5)
    if pick < 3 and harness.open_call is not None:
        return harness.open_call
    if pick < 4:
        return inp.int(0, 3)
    return inp.choice((MAX_CALL_ID, MAX_CALL_ID + 1, -1, True))


def _text(inp: Input, good: str) -> Any:
    return inp.choice((good, "", "m" * 65, "m" * 4097)) if inp.int(0, 3) == 0 else good


def _params(inp: Input) -> Any:
    if inp.int(0, 7) == 0:
        return hostile_value(inp)
    return {
        inp.choice(("name", "n", "", "\u00e9")): hostile_value(inp) for _ in range(inp.int(0, 3))
    }


def rpc_frame(inp: Input, harness: Harness) -> bytes:
    kind = inp.int(0, len(CODES))
    if kind == len(CODES):
        return frame(inp.int(0, 0xFF), hostile_value(inp))
    code = CODES[kind]
    cls: type[ControlMessage] = {**PEER_MESSAGES, **RPC_MESSAGES}[code]
    fields: list[Any]
    if cls is Call or cls is Notice:
        fields = [_call_id(inp, harness), _text(inp, "fetch"), _params(inp)]
    elif cls is Reply:
        fields = [_call_id(inp, harness), _params(inp)]
    elif cls is Fail:
        fields = [_call_id(inp, harness), _text(inp, "failed"), _text(inp, "why")]
    elif cls is Goodbye:
        fields = [_text(inp, "bye")]
    elif cls is KeepAlive:
        fields = []
    else:
        fields = [hostile_value(inp) for _ in range(inp.int(0, 5))]
    fields = [_field(inp, f) for f in fields]
    shape = inp.int(0, 7)
    if shape == 0:
        fields.append(hostile_value(inp))
    elif shape == 1 and fields:
        fields.pop()
    elif shape == 2:
        return frame(code, hostile_value(inp))
    return frame(code, fields)


def fuzz_one(data: bytes) -> list[str]:
    inp = Input(data)
    harness = Harness(inp)
    while inp.remaining() and not harness.done:
        op = inp.int(0, OP_EOF)
        if op == OP_FRAME:
            harness.queue(rpc_frame(inp, harness))
        elif op == OP_RAW:
            harness.queue(inp.sized_bytes(MAX_RAW))
        elif op == OP_CORRUPT:
            harness.queue(corrupt(inp, rpc_frame(inp, harness)))
        elif op == OP_FLOOD:
            harness.pending += harness.last_frame * inp.int(1, MAX_FLOOD)
        elif op == OP_DELIVER:
            harness.deliver(inp.int(1, MAX_DELIVER))
        elif op == OP_SEND:
            harness.send(inp.choice(SEND_KINDS), inp.int(0, 0xFFFF))
        else:
            harness.deliver(len(harness.pending))
            harness.end()
    if not harness.done:
        harness.deliver(len(harness.pending))
        harness.end()
    return harness.trace


def _raw(writer: InputWriter, frame: bytes) -> None:
    writer.int(0, OP_EOF, OP_RAW).sized_bytes(MAX_RAW, frame)
    writer.int(0, OP_EOF, OP_DELIVER).int(1, MAX_DELIVER, 2)
    writer.int(0, OP_EOF, OP_DELIVER).int(1, MAX_DELIVER, len(frame))


def _send(writer: InputWriter, kind: type[RpcEvent], arg: int) -> None:
    writer.int(0, OP_EOF, OP_SEND).choice(SEND_KINDS, kind).int(0, 0xFFFF, arg)


def seeds() -> list[bytes]:
    server = InputWriter().choice((RpcSide.CLIENT, RpcSide.SERVER), RpcSide.SERVER)
    for call_id in (1, 2):
        _raw(server, WIRE_CODEC.encode(Call(call_id, "fetch", {"name": "debian", "v": [1, b"x"]})))
        _send(server, Notice, 1)
        _send(server, Reply if call_id == 1 else Fail, 1)
    _raw(server, WIRE_CODEC.encode(KeepAlive()))
    _raw(server, WIRE_CODEC.encode(Goodbye("done")))
    server.int(0, OP_EOF, OP_EOF)

    client = InputWriter().choice((RpcSide.CLIENT, RpcSide.SERVER), RpcSide.CLIENT)
    _send(client, Call, 7)
    _raw(client, WIRE_CODEC.encode(Notice(7, "progress", {"percent": 12.5, "rate": 1 << 40})))
    _raw(client, WIRE_CODEC.encode(Reply(7, {"path": "/x", "sizes": [1, 2], "nil": None})))
    _send(client, Call, 8)
    _raw(client, WIRE_CODEC.encode(Fail(8, "unknown_template", "no template named x")))
    _send(client, Goodbye, 0)
    client.int(0, OP_EOF, OP_EOF)
    return [server.build(), client.build()]


DICTIONARY = [b"\x00\x00\x00", b"\x20", b"\x21", b"\x22", b"\x23", b"\x93", b"\x81", b"\x91"]
