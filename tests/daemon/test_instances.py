"""Instance records and overlays: durable, atomic, and never writing or deleting the template."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import blake3
import pytest
from vmswarm.daemon.instances import (
    TEMPLATE_MODE,
    Instance,
    InstanceError,
    InstanceStore,
    create_overlay,
    make_vm_dir,
    nbd_backing,
    new_vm_id,
    protect_template,
    read_head,
    rebase_overlay,
    remove_vm_files,
    unreachable_directory,
)
from vmswarm.daemon.storeerrors import StoreError
from vmswarm.swarm.flavors import default_flavors
from vmswarm.swarm.imageformat import ImageFormat

from tests.ci import unavailable
from tests.daemon.qemu_nbd import NbdServer

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def make_instance(data_dir: Path, name: str = "web", template: str = "/t/t.img") -> Instance:
    vm_id, domain_uuid = new_vm_id()
    flavor = default_flavors()["tiny"]
    vm_dir = data_dir / "vms" / vm_id
    return Instance(
        vm_id=vm_id,
        name=name,
        domain=f"vmswarm-{name}",
        uuid=domain_uuid,
        template_id="ab" * 32,
        template_name="alpine",
        template_version="3.19",
        template_path=template,
        template_format=ImageFormat.RAW,
        flavor=flavor,
        overlay=str(vm_dir / "disk.qcow2"),
        serial_log=str(vm_dir / "serial.log"),
        created=1700000000.0,
        vcpus=flavor.vcpus,
        memory=flavor.memory,
    )


def test_records_survive_a_reopen(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    first = make_instance(tmp_path, "web")
    second = make_instance(tmp_path, "db")
    store.add(first)
    store.add(second)
    store.update(second.resized(vcpus=2, memory=200 << 20))
    reopened = InstanceStore(tmp_path)
    assert {i.vm_id for i in reopened} == {first.vm_id, second.vm_id}
    assert reopened.get(first.vm_id) == first
    again = reopened.get(second.vm_id)
    assert again is not None and (again.vcpus, again.memory) == (2, 200 << 20)
    reopened.remove(first.vm_id)
    assert [i.vm_id for i in InstanceStore(tmp_path)] == [second.vm_id]


def test_streaming_is_recorded_and_survives_a_reopen(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    streaming = replace(make_instance(tmp_path, "web"), template_socket="/d/nbd/ab.sock")
    store.add(streaming)
    again = InstanceStore(tmp_path).get(streaming.vm_id)
    assert again == streaming and again.streaming
    switched = replace(streaming, template_socket=None)
    store.update(switched)
    again = InstanceStore(tmp_path).get(streaming.vm_id)
    assert again == switched and not again.streaming


def test_records_written_before_streaming_still_load(tmp_path: Path) -> None:
    old = make_instance(tmp_path).to_wire()
    del old["template_socket"]  # a record from a daemon that predates streaming launches
    (tmp_path / "vms").mkdir()
    (tmp_path / "vms" / "instances.json").write_text(json.dumps({"version": 1, "instances": [old]}))
    [loaded] = InstanceStore(tmp_path)
    assert loaded.template_socket is None and not loaded.streaming
    assert loaded.vm_id == old["vm_id"]


def test_names_are_unique(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    store.add(make_instance(tmp_path, "web"))
    with pytest.raises(InstanceError) as caught:
        store.add(make_instance(tmp_path, "web"))
    assert caught.value.code == "name_taken"
    assert len(InstanceStore(tmp_path)) == 1


def test_find_by_id_prefix_name_or_domain(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    web = make_instance(tmp_path, "web")
    store.add(web)
    assert store.find(web.vm_id) == web
    assert store.find(web.vm_id[:5]) == web
    assert store.find("web") == web
    assert store.find("vmswarm-web") == web
    with pytest.raises(InstanceError) as caught:
        store.find("nope")
    assert caught.value.code == "unknown_vm"


def test_corrupt_records_are_an_error_not_an_empty_host(tmp_path: Path) -> None:
    InstanceStore(tmp_path).add(make_instance(tmp_path))
    path = tmp_path / "vms" / "instances.json"
    path.write_text('{"version": 1, "instances": [{"vm_id": 3}]}')
    with pytest.raises(StoreError, match="corrupt"):
        InstanceStore(tmp_path)
    path.write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        InstanceStore(tmp_path)


def test_records_file_is_replaced_whole(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    for i in range(5):
        store.add(make_instance(tmp_path, f"vm{i}"))
    data = json.loads((tmp_path / "vms" / "instances.json").read_text())
    assert len(data["instances"]) == 5
    assert [p.name for p in (tmp_path / "vms").iterdir()] == ["instances.json"]  # no temp left


def digest(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


@needs_qemu_img
@pytest.mark.parametrize("grow", [None, 64 << 20])
def test_overlay_is_backed_by_the_template_and_never_writes_it(
    tmp_path: Path, grow: int | None
) -> None:
    template = tmp_path / "templates" / "t.img"
    template.parent.mkdir()
    template.write_bytes(b"\x01" * (1 << 20))
    before = digest(template)
    protect_template(template)
    assert template.stat().st_mode & 0o777 == TEMPLATE_MODE
    overlay = tmp_path / "vm" / "disk.qcow2"
    make_vm_dir(overlay.parent)
    create_overlay(template, ImageFormat.RAW, overlay, grow)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(overlay)],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(template)
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == (grow or 1 << 20)
    # Write through the overlay: the data lands in the overlay, never in the template.
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 65536", str(overlay)],
        capture_output=True,
        check=True,
    )
    assert digest(template) == before
    remove_vm_files(overlay.parent, template)
    assert not overlay.parent.exists()
    assert digest(template) == before


@needs_qemu_img
def test_overlay_failure_leaves_nothing(tmp_path: Path) -> None:
    overlay = tmp_path / "disk.qcow2"
    with pytest.raises(InstanceError, match="qemu-img could not create") as caught:
        create_overlay(tmp_path / "missing.img", ImageFormat.RAW, overlay)
    assert caught.value.code == "launch_failed"
    assert not overlay.exists()


def test_vm_files_removal_refuses_a_directory_holding_the_template(tmp_path: Path) -> None:
    template = tmp_path / "vm" / "t.img"
    template.parent.mkdir()
    template.write_bytes(b"x")
    with pytest.raises(InstanceError, match="refusing"):
        remove_vm_files(tmp_path / "vm", template)
    assert template.exists()


def test_unreachable_directory(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    (closed / "inner").mkdir(parents=True)
    closed.chmod(0o700)
    try:
        assert unreachable_directory(closed / "inner" / "disk") in {closed, *closed.parents}
    finally:
        closed.chmod(0o755)
    assert unreachable_directory(Path("/usr/bin/env")) is None


def test_read_head(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    path.chmod(0o444)
    assert read_head(path, 4) == b"abcd"
    assert read_head(path, 100) == b"abcdef"


def qemu_img_info(path: Path) -> dict[str, object]:
    info: dict[str, object] = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )
    return info


def test_nbd_backing_names_the_socket_as_qemu_reads_it() -> None:
    assert nbd_backing(Path("/d/nbd/ab.sock")) == "nbd+unix:///?socket=/d/nbd/ab.sock"
    assert nbd_backing(Path("/d d/a&b.sock")) == "nbd+unix:///?socket=/d%20d/a%26b.sock"


@pytest.fixture
def nbd_export(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(template, socket): a 1 MiB raw template served read-only by qemu-nbd."""
    if shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None:
        unavailable("test overlays over NBD", "qemu-nbd and qemu-img are not installed")
    template = tmp_path / "a dir&more" / "t.img"  # the socket path needs quoting in the URI
    template.parent.mkdir()
    template.write_bytes(b"\x07" * (1 << 20))
    socket = template.parent / "t.sock"
    server = NbdServer(template, socket)
    try:
        yield template, socket
    finally:
        server.stop()


