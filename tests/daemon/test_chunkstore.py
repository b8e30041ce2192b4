"""The storage center's content-addressed chunk store."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest
from vmswarm.daemon.chunkstore import ChunkStore
from vmswarm.daemon.storeerrors import (
    ChunkAbsent,
    ChunkCorrupt,
    ChunkMismatch,
    StoreCorruptError,
    StoreFullError,
    TemplateAbsent,
)
from vmswarm.swarm.manifest import build_manifest


def _chunk(seed: int, size: int = 1000) -> tuple[bytes, bytes]:
    data = bytes((seed * 7 + i) % 251 for i in range(size))
    return blake3.blake3(data).digest(), data


def test_put_get_roundtrip_and_listing(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "c")
    chunks = dict(_chunk(i, 1000 + i) for i in range(5))
    for digest, data in chunks.items():
        assert store.put(digest, data) is True
    for digest, data in chunks.items():
        assert store.has(digest) and digest in store
        assert store.get(digest) == data
        name = digest.hex()
        assert (tmp_path / "c" / name[:2] / name).is_file()
    assert set(store.digests()) == set(chunks)
    assert len(store) == 5
    assert store.bytes_used() == sum(len(d) for d in chunks.values())
    assert ChunkStore(tmp_path / "c").get(next(iter(chunks))) == chunks[next(iter(chunks))]


def test_put_is_idempotent(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    digest, data = _chunk(1)
    assert store.put(digest, data) is True
    assert store.put(digest, bytearray(data)) is False
    assert list(store.digests()) == [digest]


def test_put_rejects_data_that_does_not_match_its_digest(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    digest, data = _chunk(1)
    with pytest.raises(ChunkMismatch):
        store.put(digest, data + b"x")
    assert digest not in store
    assert list(store.digests()) == []


def test_digest_must_be_32_bytes(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    with pytest.raises(ValueError, match="32 bytes"):
        store.put(b"short", b"")
    assert b"short" not in store


def test_get_of_absent_chunk(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    with pytest.raises(ChunkAbsent):
        store.get(bytes(32))


def test_get_into_preallocated_buffer(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    digest, data = _chunk(3, 4096)
    store.put(digest, data)
    buf = bytearray(8192)
    assert store.get_into(digest, buf) == 4096
    assert buf[:4096] == data
    with pytest.raises(ValueError, match="too small"):
        store.get_into(digest, bytearray(100))


def test_corrupt_chunk_is_deleted_on_get(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    digest, data = _chunk(2)
    store.put(digest, data)
    path = store.path_for(digest)
    path.write_bytes(b"\x00" + data[1:])
    with pytest.raises(ChunkCorrupt):
        store.get(digest)
    assert not path.exists()
    assert digest not in store


def test_scrub_removes_bad_chunks_only(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    chunks = dict(_chunk(i) for i in range(6))
    for digest, data in chunks.items():
        store.put(digest, data)
    bad = sorted(chunks)[:2]
    store.path_for(bad[0]).write_bytes(b"garbage")
    os.truncate(store.path_for(bad[1]), 10)
    assert sorted(store.scrub()) == bad
    assert set(store.digests()) == set(chunks) - set(bad)
    assert store.scrub() == []


def test_stale_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    digest, data = _chunk(1)
    store.put(digest, data)
    sub = store.path_for(digest).parent
    (sub / f".tmp-{digest.hex()}-dead").write_bytes(data[:10])
    (tmp_path / "manifests" / ".tmp-x.manifest-dead").write_bytes(b"half")
    reopened = ChunkStore(tmp_path)
    assert reopened.stale_removed == 2
    assert sorted(os.listdir(sub)) == [digest.hex()]
    assert list(reopened.digests()) == [digest]


def test_manifests_survive_a_restart(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    one = build_manifest(random.Random(1).randbytes(70000), "debian", "12", chunk_size=1 << 16)
    two = build_manifest(random.Random(2).randbytes(1000), "alpine", "3.20", chunk_size=1 << 16)
    assert store.put_manifest(one.encode()) == one
    store.put_manifest(two.encode())
    store.put_manifest(two.encode())
    reopened = ChunkStore(tmp_path)
    assert reopened.manifests() == [two, one]
    assert reopened.get_manifest(one.template_id) == one
    with pytest.raises(TemplateAbsent):
        reopened.get_manifest(bytes(32))


def test_invalid_manifests_are_refused_and_ignored(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    with pytest.raises(StoreCorruptError, match="invalid manifest"):
        store.put_manifest(b"\x93\x01\x02\x03")
    good = build_manifest(random.Random(2).randbytes(1000), "alpine", "3.20", chunk_size=1 << 16)
    store.put_manifest(good.encode())
    (tmp_path / "manifests" / (bytes(32).hex() + ".manifest")).write_bytes(b"junk")
    assert store.manifests() == [good]


def test_enospc_leaves_no_partial_file(small_tmpfs: Callable[[str], Path]) -> None:
    root = small_tmpfs("256k")
    store = ChunkStore(root / "c")
    small_digest, small = _chunk(1, 4096)
    store.put(small_digest, small)
    big = os.urandom(512 * 1024)
    big_digest = blake3.blake3(big).digest()
    with pytest.raises(StoreFullError, match=r"need 524288 bytes, \d+ bytes free") as info:
        store.put(big_digest, big)
    assert info.value.needed == len(big)
    assert info.value.free < len(big)
    assert big_digest not in store
    leftovers = [name for _, _, files in os.walk(root) for name in files]
    assert leftovers == [small_digest.hex()]
    assert store.get(small_digest) == small
