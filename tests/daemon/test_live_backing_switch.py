"""A streaming VM's live switch from the NBD export to the local template file, on real qemu.

The guest boots from an overlay whose backing is a read-only NBD export of the template
(qemu-nbd stands in for the host's own export), then `switch_backing` moves its disk onto a new
overlay over the template file while it runs. Afterwards the export can go away: the guest
keeps running, qemu still reads the whole disk, and the definition names the new overlay.

Needs root, libvirtd on qemu:///system, qemu, qemu-nbd and the boot-disk tools; elsewhere it
is skipped, except under CI, where it must run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from vmswarm.daemon.bootdisk import build_boot_disk
from vmswarm.daemon.demo_cluster import LIBVIRT_URI, vm_launch_problem, wait_for_marker
from vmswarm.daemon.instances import create_overlay
from vmswarm.daemon.libvirt_launcher import LibvirtLauncher
from vmswarm.daemon.vm_launcher import LauncherError, VmState
from vmswarm.swarm.domain_xml import DomainSpec, build_domain_xml
from vmswarm.swarm.flavors import MIB, Flavor
from vmswarm.swarm.imageformat import ImageFormat

from tests.ci import unavailable
from tests.daemon.qemu_nbd import NbdServer

pytestmark = [pytest.mark.slow]

MARKER_TIMEOUT = 300.0
SWITCH_TIMEOUT = 120.0
WRITTEN = 64 * 1024
FLAVOR = Flavor("t", vcpus=1, memory=128 * MIB, disk=0)


@pytest.fixture
def workdir() -> Iterator[Path]:
    reason = vm_launch_problem(LIBVIRT_URI)
    if reason is None and shutil.which("qemu-nbd") is None:
        reason = "qemu-nbd (qemu-utils) is not installed"
    if reason is not None:
        unavailable("switch a real VM's disk live", reason)
    # qemu runs as libvirt-qemu: every folder above the disks and the socket must be enterable.
    path = Path(tempfile.mkdtemp(prefix="vmswarm-switch-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def launcher() -> Iterator[LibvirtLauncher]:
    made = LibvirtLauncher(LIBVIRT_URI)
    yield made
    made.close()


@pytest.fixture
def domain(launcher: LibvirtLauncher) -> Iterator[str]:
    """A unique domain name; whatever a failed test leaves in libvirtd is destroyed, undefined."""
    name = f"vmswarm-switch-{uuid.uuid4().hex[:10]}"
    yield name
    if launcher.exists(name):
        launcher.destroy(name)
        launcher.undefine(name)


def disk_of(xml: str) -> ET.Element:
    [disk] = [d for d in ET.fromstring(xml).iterfind("devices/disk") if d.get("device") == "disk"]
    return disk


def qemu_io(image: Path, command: str, *options: str) -> None:
    done = subprocess.run(
        ["qemu-io", *options, "-f", "qcow2", "-c", command, str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and "fail" not in done.stdout + done.stderr, done


def block_nodes(name: str) -> list[dict[str, Any]]:
    """Every block node the domain's qemu holds (QMP; it taints the domain, fine for a test)."""
    answer = subprocess.run(
        [
            *("virsh", "-c", LIBVIRT_URI, "qemu-monitor-command", name),
            '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    nodes: list[dict[str, Any]] = json.loads(answer.stdout)["return"]
    return nodes


def test_a_streaming_vm_moves_off_the_nbd_export_while_it_runs(
    workdir: Path, launcher: LibvirtLauncher, domain: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = f"VMSWARM-SWITCH-{uuid.uuid4().hex[:12]}"
    disk = build_boot_disk(workdir / "tiny.raw", marker=marker, power_off=False)
    template = disk.path
    template.chmod(0o444)
    old_overlay = workdir / "stream.qcow2"
    new_overlay = workdir / "disk.qcow2"
    serial = workdir / "serial.log"
    server = NbdServer(template, workdir / "template.sock")
    try:
        create_overlay(template, ImageFormat.RAW, old_overlay, template_socket=server.socket)
        # Data only the old overlay holds (as a guest's writes would be), past the boot files.
        qemu_io(old_overlay, f"write -P 0x5a {disk.size - WRITTEN} {WRITTEN}")
        spec = DomainSpec(
            name=domain,
            domain_type=launcher.choose_domain_type().domain_type,
            flavor=FLAVOR,
            overlay_path=str(old_overlay),
            template_path=str(template),
            template_format=ImageFormat.RAW,
            serial_log=str(serial),
            template_socket=str(server.socket),
        )
        launcher.define(build_domain_xml(spec))
        launcher.start(domain)
        wait_for_marker(serial, marker, MARKER_TIMEOUT)  # booted from the NBD export
        assert "nbd" in {node["drv"] for node in block_nodes(domain)}

        # A copy that cannot start is one clear error, and the guest keeps its disk.
        with pytest.raises(LauncherError, match="cannot start copying") as caught:
            launcher.switch_backing(domain, str(workdir / "absent.qcow2"), SWITCH_TIMEOUT)
        assert caught.value.code == "switch_failed"
        assert launcher.state(domain) is VmState.RUNNING

        # A copy that never gets to pivot is cancelled at its timeout; the disk stays as it was.
        monkeypatch.setattr(launcher, "_try_pivot", lambda conn, name, target: False)
        create_overlay(template, ImageFormat.RAW, workdir / "cancelled.qcow2")
        with pytest.raises(LauncherError, match="not ready within") as caught:
            launcher.switch_backing(domain, str(workdir / "cancelled.qcow2"), 1.0)
        assert caught.value.code == "switch_failed"
        monkeypatch.undo()
        assert launcher.state(domain) is VmState.RUNNING
        assert "nbd" in {node["drv"] for node in block_nodes(domain)}

        create_overlay(template, ImageFormat.RAW, new_overlay)
        launcher.switch_backing(domain, str(new_overlay), SWITCH_TIMEOUT)
        assert launcher.state(domain) is VmState.RUNNING

        conn = libvirt.open(LIBVIRT_URI)
        try:
            handle = conn.lookupByName(domain)
            live = disk_of(handle.XMLDesc(0))
            inactive = disk_of(handle.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        finally:
            conn.close()
        assert live.find("source").get("file") == str(new_overlay)  # type: ignore[union-attr]
        backing = live.find("backingStore")
        assert backing is not None and backing.get("type") == "file"
        assert backing.find("source").get("file") == str(template)  # type: ignore[union-attr]
        assert backing.find("format").get("type") == "raw"  # type: ignore[union-attr]
        # The next cold boot uses the new overlay too, and nothing names the export any more.
        assert inactive.find("source").get("file") == str(new_overlay)  # type: ignore[union-attr]
        assert "nbd" not in ET.tostring(inactive, encoding="unicode")

        # qemu let go of the export: its chain is the new overlay over the template file.
        nodes = block_nodes(domain)
        assert "nbd" not in {node["drv"] for node in nodes}
        files = {node["file"] for node in nodes if node["drv"] == "file"}
        assert files == {str(new_overlay), str(template)}

        # The copy carried the old overlay's own data over; the template still has zeros there.
        qemu_io(new_overlay, f"read -P 0x5a {disk.size - WRITTEN} {WRITTEN}", "-r", "-U")

        server.stop()  # the export goes away; the guest does not notice
        for _ in range(3):
            time.sleep(1)
            assert launcher.state(domain) is VmState.RUNNING

        launcher.destroy(domain)
        with pytest.raises(LauncherError) as caught:
            launcher.switch_backing(domain, str(new_overlay), SWITCH_TIMEOUT)
        assert caught.value.code == "not_running"  # a stopped VM's overlay is rebased instead
    finally:
        server.stop()
