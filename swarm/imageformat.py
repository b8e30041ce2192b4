"""Tell raw from qcow2 by the header bytes, and refuse qcow2 images that are not self-contained."""

from __future__ import annotations

import struct
from enum import StrEnum

from .errors import ManifestError

QCOW2_MAGIC = b"QFI\xfb"
# How many leading bytes of an image `detect_format` wants: the backing file name lives in the
# first cluster, and 64 KiB is qcow2's default cluster size.
HEADER_SAMPLE_SIZE = 1 << 16

_V2_HEADER_LENGTH = 72
_V3_HEADER_LENGTH = 104
_INCOMPAT_DATA_FILE = 1 << 2
_EXT_END = 0x00000000
_EXT_DATA_FILE = 0x44415441  # "DATA": the external data file's name
_FLATTEN_HINT = "templates must be self-contained, flatten it with `qemu-img convert`"


class ImageFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


def detect_format(header: bytes | bytearray | memoryview) -> ImageFormat:
    """The image's format from its first bytes (give at least HEADER_SAMPLE_SIZE if it has them).

    Raises ManifestError for a qcow2 image that has a backing file or an external data file,
    or whose header is truncated or of an unknown version.
    """
    head = bytes(header[:HEADER_SAMPLE_SIZE])
    if not head.startswith(QCOW2_MAGIC):
        return ImageFormat.RAW
    check_qcow2_header(head)
    return ImageFormat.QCOW2


def check_qcow2_header(head: bytes) -> None:
    """Validate a qcow2 header (magic already seen); raise ManifestError if it is not a template."""
    if len(head) < _V2_HEADER_LENGTH:
        raise ManifestError(f"qcow2 header truncated: {len(head)} bytes, need {_V2_HEADER_LENGTH}")
    (version,) = struct.unpack_from(">I", head, 4)
    if version not in (2, 3):
        raise ManifestError(f"unsupported qcow2 version {version} (expected 2 or 3)")
    backing_offset, backing_size = struct.unpack_from(">QI", head, 8)
    if backing_offset != 0:
        name = _text_at(head, backing_offset, backing_size)
        what = f"backing file {name!r}" if name is not None else "backing file"
        raise ManifestError(f"qcow2 image has a {what}; {_FLATTEN_HINT}")
    if version == 2:
        return
    if len(head) < _V3_HEADER_LENGTH:
        raise ManifestError(
            f"qcow2 v3 header truncated: {len(head)} bytes, need {_V3_HEADER_LENGTH}"
        )
    (incompatible,) = struct.unpack_from(">Q", head, 72)
    (header_length,) = struct.unpack_from(">I", head, 100)
    if incompatible & _INCOMPAT_DATA_FILE:
        name = _data_file_name(head, header_length)
        what = f"external data file {name!r}" if name is not None else "external data file"
        raise ManifestError(f"qcow2 image has an {what}; {_FLATTEN_HINT}")


def _text_at(head: bytes, offset: int, size: int) -> str | None:
    """The string stored at head[offset:offset+size], or None if it lies past the sample."""
    if size == 0 or offset + size > len(head):
        return None
    return head[offset : offset + size].decode("utf-8", errors="replace")


def _data_file_name(head: bytes, header_length: int) -> str | None:
    """The external data file's name from the header extensions, if they are in the sample."""
    pos = max(header_length, _V3_HEADER_LENGTH)
    while pos + 8 <= len(head):
        ext_type, ext_len = struct.unpack_from(">II", head, pos)
        pos += 8
        if ext_type == _EXT_END:
            return None
        if ext_type == _EXT_DATA_FILE:
            return _text_at(head, pos, ext_len)
        pos += (ext_len + 7) & ~7  # extension data is padded to a multiple of 8
    return None
