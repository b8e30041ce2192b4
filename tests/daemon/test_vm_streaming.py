"""Streaming launches in the VM service: libvirt's test driver, qemu-nbd standing in for the export.

The live switch itself needs a real qemu (tests/daemon/test_live_backing_switch.py and the e2e
streaming boot); here: the overlay over the export, the record, the offline switch at the next
start once the template is complete, and a live switch the driver cannot do leaving the VM as is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from vmswarm.daemon.libvirt_launcher import LibvirtLauncher
from vmswarm.daemon.rpc import Notifier
from vmswarm.daemon.vm_service import ReadyTemplate, StreamingTemplate, VmService
from vmswarm.swarm.flavors import default_flavors
from vmswarm.swarm.imageformat import ImageFormat

from ..ci import unavailable
from .qemu_nbd import NbdServer
from .test_download import until
from .test_vm_service import TEMPLATE_ID, silent, write_template


@dataclass
class ExportedTemplates:
    """A template "still arriving": served by qemu-nbd until `complete` is set."""

    path: Path
    socket: Path
    complete: trio.Event = field(default_factory=trio.Event)
    resumed: int = 0

    def _ready(self) -> ReadyTemplate:
        size = self.path.stat().st_size
        return ReadyTemplate(TEMPLATE_ID, "tinylinux", "1", self.path, ImageFormat.RAW, size)

    async def ready_template(
        self, name: str | None, version: str | None, template_id: bytes | None, n: Notifier
    ) -> ReadyTemplate:
        await self.complete.wait()
        return self._ready()

    async def stream_template(
        self, name: str | None, version: str | None, template_id: bytes | None, n: Notifier
    ) -> StreamingTemplate:
        return StreamingTemplate(self._ready(), self.socket, self.path.read_bytes()[:512])

    async def resume_stream(self, template_id: bytes) -> Path | None:
        self.resumed += 1
        return None if self.complete.is_set() else self.socket

    async def wait_complete(self, template_id: bytes) -> Path:
        await self.complete.wait()
        return self.path


@pytest.fixture
def nbd_template(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None:
        unavailable("test streaming launches", "qemu-nbd and qemu-img are missing (qemu-utils)")
    template = write_template(tmp_path / "templates" / "t.img")
    socket = tmp_path / "nbd.sock"
    server = NbdServer(template, socket)
    try:
        yield template, socket
    finally:
        server.stop()


@asynccontextmanager
async def streaming_host(tmp_path: Path, templates: ExportedTemplates) -> AsyncIterator[VmService]:
    launcher = LibvirtLauncher("test:///default")
    service = VmService(
        launcher,
        tmp_path / "data",
        templates,
        default_flavors(),
        stop_timeout=2.0,
        sample_interval=0.2,
        fresh_sample=0.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        try:
            yield service
        finally:
            for instance in list(service.store):
                await service.delete(instance.vm_id)
            nursery.cancel_scope.cancel()
    launcher.close()


def backing_of(overlay: str) -> str:
    info = subprocess.run(
        ["qemu-img", "info", "--force-share", "--output=json", overlay],
        capture_output=True,
        text=True,
        check=True,
    )
    backing: str = json.loads(info.stdout)["backing-filename"]
    return backing


async def launch(service: VmService) -> dict[str, object]:
    return await service.launch(
        name="tinylinux",
        version=None,
        template_id=None,
        flavor_name="tiny",
        vm_name="streamed",
        notifier=silent(),
        stream=True,
    )


async def test_a_streamed_vm_reads_the_export_until_its_next_start_after_completion(
    tmp_path: Path, nbd_template: tuple[Path, Path]
) -> None:
    template, socket = nbd_template
    templates = ExportedTemplates(template, socket)
    async with streaming_host(tmp_path, templates) as service:
        result = await launch(service)
        assert result["streaming"] is True
        (instance,) = list(service.store)
        assert instance.template_socket == str(socket)
        assert backing_of(instance.overlay).startswith("nbd+unix://")
        assert template.stat().st_mode & 0o777 != 0o444  # still arriving: not protected yet
        assert (await service.vms())["vms"][0]["streaming"] is True

        # The test driver cannot block-copy: the running VM stays on the export, and says so.
        templates.complete.set()
        with trio.fail_after(10):
            await until(lambda: service.last_error is not None)
        assert service.last_error is not None
        assert "stays on the NBD export" in service.last_error
        assert service.store.get(instance.vm_id) == instance

        await service.stop(instance.vm_id, force=True)
        started = await service.start(instance.vm_id)
        assert started["state"] == "running"
        (switched,) = list(service.store)
        assert switched.template_socket is None
        assert backing_of(switched.overlay) == str(template)
        assert template.stat().st_mode & 0o777 == 0o444
        launcher = service.launcher
        assert isinstance(launcher, LibvirtLauncher)
        xml = launcher._call("XMLDesc", lambda c: c.lookupByName(switched.domain).XMLDesc(0))
        assert "nbd" not in xml and str(template) in xml
        assert (await service.vms())["vms"][0]["streaming"] is False


async def test_a_stopped_streamed_vm_is_rebased_when_the_template_completes(
    tmp_path: Path, nbd_template: tuple[Path, Path]
) -> None:
    template, socket = nbd_template
    templates = ExportedTemplates(template, socket)
    async with streaming_host(tmp_path, templates) as service:
        await launch(service)
        (instance,) = list(service.store)
        await service.stop(instance.vm_id, force=True)
        templates.complete.set()

        def switched_off_nbd() -> bool:
            record = service.store.get(instance.vm_id)
            return record is not None and record.template_socket is None

        with trio.fail_after(10):
            await until(switched_off_nbd)
        switched = service.store.get(instance.vm_id)
        assert switched is not None and switched.overlay == instance.overlay
        assert backing_of(switched.overlay) == str(template)
        started = await service.start(instance.vm_id)
        assert started["state"] == "running"
        assert templates.resumed == 0  # nothing left to serve


async def test_a_launch_of_a_complete_template_does_not_stream(
    tmp_path: Path, nbd_template: tuple[Path, Path]
) -> None:
    template, _ = nbd_template

    @dataclass
    class Complete(ExportedTemplates):
        async def stream_template(
            self, name: str | None, version: str | None, tid: bytes | None, n: Notifier
        ) -> StreamingTemplate:
            return StreamingTemplate(self._ready(), None, self.path.read_bytes()[:512])

    templates = Complete(template, tmp_path / "unused.sock")
    async with streaming_host(tmp_path, templates) as service:
        result = await launch(service)
        assert result["streaming"] is False
        (instance,) = list(service.store)
        assert instance.template_socket is None
        assert backing_of(instance.overlay) == str(template)


async def test_after_a_restart_the_export_comes_back_for_a_streamed_vm(
    tmp_path: Path, nbd_template: tuple[Path, Path]
) -> None:
    template, socket = nbd_template
    templates = ExportedTemplates(template, socket)
    launcher = LibvirtLauncher("test:///default")
    first = VmService(launcher, tmp_path / "data", templates, default_flavors())
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await launch(first)
        nursery.cancel_scope.cancel()
    assert templates.resumed == 0
    async with streaming_host(tmp_path, templates) as again:
        with trio.fail_after(10):
            await until(lambda: templates.resumed == 1)
        (instance,) = list(again.store)
        assert instance.template_socket == str(socket)
    launcher.close()
