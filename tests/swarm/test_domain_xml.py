"""The domain XML: sizes, disk chain, serial console, NIC, escaping and validation."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.swarm.domain_xml import (
    DomainSpec,
    DomainType,
    Nic,
    NicKind,
    build_domain_xml,
    parse_nic,
)
from vmswarm.swarm.flavors import MIB, Flavor
from vmswarm.swarm.imageformat import ImageFormat

FLAVOR = Flavor("small", vcpus=1, memory=512 * MIB, disk=0, max_vcpus=4, max_memory=1024 * MIB)


def spec(**changes: object) -> DomainSpec:
    fields: dict[str, object] = {
        "name": "vmswarm-web-1",
        "domain_type": DomainType.QEMU,
        "flavor": FLAVOR,
        "overlay_path": "/var/lib/vmswarm/vms/abc/disk.qcow2",
        "template_path": "/var/lib/vmswarm/templates/ff.img",
        "template_format": ImageFormat.RAW,
        "serial_log": "/var/lib/vmswarm/vms/abc/serial.log",
        "uuid": "0f8fad5b-d9cb-469f-a165-70867728950e",
    }
    fields.update(changes)
    return DomainSpec(**fields)  # type: ignore[arg-type]


def parsed(s: DomainSpec) -> ET.Element:
    return ET.fromstring(build_domain_xml(s))


def test_type_name_uuid_and_sizes() -> None:
    root = parsed(spec())
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "vmswarm-web-1"
    assert root.findtext("uuid") == "0f8fad5b-d9cb-469f-a165-70867728950e"
    memory = root.find("memory")
    current = root.find("currentMemory")
    vcpu = root.find("vcpu")
    assert memory is not None and current is not None and vcpu is not None
    # The maximums give live resize its room; the flavor's values are what the VM boots with.
    assert (memory.get("unit"), memory.text) == ("KiB", str(1024 * 1024))
    assert (current.get("unit"), current.text) == ("KiB", str(512 * 1024))
    assert (vcpu.text, vcpu.get("current")) == ("4", "1")


def test_memory_rounds_up_to_whole_kib() -> None:
    odd = Flavor("odd", 1, 64 * MIB + 1, 0)
    root = parsed(spec(flavor=odd))
    assert root.findtext("currentMemory") == str(64 * 1024 + 1)


@pytest.mark.parametrize("kind", [DomainType.KVM, DomainType.QEMU, DomainType.TEST])
def test_domain_type_is_what_detection_chose(kind: DomainType) -> None:
    assert parsed(spec(domain_type=kind)).get("type") == kind.value


@pytest.mark.parametrize("image_format", [ImageFormat.RAW, ImageFormat.QCOW2])
def test_disk_is_the_overlay_backed_by_the_template(image_format: ImageFormat) -> None:
    root = parsed(spec(template_format=image_format))
    disks = root.findall("devices/disk")
    assert len(disks) == 1
    disk = disks[0]
    assert disk.find("driver") is not None
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert disk.find("source").get("file") == "/var/lib/vmswarm/vms/abc/disk.qcow2"  # type: ignore[union-attr]
    backing = disk.find("backingStore")
    assert backing is not None
    assert backing.find("format").get("type") == image_format.value  # type: ignore[union-attr]
    assert backing.find("source").get("file") == "/var/lib/vmswarm/templates/ff.img"  # type: ignore[union-attr]
    # The chain ends at the template: an empty backingStore stops libvirt probing further.
    end = backing.find("backingStore")
    assert end is not None and len(end) == 0
    assert disk.find("target").get("bus") == "virtio"  # type: ignore[union-attr]


@pytest.mark.parametrize("image_format", [ImageFormat.RAW, ImageFormat.QCOW2])
def test_streaming_disk_is_backed_by_the_nbd_export(image_format: ImageFormat) -> None:
    socket = "/var/lib/vmswarm/nbd/ff.sock"
    root = parsed(spec(template_format=image_format, template_socket=socket))
    [disk] = root.findall("devices/disk")
    assert disk.find("source").get("file") == "/var/lib/vmswarm/vms/abc/disk.qcow2"  # type: ignore[union-attr]
    backing = disk.find("backingStore")
    assert backing is not None and backing.get("type") == "network"
    assert backing.find("format").get("type") == image_format.value  # type: ignore[union-attr]
    source = backing.find("source")
    assert source is not None and source.get("protocol") == "nbd"
    assert source.get("file") is None
    hosts = source.findall("host")
    assert [(h.get("transport"), h.get("socket")) for h in hosts] == [("unix", socket)]
    end = backing.find("backingStore")
    assert end is not None and len(end) == 0
    assert disk.find("target").get("dev") == "vda"  # type: ignore[union-attr]


def test_streaming_socket_path_is_escaped() -> None:
    socket = "/run/x<&>\"'.sock"
    host = parsed(spec(template_socket=socket)).find("devices/disk/backingStore/source/host")
    assert host is not None and host.get("socket") == socket


def test_serial_console_goes_to_the_log_file() -> None:
    root = parsed(spec())
    serial = root.find("devices/serial")
    assert serial is not None and serial.get("type") == "file"
    assert serial.find("source").get("path") == "/var/lib/vmswarm/vms/abc/serial.log"  # type: ignore[union-attr]
    assert parsed(spec(serial_log=None)).find("devices/serial") is None


def test_nics() -> None:
    assert parsed(spec()).find("devices/interface") is None
    user = parsed(spec(nic=Nic(NicKind.USER))).find("devices/interface")
    assert user is not None and user.get("type") == "user" and user.find("source") is None
    assert user.find("rom").get("enabled") == "no"  # type: ignore[union-attr]
    net = parsed(spec(nic=parse_nic("network:default"))).find("devices/interface")
    assert net is not None and net.get("type") == "network"
    assert net.find("source").get("network") == "default"  # type: ignore[union-attr]
    bridge = parsed(spec(nic=parse_nic("bridge:br0"))).find("devices/interface")
    assert bridge is not None and bridge.find("source").get("bridge") == "br0"  # type: ignore[union-attr]


@pytest.mark.parametrize("text", ["wifi", "network", "user:x", "bridge:"])
def test_bad_nic_text(text: str) -> None:
    with pytest.raises(ValueError, match="network"):
        parse_nic(text)


def test_test_driver_gets_no_balloon_but_real_ones_do() -> None:
    assert parsed(spec()).find("devices/memballoon") is not None
    assert parsed(spec(domain_type=DomainType.TEST)).find("devices/memballoon") is None


@given(st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40))
@settings(max_examples=150)
def test_paths_are_escaped_and_survive_exactly(tail: str) -> None:
    path = "/data/" + tail + "<&>\"'"
    root = parsed(spec(template_path=path, overlay_path=path + ".qcow2", serial_log=path + ".log"))
    backing_source = root.find("devices/disk/backingStore/source")
    assert backing_source is not None and backing_source.get("file") == path
    assert root.find("devices/serial/source").get("path") == path + ".log"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "has space"}, "domain name"),
        ({"name": "x" * 65}, "domain name"),
        ({"uuid": "not-a-uuid"}, "uuid"),
        ({"overlay_path": "relative/disk.qcow2"}, "absolute"),
        ({"template_path": "t.img"}, "absolute"),
        ({"serial_log": "serial.log"}, "absolute"),
        ({"template_socket": "nbd/t.sock"}, "socket path must be absolute"),
    ],
)
def test_invalid_specs_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**changes)
