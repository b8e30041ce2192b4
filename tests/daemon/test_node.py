"""Whole daemons in one trio run over loopback: tracker, storage center, hosts, control socket."""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from vmswarm.daemon import tracker as tracker_service
from vmswarm.daemon.control import ControlError, ControlUnreachable, call_control
from vmswarm.daemon.download import DownloadConfig
from vmswarm.daemon.node import Node, NodeConfig, load_peer_id
from vmswarm.daemon.peer_link import LinkRefused, LocalPeer, connect
from vmswarm.daemon.rpc import RpcClient, RpcError
from vmswarm.daemon.serving import run_seeder
from vmswarm.daemon.template_sources import ImageFileTemplate
from vmswarm.daemon.tracker_client import TrackerClient
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.manifest import Manifest
from vmswarm.swarm.messages import Role

from .test_download import CHUNK, make_image, until

FAST = DownloadConfig(tick_interval=0.05, no_source_timeout=1.0, discovery_interval=0.1)


@dataclass
class Cluster:
    nursery: trio.Nursery
    tmp: Path
    tracker: tuple[str, int]

    async def node(self, name: str, role: Role) -> tuple[Node, tuple[str, int]]:
        config = NodeConfig(
            role=role,
            data_dir=self.tmp / name,
            tracker=self.tracker,
            control_path=self.tmp / f"{name}.sock",
            download=FAST,
            allow_unsigned=True,
        )
        node = Node(config)
        address = await self.nursery.start(node.run)
        return node, address


@asynccontextmanager
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        run = functools.partial(tracker_service.run, allow_unsigned=True)  # signing: own tests
        address = await nursery.start(run, "127.0.0.1", 0, tmp_path / "tracker")
        yield Cluster(nursery, tmp_path, address)
        nursery.cancel_scope.cancel()


async def publish(
    tmp: Path,
    nursery: trio.Nursery,
    data: bytes,
    manifest: Manifest,
    tracker: tuple[str, int],
    centers: list[tuple[Node, tuple[str, int]]],
) -> list[dict[str, Any]]:
    """What `vmswarm publish` does: register, seed the file, have each center replicate it all."""
    image = tmp / f"{manifest.version}.img"
    image.write_bytes(data)
    source = ImageFileTemplate(image, manifest)
    seeder = await nursery.start(run_seeder, source, LocalPeer(os.urandom(16), Role.HOST, None))
    async with await TrackerClient.connect(*tracker) as client:
        placement = {c.peer_id.hex(): list(range(manifest.chunk_count)) for c, _ in centers}
        await client.register_template(manifest, placement)
    replies = []
    for _, address in centers:
        async with RpcClient(await trio.open_tcp_stream(*address)) as rpc:
            replies.append(
                await rpc.call(
                    "replicate",
                    {
                        "manifest": manifest.encode(),
                        "indices": list(range(manifest.chunk_count)),
                        "sources": [list(seeder)],
                    },
                )
            )
    return replies


async def test_publish_then_fetch_through_the_control_socket(tmp_path: Path) -> None:
    data, manifest = make_image("DD0DDDDD0DDDD", seed=11)
    async with cluster(tmp_path) as c:
        center = await c.node("center", Role.STORAGE)
        host, _ = await c.node("host", Role.HOST)
        replies = await publish(tmp_path, c.nursery, data, manifest, c.tracker, [center])
        real = sum(1 for i in range(manifest.chunk_count) if i not in manifest.zero_chunks)
        assert replies[0]["stored"] == real and replies[0]["already_had"] == 0
        # Publishing the same content again moves nothing.
        again = await publish(tmp_path, c.nursery, data, manifest, c.tracker, [center])
        assert again[0]["stored"] == 0 and again[0]["already_had"] == real

        notices: list[dict[str, Any]] = []
        with trio.fail_after(20):
            result = await call_control(
                tmp_path / "host.sock",
                "fetch",
                {"name": "tmpl", "version": manifest.version},
                lambda event, payload: notices.append(payload),
            )
        assert result["template_id"] == manifest.template_id.hex()
        assert await trio.Path(result["path"]).read_bytes() == data
        assert result["bytes_from_centers"] == real * CHUNK
        assert result["bytes_from_peers"] == 0
        assert result["sources"] == 1
        assert result["wasted_bytes"] == 0  # one source: nothing can arrive twice

        # Already complete: answered at once, nothing moves.
        second = await call_control(tmp_path / "host.sock", "fetch", {"name": "tmpl"})
        assert second["path"] == result["path"]
        assert second["bytes_from_centers"] == second["bytes_from_peers"] == 0
        assert second["wasted_bytes"] == 0

        status = await call_control(tmp_path / "host.sock", "status", {})
        assert status["role"] == "host"
        assert status["peer_id"] == host.peer_id.hex()
        (entry,) = status["templates"]
        assert entry["complete"] and entry["percent"] == 100.0


