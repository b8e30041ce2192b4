"""Build a tiny bootable Linux disk (16 MiB raw) for real boot tests and the demo, with no mounts.

The recipe (see ENVIRONMENT.md): Debian's kernel and busybox-static as .deb files
(`apt-get download`, cached), unpacked with `dpkg-deb -x`; an initramfs whose `/init` prints a
marker line to /dev/ttyS0 and powers off; one FAT16 partition at sector 2048 (sfdisk, then
`mkfs.fat --offset`); kernel, initramfs and syslinux.cfg copied in with mcopy; `syslinux
--offset` and the syslinux MBR make it bootable. The guest's serial console shows the marker.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3

log = logging.getLogger(__name__)

MIB = 1 << 20
SECTOR = 512
PARTITION_START_SECTOR = 2048
PARTITION_OFFSET = PARTITION_START_SECTOR * SECTOR
DEFAULT_SIZE = 16 * MIB
DEFAULT_MARKER = "VMSWARM-GUEST-BOOTED"
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
MBR_CODE_BYTES = 440
APT_PACKAGES = "syslinux syslinux-common mtools dosfstools fdisk cpio"
# Tools live in sbin, which a non-root PATH often lacks.
_TOOL_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
)
TOOLS = ("sfdisk", "mkfs.fat", "mcopy", "mdir", "syslinux", "cpio", "dpkg-deb", "apt-get")
_MARKER_PATTERN = re.compile(r"^[A-Za-z0-9._:=-]{1,120}$")
_KERNEL_DEB = re.compile(r"^linux-image-(\d[\w.+-]*-amd64)_[^_]+_amd64\.deb$")
_COMMAND_TIMEOUT = 600.0
_PAD_BLOCK = 4 * MIB

SYSLINUX_CFG = """SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0 quiet
"""


class BootDiskError(Exception):
    """The disk could not be built; the message says which step failed and what to do."""


@dataclass(frozen=True)
class BootDisk:
    """A built disk: where it is, the line its guest prints on ttyS0, and what it boots."""

    path: Path
    marker: str
    kernel: str  # the kernel release, e.g. "6.1.0-26-amd64"
    size: int
    powers_off: bool


def default_cache_dir() -> Path:
    """$VMSWARM_BOOTDISK_CACHE, else ~/.cache/vmswarm/bootdisk (the .debs, kernel, busybox)."""
    configured = os.environ.get("VMSWARM_BOOTDISK_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "vmswarm" / "bootdisk"


def find_tool(name: str) -> str | None:
    return shutil.which(name, path=_TOOL_PATH)


def missing_tools() -> list[str]:
    """The tools (and the syslinux MBR) this machine lacks to build the disk; [] if none."""
    missing = [tool for tool in TOOLS if find_tool(tool) is None]
    if not SYSLINUX_MBR.is_file():
        missing.append(str(SYSLINUX_MBR))
    return missing


def _run(argv: Sequence[str], what: str, *, stdin: bytes | None = None) -> str:
    tool = find_tool(argv[0])
    if tool is None:
        raise BootDiskError(f"{what}: {argv[0]} is not installed (apt-get install {APT_PACKAGES})")
    try:
        result = subprocess.run(
            [tool, *argv[1:]],
            input=stdin,
            capture_output=True,
            timeout=_COMMAND_TIMEOUT,
            check=False,
            env={**os.environ, "PATH": _TOOL_PATH, "LC_ALL": "C"},
        )
    except subprocess.TimeoutExpired:
        raise BootDiskError(f"{what}: {argv[0]} ran longer than {_COMMAND_TIMEOUT:g}s") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).decode(errors="replace").strip()
        raise BootDiskError(f"{what}: {' '.join(argv)} exited {result.returncode}: {detail}")
    return result.stdout.decode(errors="replace")


def _cached_deb(cache_dir: Path, pattern: re.Pattern[str]) -> Path | None:
    found = sorted(p for p in cache_dir.glob("*.deb") if pattern.match(p.name))
    return found[-1] if found else None


def _kernel_package() -> str:
    """The versioned kernel package the meta-package points at, e.g. linux-image-6.1.0-26-amd64."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], "find the kernel package")
    for line in out.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and re.match(r"^linux-image-\d.*-amd64$", name):
            return name
    raise BootDiskError(
        f"apt-cache knows no kernel behind {KERNEL_META_PACKAGE}; run apt-get update first"
    )


