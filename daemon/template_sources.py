"""Where a template's chunks live on this machine, behind one interface the swarm code uses.

`HostTemplate` wraps a host's ImageStore, `CenterTemplate` a storage center's ChunkStore plus the
stored manifest, `ImageFileTemplate` a finished image file (the publisher's temporary seeder).
Every read is verified before it is served and every write before it is stored. The methods
block (disk and hashing): the trio code calls them through `trio.to_thread.run_sync`, except
`has`, which only looks at memory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from ..swarm.bitfield import Bitfield
from ..swarm.manifest import Manifest
from .chunkstore import ChunkStore
from .imagestore import ImageStore
from .journal import pread_into
from .peer_link import ChunkFile
from .storeerrors import ChunkAbsent, ChunkCorrupt, ChunkMismatch, StoreError


class TemplateData(Protocol):
    """One template's chunks as the swarm sees them; zero chunks always count as present."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def path(self) -> Path | None:
        """The assembled image file, if this store keeps one."""

    def has(self, index: int) -> bool:
        """Is chunk `index` present (cheap, memory only)?"""

    def have(self) -> Bitfield:
        """A copy of the present chunks."""

    def read_chunk(self, index: int) -> memoryview:
        """A present chunk's bytes in a fresh buffer, verified; ChunkAbsent or ChunkCorrupt."""

    # Stores may also offer `read_chunk_into(index, buf) -> memoryview`: the same, read into
    # `buf` (at least the chunk's length; the view is of its start), so buffers can be reused,
    # and `chunk_file(index) -> ChunkFile | None`: an already verified chunk's place in a file,
    # for sendfile (None: read it, which verifies it), and `hash_ahead() -> int`: feed the
    # chunks present in order into a running whole-image hash, so `verify_image` has less left
    # (returns the first chunk not hashed yet).

    def write_chunk(self, index: int, data: bytes | bytearray | memoryview) -> list[int]:
        """Verify and store chunk `index`; returns the indices that became present.

        Raises ChunkMismatch (nothing stored) when `data` is not that chunk.
        """

    def verify_image(self) -> bool:
        """Is every chunk present and (where there is an image file) the whole image right?"""

    def close(self) -> None: ...


class HostTemplate:
    """A host's template: the ImageStore's sparse image and durable bitfield."""

    def __init__(self, store: ImageStore) -> None:
        self.store = store

    @property
    def manifest(self) -> Manifest:
        return self.store.manifest

    @property
    def path(self) -> Path | None:
        return self.store.path

    def has(self, index: int) -> bool:
        return index in self.store

    def have(self) -> Bitfield:
        return self.store.have

    def read_chunk(self, index: int) -> memoryview:
        return self.read_chunk_into(index, bytearray(self.manifest.chunk_range(index)[1]))

    def read_chunk_into(self, index: int, buf: bytearray) -> memoryview:
        length = self.store.read_chunk_into(index, buf)
        return memoryview(buf)[:length]

    def chunk_file(self, index: int) -> ChunkFile | None:
        found = self.store.verified_range(index)
        return None if found is None else ChunkFile(*found, owned=False)

    def write_chunk(self, index: int, data: bytes | bytearray | memoryview) -> list[int]:
        return [index] if self.store.write_chunk(index, data) else []

    def verify_image(self) -> bool:
        return self.store.verify_image()

    def hash_ahead(self) -> int:
        return self.store.hash_ahead()

    def close(self) -> None:
        self.store.close()