def test_overlay_over_an_nbd_export_then_rebased_onto_the_file(
    tmp_path: Path, nbd_export: tuple[Path, Path]
) -> None:
    template, socket = nbd_export
    overlay = tmp_path / "vm" / "disk.qcow2"
    make_vm_dir(overlay.parent)
    create_overlay(template, ImageFormat.RAW, overlay, template_socket=socket)
    info = qemu_img_info(overlay)
    assert info["backing-filename"] == nbd_backing(socket)
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == 1 << 20  # learned from the export
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 4096", str(overlay)],
        capture_output=True,
        check=True,
    )
    rebase_overlay(overlay, template, ImageFormat.RAW)
    info = qemu_img_info(overlay)
    assert info["backing-filename"] == str(template)
    assert info["backing-filename-format"] == "raw"
    # The guest's write stays in the overlay; the rest now reads from the file.
    for offset, pattern in ((0, "0x55"), (65536, "0x07")):
        subprocess.run(
            [
                "qemu-io",
                "-r",
                "-f",
                "qcow2",
                "-c",
                f"read -P {pattern} {offset} 4096",
                str(overlay),
            ],
            capture_output=True,
            check=True,
        )


def test_overlay_over_a_socket_nobody_serves_fails_and_leaves_nothing(tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:
        unavailable("test overlays over NBD", "qemu-img is not installed")
    overlay = tmp_path / "disk.qcow2"
    with pytest.raises(InstanceError, match="could not create the overlay") as caught:
        create_overlay(
            tmp_path / "t.img", ImageFormat.RAW, overlay, template_socket=tmp_path / "no.sock"
        )
    assert caught.value.code == "launch_failed"
    assert not overlay.exists()


def test_rebase_failure_is_clear(tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:
        unavailable("test overlay rebase", "qemu-img is not installed")
    with pytest.raises(InstanceError, match="could not rebase the overlay") as caught:
        rebase_overlay(tmp_path / "missing.qcow2", tmp_path / "t.img", ImageFormat.RAW)
    assert caught.value.code == "switch_failed"
