"""Templates served over NBD while they are still being fetched, and their boot profiles.

One read-only NBD export per template, on `<data_dir>/nbd/<template id>.sock`, reads through
`DownloadSource`: a missing chunk jumps the download's queue and the read waits until it is
verified and stored. The order in which the export's readers first touched chunks is the
template's prefetch profile; once the image is complete it goes to the tracker, and a later
streaming launch (on any host) fetches in that order first.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..swarm.prefetch import ProfileRecorder, encode_profile
from .download import TemplateDownload
from .download_source import DownloadSource
from .nbd_export import NbdExport
from .rpc import RpcError
from .tracker_client import TrackerUnreachable

log = logging.getLogger(__name__)

NBD_DIR = "nbd"
# A boot that reads nothing for this long is waiting on a chunk no source delivers.
DEFAULT_READ_TIMEOUT = 60.0

ProfileSink = Callable[[bytes, bytes], Awaitable[None]]


@dataclass
class _Stream:
    export: NbdExport
    socket: Path
    recorder: ProfileRecorder
    label: str  # name:version, the metrics' template label
    # Chunks in the profile the tracker already has: a shorter recording does not replace it.
    known_chunks: int = 0
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)


class TemplateStreams:
    """The NBD exports of this host's templates, started on the first streaming launch."""

    def __init__(
        self,
        directory: Path,
        nursery: trio.Nursery,
        *,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        upload_profile: ProfileSink | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._nursery = nursery
        self._read_timeout = read_timeout
        self._upload_profile = upload_profile
        self._streams: dict[bytes, _Stream] = {}

    def socket_path(self, template_id: bytes) -> Path:
        # 16 hex digits: a Unix socket path must stay under 108 bytes.
        return self.directory / f"{template_id.hex()[:16]}.sock"

    def exported(self, template_id: bytes) -> Path | None:
        stream = self._streams.get(template_id)
        return None if stream is None else stream.socket

    async def export(self, download: TemplateDownload, *, known_chunks: int = 0) -> Path:
        """Serve `download` over NBD (once per template); the socket's path.

        `known_chunks`: the length of the profile the tracker has for it (0: none).
        """
        template_id = download.template_id
        stream = self._streams.get(template_id)
        if stream is not None:
            stream.known_chunks = max(stream.known_chunks, known_chunks)
            return stream.socket
        self.directory.mkdir(parents=True, exist_ok=True)
        # qemu runs as another user and must reach the socket.
        self.directory.chmod(0o755)
        socket = self.socket_path(template_id)
        recorder = ProfileRecorder(download.manifest.chunk_count)
        export = NbdExport(
            DownloadSource(download),
            socket,
            export_name=download.manifest.name,
            read_timeout=self._read_timeout,
            on_first_read=recorder.read,
        )
        label = f"{download.manifest.name}:{download.manifest.version}"
        stream = _Stream(export, socket, recorder, label, known_chunks)
        self._streams[template_id] = stream
        try:
            await self._nursery.start(self._serve, stream)
        except BaseException:
            del self._streams[template_id]
            raise
        self._nursery.start_soon(self._profile_when_complete, download, stream)
        log.info(
            "serving %s %s over NBD on %s",
            download.manifest.name,
            download.manifest.version,
            socket,
        )
        return socket

    async def _serve(self, stream: _Stream, *, task_status: trio.TaskStatus[None]) -> None:
        with stream.cancel:
            await stream.export.serve(task_status=task_status)

    async def _profile_when_complete(self, download: TemplateDownload, stream: _Stream) -> None:
        """The boot order seen until the image is whole is the template's prefetch profile."""
        await download.wait_verified()
        if self._upload_profile is None or not len(stream.recorder):
            return
        if len(stream.recorder) < stream.known_chunks:
            # The image came before the boot read much (a fast link): keep the fuller profile.
            log.info(
                "keeping the tracker's prefetch profile of %s (%d chunks; this boot read %d)",
                download.manifest.name,
                stream.known_chunks,
                len(stream.recorder),
            )
            return
        profile = stream.recorder.profile(download.template_id)
        try:
            await self._upload_profile(download.template_id, encode_profile(profile))
        except (TrackerUnreachable, RpcError) as exc:  # it only speeds up later boots
            log.warning(
                "could not store the prefetch profile of %s: %s", download.manifest.name, exc
            )
            return
        log.info(
            "stored the prefetch profile of %s %s: %d chunks in boot order",
            download.manifest.name,
            download.manifest.version,
            len(profile.order),
        )

    def status(self) -> list[dict[str, object]]:
        return [
            {
                "template_id": template_id.hex(),
                "template": stream.label,
                "socket": str(stream.socket),
                "profile_chunks": len(stream.recorder),
                **stream.export.status(),
            }
            for template_id, stream in self._streams.items()
        ]

    def close(self) -> None:
        for stream in self._streams.values():
            stream.cancel.cancel()
