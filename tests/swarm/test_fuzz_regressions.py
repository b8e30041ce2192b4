"""Inputs the fuzzer (tests/fuzz) found that broke a decoder, kept as regression tests.

Deeply nested msgpack arrays (one byte per level, up to msgpack's limit of 1024 levels) made
the error paths call repr() on them, which raised RecursionError instead of the decoder's own
error: out of FrameReader and Manifest.decode directly, and through the catch-all of
Connection and RpcConnection ("unparseable data").
"""

from __future__ import annotations

import msgpack
import pytest
from vmswarm.swarm.connection import Connection
from vmswarm.swarm.errors import ManifestError, RemoteProtocolError
from vmswarm.swarm.framing import FRAME_HEADER, PEER_CODEC, FrameReader
from vmswarm.swarm.manifest import Manifest, build_manifest
from vmswarm.swarm.messages import Role
from vmswarm.swarm.rpc import WIRE_CODEC, RpcConnection, RpcSide

# Deep enough that repr() recurses past Python's default limit of 1000, shallow enough that
# msgpack (at most 1024 levels, counting the enclosing array) still decodes it.
DEPTHS = (1000, 1022)
HANDSHAKE, BITFIELD, HAVE, CALL = 0x00, 0x01, 0x02, 0x20


def nested(depth: int) -> bytes:
    """msgpack for [[[...[0]...]]] with `depth` arrays."""
    return b"\x91" * depth + msgpack.packb(0)


def frame(code: int, body: bytes) -> bytes:
    return FRAME_HEADER.pack(1 + len(body), code) + body


def handshake_with_role(role: bytes) -> bytes:
    """A Handshake body that is valid except for its role field."""
    fields = msgpack.packb([1, bytes(32), bytes(16), None], use_bin_type=True)
    return b"\x95" + fields[1:] + role


def peer_bodies(depth: int) -> list[tuple[int, bytes]]:
    return [
        (HAVE, b"\x91" + nested(depth - 1)),  # index is a deep list: _check_int's message
        (BITFIELD, nested(depth)),  # not a 1-field list: _check_arity's message
        (HANDSHAKE, handshake_with_role(nested(depth - 1))),  # Role(...) says the value
    ]


@pytest.mark.parametrize("depth", DEPTHS)
def test_frame_reader_refuses_deep_nesting_with_a_remote_error(depth: int) -> None:
    for code, body in peer_bodies(depth):
        reader = FrameReader(PEER_CODEC)
        reader.feed(frame(code, body))
        with pytest.raises(RemoteProtocolError):
            reader.next_message()


@pytest.mark.parametrize("depth", DEPTHS)
def test_connection_refuses_deep_nesting_without_its_catch_all(depth: int) -> None:
    for code, body in peer_bodies(depth):
        conn = Connection(Role.STORAGE, chunk_count=8)
        conn.receive_data(frame(code, body), now=0.0)
        with pytest.raises(RemoteProtocolError) as caught:
            conn.next_event()
        assert "unparseable" not in str(caught.value)


@pytest.mark.parametrize("depth", DEPTHS)
def test_rpc_refuses_deep_nesting_without_its_catch_all(depth: int) -> None:
    # The wire codec decodes peer messages too, so an RPC session meets their error paths.
    for code in (CALL, BITFIELD):
        server = RpcConnection(RpcSide.SERVER, codec=WIRE_CODEC)
        server.receive_data(frame(code, nested(depth)))
        with pytest.raises(RemoteProtocolError) as caught:
            server.next_event()
        assert "unparseable" not in str(caught.value)


def manifest_with(index: int, value: bytes) -> bytes:
    """A valid manifest's bytes with field `index` replaced by the raw msgpack `value`."""
    fields = msgpack.unpackb(build_manifest(b"x", "t", "1", 1 << 16).encode())
    parts = [msgpack.packb(f, use_bin_type=True) for f in fields]
    parts[index] = value
    return b"\x9a" + b"".join(parts)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize(
    ("index", "field"), [(0, "magic"), (1, "version"), (4, "format"), (5, "size"), (6, "chunk")]
)
def test_manifest_refuses_deep_nesting_with_a_manifest_error(
    depth: int, index: int, field: str
) -> None:
    with pytest.raises(ManifestError, match=field):
        Manifest.decode(manifest_with(index, nested(depth - 1)))
