"""The host's per-template image store: sparse image plus durable bitfield."""

from __future__ import annotations

import errno
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest
from vmswarm.daemon import imagestore, journal
from vmswarm.daemon.imagestore import ImageStore, hash_file
from vmswarm.daemon.storeerrors import (
    ChunkAbsent,
    ChunkCorrupt,
    ChunkMismatch,
    StoreError,
    StoreFullError,
    StoreLockedError,
    TemplateAbsent,
)
from vmswarm.swarm.manifest import Manifest, build_manifest

CHUNK = 1 << 16


def _image(
    pattern: str, seed: int = 0, tail: int = 0, name: str = "test"
) -> tuple[bytes, Manifest]:
    """An image with one chunk per letter: 'D' random data, '0' all zeros; `tail` bytes cut off."""
    rng = random.Random(seed)
    data = b"".join(bytes(CHUNK) if c == "0" else rng.randbytes(CHUNK) for c in pattern)
    if tail:
        data = data[:-tail]
    return data, build_manifest(data, name, f"v{seed}", chunk_size=CHUNK)


def _chunk(data: bytes, manifest: Manifest, index: int) -> bytes:
    offset, length = manifest.chunk_range(index)
    return data[offset : offset + length]


def _fill(store: ImageStore, data: bytes, indices: list[int] | None = None) -> None:
    for i in list(store.have.missing()) if indices is None else indices:
        store.write_chunk(i, _chunk(data, store.manifest, i))


