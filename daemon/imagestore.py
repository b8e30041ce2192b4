"""A host's copy of one template: a sparse image file plus a durable chunk bitfield.

Files in the data directory, named by the template id in hex:
`.img` (the image), `.manifest` (its manifest), `.bits` and `.journal` (the DurableBitfield).
Chunks are verified before they are written and again before they are served: by a read that
hashes them, or because this process verified them (written or read) since it opened the file,
which it holds locked; those can go out with sendfile, untouched. `scrub` re-hashes everything.
Plain blocking I/O: the trio daemon calls these methods through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from pathlib import Path
from types import TracebackType

import blake3

from ..swarm.bitfield import Bitfield
from ..swarm.errors import ManifestError
from ..swarm.manifest import Manifest
from .journal import (
    DEFAULT_JOURNAL_RECORDS,
    TEMP_PREFIX,
    DurableBitfield,
    atomic_write,
    disk_free,
    pread_into,
    pwrite_all,
    store_error,
)
from .storeerrors import (
    ChunkAbsent,
    ChunkCorrupt,
    ChunkMismatch,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    TemplateAbsent,
)

_IMAGE_SUFFIX = ".img"
_MANIFEST_SUFFIX = ".manifest"
_BITS_SUFFIX = ".bits"
_JOURNAL_SUFFIX = ".journal"
# Streaming block for whole-image hashing: few syscalls, and still fits in the cache.
_HASH_BLOCK = 4 << 20


def hash_file(fd: int, size: int, hasher: blake3.blake3, block: int = _HASH_BLOCK) -> bool:
    """Feed the first `size` bytes of `fd` to `hasher`; False if the file is shorter."""
    return hash_range(fd, 0, size, hasher, block)


def hash_range(
    fd: int, start: int, end: int, hasher: blake3.blake3, block: int = _HASH_BLOCK
) -> bool:
    """Feed bytes [start, end) of `fd` to `hasher`; False if the file ends before `end`.

    Holes read as zeros by definition, so they are hashed from memory instead of read: the
    zero chunks of an image are holes. pread, not mmap: a mapped hole on a full tmpfs is SIGBUS.
    """
    if os.fstat(fd).st_size < end:
        return False
    buf = bytearray(min(block, max(end - start, 1)))
    view = memoryview(buf)
    zeros = memoryview(bytes(len(buf)))
    offset = start
    while offset < end:
        data_at = min(_seek(fd, offset, os.SEEK_DATA, end), end)
        while offset < data_at:
            step = min(len(zeros), data_at - offset)
            hasher.update(zeros[:step])
            offset += step
        if offset >= end:
            break
        hole_at = min(_seek(fd, offset, os.SEEK_HOLE, end), end)
        if hole_at <= offset:  # a hole punched since SEEK_DATA: read on, it reads as zeros
            hole_at = min(offset + len(buf), end)
        while offset < hole_at:
            want = min(len(buf), hole_at - offset)
            got = pread_into(fd, view[:want], offset)
            if got != want:
                return False
            hasher.update(view[:got])
            offset += got
    return True


def _seek(fd: int, offset: int, whence: int, end: int) -> int:
    """lseek for SEEK_DATA/SEEK_HOLE, which never moves past `end` (no more data: `end`)."""
    try:
        return os.lseek(fd, offset, whence)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            # No data from `offset` on: the rest up to the end of the file (past `end`) is a hole.
            return end if whence == os.SEEK_DATA else offset
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            # Without hole support everything is data.
            return offset if whence == os.SEEK_DATA else end
        raise


def _nonzero_runs(manifest: Manifest) -> list[tuple[int, int]]:
    """(offset, length) of each maximal run of non-zero chunks."""
    runs: list[tuple[int, int]] = []
    for i in range(manifest.chunk_count):
        if manifest.is_zero(i):
            continue
        offset, length = manifest.chunk_range(i)
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + length)
        else:
            runs.append((offset, length))
    return runs


class ImageStore:
    """One template's image on a host, with which chunks of it are present (open-or-create)."""

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        *,
        journal_records: int = DEFAULT_JOURNAL_RECORDS,
    ) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.template_id = manifest.template_id
        stem = self.template_id.hex()
        self.path = self.directory / (stem + _IMAGE_SUFFIX)
        self.manifest_path = self.directory / (stem + _MANIFEST_SUFFIX)
        self._lock = threading.Lock()
        # Chunks being written right now, each with the event its other writers wait on.
        self._writing: dict[int, threading.Event] = {}
        # Chunks this process has verified since it opened (and locked) the image file.
        self._verified: set[int] = set()
        # The whole-image hash, fed in order from the file as far as chunks are present
        # (`hash_ahead`), so that `verify_image` at the end has only the rest to read.
        self._running = blake3.blake3()
        self._running_end = 0  # bytes of the image fed into `_running`: a chunk boundary
        self._running_lock = threading.Lock()
        self._fd = -1
        self.directory.mkdir(parents=True, exist_ok=True)
        initialized = (self.directory / (stem + _BITS_SUFFIX)).exists()

        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = -1
            raise StoreLockedError(f"{self.path} is open in another process") from None
        try:
            self._remove_stale_temps(stem)  # only now: the lock proves no writer owns them
            self._prepare_file()
            self._write_manifest()
            self._bits = DurableBitfield(
                self.directory / stem,
                manifest.chunk_count,
                self.template_id,
                sync_data=self._sync_image,
                verify=self._verify_on_disk,
                initial=manifest.zero_chunks,
                journal_records=journal_records,
            )
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            if not initialized:
                # Nothing half-created stays behind to be mistaken for a store later.
                for suffix in (_BITS_SUFFIX, _JOURNAL_SUFFIX, _MANIFEST_SUFFIX, _IMAGE_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        (self.directory / (stem + suffix)).unlink()
            raise

    @classmethod
    def load(
        cls,
        directory: Path,
        template_id: bytes,
        *,
        journal_records: int = DEFAULT_JOURNAL_RECORDS,
    ) -> ImageStore:
        """Open an existing store from its stored manifest."""
        path = Path(directory) / (template_id.hex() + _MANIFEST_SUFFIX)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TemplateAbsent(f"template {template_id.hex()} is not in {directory}") from None
        manifest = _decode_stored(data, path)
        if manifest is None:
            raise StoreCorruptError(f"stored manifest {path} is corrupt")
        return cls(directory, manifest, journal_records=journal_records)

    @staticmethod
    def list_templates(directory: Path) -> list[Manifest]:
        """Manifests of the templates stored in `directory`, ordered by name then version."""
        found: list[Manifest] = []
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.name.endswith(_MANIFEST_SUFFIX) or entry.name.startswith(TEMP_PREFIX):
                continue
            path = Path(entry.path)
            stem = entry.name[: -len(_MANIFEST_SUFFIX)]
            if not (path.parent / (stem + _BITS_SUFFIX)).exists():
                continue  # creation never finished
            with contextlib.suppress(FileNotFoundError):
                manifest = _decode_stored(path.read_bytes(), path)
                if manifest is not None:
                    found.append(manifest)
        return sorted(found, key=lambda m: (m.name, m.version, m.template_id))

    def _remove_stale_temps(self, stem: str) -> None:
        prefix = TEMP_PREFIX + stem
        for entry in os.scandir(self.directory):
            if entry.name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def _prepare_file(self) -> None:
        """Size the file sparsely and check the disk can take every non-zero chunk still missing.

        A check, not a reservation: on ext4 writes into fallocated (unwritten) extents cost
        several times the CPU, and on tmpfs fallocate zeroes every page before the first write.
        A disk that fills up later fails the write that finds it full, and marks nothing.
        """
        size = self.manifest.size
        st = os.fstat(self._fd)
        wanted = sum(length for _, length in _nonzero_runs(self.manifest))
        # Blocks already held (a store reopened mid-fetch) need no new room.
        needed = max(wanted - st.st_blocks * 512, 0)
        free = disk_free(self.directory)
        if needed > free:
            raise StoreFullError(
                f"image of {self.manifest.name} {self.manifest.version} in {self.directory}",
                needed,
                free,
            )
        try:
            if st.st_size != size:
                os.ftruncate(self._fd, size)
        except OSError as exc:
            raise store_error(exc, "sizing the image", needed, self.directory) from exc

    def _write_manifest(self) -> None:
        data = self.manifest.encode()
        with contextlib.suppress(FileNotFoundError):
            if self.manifest_path.read_bytes() == data:
                return
        atomic_write(self.manifest_path, data, "manifest")

    def _sync_image(self) -> None:
        os.fdatasync(self._fd)

    def _verify_on_disk(self, index: int) -> bool:
        """Does chunk `index` on disk verify? Zero chunks are repaired instead, so always do."""
        offset, length = self.manifest.chunk_range(index)
        buf = bytearray(length)
        try:
            got = pread_into(self._fd, buf, offset)
        except OSError:
            got = -1  # unreadable counts as bad: the chunk will be fetched again
        if not self.manifest.is_zero(index):
            return got == length and self.manifest.chunk_matches(index, buf)
        if got != length or any(buf):
            # Zero chunks are never sent by peers, so the region must be fixed here.
            try:
                pwrite_all(self._fd, bytes(length), offset)
            except OSError as exc:
                raise store_error(
                    exc, f"repairing zero chunk {index}", length, self.directory
                ) from exc
        return True

    # -- state ---------------------------------------------------------------------------------

    @property
    def have(self) -> Bitfield:
        """A copy of which chunks are present."""
        with self._lock:
            return self._bits.snapshot()

    def __contains__(self, index: object) -> bool:
        return index in self._bits

    @property
    def present_count(self) -> int:
        return len(self._bits)

    @property
    def missing_count(self) -> int:
        return self.manifest.chunk_count - len(self._bits)

    @property
    def complete(self) -> bool:
        return len(self._bits) == self.manifest.chunk_count

    @property
    def dropped_on_open(self) -> frozenset[int]:
        """Chunks the last open found claimed but not really on disk (after an unclean stop)."""
        return self._bits.dropped_on_open

    @property
    def recovered(self) -> bool:
        """True if the last open found an unclean stop or a damaged bitfield and repaired it."""
        return bool(self._bits.replayed) or self._bits.damaged

    # -- chunks --------------------------------------------------------------------------------

    def write_chunk(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Verify, write and mark chunk `index`; False if it was already present.

        Safe from several threads: a second writer of the same chunk waits for the first and
        returns False if that one stored it, so exactly one call reports True.
        Once this returns the chunk survives kill -9; `checkpoint` makes it survive power loss.
        """
        self._check_open()
        offset, length = self.manifest.chunk_range(index)
        if not self.manifest.chunk_matches(index, data):
            raise ChunkMismatch(
                f"data for chunk {index} of {self.manifest.name} {self.manifest.version} "
                f"does not match its digest ({len(data)} bytes, expected {length})"
            )
        while True:
            with self._lock:
                if index in self._bits:
                    return False
                busy = self._writing.get(index)
                if busy is None:
                    done = self._writing[index] = threading.Event()
                    break
            busy.wait()
        try:
            try:
                pwrite_all(self._fd, data, offset)
            except OSError as exc:
                raise store_error(exc, f"chunk {index}", length, self.directory) from exc
            with self._lock:
                # Marked only after every byte is in the page cache, which outlives a kill.
                self._bits.add(index)
                self._verified.add(index)
        finally:
            with self._lock:
                del self._writing[index]
            done.set()
        return True

    def read_chunk(self, index: int) -> bytes:
        """The verified bytes of a present chunk."""
        _, length = self.manifest.chunk_range(index)
        buf = bytearray(length)
        self.read_chunk_into(index, buf)
        return bytes(buf)

    def read_chunk_into(self, index: int, buf: bytearray | memoryview) -> int:
        """Read a present chunk into `buf`, verified; return its length.

        A chunk that no longer verifies is unmarked durably and ChunkCorrupt raised.
        """
        self._check_open()
        offset, length = self.manifest.chunk_range(index)
        view = memoryview(buf).cast("B")
        if len(view) < length:
            raise ValueError(f"buffer of {len(view)} bytes too small for {length}-byte chunk")
        if index not in self._bits:
            raise ChunkAbsent(f"chunk {index} of {self.manifest.name} is not present")
        if self.manifest.is_zero(index):
            # Zero chunks are holes by definition; never worth a disk read.
            view[:length] = bytes(length)
            return length
        try:
            got = pread_into(self._fd, view[:length], offset)
        except OSError as exc:
            raise store_error(exc, f"reading chunk {index}", 0, self.directory) from exc
        if got != length or not self.manifest.chunk_matches(index, view[:length]):
            with self._lock:
                self._bits.discard(index)
                self._verified.discard(index)
            raise ChunkCorrupt(
                f"chunk {index} of {self.manifest.name} {self.manifest.version} is corrupt on "
                f"disk in {self.path}; unmarked it so it will be fetched again"
            )
        with self._lock:
            if index in self._bits:
                self._verified.add(index)
        return length

    def verified_range(self, index: int) -> tuple[int, int, int] | None:
        """(fd, offset, length) of a present non-zero chunk this process verified, else None.

        The fd is the store's own: valid until `close`, never to be closed by the caller.
        """
        if index not in self._verified or self.manifest.is_zero(index) or self._fd < 0:
            return None
        offset, length = self.manifest.chunk_range(index)
        return self._fd, offset, length

    def scrub(self) -> list[int]:
        """Re-verify every present chunk; unmark the bad ones durably and return them."""
        self._check_open()
        bad: list[int] = []
        for index in self.have:
            if self.manifest.is_zero(index):
                self._verify_on_disk(index)  # repairs a zero region in place
                continue
            try:
                self.read_chunk(index)
            except ChunkCorrupt:
                bad.append(index)
            except ChunkAbsent:
                continue  # dropped concurrently
        return bad

    def hash_ahead(self) -> int:
        """Feed the present chunks right after the hashed prefix into the running image hash.

        Called while chunks still arrive, it spreads the whole-image check over the download.
        Returns the first chunk not hashed yet (the chunk count once all are). Reads the bytes
        back from the file, so what the check covers is what was written.
        """
        self._check_open()
        with self._running_lock:
            return self._hash_ahead_locked()

    def _hash_ahead_locked(self) -> int:
        manifest = self.manifest
        start = self._running_end
        index = start // manifest.chunk_size
        with self._lock:
            while index < manifest.chunk_count and index in self._bits:
                index += 1
        end = manifest.chunk_range(index)[0] if index < manifest.chunk_count else manifest.size
        if end > start:
            if not hash_range(self._fd, start, end, self._running):
                # Shorter than the manifest says: start over; verify_image will say no.
                self._running, self._running_end = blake3.blake3(), 0
                return 0
            self._running_end = end
        return index

    def verify_image(self) -> bool:
        """Is the whole image present and does it hash to the manifest's digest?"""
        self._check_open()
        if not self.complete or os.fstat(self._fd).st_size != self.manifest.size:
            return False
        with self._running_lock:
            self._hash_ahead_locked()
            hashed = self._running_end == self.manifest.size
            if hashed and self._running.digest() == self.manifest.digest:
                return True
            # A mismatch is confirmed from scratch: the file as it is now, from its first byte.
            # One thread: blake3's pool spins against the daemon's and the VMs' threads.
            hasher = blake3.blake3()
            if not hash_file(self._fd, self.manifest.size, hasher):
                return False
            # Right now (a region repaired since it was hashed): the running hash starts over.
            self._running, self._running_end = hasher, self.manifest.size
            return bool(hasher.digest() == self.manifest.digest)

    # -- durability ----------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Make every marked chunk survive power loss and compact the journal."""
        self._check_open()
        with self._lock:
            self._bits.checkpoint()

    def close(self) -> None:
        """Checkpoint and release the files; safe to call twice."""
        if self._fd < 0:
            return
        try:
            with self._lock:
                self._bits.close()
        finally:
            os.close(self._fd)
            self._fd = -1

    def _check_open(self) -> None:
        if self._fd < 0:
            raise StoreError(f"image store {self.path} is closed")

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _decode_stored(data: bytes, path: Path) -> Manifest | None:
    """A stored manifest, or None if it fails to decode or its file name is not its id."""
    try:
        manifest = Manifest.decode(data)
    except ManifestError:
        return None
    if path.name != manifest.template_id.hex() + _MANIFEST_SUFFIX:
        return None
    return manifest
