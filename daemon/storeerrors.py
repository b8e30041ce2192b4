"""Errors raised by the on-disk stores (image store, chunk store, bitfield journal)."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the on-disk stores raise."""


class StoreFullError(StoreError):
    """The filesystem has no room for what we must write; nothing partial was kept."""

    def __init__(self, what: str, needed: int, free: int) -> None:
        self.needed = needed
        self.free = free
        super().__init__(
            f"not enough disk space for {what}: need {needed} bytes, {free} bytes free"
        )


class StoreIOError(StoreError):
    """The disk failed an I/O request (EIO and friends); the chunk was not marked."""


class StoreLockedError(StoreError):
    """Another process holds this store open."""


class StoreCorruptError(StoreError):
    """A store's metadata file is unreadable or belongs to something else."""


class ChunkMismatch(StoreError):
    """Data offered for a chunk does not hash to the expected digest; nothing was written."""


class ChunkCorrupt(StoreError):
    """A chunk stored on disk no longer verifies; it has been dropped and must be fetched again."""


class ChunkAbsent(StoreError, LookupError):
    """The requested chunk is not in the store."""


class TemplateAbsent(StoreError, LookupError):
    """No stored manifest for the requested template."""
