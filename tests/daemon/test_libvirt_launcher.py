"""LibvirtLauncher against libvirt's test:///default driver (in-process, no daemon needed)."""

from __future__ import annotations

import os
import stat
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from vmswarm.daemon.libvirt_launcher import (
    PROBE_MARKER,
    LibvirtLauncher,
    _file_disk_xml,
    _first_disk_target,
    kvm_device_problem,
    offers_kvm,
    probe_boot_sector,
)
from vmswarm.daemon.vm_launcher import LauncherError, VmState
from vmswarm.swarm.domain_xml import DomainSpec, DomainType, build_domain_xml
from vmswarm.swarm.flavors import MIB, Flavor
from vmswarm.swarm.imageformat import ImageFormat

from tests.ci import unavailable

TEST_URI = "test:///default"
FLAVOR = Flavor("t", vcpus=1, memory=128 * MIB, disk=0, max_vcpus=2, max_memory=256 * MIB)


@pytest.fixture
def launcher() -> Iterator[LibvirtLauncher]:
    made = LibvirtLauncher(TEST_URI)
    yield made
    made.close()


@pytest.fixture
def domain(launcher: LibvirtLauncher) -> Iterator[str]:
    """A defined (not started) domain with a unique name; removed afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    launcher.define(xml_for(name))
    yield name
    if launcher.exists(name):
        launcher.destroy(name)
        launcher.undefine(name)


def xml_for(name: str) -> str:
    return build_domain_xml(
        DomainSpec(
            name=name,
            domain_type=DomainType.TEST,
            flavor=FLAVOR,
            overlay_path=f"/nonexistent/{name}/disk.qcow2",
            template_path="/nonexistent/template.img",
            template_format=ImageFormat.RAW,
            serial_log=f"/nonexistent/{name}/serial.log",
        )
    )


def test_the_test_driver_gets_test_domains(launcher: LibvirtLauncher) -> None:
    choice = launcher.choose_domain_type()
    assert choice.domain_type is DomainType.TEST
    assert launcher.choose_domain_type() is choice  # decided once


def test_host_resources(launcher: LibvirtLauncher) -> None:
    host = launcher.host_resources()
    assert host.cpus > 0 and host.memory > 0


def test_lifecycle_define_start_stop_delete(launcher: LibvirtLauncher, domain: str) -> None:
    assert launcher.exists(domain)
    assert launcher.state(domain) is VmState.SHUTOFF
    launcher.start(domain)
    assert launcher.state(domain) is VmState.RUNNING
    launcher.start(domain)  # starting a running domain changes nothing
    launcher.shutdown(domain)
    assert launcher.state(domain) is VmState.SHUTOFF
    launcher.start(domain)
    launcher.destroy(domain)
    assert launcher.state(domain) is VmState.SHUTOFF
    launcher.destroy(domain)  # already off: nothing happens
    launcher.undefine(domain)
    assert not launcher.exists(domain)
    assert launcher.state(domain) is VmState.MISSING
    launcher.undefine(domain)  # already gone: nothing happens


def test_a_second_define_with_the_same_name_is_name_taken(
    launcher: LibvirtLauncher, domain: str
) -> None:
    with pytest.raises(LauncherError) as caught:
        launcher.define(xml_for(domain))
    assert caught.value.code == "name_taken"


def test_operations_on_unknown_domains(launcher: LibvirtLauncher) -> None:
    for action in (launcher.start, launcher.shutdown, launcher.destroy):
        with pytest.raises(LauncherError) as caught:
            action("no-such-domain")
        assert caught.value.code == "unknown_vm"
    assert launcher.stats(["no-such-domain"]) == {}


def test_live_resize_within_the_maximums(launcher: LibvirtLauncher, domain: str) -> None:
    launcher.start(domain)
    launcher.set_vcpus(domain, 2)
    launcher.set_memory(domain, 200 * MIB)
    stats = launcher.stats([domain])[domain]
    assert (stats.vcpus, stats.max_vcpus) == (2, 2)
    assert (stats.memory, stats.max_memory) == (200 * MIB, 256 * MIB)
    launcher.set_vcpus(domain, 1)
    assert launcher.stats([domain])[domain].vcpus == 1


def test_resize_past_the_maximums_says_why(launcher: LibvirtLauncher, domain: str) -> None:
    launcher.start(domain)
    with pytest.raises(LauncherError, match=r"1\.\.2 vCPUs") as caught:
        launcher.set_vcpus(domain, 3)
    assert caught.value.code == "cannot_resize"
    with pytest.raises(LauncherError, match="at most 256 MiB") as caught:
        launcher.set_memory(domain, 300 * MIB)
    assert caught.value.code == "cannot_resize"
    assert launcher.stats([domain])[domain].vcpus == 1


def test_resize_of_a_stopped_domain_changes_its_definition(
    launcher: LibvirtLauncher, domain: str
) -> None:
    launcher.set_vcpus(domain, 2)
    launcher.start(domain)
    assert launcher.stats([domain])[domain].vcpus == 2


def test_stats_sample_running_domains(launcher: LibvirtLauncher, domain: str) -> None:
    launcher.start(domain)
    stats = launcher.stats([domain, "absent"])
    assert set(stats) == {domain}
    sample = stats[domain]
    assert sample.state is VmState.RUNNING
    assert sample.memory == 128 * MIB and sample.memory_used > 0
    assert sample.cpu_time_ns >= 0
    for counter in ("net_rx_bytes", "net_tx_bytes", "disk_read_bytes", "disk_write_bytes"):
        assert getattr(sample, counter) >= 0


def test_the_test_driver_cannot_switch_a_disk_live(launcher: LibvirtLauncher, domain: str) -> None:
    launcher.start(domain)
    with pytest.raises(LauncherError, match="cannot block-copy") as caught:
        launcher.switch_backing(domain, "/nonexistent/new.qcow2", 5.0)
    assert caught.value.code == "unsupported"
    assert launcher.state(domain) is VmState.RUNNING


def test_the_switched_disk_is_the_domains_first_disk() -> None:
    assert _first_disk_target(xml_for("d")) == "vda"
    scsi = xml_for("d").replace('bus="virtio"', 'bus="scsi"').replace("vda", "sda")
    assert _first_disk_target(scsi) == "sda"
    cdrom_first = """<domain><devices>
      <disk type='file' device='cdrom'><target dev='hdc'/></disk>
      <disk type='file' device='disk'><target dev='vdb'/></disk>
    </devices></domain>"""
    assert _first_disk_target(cdrom_first) == "vdb"
    assert _first_disk_target("<domain><devices/></domain>") is None


def test_the_copy_destination_is_the_new_overlay_file() -> None:
    disk = ET.fromstring(_file_disk_xml("/d/a&b'.qcow2"))
    assert (disk.tag, disk.get("type")) == ("disk", "file")
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert disk.find("source").get("file") == "/d/a&b'.qcow2"  # type: ignore[union-attr]


def test_unreachable_libvirt_is_one_clear_error() -> None:
    launcher = LibvirtLauncher("test:///nonexistent/vmswarm-no-such-file.xml")
    with pytest.raises(LauncherError, match="cannot connect to libvirt") as caught:
        launcher.connect()
    assert caught.value.code == "libvirt_unreachable"
    with pytest.raises(LauncherError) as caught:
        launcher.choose_domain_type()
    assert caught.value.code == "libvirt_unreachable"


def test_probe_boot_sector_is_a_bootable_mbr() -> None:
    sector = probe_boot_sector()
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"
    assert PROBE_MARKER in sector


CAPS = """<capabilities><host/>
<guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/>{kvm}</arch></guest>
<guest><os_type>hvm</os_type><arch name='i686'><domain type='qemu'/><domain type='kvm'/></arch>
</guest></capabilities>"""


def test_offers_kvm_reads_the_capabilities_per_arch() -> None:
    assert offers_kvm(CAPS.format(kvm="<domain type='kvm'/>"), "x86_64")
    assert not offers_kvm(CAPS.format(kvm=""), "x86_64")
    assert offers_kvm(CAPS.format(kvm=""), "i686")


def test_kvm_device_problems(tmp_path: Path) -> None:
    missing = kvm_device_problem(tmp_path / "kvm")
    assert missing is not None and "does not exist" in missing
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    problem = kvm_device_problem(plain)
    assert problem is not None and "not a character device" in problem


def test_root_only_kvm_device_is_not_usable_by_qemu(tmp_path: Path) -> None:
    assert kvm_device_problem(Path("/dev/null")) is None  # a character device anyone may use
    if os.geteuid() != 0:
        unavailable("test a root-only /dev/kvm", "making a device node needs root")
    node = tmp_path / "kvm"
    try:  # a /dev/null twin, readable and writable by its owner only (like /dev/kvm as shipped)
        os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except OSError as exc:
        unavailable("test a root-only /dev/kvm", f"cannot make a device node here: {exc}")
    problem = kvm_device_problem(node)
    assert problem is not None and "chmod 660" in problem
    assert kvm_device_problem(node, for_other_user=False) is None
    node.chmod(0o660)
    assert kvm_device_problem(node) is None


def test_the_probe_verdict_is_cached_per_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "run" / "kvm-probe.json"
    probes: list[int] = []
    key = {"boot_id": "b1"}

    def probe(self: LibvirtLauncher) -> tuple[bool, str]:
        probes.append(1)
        return False, "the guest stopped"

    monkeypatch.setattr(LibvirtLauncher, "_probe_kvm", probe)
    monkeypatch.setattr(LibvirtLauncher, "_probe_key", lambda self: dict(key))
    first = LibvirtLauncher(TEST_URI, probe_cache=cache)._cached_probe()
    second = LibvirtLauncher(TEST_URI, probe_cache=cache)._cached_probe()
    assert first == (False, "the guest stopped")
    assert second[0] is False and "probed earlier" in second[1]
    assert len(probes) == 1
    key["boot_id"] = "b2"  # a reboot (or another device, URI or qemu) probes again
    LibvirtLauncher(TEST_URI, probe_cache=cache)._cached_probe()
    assert len(probes) == 2
    LibvirtLauncher(TEST_URI, probe_cache=None)._cached_probe()
    assert len(probes) == 3


class _MonitorGone:
    """A libvirt connection whose stats call fails for one domain, as when its guest powers off."""

    def __init__(self, conn: object, dying: str) -> None:
        self._conn = conn
        self._dying = dying

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)

    def domainListGetStats(self, domains: list[object], stats: int, flags: int) -> object:
        if any(d.name() == self._dying for d in domains):  # type: ignore[attr-defined]
            raise libvirt.libvirtError("internal error: End of file from qemu monitor")
        return self._conn.domainListGetStats(domains, stats, flags)  # type: ignore[attr-defined]


def test_stats_survive_one_guest_whose_monitor_is_gone(
    launcher: LibvirtLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"t-{uuid.uuid4().hex[:10]}" for _ in range(2)]
    for name in names:
        launcher.define(xml_for(name))
        launcher.start(name)
    try:
        real = launcher._connection()
        monkeypatch.setattr(launcher, "_connection", lambda: _MonitorGone(real, names[0]))
        stats = launcher.stats(names)
        # The healthy guest keeps its full record; the dying one still shows, from its info.
        assert set(stats) == set(names)
        assert stats[names[1]].memory_used > 0
        assert stats[names[0]].state is VmState.RUNNING
    finally:
        monkeypatch.undo()
        for name in names:
            launcher.destroy(name)
            launcher.undefine(name)
