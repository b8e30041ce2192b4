"""The tiny bootable disk: an MBR partition table, a FAT16 file system with kernel, initramfs,
syslinux config and loader, and an /init that prints the marker on the serial port."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest
from vmswarm.daemon import bootdisk
from vmswarm.daemon.bootdisk import (
    PARTITION_OFFSET,
    SYSLINUX_MBR,
    BootDisk,
    BootDiskError,
    build_boot_disk,
    find_tool,
    init_script,
    missing_tools,
)
from vmswarm.daemon.demo_cluster import make_bootable
from vmswarm.daemon.mixed_image import write_mixed_image

MARKER = "TEST-MARKER-42"


def tool(name: str) -> str:
    path = find_tool(name)
    assert path is not None, f"{name} is not installed"
    return path


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> BootDisk:
    missing = missing_tools()
    if missing and not os.environ.get("CI"):
        pytest.skip(
            f"boot disk tools missing here: {', '.join(missing)} (bash run.sh installs them)"
        )
    return build_boot_disk(tmp_path_factory.mktemp("bootdisk") / "tiny.raw", marker=MARKER)


def newc_members(archive: bytes) -> dict[str, bytes]:
    """Files of a cpio "newc" archive by name (the format the kernel unpacks)."""
    members: dict[str, bytes] = {}
    offset = 0
    while True:
        header = archive[offset : offset + 110]
        assert header[:6] == b"070701", f"not a newc header at {offset}"
        size = int(header[54:62], 16)
        name_size = int(header[94:102], 16)
        name_start = offset + 110
        name = archive[name_start : name_start + name_size - 1].decode()
        data_start = (name_start + name_size + 3) & ~3
        if name == "TRAILER!!!":
            return members
        members[name] = archive[data_start : data_start + size]
        offset = (data_start + size + 3) & ~3


def test_one_bootable_fat16_partition_at_sector_2048(disk: BootDisk) -> None:
    assert disk.path.stat().st_size == 16 << 20 == disk.size
    table = json.loads(
        subprocess.run(
            [tool("sfdisk"), "--json", str(disk.path)], capture_output=True, check=True
        ).stdout
    )["partitiontable"]
    assert table["label"] == "dos"
    [partition] = table["partitions"]
    assert (partition["start"], partition["type"], partition.get("bootable")) == (2048, "6", True)
    assert partition["size"] == (16 << 20) // 512 - 2048


def test_the_mbr_holds_syslinux_boot_code_and_the_signature(disk: BootDisk) -> None:
    head = disk.path.read_bytes()[:512]
    assert head[:440] == SYSLINUX_MBR.read_bytes()[:440]
    assert head[510:512] == b"\x55\xaa"
    boot_sector = disk.path.read_bytes()[PARTITION_OFFSET : PARTITION_OFFSET + 512]
    assert boot_sector[54:62] == b"FAT16   "
    assert boot_sector[510:512] == b"\x55\xaa"


def mtools(disk: BootDisk, command: str, *args: str) -> bytes:
    image = f"{disk.path}@@{PARTITION_OFFSET}"
    return subprocess.run(
        [tool(command), "-i", image, *args], capture_output=True, check=True
    ).stdout


def test_the_file_system_holds_kernel_initramfs_config_and_loader(disk: BootDisk) -> None:
    listing = mtools(disk, "mdir", "-a", "-b", "::/").decode().split()
    names = {name.removeprefix("::/").lower() for name in listing}
    assert {"vmlinuz", "initrd.gz", "syslinux.cfg", "ldlinux.sys", "ldlinux.c32"} <= names
    config = mtools(disk, "mtype", "::syslinux.cfg").decode()
    assert "SERIAL 0 115200" in config
    assert "console=ttyS0" in config
    kernel = mtools(disk, "mtype", "::vmlinuz")
    assert kernel[0x202:0x206] == b"HdrS"  # the x86 Linux boot protocol header
    assert disk.kernel.endswith("-amd64")


def test_the_initramfs_init_prints_the_marker_on_ttys0_and_powers_off(disk: BootDisk) -> None:
    members = newc_members(gzip.decompress(mtools(disk, "mtype", "::initrd.gz")))
    init = members["init"].decode()
    assert f"echo {MARKER} > /dev/ttyS0" in init
    assert "poweroff -f" in init
    assert members["bin/busybox"][:4] == b"\x7fELF"


def test_a_guest_that_stays_up_loops_instead_of_powering_off() -> None:
    script = init_script("UP", power_off=False)
    assert "echo UP > /dev/ttyS0" in script and "poweroff" not in script


@pytest.mark.parametrize("marker", ["", "two words", "quote'd", "x" * 121])
def test_a_marker_that_is_not_plain_is_refused(tmp_path: Path, marker: str) -> None:
    with pytest.raises(ValueError, match="marker"):
        build_boot_disk(tmp_path / "d.raw", marker=marker)


def test_missing_tools_are_named_with_the_packages_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bootdisk, "_TOOL_PATH", str(tmp_path))
    assert "mkfs.fat" in missing_tools()
    with pytest.raises(BootDiskError, match=r"missing .*syslinux.*apt-get install syslinux"):
        build_boot_disk(tmp_path / "d.raw")
    assert not (tmp_path / "d.raw").exists()


def test_the_demo_makes_its_template_bootable_and_keeps_the_rest(
    disk: BootDisk, tmp_path: Path
) -> None:
    image = tmp_path / "demo.img"
    write_mixed_image(image, 32 << 20, seed=3)
    tail = image.read_bytes()[16 << 20 :]
    make_bootable(image, MARKER)
    data = image.read_bytes()
    assert len(data) == 32 << 20
    assert data[510:512] == b"\x55\xaa" and data[:440] == SYSLINUX_MBR.read_bytes()[:440]
    assert data[16 << 20 :] == tail
