"""Building a manifest from an image file on disk."""

from __future__ import annotations

import errno
import itertools
import os
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmswarm.daemon import imagefile
from vmswarm.daemon.imagefile import ImageFileError, image_name, manifest_from_file
from vmswarm.swarm.errors import ManifestError
from vmswarm.swarm.manifest import MIN_CHUNK_SIZE, ImageFormat, build_manifest

CS = MIN_CHUNK_SIZE


def write_sparse(path: Path, size: int, data_runs: list[tuple[int, int]], seed: int = 0) -> bytes:
    """A file of `size` bytes, random in `data_runs` (offset, length), holes elsewhere."""
    rng = random.Random(seed)
    content = bytearray(size)
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length in data_runs:
            chunk = rng.randbytes(length)
            content[offset : offset + length] = chunk
            f.seek(offset)
            f.write(chunk)
    return bytes(content)


@pytest.fixture
def small_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read one chunk at a time, so a small file still takes many reads and both buffers."""
    monkeypatch.setattr(imagefile, "_READ_SIZE", CS)


@pytest.mark.parametrize(
    ("size", "runs"),
    [
        (0, []),
        (1, [(0, 1)]),
        (10 * CS + 123, [(0, 10 * CS + 123)]),
        (10 * CS + 123, []),
        (10 * CS + 123, [(5, 100), (3 * CS - 7, 2 * CS + 9), (10 * CS, 123)]),
        (64 * CS, [(i * 3 * CS + 11, CS + 1000) for i in range(20)]),
    ],
)
@pytest.mark.parametrize("chunk_size", [CS, 4 * CS])
def test_file_manifest_equals_in_memory_manifest(
    tmp_path: Path,
    small_reads: None,
    size: int,
    runs: list[tuple[int, int]],
    chunk_size: int,
) -> None:
    path = tmp_path / "disk.img"
    content = write_sparse(path, size, runs)
    from_file = manifest_from_file(path, "disk", "7", chunk_size)
    assert from_file == build_manifest(content, "disk", "7", chunk_size)
    assert from_file.size == size


def test_default_read_size_gives_the_same_manifest(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    size = (1 << 24) * 2 + 5 * CS + 3  # more than two default-sized reads
    content = write_sparse(path, size, [(0, 3 * CS), (1 << 24, 1 << 20), (size - 10, 10)])
    assert manifest_from_file(path, "d", "1", CS) == build_manifest(content, "d", "1", CS)


def test_file_without_hole_support_is_read_whole(
    tmp_path: Path, small_reads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "disk.img"
    content = write_sparse(path, 6 * CS, [(CS, CS)])
    monkeypatch.setattr(imagefile, "_extents", lambda fd, size: [(0, size, True)])
    assert manifest_from_file(path, "d", "1", CS) == build_manifest(content, "d", "1", CS)


def test_extents_cover_the_file_and_find_holes(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    size = 256 * CS
    write_sparse(path, size, [(0, CS), (128 * CS, CS)])
    fd = os.open(path, os.O_RDONLY)
    try:
        runs = imagefile._extents(fd, size)
    finally:
        os.close(fd)
    assert runs[0][0] == 0
    assert runs[-1][1] == size
    for (_, end, _), (start, _, _) in itertools.pairwise(runs):
        assert end == start
    data_bytes = sum(end - start for start, end, is_data in runs if is_data)
    assert data_bytes >= 2 * CS
    if path.stat().st_blocks * 512 < size // 2:  # the file system kept the holes
        assert any(not is_data for _, _, is_data in runs)
        assert data_bytes < size


def test_qcow2_with_backing_file_is_refused(tmp_path: Path) -> None:
    head = bytearray(2 * CS)
    struct.pack_into(">4sIQI", head, 0, b"QFI\xfb", 2, 512, 8)
    head[512:520] = b"base.img"
    path = tmp_path / "overlay.qcow2"
    path.write_bytes(head)
    with pytest.raises(ManifestError, match=r"backing file 'base\.img'; templates must be"):
        manifest_from_file(path, "o", "1", CS)


def test_clean_qcow2_is_recorded_as_qcow2(tmp_path: Path) -> None:
    head = bytearray(2 * CS)
    struct.pack_into(">4sI", head, 0, b"QFI\xfb", 2)
    path = tmp_path / "clean.qcow2"
    path.write_bytes(head)
    assert manifest_from_file(path, "c", "1", CS).format is ImageFormat.QCOW2


def test_bad_chunk_size_is_refused_before_opening(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="power of two"):
        manifest_from_file(tmp_path / "missing.img", "m", "1", 3 * CS)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageFileError, match=r"missing\.img: no such file"):
        manifest_from_file(tmp_path / "missing.img", "m", "1", CS)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageFileError, match="is a directory"):
        manifest_from_file(tmp_path, "m", "1", CS)


def test_path_through_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ImageFileError, match="a parent of the path is not a directory"):
        manifest_from_file(tmp_path / "file" / "disk.img", "m", "1", CS)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ImageFileError, match="not a regular file or block device"):
        manifest_from_file(fifo, "m", "1", CS)


def test_character_device_is_refused() -> None:
    with pytest.raises(ImageFileError, match="/dev/null: not a regular file or block device"):
        manifest_from_file("/dev/null", "m", "1", CS)


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        yield path


def test_socket_cannot_be_opened(unix_socket: Path) -> None:
    with pytest.raises(ImageFileError, match="sock: cannot open: No such device or address"):
        manifest_from_file(unix_socket, "m", "1", CS)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.img"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(ImageFileError, match="permission denied"):
        manifest_from_file(path, "m", "1", CS)


def test_read_error_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bad.img"
    write_sparse(path, 2 * CS, [(0, 2 * CS)])

    def failing_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", failing_preadv)
    with pytest.raises(ImageFileError, match=r"bad\.img: read failed: Input/output error"):
        manifest_from_file(path, "m", "1", CS)


def test_file_that_shrinks_while_read_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "shrinking.img"
    write_sparse(path, 2 * CS, [(0, 2 * CS)])
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: 0)
    with pytest.raises(ImageFileError, match="shrank while it was being read"):
        manifest_from_file(path, "m", "1", CS)


@pytest.mark.parametrize(
    ("path", "name"),
    [("/var/lib/debian-12.qcow2", "debian-12"), ("disk", "disk"), ("a.b.raw", "a.b")],
)
def test_image_name_is_the_stem(path: str, name: str) -> None:
    assert image_name(path) == name
