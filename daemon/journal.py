"""A chunk bitfield that survives kill -9 and power loss: a checkpoint file plus a journal.

The checkpoint file holds the whole bitfield and a generation number, replaced atomically. Each
change after it is one fixed-size journal record carrying that generation and a CRC, so a torn
tail record and records left over from an older generation are both ignored. Records reach the
page cache with a plain write, which survives a process kill; power loss is covered by
re-verifying, on the next open, every chunk the journal claims (the owner's `verify` callback).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import struct
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from ..swarm.bitfield import Bitfield
from .storeerrors import StoreCorruptError, StoreError, StoreFullError, StoreIOError

_BITS_MAGIC = b"VSBF"
_BITS_VERSION = 1
# magic, version, reserved, generation, size, tag; then the bits; then a CRC32 of all before it.
_BITS_HEADER = struct.Struct("<4sHHQI32s")
_CRC = struct.Struct("<I")

_RECORD_MAGIC = b"VJ"
_OP_ADD = 1
_OP_DISCARD = 2
# magic, op, reserved, generation (low 32 bits), index, CRC32 of the first 12 bytes.
_RECORD = struct.Struct("<2sBBIII")
RECORD_SIZE = _RECORD.size
DEFAULT_JOURNAL_RECORDS = 4096

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def disk_free(path: Path) -> int:
    """Bytes an unprivileged writer may still allocate on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def store_error(exc: OSError, what: str, needed: int, where: Path) -> StoreError:
    """Translate an OSError from a store write into the store's error type."""
    if exc.errno in _NO_SPACE:
        return StoreFullError(f"{what} in {where}", needed, disk_free(where))
    return StoreIOError(f"I/O error on {what} in {where}: {exc}")


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite the whole buffer, resuming after short writes."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            # A zero-byte write on a non-empty buffer means the filesystem is out of room.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]
        offset += written


def pread_into(fd: int, buf: bytearray | memoryview, offset: int) -> int:
    """Fill `buf` from `offset`, resuming after short reads; return bytes read (less at EOF)."""
    view = memoryview(buf).cast("B")
    total = 0
    while total < len(view):
        got = os.preadv(fd, [view[total:]], offset + total)
        if got == 0:
            break
        total += got
    return total


