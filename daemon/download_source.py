"""A template download seen as a block device, for its NBD export: verified chunks only."""

from __future__ import annotations

import os

import trio

from .download import TemplateDownload


class DownloadSource:
    """A template download seen as a block device: verified chunks only, missing ones awaited."""

    def __init__(self, download: TemplateDownload) -> None:
        self._download = download
        self._manifest = download.manifest

    @property
    def size(self) -> int:
        return self._manifest.size

    @property
    def chunk_size(self) -> int:
        return self._manifest.chunk_size

    def is_zero(self, index: int) -> bool:
        return self._manifest.is_zero(index)

    def is_ready(self, index: int) -> bool:
        return self._download.data.has(index)

    async def wait_ready(self, index: int) -> None:
        await self._download.wait_chunk(index)

    def why_missing(self, index: int) -> str:
        return self._download.why_missing(index)

    async def read(self, offset: int, length: int) -> bytes:
        return await trio.to_thread.run_sync(self._read, offset, length)

    def _read(self, offset: int, length: int) -> bytes:
        """Blocking: the bytes of ready chunks, from the image file where they were verified."""
        data = self._download.data
        chunk_size = self._manifest.chunk_size
        out = bytearray()
        end = offset + length
        while offset < end:
            index = offset // chunk_size
            start, chunk_length = self._manifest.chunk_range(index)
            take = min(end, start + chunk_length) - offset
            if self._manifest.is_zero(index):
                out += bytes(take)
            else:
                found = getattr(data, "chunk_file", lambda _i: None)(index)
                if found is None:
                    # Not verified by this process yet: read_chunk verifies it (and marks it).
                    chunk = data.read_chunk(index)
                    out += chunk[offset - start : offset - start + take]
                else:
                    out += os.pread(found.fd, take, found.offset + offset - start)
            offset += take
        return bytes(out)