async def test_second_host_gets_bytes_from_the_first(tmp_path: Path) -> None:
    data, manifest = make_image("DDDDDDDD", seed=12)
    async with cluster(tmp_path) as c:
        center = await c.node("center", Role.STORAGE)
        await c.node("h1", Role.HOST)
        await c.node("h2", Role.HOST)
        await publish(tmp_path, c.nursery, data, manifest, c.tracker, [center])
        with trio.fail_after(20):
            first = await call_control(tmp_path / "h1.sock", "fetch", {"name": "tmpl"})
            assert first["bytes_from_centers"] == len(data)
            # Kill the center's copy so the only remaining source is h1.
            center[0].templates[manifest.template_id].data.close()
            await _stop_serving(center[0], manifest)
            second = await call_control(tmp_path / "h2.sock", "fetch", {"name": "tmpl"})
        assert await trio.Path(second["path"]).read_bytes() == data
        assert second["bytes_from_peers"] == len(data)


async def _stop_serving(center: Node, manifest: Manifest) -> None:
    """Make the center refuse the template (as if it had lost it)."""
    center.templates.pop(manifest.template_id)


async def test_unknown_template_fails_clearly(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        await c.node("host", Role.HOST)
        with pytest.raises(RpcError) as caught:
            await call_control(tmp_path / "host.sock", "fetch", {"name": "nope"})
        assert caught.value.code == "unknown_template"


async def test_no_source_fails_the_fetch_with_the_chunk(tmp_path: Path) -> None:
    _, manifest = make_image("DDD", seed=13)
    async with cluster(tmp_path) as c:
        await c.node("host", Role.HOST)
        async with await TrackerClient.connect(*c.tracker) as client:
            await client.register_template(manifest, {})
        with trio.fail_after(20), pytest.raises(RpcError) as caught:
            await call_control(tmp_path / "host.sock", "fetch", {"name": "tmpl"})
        assert caught.value.code == "no_source"
        assert "no source holds chunk" in caught.value.message


async def test_inbound_handshake_for_unknown_template_gets_goodbye(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        _, address = await c.node("center", Role.STORAGE)
        stream = await trio.open_tcp_stream(*address)
        me = LocalPeer(os.urandom(16), Role.HOST, None)
        with pytest.raises(LinkRefused, match="unknown template"):
            await connect(stream, me, b"\x01" * 32, Bitfield(4))


async def test_control_socket_mode_stale_file_and_live_daemon(tmp_path: Path) -> None:
    sock = tmp_path / "host.sock"
    sock.write_bytes(b"")  # a stale leftover (not even a socket)
    async with cluster(tmp_path) as c:
        node, _ = await c.node("host", Role.HOST)
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        with pytest.raises(ControlError, match="already running"):
            await Node(node.config).run()
        assert load_peer_id(tmp_path / "host") == node.peer_id
    assert not sock.exists()
    with pytest.raises(ControlUnreachable, match=str(sock)):
        await call_control(sock, "status", {})


async def test_host_resumes_its_templates_after_restart(tmp_path: Path) -> None:
    data, manifest = make_image("DDDD", seed=14)
    async with cluster(tmp_path) as c:
        center = await c.node("center", Role.STORAGE)
        await publish(tmp_path, c.nursery, data, manifest, c.tracker, [center])
        config = NodeConfig(
            role=Role.HOST,
            data_dir=tmp_path / "host",
            tracker=c.tracker,
            control_path=tmp_path / "host.sock",
            download=FAST,
            allow_unsigned=True,
        )
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                await inner.start(Node(config).run)
                await call_control(config.control, "fetch", {"name": "tmpl"})
                scope.cancel()
        restarted = Node(config)
        await c.nursery.start(restarted.run)
        (download,) = restarted.templates.values()
        with trio.fail_after(10):
            await download.wait_done()
        assert download.progress().bytes_from_centers == 0
        result = await call_control(config.control, "fetch", {"name": "tmpl"})
        assert await trio.Path(result["path"]).read_bytes() == data


async def test_announces_resume_when_the_tracker_comes_back(tmp_path: Path) -> None:
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    config = NodeConfig(
        role=Role.STORAGE,
        data_dir=tmp_path / "center",
        tracker=("127.0.0.1", port),
        control_path=tmp_path / "center.sock",
        download=FAST,
    )
    async with trio.open_nursery() as nursery:
        node = Node(config)
        await nursery.start(node.run)
        assert node.tracker is not None
        link = node.tracker
        with trio.fail_after(10):
            await until(lambda: link.last_error is not None)
            assert not link.connected
            # The daemon keeps serving while the tracker is away.
            status = await call_control(config.control, "status", {})
            assert status["tracker"]["connected"] is False
            await nursery.start(tracker_service.run, "127.0.0.1", port, tmp_path / "tracker")
            await until(lambda: link.connected)
        async with await TrackerClient.connect("127.0.0.1", port) as client:
            centers = await client.centers()
        assert [c.peer_id for c in centers] == [node.peer_id]
        nursery.cancel_scope.cancel()
