"""The libvirt domain XML of a VM: flavor, overlay disk over its template, serial log, NIC.

Pure: ElementTree builds the text (it escapes paths and names correctly); nothing is read.
`<vcpu current=N>MAX` and `<currentMemory>`/`<memory>` give live resize its room; the explicit
`<backingStore>` names the template's format so libvirt never probes a raw template as qcow2.
A streaming launch's backingStore is the host's NBD export of the template (a Unix socket).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from enum import StrEnum

from .flavors import KIB, Flavor
from .imageformat import ImageFormat

# libvirt accepts more, but these names also become file names (overlay, serial log).
_DOMAIN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_UUID_PATTERN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class DomainType(StrEnum):
    KVM = "kvm"
    QEMU = "qemu"  # TCG: pure emulation, works where KVM does not
    TEST = "test"  # libvirt's test:///default driver


class NicKind(StrEnum):
    NONE = "none"
    USER = "user"  # qemu's user-mode network: no bridge or libvirt network needed
    NETWORK = "network"  # a libvirt network by name
    BRIDGE = "bridge"  # a host bridge by name


@dataclass(frozen=True)
class Nic:
    kind: NicKind = NicKind.NONE
    source: str | None = None  # the network or bridge name
    mac: str | None = None

    def __post_init__(self) -> None:
        needs_source = self.kind in (NicKind.NETWORK, NicKind.BRIDGE)
        if needs_source and not self.source:
            raise ValueError(
                f"a {self.kind.value} network needs a name, like {self.kind.value}:NAME"
            )


def parse_nic(text: str) -> Nic:
    """ "none", "user", "network:NAME" or "bridge:NAME" as a Nic; ValueError otherwise."""
    kind, _, source = text.partition(":")
    try:
        parsed = NicKind(kind)
    except ValueError:
        raise ValueError(
            f"network {text!r} must be none, user, network:NAME or bridge:NAME"
        ) from None
    if parsed in (NicKind.NONE, NicKind.USER) and source:
        raise ValueError(f"network {text!r}: {kind} takes no name")
    return Nic(parsed, source or None)


@dataclass(frozen=True)
class DomainSpec:
    """Everything the domain XML is made from."""

    name: str
    domain_type: DomainType
    flavor: Flavor
    overlay_path: str  # the VM's qcow2 overlay: the only disk file the VM writes
    template_path: str  # the read-only backing file
    template_format: ImageFormat
    serial_log: str | None = None
    uuid: str | None = None
    nic: Nic = Nic()
    arch: str = "x86_64"
    machine: str | None = None
    disk_bus: str = "virtio"
    # Streaming launch: the template is read from this NBD Unix socket, not from template_path.
    template_socket: str | None = None

    def __post_init__(self) -> None:
        if not _DOMAIN_NAME_PATTERN.match(self.name):
            raise ValueError(
                f"domain name {self.name!r:.80} must be 1-64 letters, digits, '.', '_' or '-'"
            )
        if self.uuid is not None and not _UUID_PATTERN.match(self.uuid):
            raise ValueError(f"uuid {self.uuid!r:.60} is not a lower-case canonical UUID")
        for what, path in (("overlay", self.overlay_path), ("template", self.template_path)):
            if not path.startswith("/"):
                raise ValueError(f"the {what} path must be absolute, got {path!r:.200}")
        if self.serial_log is not None and not self.serial_log.startswith("/"):
            raise ValueError(f"the serial log path must be absolute, got {self.serial_log!r:.200}")
        if self.template_socket is not None and not self.template_socket.startswith("/"):
            raise ValueError(
                f"the template socket path must be absolute, got {self.template_socket!r:.200}"
            )


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def _kib(count: int) -> str:
    # libvirt counts memory in KiB; round up so a flavor never gets less than it says.
    return str(-(-count // KIB))


def build_domain_xml(spec: DomainSpec) -> str:
    """The domain XML text for `spec`."""
    flavor = spec.flavor
    domain = ET.Element("domain", {"type": spec.domain_type.value})
    _sub(domain, "name", spec.name)
    if spec.uuid is not None:
        _sub(domain, "uuid", spec.uuid)
    _sub(domain, "memory", _kib(flavor.max_memory), unit="KiB")
    _sub(domain, "currentMemory", _kib(flavor.memory), unit="KiB")
    _sub(domain, "vcpu", str(flavor.max_vcpus), placement="static", current=str(flavor.vcpus))
    os_element = _sub(domain, "os")
    type_attrs = {"arch": spec.arch}
    if spec.machine is not None:
        type_attrs["machine"] = spec.machine
    _sub(os_element, "type", "hvm", **type_attrs)
    _sub(os_element, "boot", dev="hd")
    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")
    devices = _sub(domain, "devices")
    _disk(devices, spec)
    _nic(devices, spec.nic)
    if spec.serial_log is not None:
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=spec.serial_log)
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="file")
        _sub(console, "source", path=spec.serial_log)
        _sub(console, "target", type="serial", port="0")
    if spec.domain_type is not DomainType.TEST:
        _sub(devices, "memballoon", model="virtio")
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")


def _disk(devices: ET.Element, spec: DomainSpec) -> None:
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2")
    _sub(disk, "source", file=spec.overlay_path)
    if spec.template_socket is None:
        backing = _sub(disk, "backingStore", type="file")
        _sub(backing, "format", type=spec.template_format.value)
        _sub(backing, "source", file=spec.template_path)
    else:
        # A template still being fetched: the host's read-only NBD export serves its bytes.
        backing = _sub(disk, "backingStore", type="network")
        _sub(backing, "format", type=spec.template_format.value)
        source = _sub(backing, "source", protocol="nbd")
        _sub(source, "host", transport="unix", socket=spec.template_socket)
    _sub(backing, "backingStore")  # the template itself has no backing file
    _sub(disk, "target", dev="vda" if spec.disk_bus == "virtio" else "sda", bus=spec.disk_bus)


def _nic(devices: ET.Element, nic: Nic) -> None:
    if nic.kind is NicKind.NONE:
        return
    interface = _sub(devices, "interface", type=nic.kind.value)
    if nic.mac is not None:
        _sub(interface, "mac", address=nic.mac)
    if nic.kind is NicKind.NETWORK:
        _sub(interface, "source", network=nic.source or "")
    elif nic.kind is NicKind.BRIDGE:
        _sub(interface, "source", bridge=nic.source or "")
    _sub(interface, "model", type="virtio")
    # VMs boot from their disk; the NIC's PXE option ROM only slows the BIOS (seconds under TCG).
    _sub(interface, "rom", enabled="no")


__all__ = ["DomainSpec", "DomainType", "Nic", "NicKind", "build_domain_xml", "parse_nic"]