class CenterTemplate:
    """A storage center's view of one template: which of its digests the ChunkStore holds.

    Chunks with equal digests are one file, so storing one index makes all of them present.
    """

    def __init__(self, store: ChunkStore, manifest: Manifest) -> None:
        self.store = store
        self._manifest = manifest
        self._lock = threading.Lock()
        self._by_digest: dict[bytes, list[int]] = {}
        for index, digest in enumerate(manifest.chunk_digests):
            if index not in manifest.zero_chunks:
                self._by_digest.setdefault(digest, []).append(index)
        self._have = Bitfield.from_indices(manifest.chunk_count, manifest.zero_chunks)
        self.refresh()

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def path(self) -> Path | None:
        return None

    def refresh(self) -> list[int]:
        """Re-read which digests the store holds (another template may have added some)."""
        added: list[int] = []
        for digest, indices in self._by_digest.items():
            if indices[0] in self._have or not self.store.has(digest):
                continue
            with self._lock:
                for index in indices:
                    if self._have.add(index):
                        added.append(index)
        return added

    def has(self, index: int) -> bool:
        return index in self._have

    def have(self) -> Bitfield:
        with self._lock:
            return self._have.copy()

    def read_chunk(self, index: int) -> memoryview:
        return self.read_chunk_into(index, bytearray(self._manifest.chunk_range(index)[1]))

    def read_chunk_into(self, index: int, buf: bytearray) -> memoryview:
        _, length = self._manifest.chunk_range(index)
        if index in self._manifest.zero_chunks:
            view = memoryview(buf)[:length]
            view[:] = bytes(length)
            return view
        digest = self._manifest.chunk_digests[index]
        if len(buf) < length:
            raise ValueError(f"buffer of {len(buf)} bytes too small for {length}-byte chunk")
        try:
            got = self.store.get_into(digest, memoryview(buf)[:length])
        except (ChunkAbsent, ChunkCorrupt):
            self._drop(digest)
            raise
        if got != length:
            raise ChunkCorrupt(f"chunk {index} holds {got} bytes, the manifest says {length}")
        return memoryview(buf)[:length]

    def chunk_file(self, index: int) -> ChunkFile | None:
        if index in self._manifest.zero_chunks or index not in self._have:
            return None
        found = self.store.open_verified(self._manifest.chunk_digests[index])
        if found is None:
            return None
        fd, size = found
        if size != self._manifest.chunk_range(index)[1]:
            os.close(fd)
            return None
        return ChunkFile(fd, 0, size, owned=True)

    def _drop(self, digest: bytes) -> None:
        with self._lock:
            for index in self._by_digest.get(digest, ()):
                self._have.discard(index)

    def forget(self, digests: Iterable[bytes]) -> list[int]:
        """Stop counting these digests as present (a scrub deleted them); the indices lost."""
        lost: list[int] = []
        with self._lock:
            for digest in digests:
                for index in self._by_digest.get(digest, ()):
                    if index in self._have:
                        self._have.discard(index)
                        lost.append(index)
        return lost

    def write_chunk(self, index: int, data: bytes | bytearray | memoryview) -> list[int]:
        if not self._manifest.chunk_matches(index, data):
            raise ChunkMismatch(
                f"data for chunk {index} of {self._manifest.name} {self._manifest.version} "
                "does not match its digest"
            )
        digest = self._manifest.chunk_digests[index]
        if index in self._manifest.zero_chunks:
            return []
        self.store.put(digest, data)
        added: list[int] = []
        with self._lock:
            for same in self._by_digest[digest]:
                if self._have.add(same):
                    added.append(same)
        return added

    def verify_image(self) -> bool:
        return self._have.complete

    def close(self) -> None:
        return None


class ImageFileTemplate:
    """A complete image file on disk, served read-only (the publisher's seeder)."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self._path = Path(path)
        self._manifest = manifest
        self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        size = os.fstat(self._fd).st_size
        if size != manifest.size:
            os.close(self._fd)
            raise StoreError(f"{self._path} has {size} bytes, its manifest says {manifest.size}")

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def path(self) -> Path | None:
        return self._path

    def has(self, index: int) -> bool:
        return 0 <= index < self._manifest.chunk_count

    def have(self) -> Bitfield:
        return Bitfield.full(self._manifest.chunk_count)

    def read_chunk(self, index: int) -> memoryview:
        return self.read_chunk_into(index, bytearray(self._manifest.chunk_range(index)[1]))

    def read_chunk_into(self, index: int, buf: bytearray) -> memoryview:
        offset, length = self._manifest.chunk_range(index)
        if len(buf) < length:
            raise ValueError(f"buffer of {len(buf)} bytes too small for {length}-byte chunk")
        view = memoryview(buf)[:length]
        got = pread_into(self._fd, view, offset)
        if got != length or not self._manifest.chunk_matches(index, view):
            raise ChunkCorrupt(
                f"chunk {index} of {self._path} changed since its manifest was built"
            )
        return view

    def write_chunk(self, index: int, data: bytes | bytearray | memoryview) -> list[int]:
        raise StoreError(f"{self._path} is served read-only")

    def verify_image(self) -> bool:
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
