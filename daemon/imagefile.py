"""Build a template's manifest by streaming its image file from disk."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..swarm.manifest import DEFAULT_CHUNK_SIZE, Manifest, ManifestBuilder

# Reads this many bytes at a time (rounded up to whole chunks): large reads keep syscalls rare,
# and blake3's threads get big buffers to split.
_READ_SIZE = 1 << 24


class ImageFileError(Exception):
    """The image file cannot be read; the message names the path and says why."""


def open_image(path: str | os.PathLike[str]) -> int:
    """Open `path` for reading and return the fd; only regular files and block devices qualify."""
    where = os.fspath(path)
    try:
        # O_NONBLOCK so that opening a FIFO fails the type check below instead of hanging.
        fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageFileError(f"{where}: no such file") from None
    except NotADirectoryError:
        raise ImageFileError(f"{where}: a parent of the path is not a directory") from None
    except PermissionError:
        raise ImageFileError(f"{where}: permission denied") from None
    except OSError as exc:
        raise ImageFileError(f"{where}: cannot open: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ImageFileError(f"{where}: is a directory, not an image file")
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ImageFileError(f"{where}: not a regular file or block device")
    except BaseException:
        os.close(fd)
        raise
    return fd


def manifest_from_file(
    path: str | os.PathLike[str],
    name: str,
    version: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Manifest:
    """The manifest of the image at `path`.

    Raises ImageFileError if the file can't be read, ManifestError if it can't be a template.
    """
    # Two threads: this one reads and hashes chunks while a worker hashes the whole image, each
    # single-threaded, which beats both halves using blake3's thread pool one after the other.
    builder = ManifestBuilder(chunk_size, multithreaded=False)  # validates chunk_size before I/O
    read_size = max(chunk_size, _READ_SIZE // chunk_size * chunk_size)
    where = os.fspath(path)
    fd = open_image(path)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="manifest-hash") as pool:
            whole: Future[None] | None = None
            for piece in _pieces(fd, where, read_size):
                if whole is not None:
                    whole.result()  # frees the buffer that `_pieces` fills next
                whole = pool.submit(builder.update_whole, piece)
                builder.update_chunks(piece)
            if whole is not None:
                whole.result()
    finally:
        os.close(fd)
    return builder.finish(name, version)


def _pieces(fd: int, where: str, read_size: int) -> Iterator[memoryview]:
    """The file's bytes in order, at most `read_size` at a time.

    Data is read alternately into two buffers, so a piece stays valid until the next-but-one
    is asked for. Holes are served from a zero buffer without reading.
    """
    buffers = [memoryview(bytearray(read_size)), memoryview(bytearray(read_size))]
    zeros = memoryview(bytes(read_size))
    turn = 0
    size = os.lseek(fd, 0, os.SEEK_END)
    for start, end, is_data in _extents(fd, size):
        pos = start
        while pos < end:
            length = min(read_size, end - pos)
            if not is_data:
                yield zeros[:length]
                pos += length
                continue
            view = buffers[turn][:length]
            try:
                count = os.preadv(fd, [view], pos)
            except OSError as exc:
                raise ImageFileError(f"{where}: read failed: {exc.strerror or exc}") from None
            if count == 0:
                raise ImageFileError(f"{where}: file shrank while it was being read")
            yield view[:count]
            turn ^= 1
            pos += count


def _extents(fd: int, size: int) -> list[tuple[int, int, bool]]:
    """(start, end, is_data) runs covering 0..size; holes found with SEEK_DATA/SEEK_HOLE."""
    runs: list[tuple[int, int, bool]] = []
    pos = 0
    try:
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: only a hole is left
                    raise
                data = size
            data = min(data, size)
            if data > pos:
                runs.append((pos, data, False))
            if data >= size:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            runs.append((data, hole, True))
            pos = hole
    except OSError:
        return [(0, size, True)]  # no hole support (e.g. a block device): read it all
    return runs


def image_name(path: str | os.PathLike[str]) -> str:
    """The default template name for an image file: its file name without the extension."""
    return Path(path).stem or Path(path).name
