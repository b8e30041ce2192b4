"""A real template download behind the NBD export, read by qemu-io: bytes, waits, EIO."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
from typer.testing import CliRunner
from vmswarm.daemon.download_source import DownloadSource
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.daemon.nbd_export import NbdExport
from vmswarm.daemon.streaming import TemplateStreams
from vmswarm.daemon.template_sources import HostTemplate
from vmswarm.swarm.messages import Role
from vmswarm.swarm.prefetch import decode_profile

from .daemon_cli import capture_node_configs
from .test_download import (
    CHUNK,
    center_store,
    host_store,
    make_image,
    seeding,
    start_download,
    until,
)
from .test_nbd_export import qemu_io

PATTERN = "DDDD0DDD"


async def test_qemu_reads_a_template_still_arriving_and_gets_eio_for_a_lost_chunk(
    tmp_path: Path, qemu: None, caplog: pytest.LogCaptureFixture
) -> None:
    data, manifest = make_image(PATTERN, seed=21)
    socket = tmp_path / "t.sock"
    async with trio.open_nursery() as nursery:
        # The only source lacks chunk 6: no one can deliver it.
        partial = center_store(tmp_path / "c", data, manifest, [0, 1, 2, 3, 5, 7])
        async with seeding(nursery, partial, Role.STORAGE) as center:
            target = HostTemplate(ImageStore(tmp_path / "host", manifest))
            download = await start_download(nursery, target, [center.address])
            export = NbdExport(
                DownloadSource(download), socket, export_name="tmpl", read_timeout=1.0
            )
            await nursery.start(export.serve)
            # Chunk 2 and the zero chunk 4, read the moment the export is up: both answered.
            code, out = await qemu_io(socket, f"read -P 0 {4 * CHUNK} {CHUNK}")
            assert code == 0, out
            expected = data[2 * CHUNK + 5]
            code, out = await qemu_io(socket, f"read -P {expected} {2 * CHUNK + 5} 1")
            assert code == 0 and "Pattern verification failed" not in out, out
            assert target.has(2)
            with caplog.at_level(logging.WARNING):
                code, out = await qemu_io(socket, f"read {6 * CHUNK} 4096")
            assert code != 0 or "Input/output error" in out, out
            assert "Input/output error" in out
            assert export.status()["eio_count"] == 1
            assert "EIO: chunk 6" in caplog.text and "no source holds chunk 6" in caplog.text
            assert not target.has(6)
            nursery.cancel_scope.cancel()


def test_the_nbd_read_timeout_comes_from_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    app, seen = capture_node_configs(monkeypatch)
    args = ["daemon", "run", "--role", "host", "--data-dir", str(tmp_path), "--insecure"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen[-1].nbd_read_timeout == 60.0
    monkeypatch.setenv("VMSWARM_DAEMON_NBD_READ_TIMEOUT", "5")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen[-1].nbd_read_timeout == 5.0
    monkeypatch.setenv("VMSWARM_DAEMON_NBD_READ_TIMEOUT", "0.1")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "nbd_read_timeout" in result.output


@pytest.mark.parametrize(("known", "stored"), [(0, True), (5, False)])
async def test_a_boot_profile_is_stored_unless_the_tracker_has_a_fuller_one(
    tmp_path: Path, qemu: None, known: int, stored: bool
) -> None:
    data, manifest = make_image(PATTERN, seed=22)
    uploads: list[tuple[bytes, bytes]] = []

    async def upload(template_id: bytes, profile: bytes) -> None:
        uploads.append((template_id, profile))

    async with trio.open_nursery() as nursery:
        seed = host_store(tmp_path / "seed", data, manifest, range(manifest.chunk_count))
        async with seeding(nursery, seed) as source:
            target = HostTemplate(ImageStore(tmp_path / "host", manifest))
            download = await start_download(nursery, target, [])
            streams = TemplateStreams(tmp_path / "nbd", nursery, upload_profile=upload)
            socket = await streams.export(download, known_chunks=known)
            await download.add_sources([source.address])
            code, out = await qemu_io(socket, f"read {3 * CHUNK} 512")  # the boot reads chunk 3
            assert code == 0, out
            with trio.fail_after(20):
                await download.wait_done()
                if stored:
                    await until(lambda: bool(uploads))
                else:
                    await trio.sleep(0.2)  # an upload would follow completion at once
            if stored:
                [(template_id, raw)] = uploads
                profile = decode_profile(raw, manifest)
                assert template_id == manifest.template_id and 3 in profile.order
            else:
                assert uploads == []
            nursery.cancel_scope.cancel()
