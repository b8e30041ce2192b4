"""A host's copy of one template: a sparse, preallocated image file plus a durable chunk bitfield.

Files in the data directory, named by the template id in hex:
`.img` (the image), `.manifest` (its manifest), `.bits` and `.journal` (the DurableBitfield).
Chunks are verified before they are written and again before they are served.
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
# Streaming block for whole-image hashing: large enough for blake3's threads to pay off.
_HASH_BLOCK = 16 << 20


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
            self._preallocate()
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

    def _preallocate(self) -> None:
        """Size the file sparsely, then reserve every non-zero chunk so a full disk shows now."""
        size = self.manifest.size
        st = os.fstat(self._fd)
        runs = _nonzero_runs(self.manifest)
        wanted = sum(length for _, length in runs)
        try:
            if st.st_size != size:
                os.ftruncate(self._fd, size)
            for offset, length in runs:
                os.posix_fallocate(self._fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                allocated = os.fstat(self._fd).st_blocks * 512
                # Report what the whole reservation needed against what was free before it.
                needed = max(wanted - st.st_blocks * 512, 0)
                free = disk_free(self.directory) + max(allocated - st.st_blocks * 512, 0)
                raise StoreFullError(
                    f"image of {self.manifest.name} {self.manifest.version} in {self.directory}",
                    needed,
                    free,
                ) from exc
            raise store_error(exc, "image preallocation", wanted, self.directory) from exc

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

        Once this returns the chunk survives kill -9; `checkpoint` makes it survive power loss.
        """
        self._check_open()
        offset, length = self.manifest.chunk_range(index)
        if not self.manifest.chunk_matches(index, data):
            raise ChunkMismatch(
                f"data for chunk {index} of {self.manifest.name} {self.manifest.version} "
                f"does not match its digest ({len(data)} bytes, expected {length})"
            )
        if index in self._bits:
            return False
        try:
            pwrite_all(self._fd, data, offset)
        except OSError as exc:
            raise store_error(exc, f"chunk {index}", length, self.directory) from exc
        with self._lock:
            # Marked only after every byte is in the page cache, which outlives a kill.
            self._bits.add(index)
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
            raise ChunkCorrupt(
                f"chunk {index} of {self.manifest.name} {self.manifest.version} is corrupt on "
                f"disk in {self.path}; unmarked it so it will be fetched again"
            )
        return length

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

    def verify_image(self) -> bool:
        """Is the whole image present and does it hash to the manifest's digest?"""
        self._check_open()
        if not self.complete or os.fstat(self._fd).st_size != self.manifest.size:
            return False
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        buf = bytearray(min(_HASH_BLOCK, max(self.manifest.size, 1)))
        view = memoryview(buf)
        offset = 0
        while offset < self.manifest.size:
            want = min(len(buf), self.manifest.size - offset)
            got = pread_into(self._fd, view[:want], offset)
            if got != want:
                return False
            hasher.update(view[:got])
            offset += got
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
