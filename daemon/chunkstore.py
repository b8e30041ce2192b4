"""A storage center's content-addressed chunk store: one file per blake3 digest at `<dir>/ab/<hex>`.

Every chunk is verified before it is stored and again before it is served: by a read that
hashes it, or by a memo of the files this process has verified (put or read) whose identity
(device, inode, size, mtime) is unchanged, so a hot chunk is hashed once, then sent with sendfile.
Files appear only by atomic rename, so a crash leaves either the whole chunk or a stale temp file
(removed on open); `scrub` re-hashes everything and forgets what fails.
Manifests are kept too, under `<dir>/manifests/`, so a center can serve a template after a restart.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3

from ..swarm.errors import ManifestError
from ..swarm.manifest import Manifest
from .journal import TEMP_PREFIX, atomic_write, fsync_dir, pread_into, pwrite_all, store_error
from .storeerrors import (
    ChunkAbsent,
    ChunkCorrupt,
    ChunkMismatch,
    StoreCorruptError,
    TemplateAbsent,
)

DIGEST_SIZE = 32
_MANIFEST_DIR = "manifests"
_MANIFEST_SUFFIX = ".manifest"
_SIGNATURE_SUFFIX = ".sig"
_HEX = frozenset("0123456789abcdef")


def _check_digest(digest: bytes) -> None:
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"chunk digest must be {DIGEST_SIZE} bytes, got {len(digest)}")


def _is_hex_name(name: str, length: int) -> bool:
    return len(name) == length and set(name) <= _HEX


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ChunkStore:
    """Chunks by blake3 digest, on disk, verified on the way in and on the way out."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        # digest -> identity of the file this process last verified for it (see module doc).
        self._verified: dict[bytes, tuple[int, int, int, int]] = {}
        self._memo_lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / _MANIFEST_DIR).mkdir(exist_ok=True)
        self.stale_removed = self._remove_stale_temps()

    def _remove_stale_temps(self) -> int:
        """Delete temp files a crash left behind; return how many."""
        removed = 0
        for sub in self._subdirs():
            for entry in os.scandir(sub):
                if entry.name.startswith(TEMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        return removed

    def _subdirs(self) -> Iterator[Path]:
        for entry in os.scandir(self.directory):
            if entry.is_dir(follow_symlinks=False) and (
                _is_hex_name(entry.name, 2) or entry.name == _MANIFEST_DIR
            ):
                yield Path(entry.path)

    def path_for(self, digest: bytes) -> Path:
        _check_digest(digest)
        name = digest.hex()
        return self.directory / name[:2] / name

    def has(self, digest: bytes) -> bool:
        return self.path_for(digest).is_file()

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, bytes) and len(digest) == DIGEST_SIZE and self.has(digest)

    def put(self, digest: bytes, data: bytes | bytearray | memoryview) -> bool:
        """Store a chunk after checking blake3(data) == digest; False if it was already there."""
        path = self.path_for(digest)
        if blake3.blake3(data).digest() != digest:
            raise ChunkMismatch(f"chunk data does not hash to {digest.hex()}")
        if path.is_file():
            return False
        sub = path.parent
        # A unique temp name lets concurrent puts of the same chunk race harmlessly.
        tmp = sub / f"{TEMP_PREFIX}{path.name}-{secrets.token_hex(4)}"
        try:
            if not sub.is_dir():
                sub.mkdir(exist_ok=True)
                fsync_dir(self.directory)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                pwrite_all(fd, data, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(sub)
            self._remember(digest, os.stat(path))
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise store_error(exc, f"chunk {digest.hex()}", len(memoryview(data)), sub) from exc
        return True

    def size_of(self, digest: bytes) -> int:
        """Stored length of a chunk, without reading it."""
        try:
            return self.path_for(digest).stat().st_size
        except FileNotFoundError:
            raise ChunkAbsent(f"chunk {digest.hex()} is not in {self.directory}") from None

    def get(self, digest: bytes) -> bytes:
        """Return a chunk's bytes, verified; a corrupt file is deleted and ChunkCorrupt raised."""
        buf = bytearray(self.size_of(digest))
        got = self.get_into(digest, buf)
        return bytes(buf[:got])

    def get_into(self, digest: bytes, buf: bytearray | memoryview) -> int:
        """Read a chunk into a preallocated buffer, verified; return its length."""
        path = self.path_for(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ChunkAbsent(f"chunk {digest.hex()} is not in {self.directory}") from None
        try:
            size = os.fstat(fd).st_size
            view = memoryview(buf).cast("B")
            if size > len(view):
                raise ValueError(f"buffer of {len(view)} bytes too small for {size}-byte chunk")
            got = pread_into(fd, view[:size], 0)
            if got != size or blake3.blake3(view[:got]).digest() != digest:
                self._drop(path)
                raise ChunkCorrupt(
                    f"chunk {digest.hex()} in {self.directory} is corrupt; deleted it"
                )
            self._remember(digest, os.fstat(fd))
        finally:
            os.close(fd)
        return got

    def _remember(self, digest: bytes, st: os.stat_result) -> None:
        with self._memo_lock:
            self._verified[digest] = _identity(st)

    def _forget(self, digest: bytes) -> None:
        with self._memo_lock:
            self._verified.pop(digest, None)

    def open_verified(self, digest: bytes) -> tuple[int, int] | None:
        """An open fd and the size of a chunk this process verified and nobody replaced since.

        None when it must be read and hashed first (`get_into`). The caller closes the fd.
        """
        with self._memo_lock:
            known = self._verified.get(digest)
        if known is None:
            return None
        try:
            fd = os.open(self.path_for(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(digest)
            return None
        st = os.fstat(fd)
        if _identity(st) != known:
            os.close(fd)
            self._forget(digest)
            return None
        return fd, st.st_size

    def _drop(self, path: Path) -> None:
        self._forget(bytes.fromhex(path.name))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fsync_dir(path.parent)

    def delete(self, digest: bytes) -> bool:
        """Remove a chunk; False if it was not there."""
        path = self.path_for(digest)
        if not path.is_file():
            return False
        self._drop(path)
        return True

    def digests(self) -> Iterator[bytes]:
        """Every stored chunk's digest (unverified; `get` and `scrub` verify)."""
        for sub in self._subdirs():
            if sub.name == _MANIFEST_DIR:
                continue
            for entry in os.scandir(sub):
                if _is_hex_name(entry.name, 2 * DIGEST_SIZE) and entry.name[:2] == sub.name:
                    yield bytes.fromhex(entry.name)

    def __len__(self) -> int:
        return sum(1 for _ in self.digests())

    def scrub(self) -> list[bytes]:
        """Re-verify every chunk, delete the bad ones and return their digests."""
        bad: list[bytes] = []
        for digest in list(self.digests()):
            try:
                self.get(digest)
            except ChunkCorrupt:
                bad.append(digest)
            except ChunkAbsent:
                continue
        return bad

    def bytes_used(self) -> int:
        """Total bytes of chunk data held."""
        total = 0
        for digest in self.digests():
            with contextlib.suppress(FileNotFoundError):
                total += self.path_for(digest).stat().st_size
        return total

    def put_manifest(self, data: bytes) -> Manifest:
        """Validate and keep a template's manifest; return it. Idempotent."""
        try:
            manifest = Manifest.decode(data)
        except ManifestError as exc:
            raise StoreCorruptError(f"refusing to store an invalid manifest: {exc}") from exc
        path = self._manifest_path(manifest.template_id)
        if not path.is_file():
            atomic_write(path, manifest.encode(), f"manifest {manifest.template_id.hex()}")
        return manifest

    def _manifest_path(self, template_id: bytes) -> Path:
        return self.directory / _MANIFEST_DIR / (template_id.hex() + _MANIFEST_SUFFIX)

    def put_signature(self, template_id: bytes, signature: bytes) -> None:
        """Keep a template's signature envelope beside its manifest (to re-register it later)."""
        path = self._manifest_path(template_id).with_suffix(_SIGNATURE_SUFFIX)
        atomic_write(path, signature, f"signature of {template_id.hex()}")

    def get_signature(self, template_id: bytes) -> bytes | None:
        """The signature envelope kept for a template, if any (unverified: checkers verify it)."""
        path = self._manifest_path(template_id).with_suffix(_SIGNATURE_SUFFIX)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def get_manifest(self, template_id: bytes) -> Manifest:
        try:
            data = self._manifest_path(template_id).read_bytes()
        except FileNotFoundError:
            raise TemplateAbsent(f"no manifest for template {template_id.hex()}") from None
        manifest = _decode_stored(data, self._manifest_path(template_id))
        if manifest is None:
            raise StoreCorruptError(f"stored manifest for template {template_id.hex()} is corrupt")
        return manifest

    def manifests(self) -> list[Manifest]:
        """Every valid stored manifest, ordered by name then version."""
        found: list[Manifest] = []
        for entry in os.scandir(self.directory / _MANIFEST_DIR):
            if entry.name.endswith(_MANIFEST_SUFFIX) and not entry.name.startswith(TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    manifest = _decode_stored(Path(entry.path).read_bytes(), Path(entry.path))
                    if manifest is not None:
                        found.append(manifest)
        return sorted(found, key=lambda m: (m.name, m.version, m.template_id))


def _decode_stored(data: bytes, path: Path) -> Manifest | None:
    """A stored manifest, or None if it fails to decode or its file name is not its id."""
    try:
        manifest = Manifest.decode(data)
    except ManifestError:
        return None
    if path.name != manifest.template_id.hex() + _MANIFEST_SUFFIX:
        return None
    return manifest
