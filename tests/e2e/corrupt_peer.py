"""A lying peer for the end-to-end tests: it claims a whole template and serves corrupt chunks.

Run as `python -m tests.e2e.corrupt_peer --tracker HOST:PORT --template NAME:VER --image PATH
--peer-id HEX`. It looks the template up at the real tracker, announces itself as a *complete
host* (so the tracker's handout ranks it first), accepts peer links over real TCP sockets with
`swarm.connection.Connection`, and answers every Request with the true chunk (read from IMAGE)
with one byte flipped: right index, right length, wrong digest. It never dials anyone.

Prints `ready HOST:PORT` once it has announced, then `served INDEX` per corrupt chunk sent and
`link ...` lines, so its log shows what it did.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import trio
from vmswarm.daemon.cluster import die_with_parent
from vmswarm.daemon.tracker_client import TemplateHave, TrackerClient, TrackerUnreachable
from vmswarm.swarm.address import format_address, parse_address
from vmswarm.swarm.bitfield import Bitfield as ChunkSet
from vmswarm.swarm.connection import NEED_DATA, Connection, ConnectionClosed, Sentinel
from vmswarm.swarm.errors import ProtocolError
from vmswarm.swarm.manifest import Manifest
from vmswarm.swarm.messages import (
    PROTOCOL_VERSION,
    Bitfield,
    Chunk,
    Goodbye,
    Handshake,
    Request,
    Role,
)

log = logging.getLogger("corrupt_peer")

RECEIVE_SIZE = 1 << 16
# Re-announce at least this often, whatever interval the tracker asks for.
MAX_ANNOUNCE_WAIT = 2.0
RECONNECT_WAIT = 0.2


def corrupt_copy(image: Path, manifest: Manifest, index: int) -> bytes:
    """The true bytes of chunk `index` with the middle byte inverted (fails its digest)."""
    offset, length = manifest.chunk_range(index)
    with image.open("rb") as f:
        f.seek(offset)
        data = bytearray(f.read(length))
    data = data.ljust(length, b"\0")
    data[length // 2] ^= 0xFF
    return bytes(data)


class CorruptPeer:
    """Serves one template's chunks, every one of them corrupt."""

    def __init__(
        self, manifest: Manifest, image: Path, peer_id: bytes, listen: tuple[str, int]
    ) -> None:
        self.manifest = manifest
        self.image = image
        self.peer_id = peer_id
        self.listen = listen
        self.full = ChunkSet.full(manifest.chunk_count)
        self.served = 0

    async def serve_link(self, stream: trio.SocketStream) -> None:
        """One inbound peer link: handshake, then corrupt answers to every Request."""
        conn = Connection(Role.HOST, max_chunk_size=self.manifest.chunk_size)
        try:
            await self._session(stream, conn)
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            print(f"link ended: {exc!r}", flush=True)
        finally:
            await trio.aclose_forcefully(stream)

    async def _next(self, stream: trio.SocketStream, conn: Connection) -> object:
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await stream.receive_some(RECEIVE_SIZE), now=trio.current_time())
                continue
            return event

    async def _session(self, stream: trio.SocketStream, conn: Connection) -> None:
        their = await self._next(stream, conn)
        if not isinstance(their, Handshake):
            print(f"link without handshake: {their!r}", flush=True)
            return
        conn.set_chunk_count(self.manifest.chunk_count)
        if their.template_id != self.manifest.template_id:
            await stream.send_all(conn.send(Goodbye("unknown template"), now=trio.current_time()))
            return
        now = trio.current_time()
        hello = conn.send(
            Handshake(
                PROTOCOL_VERSION, self.manifest.template_id, self.peer_id, self.listen, Role.HOST
            ),
            now=now,
        )
        hello += conn.send(Bitfield(self.full.to_bytes()), now=now)
        await stream.send_all(hello)
        print(f"link up with {their.peer_id.hex()} ({their.role.value})", flush=True)
        while True:
            event = await self._next(stream, conn)
            if isinstance(event, ConnectionClosed) or event is Sentinel.CLOSED:
                print("link closed by peer", flush=True)
                return
            if isinstance(event, Goodbye):
                print(f"link goodbye: {event.reason}", flush=True)
                return
            if isinstance(event, Request):
                data = await trio.to_thread.run_sync(
                    corrupt_copy, self.image, self.manifest, event.index
                )
                for part in conn.send_parts(Chunk(event.index, data), now=trio.current_time()):
                    await stream.send_all(part)
                self.served += 1
                print(f"served {event.index}", flush=True)
            # Bitfield, Have, Cancel and KeepAlive change nothing for a liar.

    async def announce_forever(
        self, tracker: tuple[str, int], task_status: trio.TaskStatus[None]
    ) -> None:
        """Announce as a complete host; `started` after the first accepted announce."""
        have = TemplateHave.from_bitfield(self.manifest.template_id, self.full)
        started = False
        client: TrackerClient | None = None
        while True:
            try:
                if client is None:
                    client = await TrackerClient.connect(*tracker)
                interval = await client.announce(self.peer_id, Role.HOST, self.listen, [have])
            except TrackerUnreachable as exc:
                log.warning("tracker away: %s", exc)
                if client is not None:
                    await client.aclose()
                client = None
                await trio.sleep(RECONNECT_WAIT)
                continue
            if not started:
                started = True
                task_status.started()
            await trio.sleep(min(interval, MAX_ANNOUNCE_WAIT))


async def lookup(tracker: tuple[str, int], name: str, version: str) -> Manifest:
    async with await TrackerClient.connect(*tracker) as client:
        return (await client.lookup(name, version)).manifest


async def run(args: argparse.Namespace) -> None:
    tracker = parse_address(args.tracker)
    name, _, version = args.template.partition(":")
    manifest = await lookup(tracker, name, version)
    host, port = parse_address(args.listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = (host, int(listeners[0].socket.getsockname()[1]))
    peer = CorruptPeer(manifest, Path(args.image), bytes.fromhex(args.peer_id), bound)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, peer.serve_link, listeners)
        await nursery.start(peer.announce_forever, tracker)
        print(f"ready {format_address(*bound)}", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="corrupt_peer", description=__doc__)
    parser.add_argument("--tracker", required=True, help="tracker HOST:PORT")
    parser.add_argument("--template", required=True, help="NAME:VERSION to lie about")
    parser.add_argument("--image", required=True, help="the true image (corrupted on the fly)")
    parser.add_argument("--peer-id", required=True, help="16-byte peer id in hex")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept links on")
    args = parser.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    trio.run(run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
