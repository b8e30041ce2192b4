"""A peer that resets its connection while chunks are sent to it ends its link, not the daemon.

The chunk server's sender runs in a nursery: a reset used to surface there as an exception group
holding an OSError, which the link's guard did not recognise, and a storage center exited.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import trio
from vmswarm.daemon.peer_link import LocalPeer, PeerLink, connect
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.messages import Request, Role

from .test_hostile_limits import SAFETY, Center, center, honest_fetch

# SO_LINGER on with a zero timeout: close() sends RST instead of FIN.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


async def _small_window_link(source: str, c: Center) -> PeerLink:
    """A link whose tiny receive window keeps the center's sender blocked on a full socket."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.bind((source, 0))
    await sock.connect(c.address)
    me = LocalPeer(bytes(range(16)), Role.HOST, None)
    with trio.fail_after(SAFETY):
        return await connect(
            trio.SocketStream(sock),
            me,
            c.manifest.template_id,
            Bitfield(c.manifest.chunk_count),
            max_chunk_size=c.manifest.chunk_size,
        )


async def test_a_peer_resetting_mid_transfer_leaves_the_center_serving(tmp_path: Path) -> None:
    async with center(tmp_path) as c, trio.open_nursery() as nursery:
        for attempt in range(8):
            link = await _small_window_link(f"127.0.0.{2 + attempt}", c)
            for index in range(c.manifest.chunk_count):
                if index not in c.manifest.zero_chunks:
                    link.post(Request(index))
            # Flush the requests (never read a byte back), let the center fill the window, reset.
            await link.stream.send_all(b"".join(link.conn.send(m, now=0.0) for m in link._outbox))
            await trio.sleep(0.1)
            sock = link.stream.socket  # type: ignore[attr-defined]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            sock.close()
        with trio.fail_after(SAFETY):
            await honest_fetch(tmp_path, c, nursery)
        nursery.cancel_scope.cancel()


def test_a_group_of_stream_errors_is_a_stream_failure() -> None:
    from vmswarm.daemon.peer_link import _stream_failure

    reset = ConnectionResetError(104, "Connection reset by peer")
    nested = BaseExceptionGroup("outer", [ExceptionGroup("inner", [reset, BrokenPipeError()])])
    assert _stream_failure(nested) is reset
    assert _stream_failure(trio.BrokenResourceError()) is not None
    # Anything else in the group (a bug, a cancellation) must still propagate.
    assert _stream_failure(ExceptionGroup("mixed", [reset, ValueError("bug")])) is None
    assert _stream_failure(ValueError("bug")) is None