def fsync_dir(directory: Path) -> None:
    """Make a rename or create in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TEMP_PREFIX = ".tmp-"


def atomic_write(path: Path, data: bytes, what: str) -> None:
    """Replace `path` with `data`: temp file in the same directory, fsync, rename, fsync dir."""
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            pwrite_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise store_error(exc, what, len(data), path.parent) from exc


def _encode_bits(generation: int, tag: bytes, bits: Bitfield) -> bytes:
    body = _BITS_HEADER.pack(_BITS_MAGIC, _BITS_VERSION, 0, generation, bits.size, tag)
    body += bits.to_bytes()
    return body + _CRC.pack(zlib.crc32(body))


def _decode_bits(raw: bytes, size: int, tag: bytes, path: Path) -> tuple[int, Bitfield] | None:
    """Parse a checkpoint file; None if it is damaged. A file of another store is an error."""
    if len(raw) < _BITS_HEADER.size + _CRC.size:
        return None
    body, (crc,) = raw[: -_CRC.size], _CRC.unpack(raw[-_CRC.size :])
    if zlib.crc32(body) != crc:
        return None
    magic, version, _, generation, stored_size, stored_tag = _BITS_HEADER.unpack_from(body)
    if magic != _BITS_MAGIC or version != _BITS_VERSION:
        return None
    if stored_size != size or stored_tag != tag:
        raise StoreCorruptError(f"{path} belongs to another store (size or template id differ)")
    if len(body) != _BITS_HEADER.size + (size + 7) // 8:
        return None
    try:
        return generation, Bitfield(size, body[_BITS_HEADER.size :])
    except ValueError:
        return None


def _encode_record(op: int, generation: int, index: int) -> bytes:
    head = _RECORD.pack(_RECORD_MAGIC, op, 0, generation & 0xFFFFFFFF, index, 0)[:12]
    return head + _CRC.pack(zlib.crc32(head))


def _replay(raw: bytes, generation: int, size: int) -> tuple[list[tuple[int, int]], int]:
    """Valid records of this generation, in order, and the byte length they cover."""
    records: list[tuple[int, int]] = []
    gen32 = generation & 0xFFFFFFFF
    offset = 0
    while offset + RECORD_SIZE <= len(raw):
        magic, op, _, gen, index, crc = _RECORD.unpack_from(raw, offset)
        valid = (
            magic == _RECORD_MAGIC
            and zlib.crc32(raw[offset : offset + 12]) == crc
            and op in (_OP_ADD, _OP_DISCARD)
            and gen == gen32
            and index < size
        )
        if not valid:
            # A torn or stale record ends the journal: nothing after it was written in order.
            break
        records.append((op, index))
        offset += RECORD_SIZE
    return records, offset


class DurableBitfield:
    """A Bitfield persisted as `<base>.bits` (checkpoint) plus `<base>.journal` (changes since).

    `sync_data` must make the data the bits describe durable (fdatasync the image); it runs at
    the start of every checkpoint. `verify(i)` re-checks chunk i on disk; it runs on open for
    every chunk the journal claims, and for every chunk when the checkpoint file was damaged.
    """

    def __init__(
        self,
        base: Path,
        size: int,
        tag: bytes,
        *,
        sync_data: Callable[[], None],
        verify: Callable[[int], bool],
        initial: Iterable[int] = (),
        journal_records: int = DEFAULT_JOURNAL_RECORDS,
    ) -> None:
        if len(tag) != 32:
            raise ValueError(f"tag must be 32 bytes, got {len(tag)}")
        if journal_records < 1:
            raise ValueError("journal_records must be >= 1")
        self.bits_path = base.with_name(base.name + ".bits")
        self.journal_path = base.with_name(base.name + ".journal")
        self.size = size
        self._tag = tag
        self._sync_data = sync_data
        self._capacity = journal_records * RECORD_SIZE
        self._journal_len = 0
        # A random start, so a new or rebuilt checkpoint never matches leftover journal records.
        self._generation = secrets.randbelow(1 << 32)
        self._bits = Bitfield(size)
        # True while the checkpoint file lags the in-memory bits.
        self._dirty = True
        # What the last open found, for logs and tests.
        self.created = False
        self.damaged = False
        self.replayed: frozenset[int] = frozenset()
        self.dropped_on_open: frozenset[int] = frozenset()

        self._journal_fd = os.open(self.journal_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._load(verify, initial)
        except BaseException:
            os.close(self._journal_fd)
            raise

    def _load(self, verify: Callable[[int], bool], initial: Iterable[int]) -> None:
        try:
            raw = self.bits_path.read_bytes()
        except FileNotFoundError:
            self.created = True
            for i in initial:
                self._bits.add(i)
            self.checkpoint()
            return
        decoded = _decode_bits(raw, self.size, self._tag, self.bits_path)
        if decoded is None:
            # The checkpoint is unreadable: trust nothing and rebuild it from the data itself.
            self.damaged = True
            dropped = set()
            for i in range(self.size):
                if verify(i):
                    self._bits.add(i)
                else:
                    dropped.add(i)
            self.dropped_on_open = frozenset(dropped)
            self.checkpoint()
            return
        self._generation, self._bits = decoded
        self._dirty = False
        # Read it all: an earlier run may have used a larger journal than this one.
        journal_size = os.fstat(self._journal_fd).st_size
        journal = os.pread(self._journal_fd, journal_size, 0) if journal_size else b""
        records, _ = _replay(journal, self._generation, self.size)
        if not records:
            return
        self._dirty = True
        last_op: dict[int, int] = {}
        for op, index in records:
            last_op[index] = op
            if op == _OP_ADD:
                self._bits.add(index)
            else:
                self._bits.discard(index)
        # Unclean stop: the journal may be ahead of the data on disk (power loss), so re-verify.
        self.replayed = frozenset(i for i, op in last_op.items() if op == _OP_ADD)
        dropped = {i for i in sorted(self.replayed) if not verify(i)}
        for i in dropped:
            self._bits.discard(i)
        self.dropped_on_open = frozenset(dropped)
        self.checkpoint()

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def journal_records(self) -> int:
        """Records written since the last checkpoint."""
        return self._journal_len // RECORD_SIZE

    def __contains__(self, index: object) -> bool:
        return index in self._bits

    def __len__(self) -> int:
        return len(self._bits)

    def snapshot(self) -> Bitfield:
        return self._bits.copy()

    def add(self, index: int) -> None:
        """Mark chunk `index`. Survives kill -9 once this returns; power loss needs a checkpoint."""
        if index in self._bits:
            return
        self._append(_OP_ADD, index)
        self._bits.add(index)
        self._dirty = True

    def discard(self, index: int) -> None:
        """Unmark chunk `index`, durably (survives power loss) once this returns."""
        if index not in self._bits:
            return
        self._append(_OP_DISCARD, index)
        try:
            os.fdatasync(self._journal_fd)
        except OSError as exc:
            raise store_error(exc, "bitfield journal sync", 0, self.journal_path.parent) from exc
        self._bits.discard(index)
        self._dirty = True

    def _append(self, op: int, index: int) -> None:
        if not 0 <= index < self.size:
            raise IndexError(f"chunk {index} out of range 0..{self.size - 1}")
        if self._journal_len + RECORD_SIZE > self._capacity:
            self.checkpoint()
        record = _encode_record(op, self._generation, index)
        try:
            # A failed or short write leaves a torn record that replay stops at; the next
            # append overwrites it because _journal_len does not move.
            pwrite_all(self._journal_fd, record, self._journal_len)
        except OSError as exc:
            raise store_error(
                exc, "bitfield journal", RECORD_SIZE, self.journal_path.parent
            ) from exc
        self._journal_len += RECORD_SIZE

    def checkpoint(self) -> None:
        """Sync the data, write the bitfield atomically as a new generation, reset the journal.

        A no-op when nothing changed since the last one, so closing a clean store costs no fsync.
        """
        if not self._dirty:
            return
        try:
            self._sync_data()
        except OSError as exc:
            raise store_error(exc, "data sync", 0, self.bits_path.parent) from exc
        generation = self._generation + 1
        atomic_write(self.bits_path, _encode_bits(generation, self._tag, self._bits), "bitfield")
        # From here on, journal records of the older generation are ignored, so resetting is safe.
        self._generation = generation
        self._journal_len = 0
        self._dirty = False
        try:
            os.ftruncate(self._journal_fd, 0)
            # Reserve the journal up front so appends never grow the file (and never hit ENOSPC).
            os.posix_fallocate(self._journal_fd, 0, self._capacity)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise store_error(exc, "bitfield journal", 0, self.journal_path.parent) from exc

    def close(self) -> None:
        """Checkpoint and release the journal."""
        if self._journal_fd < 0:
            return
        try:
            self.checkpoint()
        finally:
            os.close(self._journal_fd)
            self._journal_fd = -1
