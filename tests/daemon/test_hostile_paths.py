"""No name from the network or from a manifest can reach outside the data directory.

Stores name files by template id and chunk digest (hex), never by a template's name or version;
VM directories by a generated id; VM names are checked against a strict pattern. These tests feed
`../` names, absolute paths, NUL bytes and very long names through each and look at the disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from vmswarm.daemon.chunkstore import ChunkStore
from vmswarm.daemon.control import call_control
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.daemon.node import Node
from vmswarm.daemon.peer_link import LocalPeer
from vmswarm.daemon.rpc import RpcClient, RpcError
from vmswarm.daemon.serving import run_seeder
from vmswarm.daemon.template_sources import ImageFileTemplate
from vmswarm.daemon.tracker_client import TrackerClient
from vmswarm.swarm.errors import ManifestError
from vmswarm.swarm.manifest import Manifest, build_manifest
from vmswarm.swarm.messages import Role

from .test_download import CHUNK
from .test_node import Cluster, cluster
from .test_vm_service import host

HOSTILE_NAMES = [
    "../../../../escape",
    "/tmp/escape-absolute",
    "..",
    "a/../../b",
    "~root/.ssh/authorized_keys",
]
REFUSED_NAMES = ["nul\0byte", "x" * 300, "line\nbreak", ""]


def files_under(root: Path) -> set[Path]:
    return {Path(d) / f for d, _, names in os.walk(root) for f in names} | {
        Path(d) for d, _, _ in os.walk(root)
    }


def hostile_image(name: str, version: str) -> tuple[bytes, Manifest]:
    data = os.urandom(CHUNK) + bytes(CHUNK) + os.urandom(CHUNK)
    return data, build_manifest(data, name, version, chunk_size=CHUNK)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_stores_name_files_by_id_whatever_the_manifest_says(tmp_path: Path, name: str) -> None:
    data, manifest = hostile_image(name, name)
    outside = tmp_path / "outside"
    outside.mkdir()
    root = outside / "data"
    root.mkdir()
    before = files_under(tmp_path)
    image = ImageStore(root / "templates", manifest)
    for index in range(manifest.chunk_count):
        if index not in manifest.zero_chunks:
            image.write_chunk(index, data[index * CHUNK : (index + 1) * CHUNK])
    image.close()
    chunks = ChunkStore(root / "chunks")
    chunks.put_manifest(manifest.encode())
    chunks.put(manifest.chunk_digests[0], data[:CHUNK])
    created = files_under(tmp_path) - before
    assert created and all(path.is_relative_to(root) for path in created), created
    assert not any(part in str(path) for path in created for part in ("escape", "ssh", ".."))
    assert not Path("/tmp/escape-absolute").exists()
    # What a store reads back names templates by id too.
    assert [m.template_id for m in ImageStore.list_templates(root / "templates")] == [
        manifest.template_id
    ]
    assert [m.name for m in chunks.manifests()] == [name]


@pytest.mark.parametrize("name", REFUSED_NAMES)
def test_manifests_with_nul_control_or_overlong_names_are_refused(name: str) -> None:
    data = os.urandom(CHUNK)
    with pytest.raises(ManifestError):
        build_manifest(data, name, "1", chunk_size=CHUNK)
    with pytest.raises(ManifestError):
        build_manifest(data, "ok", name, chunk_size=CHUNK)
    # A forged encoding of such a manifest is refused on decode as well.
    good = build_manifest(data, "ok", "1", chunk_size=CHUNK).encode()
    forged = good.replace(b"\xa2ok", _msgpack_str(name), 1)
    with pytest.raises(ManifestError):
        Manifest.decode(forged)


async def publish_seeded(
    seed: Path, c: Cluster, data: bytes, manifest: Manifest, center: tuple[Node, tuple[str, int]]
) -> None:
    """test_node.publish with the seed file at `seed` (publish names it by the version)."""
    await trio.Path(seed).write_bytes(data)
    source = ImageFileTemplate(seed, manifest)
    seeder = await c.nursery.start(run_seeder, source, LocalPeer(os.urandom(16), Role.HOST, None))
    async with await TrackerClient.connect(*c.tracker) as client:
        placement = {center[0].peer_id.hex(): list(range(manifest.chunk_count))}
        await client.register_template(manifest, placement)
    async with RpcClient(await trio.open_tcp_stream(*center[1])) as rpc:
        params = {
            "manifest": manifest.encode(),
            "indices": list(range(manifest.chunk_count)),
            "sources": [list(seeder)],
        }
        await rpc.call("replicate", params)


def _msgpack_str(value: str) -> bytes:
    import msgpack

    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


async def test_a_template_with_a_hostile_name_travels_the_network_into_the_data_dir(
    tmp_path: Path,
) -> None:
    name, version = "../../../../escape", "/tmp/escape-version"
    data, manifest = hostile_image(name, version)
    async with cluster(tmp_path) as c:
        center = await c.node("center", Role.STORAGE)
        await c.node("host", Role.HOST)
        before = files_under(tmp_path)
        await publish_seeded(tmp_path / "seed.img", c, data, manifest, center)
        with trio.fail_after(20):
            result = await call_control(
                tmp_path / "host.sock", "fetch", {"name": name, "version": version}
            )
        assert Path(result["path"]).is_relative_to(tmp_path / "host")
        assert await trio.Path(result["path"]).read_bytes() == data
        # Names that are no template (a path, a NUL) are just not found.
        for bad in ("../../etc/passwd", "nul\0byte", "/etc/shadow"):
            with pytest.raises(RpcError, match="no template"):
                await call_control(tmp_path / "host.sock", "fetch", {"name": bad, "version": "1"})
        created = files_under(tmp_path) - before
        allowed = [tmp_path / d for d in ("center", "host", "tracker")]
        stray = [
            p
            for p in created
            if not any(p.is_relative_to(a) for a in allowed) and p != tmp_path / "seed.img"
        ]
        assert stray == [], stray
        assert not any("escape" in str(p.relative_to(tmp_path)) for p in created)
        assert not await trio.Path("/tmp/escape-version").exists()
        c.nursery.cancel_scope.cancel()


async def test_vm_names_and_ids_from_rpc_never_become_paths(tmp_path: Path) -> None:
    async with host(tmp_path) as h:
        before = files_under(tmp_path)
        for bad in (*HOSTILE_NAMES, *REFUSED_NAMES[:3], "a" * 57):
            with pytest.raises(ValueError, match="vm_name"):
                await h.launch("tiny", vm_name=bad)
        for key in ("../..", "/etc", "..", "nul\0"):
            for action in (h.service.stop, h.service.start, h.service.delete):
                with pytest.raises(RpcError):
                    await action(key)
        assert files_under(tmp_path) == before
