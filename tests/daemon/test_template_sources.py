"""The three TemplateData stores read chunks into a caller's (pooled) buffer, verified."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from vmswarm.daemon.chunkstore import ChunkStore
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.daemon.storeerrors import ChunkCorrupt
from vmswarm.daemon.template_sources import CenterTemplate, HostTemplate, ImageFileTemplate
from vmswarm.swarm.manifest import Manifest, build_manifest

CHUNK = 1 << 16


def _image() -> tuple[bytes, Manifest]:
    rng = random.Random(5)
    data = rng.randbytes(CHUNK) + bytes(CHUNK) + rng.randbytes(CHUNK // 2 + 7)
    return data, build_manifest(data, "t", "1", chunk_size=CHUNK)


def _stores(
    tmp_path: Path, data: bytes, manifest: Manifest
) -> list[HostTemplate | CenterTemplate | ImageFileTemplate]:
    image = tmp_path / "image.raw"
    image.write_bytes(data)
    host = HostTemplate(ImageStore(tmp_path / "host", manifest))
    center = CenterTemplate(ChunkStore(tmp_path / "center"), manifest)
    for index in range(manifest.chunk_count):
        offset, length = manifest.chunk_range(index)
        host.write_chunk(index, data[offset : offset + length])
        center.write_chunk(index, data[offset : offset + length])
    return [host, center, ImageFileTemplate(image, manifest)]


def test_every_store_reads_each_chunk_into_a_reused_buffer(tmp_path: Path) -> None:
    data, manifest = _image()
    for store in _stores(tmp_path, data, manifest):
        buf = bytearray(b"\xee" * CHUNK)  # stale bytes from an earlier chunk
        for index in (0, 1, 2, 0):
            offset, length = manifest.chunk_range(index)
            view = store.read_chunk_into(index, buf)
            assert view.obj is buf and len(view) == length
            assert bytes(view) == data[offset : offset + length]
            assert bytes(store.read_chunk(index)) == bytes(view)
        store.close()


def test_a_chunk_changed_on_disk_is_not_served(tmp_path: Path) -> None:
    data, manifest = _image()
    image = tmp_path / "image.raw"
    image.write_bytes(data)
    store = ImageFileTemplate(image, manifest)
    with image.open("r+b") as f:
        f.write(b"\x00\x01")
    with pytest.raises(ChunkCorrupt):
        store.read_chunk_into(0, bytearray(CHUNK))
    with pytest.raises(ValueError, match="too small"):
        store.read_chunk_into(2, bytearray(10))
    store.close()
