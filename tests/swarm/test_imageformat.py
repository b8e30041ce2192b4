"""Raw vs qcow2 detection, and refusal of qcow2 images that are not self-contained."""

from __future__ import annotations

import contextlib
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.swarm.errors import ManifestError
from vmswarm.swarm.imageformat import (
    HEADER_SAMPLE_SIZE,
    QCOW2_MAGIC,
    ImageFormat,
    detect_format,
)
from vmswarm.swarm.manifest import MIN_CHUNK_SIZE, build_manifest

EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
EXT_FEATURE_TABLE = 0x6803F857


def qcow2_header(
    *,
    version: int = 3,
    backing: bytes | None = None,
    backing_offset: int | None = None,
    incompatible: int = 0,
    extensions: list[tuple[int, bytes]] | None = None,
    total: int = 4096,
) -> bytes:
    """A qcow2 header as qemu-img lays it out: fields, extensions, then the backing file name."""
    head = bytearray(total)
    struct.pack_into(">4sI", head, 0, QCOW2_MAGIC, version)
    struct.pack_into(">I", head, 20, 16)  # cluster_bits
    struct.pack_into(">Q", head, 24, 1 << 30)  # virtual size
    header_length = 104 if version == 3 else 72
    if version == 3:
        struct.pack_into(">QQQII", head, 72, incompatible, 0, 0, 4, header_length)
    pos = header_length
    for ext_type, data in extensions or []:
        struct.pack_into(">II", head, pos, ext_type, len(data))
        head[pos + 8 : pos + 8 + len(data)] = data
        pos += 8 + (len(data) + 7) // 8 * 8
    pos += 8  # end-of-extensions marker, already zero
    if backing is not None:
        offset = pos if backing_offset is None else backing_offset
        struct.pack_into(">QI", head, 8, offset, len(backing))
        if offset + len(backing) <= total:
            head[offset : offset + len(backing)] = backing
    return bytes(head)


@pytest.mark.parametrize(
    "head",
    [b"", b"Q", b"QFI", b"QFI\xfa" + bytes(200), bytes(512), b"\xeb\x63\x90" + bytes(509)],
)
def test_anything_without_the_qcow2_magic_is_raw(head: bytes) -> None:
    assert detect_format(head) is ImageFormat.RAW


@given(st.binary(max_size=256).filter(lambda b: not b.startswith(QCOW2_MAGIC)))
@settings(max_examples=200)
def test_random_headers_are_raw(head: bytes) -> None:
    assert detect_format(head) is ImageFormat.RAW


@pytest.mark.parametrize("version", [2, 3])
def test_self_contained_qcow2_is_accepted(version: int) -> None:
    assert detect_format(qcow2_header(version=version)) is ImageFormat.QCOW2


def test_qcow2_with_unrelated_extensions_and_dirty_bit_is_accepted() -> None:
    head = qcow2_header(incompatible=1, extensions=[(EXT_FEATURE_TABLE, bytes(48))])
    assert detect_format(head) is ImageFormat.QCOW2


@pytest.mark.parametrize("version", [2, 3])
def test_backing_file_is_refused_with_its_name(version: int) -> None:
    head = qcow2_header(version=version, backing=b"/var/lib/images/base.img")
    with pytest.raises(ManifestError) as info:
        detect_format(head)
    message = str(info.value)
    assert "backing file '/var/lib/images/base.img'" in message
    assert "self-contained" in message
    assert "qemu-img convert" in message


def test_backing_file_name_past_the_sample_is_still_refused() -> None:
    head = qcow2_header(backing=b"base.img", backing_offset=HEADER_SAMPLE_SIZE + 100)
    with pytest.raises(ManifestError, match="has a backing file; templates must be"):
        detect_format(head)


def test_external_data_file_is_refused_with_its_name() -> None:
    head = qcow2_header(
        incompatible=1 << 2,
        extensions=[(EXT_BACKING_FORMAT, b"raw"), (EXT_DATA_FILE, b"/srv/data.raw")],
    )
    with pytest.raises(ManifestError, match=r"external data file '/srv/data\.raw'.*qemu-img"):
        detect_format(head)


def test_external_data_file_without_its_extension_is_still_refused() -> None:
    with pytest.raises(ManifestError, match="has an external data file; templates must be"):
        detect_format(qcow2_header(incompatible=1 << 2))


def test_data_file_extension_without_the_feature_bit_is_ignored() -> None:
    # qemu only uses the extension when the incompatible bit says so.
    head = qcow2_header(extensions=[(EXT_DATA_FILE, b"/srv/data.raw")])
    assert detect_format(head) is ImageFormat.QCOW2


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unknown_qcow2_version_is_refused(version: int) -> None:
    with pytest.raises(ManifestError, match=f"unsupported qcow2 version {version}"):
        detect_format(qcow2_header(version=version))


@pytest.mark.parametrize("length", [4, 8, 71])
def test_truncated_qcow2_header_is_refused(length: int) -> None:
    with pytest.raises(ManifestError, match="qcow2 header truncated"):
        detect_format(qcow2_header(version=2)[:length])


def test_truncated_v3_header_is_refused() -> None:
    with pytest.raises(ManifestError, match="qcow2 v3 header truncated"):
        detect_format(qcow2_header(version=3)[:90])


@given(st.binary(min_size=0, max_size=300))
@settings(max_examples=300)
def test_any_bytes_after_the_magic_give_a_format_or_manifest_error(tail: bytes) -> None:
    with contextlib.suppress(ManifestError):
        assert detect_format(QCOW2_MAGIC + tail) is ImageFormat.QCOW2


def test_manifest_of_a_qcow2_image_records_the_format() -> None:
    image = qcow2_header(total=3 * MIN_CHUNK_SIZE + 5)
    assert build_manifest(image, "vm", "1", MIN_CHUNK_SIZE).format is ImageFormat.QCOW2


def test_manifest_of_a_qcow2_with_backing_file_is_refused() -> None:
    image = qcow2_header(backing=b"base.qcow2", total=2 * MIN_CHUNK_SIZE)
    with pytest.raises(ManifestError, match=r"backing file 'base\.qcow2'"):
        build_manifest(image, "vm", "1", MIN_CHUNK_SIZE)


QEMU_IMG = shutil.which("qemu-img")
needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")


def qemu_img(*args: str) -> None:
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, *args], check=True, capture_output=True)


def sample(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(HEADER_SAMPLE_SIZE)


@needs_qemu_img
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_real_qcow2_image_is_accepted(tmp_path: Path, compat: str) -> None:
    image = tmp_path / "plain.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"compat={compat}", str(image), "64M")
    assert detect_format(sample(image)) is ImageFormat.QCOW2


@needs_qemu_img
def test_real_qcow2_overlay_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemu_img("create", "-f", "raw", str(base), "16M")
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    with pytest.raises(ManifestError, match=re.escape(f"backing file '{base}'")):
        detect_format(sample(overlay))


@needs_qemu_img
def test_real_qcow2_with_external_data_file_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data.raw"
    image = tmp_path / "image.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", str(image), "16M")
    with pytest.raises(ManifestError, match=re.escape(f"external data file '{data}'")):
        detect_format(sample(image))


@needs_qemu_img
def test_real_raw_image_is_raw(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    qemu_img("create", "-f", "raw", str(image), "1M")
    assert detect_format(sample(image)) is ImageFormat.RAW