def _download(package: str, cache_dir: Path) -> None:
    log.info("downloading %s into %s", package, cache_dir)
    # apt-get download writes into the current directory.
    tool = find_tool("apt-get")
    if tool is None:
        raise BootDiskError(f"download {package}: apt-get is not installed")
    result = subprocess.run(
        [tool, "download", "-q", package],
        cwd=cache_dir,
        capture_output=True,
        timeout=_COMMAND_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip()
        raise BootDiskError(
            f"apt-get download {package} failed ({detail}); run apt-get update, or put the .deb "
            f"into {cache_dir}"
        )


def fetch_debs(cache_dir: Path) -> tuple[Path, Path]:
    """The kernel and busybox-static .debs, downloaded into `cache_dir` unless already there."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    busybox_pattern = re.compile(rf"^{BUSYBOX_PACKAGE}_[^_]+_amd64\.deb$")
    kernel = _cached_deb(cache_dir, _KERNEL_DEB)
    if kernel is None:
        _download(_kernel_package(), cache_dir)
        kernel = _cached_deb(cache_dir, _KERNEL_DEB)
    busybox = _cached_deb(cache_dir, busybox_pattern)
    if busybox is None:
        _download(BUSYBOX_PACKAGE, cache_dir)
        busybox = _cached_deb(cache_dir, busybox_pattern)
    if kernel is None or busybox is None:
        raise BootDiskError(f"apt-get download left no kernel or busybox .deb in {cache_dir}")
    return kernel, busybox


def _unpacked(deb: Path, member: str, cache_dir: Path, name: str) -> Path:
    """`member` of a .deb (dpkg-deb -x), kept in the cache as `name` for the next build."""
    kept = cache_dir / name
    if kept.is_file():
        return kept
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        _run(["dpkg-deb", "-x", str(deb), scratch], f"unpack {deb.name}")
        source = Path(scratch) / member
        if not source.is_file():
            raise BootDiskError(f"{deb.name} has no {member}")
        partial = kept.with_suffix(".partial")
        shutil.copyfile(source, partial)
        partial.chmod(0o755)
        partial.replace(kept)
    return kept


def init_script(marker: str, *, power_off: bool) -> str:
    """The initramfs's /init: mount /dev, print the marker on the serial port, power off."""
    ending = (
        "/bin/busybox poweroff -f" if power_off else "while :; do /bin/busybox sleep 3600; done"
    )
    return (
        "#!/bin/busybox sh\n"
        "/bin/busybox mount -t devtmpfs devtmpfs /dev\n"
        "/bin/busybox mount -t proc proc /proc\n"
        f"/bin/busybox echo {marker} > /dev/ttyS0\n"
        f"{ending}\n"
    )


def _initramfs(busybox: Path, marker: str, power_off: bool, workdir: Path) -> bytes:
    root = workdir / "initramfs"
    for folder in ("bin", "dev", "proc", "sys"):
        (root / folder).mkdir(parents=True)
    shutil.copyfile(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    init = root / "init"
    init.write_text(init_script(marker, power_off=power_off))
    init.chmod(0o755)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    listing = "\n".join([".", *names]).encode() + b"\n"
    tool = find_tool("cpio")
    if tool is None:
        raise BootDiskError("pack the initramfs: cpio is not installed (apt-get install cpio)")
    result = subprocess.run(
        [tool, "-o", "-H", "newc", "--quiet", "-R", "0:0"],
        input=listing,
        cwd=root,
        capture_output=True,
        timeout=_COMMAND_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise BootDiskError(f"pack the initramfs: cpio failed: {result.stderr.decode().strip()}")
    return gzip.compress(result.stdout, compresslevel=9, mtime=0)


def build_boot_disk(
    path: Path,
    *,
    marker: str = DEFAULT_MARKER,
    power_off: bool = True,
    size: int = DEFAULT_SIZE,
    cache_dir: Path | None = None,
) -> BootDisk:
    """Write a bootable raw disk to `path`; its guest prints `marker` on ttyS0 (then powers off)."""
    if not _MARKER_PATTERN.match(marker):
        raise ValueError(f"marker {marker!r:.60} must be 1-120 letters, digits or ._:=-")
    if size % MIB or size < 8 * MIB:
        raise ValueError(f"disk size must be a whole number of MiB, at least 8 MiB, got {size}")
    missing = missing_tools()
    if missing:
        raise BootDiskError(
            f"cannot build the boot disk: missing {', '.join(missing)} "
            f"(apt-get install {APT_PACKAGES})"
        )
    cache = default_cache_dir() if cache_dir is None else cache_dir
    kernel_deb, busybox_deb = fetch_debs(cache)
    release = _KERNEL_DEB.match(kernel_deb.name)
    assert release is not None
    kernel_release = release.group(1)
    vmlinuz = _unpacked(
        kernel_deb, f"boot/vmlinuz-{kernel_release}", cache, f"vmlinuz-{kernel_release}"
    )
    busybox = _unpacked(busybox_deb, "bin/busybox", cache, f"busybox-{busybox_deb.stem}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vmswarm-bootdisk-") as scratch:
        work = Path(scratch)
        initrd = work / "initrd.gz"
        initrd.write_bytes(_initramfs(busybox, marker, power_off, work))
        config = work / "syslinux.cfg"
        config.write_text(SYSLINUX_CFG)
        needed = vmlinuz.stat().st_size + initrd.stat().st_size + PARTITION_OFFSET + MIB
        if needed > size:
            raise BootDiskError(
                f"kernel and initramfs need {needed / MIB:.1f} MiB; ask for a bigger disk "
                f"than {size // MIB} MiB"
            )
        disk = work / "disk.img"
        with disk.open("wb") as image:
            image.truncate(size)
        _run(
            ["sfdisk", "--quiet", str(disk)],
            "partition the disk",
            stdin=f"label: dos\nstart={PARTITION_START_SECTOR}, type=6, bootable\n".encode(),
        )
        blocks = (size - PARTITION_OFFSET) // 1024
        _run(
            [
                "mkfs.fat",
                "--offset",
                str(PARTITION_START_SECTOR),
                "-F",
                "16",
                "-n",
                "VMSWARM",
                "-i",
                "564d5357",
                str(disk),
                str(blocks),
            ],
            "make the FAT16 file system",
        )
        target = f"{disk}@@{PARTITION_OFFSET}"
        for source, name in ((vmlinuz, "vmlinuz"), (initrd, "initrd.gz"), (config, "syslinux.cfg")):
            _run(["mcopy", "-i", target, str(source), f"::{name}"], f"copy {name} onto the disk")
        _run(
            ["syslinux", "--install", "--offset", str(PARTITION_OFFSET), str(disk)],
            "install syslinux",
        )
        mbr = SYSLINUX_MBR.read_bytes()[:MBR_CODE_BYTES]
        with disk.open("r+b") as image:
            image.write(mbr)
        shutil.move(disk, path)
    log.info("built boot disk %s (kernel %s, marker %s)", path, kernel_release, marker)
    return BootDisk(path, marker, kernel_release, size, power_off)


def pad_boot_disk(src: Path, dst: Path, size: int, seed: int = 0) -> Path:
    """Copy the bootable disk `src` to `dst` and fill it up to `size` bytes with seeded random
    data the boot never reads: a large template whose boot touches only its first MiBs."""
    src, dst = Path(src), Path(dst)
    head = src.read_bytes()
    if size % MIB or size < len(head):
        raise ValueError(f"size must be a whole number of MiB, at least {len(head)}, got {size}")
    # blake3's extendable output: fast, deterministic, incompressible (no zero chunks to skip).
    stream = blake3.blake3(b"pad" + seed.to_bytes(8, "big"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(dst.name + ".partial")
    with partial.open("wb") as out:
        out.write(head)
        offset = len(head)
        while offset < size:
            piece = min(_PAD_BLOCK, size - offset)
            out.write(stream.digest(length=piece, seek=offset))
            offset += piece
        out.flush()
        os.fsync(out.fileno())
    partial.replace(dst)
    return dst