def _scribble(path: Path, offset: int, data: bytes) -> None:
    """Change the image behind the store's back."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _assert_zero_chunks_are_holes(store: ImageStore) -> None:
    manifest = store.manifest
    fd = os.open(store.path, os.O_RDONLY)
    try:
        for i in manifest.zero_chunks:
            offset, length = manifest.chunk_range(i)
            try:
                data_at = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                data_at = manifest.size
            assert data_at >= offset + length, f"zero chunk {i} has data allocated"
        allocated = os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)
    nonzero = sum(manifest.chunk_range(i)[1] for i in range(manifest.chunk_count)) - sum(
        manifest.chunk_range(i)[1] for i in manifest.zero_chunks
    )
    # Only non-zero chunks ever take room (written ones; a fresh store takes none).
    assert allocated < nonzero + CHUNK


def test_create_sizes_the_image_sparsely_and_zero_chunks_are_present_holes(
    tmp_path: Path,
) -> None:
    _, manifest = _image("D0DD00D0", tail=100)
    with ImageStore(tmp_path, manifest) as store:
        assert store.path.stat().st_size == manifest.size
        assert set(store.have) == {1, 4, 5, 7}
        assert store.missing_count == 4 and not store.complete
        _assert_zero_chunks_are_holes(store)
        # No reservation up front: writing into fallocated extents costs far more CPU.
        assert store.path.stat().st_blocks * 512 < CHUNK
    names = sorted(os.listdir(tmp_path))
    stem = manifest.template_id.hex()
    assert names == sorted(stem + s for s in (".bits", ".img", ".journal", ".manifest"))


def test_write_then_read_back_and_verify_image(tmp_path: Path) -> None:
    data, manifest = _image("DD0D", tail=12345)
    with ImageStore(tmp_path, manifest) as store:
        assert not store.verify_image()  # incomplete
        assert store.write_chunk(3, _chunk(data, manifest, 3)) is True
        assert store.read_chunk(3) == _chunk(data, manifest, 3)
        snapshot = store.have
        _fill(store, data)
        assert 0 not in snapshot  # `have` is a copy
        assert store.complete and store.missing_count == 0
        assert store.read_chunk(2) == bytes(CHUNK)
        assert store.verify_image()
    assert Path(store.path).read_bytes() == data


def test_read_chunk_into_a_preallocated_buffer(tmp_path: Path) -> None:
    data, manifest = _image("DD", tail=10)
    with ImageStore(tmp_path, manifest) as store:
        _fill(store, data)
        buf = bytearray(CHUNK + 50)
        assert store.read_chunk_into(1, memoryview(buf)) == CHUNK - 10
        assert buf[: CHUNK - 10] == _chunk(data, manifest, 1)
        with pytest.raises(ValueError, match="too small"):
            store.read_chunk_into(0, bytearray(10))


def test_mismatched_chunk_is_refused_and_not_written(tmp_path: Path) -> None:
    data, manifest = _image("D0")
    with ImageStore(tmp_path, manifest) as store:
        bad = bytearray(_chunk(data, manifest, 0))
        bad[100] ^= 1
        with pytest.raises(ChunkMismatch):
            store.write_chunk(0, bad)
        with pytest.raises(ChunkMismatch):
            store.write_chunk(0, _chunk(data, manifest, 0)[:-1])
        with pytest.raises(ChunkMismatch):
            store.write_chunk(1, b"\x01" * CHUNK)  # a zero chunk with data in it
        assert 0 not in store
        assert store.path.read_bytes() == bytes(manifest.size)
        with pytest.raises(ChunkAbsent):
            store.read_chunk(0)


def test_rewriting_a_present_chunk_is_a_no_op(tmp_path: Path) -> None:
    data, manifest = _image("D0")
    with ImageStore(tmp_path, manifest) as store:
        assert store.write_chunk(0, _chunk(data, manifest, 0)) is True
        assert store.write_chunk(0, _chunk(data, manifest, 0)) is False
        assert store.write_chunk(1, bytes(CHUNK)) is False


def test_marks_survive_close_and_load(tmp_path: Path) -> None:
    data, manifest = _image("DDD0D")
    with ImageStore(tmp_path, manifest) as store:
        _fill(store, data, [0, 4])
    with ImageStore.load(tmp_path, manifest.template_id) as again:
        assert again.manifest == manifest
        assert set(again.have) == {0, 3, 4}
        assert not again.recovered
    with pytest.raises(TemplateAbsent):
        ImageStore.load(tmp_path, bytes(32))


def test_corrupt_chunk_on_disk_is_detected_on_read_and_unmarked_durably(tmp_path: Path) -> None:
    data, manifest = _image("DDD")
    with ImageStore(tmp_path, manifest) as store:
        _fill(store, data)
        _scribble(store.path, CHUNK + 7, b"\xff\xfe")
        with pytest.raises(ChunkCorrupt, match="chunk 1"):
            store.read_chunk(1)
        assert 1 not in store
        with pytest.raises(ChunkAbsent):
            store.read_chunk(1)
        # Durable at once: a copy taken now, as after a crash, agrees.
        shutil.copytree(tmp_path, tmp_path.parent / "copy")
    with ImageStore(tmp_path.parent / "copy", manifest) as copy:
        assert set(copy.have) == {0, 2}
    with ImageStore(tmp_path, manifest) as store:
        assert set(store.have) == {0, 2}
        store.write_chunk(1, _chunk(data, manifest, 1))
        assert store.verify_image()


def test_scrub_unmarks_bad_chunks_and_repairs_zero_regions(tmp_path: Path) -> None:
    data, manifest = _image("DD0DD")
    with ImageStore(tmp_path, manifest) as store:
        _fill(store, data)
        _scribble(store.path, 0, b"x")
        _scribble(store.path, 4 * CHUNK - 1, b"y")
        _scribble(store.path, 2 * CHUNK + 9, b"z")  # inside the zero chunk
        assert not store.verify_image()
        assert store.scrub() == [0, 3]
        assert set(store.have) == {1, 2, 4}
        assert store.read_chunk(2) == bytes(CHUNK)
        assert store.scrub() == []
        _fill(store, data)
        assert store.verify_image()
    with ImageStore(tmp_path, manifest) as store:
        assert store.complete


def test_unclean_open_reverifies_journaled_chunks(tmp_path: Path) -> None:
    data, manifest = _image("DDDD0")
    live = tmp_path / "live"
    crashed = tmp_path / "crashed"
    store = ImageStore(live, manifest)
    store.checkpoint()
    _fill(store, data, [1, 2, 3])
    # What kill -9 leaves: the journal names 1, 2, 3, and no checkpoint since.
    shutil.copytree(live, crashed)
    store.close()
    # As after power loss: the journal record reached the disk but chunk 2's data did not.
    _scribble(crashed / (manifest.template_id.hex() + ".img"), 2 * CHUNK, bytes(CHUNK))
    with ImageStore(crashed, manifest) as recovered:
        assert recovered.recovered
        assert recovered.dropped_on_open == {2}
        assert set(recovered.have) == {1, 3, 4}
    with ImageStore(crashed, manifest) as clean:
        assert not clean.recovered
        assert set(clean.have) == {1, 3, 4}


def test_damaged_bitfield_is_rebuilt_from_the_image(tmp_path: Path) -> None:
    data, manifest = _image("DD0D")
    with ImageStore(tmp_path, manifest) as store:
        _fill(store, data, [0, 3])
    bits = tmp_path / (manifest.template_id.hex() + ".bits")
    bits.write_bytes(b"\x00" * len(bits.read_bytes()))
    with ImageStore(tmp_path, manifest) as store:
        assert store.recovered
        assert set(store.have) == {0, 2, 3}


def test_second_open_is_locked_out(tmp_path: Path) -> None:
    _, manifest = _image("D")
    with ImageStore(tmp_path, manifest), pytest.raises(StoreLockedError):
        ImageStore(tmp_path, manifest)
    with ImageStore(tmp_path, manifest) as store:
        assert store.missing_count == 1


def test_closed_store_refuses_work(tmp_path: Path) -> None:
    data, manifest = _image("D")
    store = ImageStore(tmp_path, manifest)
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.write_chunk(0, _chunk(data, manifest, 0))


def test_concurrent_writers_from_threads(tmp_path: Path) -> None:
    data, manifest = _image("D" * 40, tail=3)
    with ImageStore(tmp_path, manifest, journal_records=8) as store:
        with ThreadPoolExecutor(4) as pool:
            for i in range(manifest.chunk_count):
                pool.submit(store.write_chunk, i, _chunk(data, manifest, i))
        assert store.complete
    with ImageStore(tmp_path, manifest) as store:
        assert store.complete and store.verify_image()


def test_list_templates_ignores_half_created_and_corrupt(tmp_path: Path) -> None:
    _, first = _image("D", seed=1, name="debian")
    _, second = _image("D0", seed=2, name="alpine")
    ImageStore(tmp_path, first).close()
    ImageStore(tmp_path, second).close()
    _, orphan = _image("DD", seed=3, name="orphan")
    (tmp_path / (orphan.template_id.hex() + ".manifest")).write_bytes(orphan.encode())
    (tmp_path / (bytes(32).hex() + ".manifest")).write_bytes(b"junk")
    (tmp_path / (bytes(32).hex() + ".bits")).write_bytes(b"junk")
    assert ImageStore.list_templates(tmp_path) == [second, first]
    assert ImageStore.list_templates(tmp_path / "nowhere") == []


def test_stale_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    _, manifest = _image("D")
    ImageStore(tmp_path, manifest).close()
    stale = tmp_path / f".tmp-{manifest.template_id.hex()}.bits-dead"
    stale.write_bytes(b"half")
    ImageStore(tmp_path, manifest).close()
    assert not stale.exists()


def test_a_disk_too_small_for_the_image_fails_at_once_and_leaves_nothing(
    small_tmpfs: Callable[[str], Path],
) -> None:
    root = small_tmpfs("1m")
    _, manifest = _image("D" * 32)
    with pytest.raises(StoreFullError, match=r"need 2097152 bytes, \d+ bytes free") as info:
        ImageStore(root / "store", manifest)
    assert info.value.needed == 32 * CHUNK
    assert 0 < info.value.free <= 1 << 20
    assert os.listdir(root / "store") == []
    assert ImageStore.list_templates(root / "store") == []


def test_mostly_zero_image_fits_because_zero_chunks_stay_holes(
    small_tmpfs: Callable[[str], Path],
) -> None:
    root = small_tmpfs("1m")
    data, manifest = _image("D" + "0" * 62 + "D")  # a 4 MiB image on a 1 MiB filesystem
    with ImageStore(root, manifest) as store:
        _assert_zero_chunks_are_holes(store)
        _fill(store, data)
        assert store.verify_image()


def test_full_disk_during_chunk_write_marks_nothing(small_tmpfs: Callable[[str], Path]) -> None:
    root = small_tmpfs("2m")
    data, manifest = _image("DDDDDDDD")
    store = ImageStore(root, manifest)
    # Fill the disk behind the store's back.
    store.write_chunk(1, _chunk(data, manifest, 1))  # journaled, so a checkpoint is due
    filler = root / "filler"
    with filler.open("wb") as f, pytest.raises(OSError) as full:
        while True:
            f.write(b"\xaa" * CHUNK)
            f.flush()
    assert full.value.errno == errno.ENOSPC
    with pytest.raises(StoreFullError, match="chunk 0"):
        store.write_chunk(0, _chunk(data, manifest, 0))
    assert 0 not in store
    with pytest.raises(StoreFullError, match="bitfield"):
        store.checkpoint()
    assert set(store.have) == {1}
    filler.unlink()
    store.write_chunk(0, _chunk(data, manifest, 0))
    store.close()
    with ImageStore(root, manifest) as again:
        assert set(again.have) == {0, 1}
        assert again.read_chunk(0) == _chunk(data, manifest, 0)


@pytest.mark.parametrize("block", [4096, 1 << 16, 1 << 22])
def test_hash_file_reads_data_and_hashes_holes_as_zeros(tmp_path: Path, block: int) -> None:
    path = tmp_path / "sparse"
    rng = random.Random(block)
    size = 3 * (1 << 20) + 12345
    with open(path, "wb") as out:
        out.truncate(size)
        for offset in (0, 1 << 20, size - 5000):
            out.seek(offset)
            out.write(rng.randbytes(5000))
    data = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        hasher = blake3.blake3()
        assert hash_file(fd, size, hasher, block)
        assert hasher.digest() == blake3.blake3(data).digest()
        # A file shorter than asked does not verify.
        assert not hash_file(fd, size + 1, blake3.blake3(), block)
    finally:
        os.close(fd)


def _racing_writes(store: ImageStore, chunk: bytes, index: int) -> list[bool | Exception]:
    """Two threads write the same chunk at once; what each call returned or raised."""
    barrier = threading.Barrier(2)

    def write() -> bool | Exception:
        barrier.wait()
        try:
            return store.write_chunk(index, chunk)
        except StoreError as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: write(), range(2)))


def test_concurrent_writes_of_one_chunk_report_success_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, manifest = _image("DDD")
    real_pwrite = journal.pwrite_all
    writes: list[int] = []

    def slow_pwrite(fd: int, buf: bytes | bytearray | memoryview, offset: int) -> None:
        writes.append(offset)
        time.sleep(0.05)  # widen the window in which both writers are past the checks
        real_pwrite(fd, buf, offset)

    monkeypatch.setattr(imagestore, "pwrite_all", slow_pwrite)
    with ImageStore(tmp_path, manifest) as store:
        results = _racing_writes(store, _chunk(data, manifest, 1), 1)
        assert sorted(results, key=str) == [False, True]
        assert writes == [CHUNK]  # the second writer waited and found the chunk there
        assert 1 in store and store.read_chunk(1) == _chunk(data, manifest, 1)


def test_a_waiting_writer_takes_over_when_the_first_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, manifest = _image("DDD")
    real_pwrite = journal.pwrite_all
    calls: list[int] = []

    def first_fails(fd: int, buf: bytes | bytearray | memoryview, offset: int) -> None:
        calls.append(offset)
        time.sleep(0.05)
        if len(calls) == 1:
            raise OSError(errno.EIO, "injected I/O error")
        real_pwrite(fd, buf, offset)

    monkeypatch.setattr(imagestore, "pwrite_all", first_fails)
    with ImageStore(tmp_path, manifest) as store:
        results = _racing_writes(store, _chunk(data, manifest, 2), 2)
        assert sum(r is True for r in results) == 1
        assert sum(isinstance(r, StoreError) for r in results) == 1
        assert len(calls) == 2 and 2 in store
        assert store.read_chunk(2) == _chunk(data, manifest, 2)


def test_hash_ahead_hashes_the_present_prefix_so_verify_reads_only_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, manifest = _image("DD0DD", tail=100)
    hashed: list[tuple[int, int]] = []
    real = imagestore.hash_range

    def counting(fd: int, start: int, end: int, hasher: blake3.blake3, block: int = 1) -> bool:
        hashed.append((start, end))
        return real(fd, start, end, hasher)

    monkeypatch.setattr(imagestore, "hash_range", counting)
    with ImageStore(tmp_path, manifest) as store:
        assert store.hash_ahead() == 0  # chunk 0 is not here yet
        _fill(store, data, [0, 3])
        assert store.hash_ahead() == 1
        _fill(store, data, [1])
        assert store.hash_ahead() == 4  # 1, the zero chunk 2 and 3 follow at once
        _fill(store, data, [4])
        assert hashed == [(0, CHUNK), (CHUNK, 4 * CHUNK)]
        assert store.verify_image()
        assert hashed[-1] == (4 * CHUNK, manifest.size)  # the end check read only the rest
        assert sum(end - start for start, end in hashed) == manifest.size


def test_a_byte_changed_before_it_was_hashed_fails_verify_and_a_repair_passes(
    tmp_path: Path,
) -> None:
    data, manifest = _image("DDD")
    with ImageStore(tmp_path, manifest) as store:
        _fill(store, data, [0])
        store.hash_ahead()
        _fill(store, data, [1, 2])
        _scribble(store.path, 2 * CHUNK + 5, b"!")
        assert not store.verify_image()
        assert store.scrub() == [2]
        _fill(store, data)
        assert store.verify_image()  # confirmed from scratch, then the running hash is right
        assert store.verify_image()
