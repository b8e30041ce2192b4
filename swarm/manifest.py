"""The template manifest: chunk digests, zero chunks and whole-image digest, canonical msgpack."""

from __future__ import annotations

import functools
import reprlib
from dataclasses import dataclass
from typing import Any

import blake3
import msgpack

from .bitfield import Bitfield
from .errors import ManifestError
from .imageformat import HEADER_SAMPLE_SIZE, ImageFormat, detect_format

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DIGEST_SIZE",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MAX_IMAGE_SIZE",
    "MAX_NAME_BYTES",
    "MIN_CHUNK_SIZE",
    "ImageFormat",
    "Manifest",
    "ManifestBuilder",
    "build_manifest",
    "check_chunk_size",
    "digest_of",
    "zero_chunk_digest",
]

MIN_CHUNK_SIZE = 1 << 16
MAX_CHUNK_SIZE = 1 << 24
# 2 MiB, from bench/manifest_rate.py (1 GiB, half zeros in 4-12 MiB runs): against 4 MiB it finds
# 50% more zero bytes to never send (378 vs 252 MiB) and builds ~10% faster per CPU-second (fewer
# chunks to hash); 1 MiB finds more still, but 2 MiB keeps manifests half as big (16 KiB per GiB,
# so a 64 GiB image's manifest fits a 1 MiB control frame) and halves the requests.
DEFAULT_CHUNK_SIZE = 1 << 21
DIGEST_SIZE = 32
# Caps the image size so a manifest's chunk count stays representable everywhere (1 EiB).
MAX_IMAGE_SIZE = 1 << 60
MAX_NAME_BYTES = 255  # for both the name and the version, in UTF-8 bytes

MAGIC = "vmswarm-manifest"
FORMAT_VERSION = 1
_FIELD_COUNT = 10
# Strings in a manifest are the magic, the format and the name/version; none is longer than this.
_MAX_STR_BYTES = 1024


def digest_of(data: bytes | bytearray | memoryview) -> bytes:
    """The blake3 digest of `data`, on this thread only.

    Chunks are verified while other threads receive and write; blake3's own thread pool would
    spin against them for the same cores.
    """
    return blake3.blake3(data).digest()


@functools.lru_cache(maxsize=16)
def zero_chunk_digest(length: int) -> bytes:
    """The blake3 digest of `length` zero bytes (cached: manifests use at most two lengths)."""
    return digest_of(bytes(length))


# reprlib stops at a few levels: repr() of a 1000-deep decoded list raises RecursionError.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 40
_FORMATS = frozenset(f.value for f in ImageFormat)


def _show(value: object) -> str:
    """A short repr of a decoded value for an error message, whatever its size or depth."""
    return _SHORT_REPR.repr(value)[:40]


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def check_chunk_size(chunk_size: object) -> int:
    """`chunk_size` if it is a valid chunk size, else ManifestError."""
    if type(chunk_size) is not int or not _is_power_of_two(chunk_size):
        raise ManifestError(f"chunk size must be a power of two, got {_show(chunk_size)}")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ManifestError(
            f"chunk size {chunk_size} out of range {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"
        )
    return chunk_size


def _check_label(what: str, value: object) -> str:
    if type(value) is not str:
        raise ManifestError(f"manifest {what} must be a string, got {type(value).__name__}")
    if not value:
        raise ManifestError(f"manifest {what} must not be empty")
    if len(value.encode("utf-8", errors="surrogatepass")) > MAX_NAME_BYTES:
        raise ManifestError(f"manifest {what} longer than {MAX_NAME_BYTES} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ManifestError(f"manifest {what} contains control characters: {value!r:.80}")
    return value


@dataclass(frozen=True)
class Manifest:
    """What a template is made of; construct through ManifestBuilder or `decode`."""

    name: str
    version: str
    format: ImageFormat
    size: int
    chunk_size: int
    chunk_digests: tuple[bytes, ...]
    zero_chunks: frozenset[int]
    digest: bytes

    def __post_init__(self) -> None:
        _check_label("name", self.name)
        _check_label("version", self.version)
        if not isinstance(self.format, ImageFormat):
            raise ManifestError(f"manifest format must be an ImageFormat, got {self.format!r:.40}")
        if type(self.size) is not int or not 0 <= self.size <= MAX_IMAGE_SIZE:
            raise ManifestError(f"image size must be in 0..{MAX_IMAGE_SIZE}, got {self.size!r:.40}")
        chunk_size = check_chunk_size(self.chunk_size)
        count = -(-self.size // chunk_size)
        if not isinstance(self.chunk_digests, tuple) or len(self.chunk_digests) != count:
            raise ManifestError(
                f"{self.size}-byte image in {chunk_size}-byte chunks needs {count} chunk digests"
            )
        for i, chunk_digest in enumerate(self.chunk_digests):
            if type(chunk_digest) is not bytes or len(chunk_digest) != DIGEST_SIZE:
                raise ManifestError(f"chunk {i} digest is not {DIGEST_SIZE} bytes")
        if not isinstance(self.zero_chunks, frozenset):
            raise ManifestError("zero chunks must be a frozenset of chunk indices")
        for i in self.zero_chunks:
            if type(i) is not int or not 0 <= i < count:
                raise ManifestError(f"zero chunk {i!r:.40} out of range 0..{count - 1}")
        self._check_zero_digests(count)
        if type(self.digest) is not bytes or len(self.digest) != DIGEST_SIZE:
            raise ManifestError(f"image digest is not {DIGEST_SIZE} bytes")
        if self.size == 0 and self.digest != digest_of(b""):
            raise ManifestError("empty image has a digest other than blake3 of nothing")

    def _check_zero_digests(self, count: int) -> None:
        """Zero chunks carry the zeros digest, and only they do (one manifest per image)."""
        if count == 0:
            return
        full = zero_chunk_digest(self.chunk_size)
        last_length = self.size - (count - 1) * self.chunk_size
        last = zero_chunk_digest(last_length)
        for i, chunk_digest in enumerate(self.chunk_digests):
            zeros = last if i == count - 1 else full
            if (chunk_digest == zeros) != (i in self.zero_chunks):
                if i in self.zero_chunks:
                    raise ManifestError(f"chunk {i} is marked zero but its digest is not of zeros")
                raise ManifestError(f"chunk {i} has the digest of zeros but is not marked zero")

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_digests)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk `index` in the image; the last chunk may be short."""
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"chunk {index} out of range 0..{self.chunk_count - 1}")
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def is_zero(self, index: int) -> bool:
        self.chunk_range(index)  # range check
        return index in self.zero_chunks

    def chunk_matches(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """True if `data` is exactly chunk `index` (length and blake3 digest)."""
        _, length = self.chunk_range(index)
        return len(data) == length and digest_of(data) == self.chunk_digests[index]

    @functools.cached_property
    def _encoded(self) -> bytes:
        fields = [
            MAGIC,
            FORMAT_VERSION,
            self.name,
            self.version,
            self.format.value,
            self.size,
            self.chunk_size,
            b"".join(self.chunk_digests),
            Bitfield.from_indices(self.chunk_count, self.zero_chunks).to_bytes(),
            self.digest,
        ]
        return msgpack.packb(fields, use_bin_type=True)

    def encode(self) -> bytes:
        """Canonical msgpack: equal manifests always give equal bytes."""
        return self._encoded

    @functools.cached_property
    def template_id(self) -> bytes:
        """blake3 of the encoded manifest: names the template everywhere."""
        return digest_of(self._encoded)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Manifest:
        """Parse and validate an encoded manifest; anything wrong raises ManifestError."""
        raw = bytes(data)
        try:
            fields = msgpack.unpackb(
                raw,
                raw=False,
                strict_map_key=True,
                use_list=True,
                max_str_len=_MAX_STR_BYTES,
                max_bin_len=len(raw),
                max_array_len=_FIELD_COUNT,
                max_map_len=0,
                max_ext_len=0,
            )
        except (ValueError, msgpack.UnpackException) as exc:
            raise ManifestError(f"manifest is not valid msgpack: {exc}") from None
        manifest = cls._from_fields(fields)
        if manifest.encode() != raw:
            raise ManifestError("manifest is not canonically encoded")
        return manifest

    @classmethod
    def _from_fields(cls, fields: Any) -> Manifest:
        if type(fields) is not list or len(fields) != _FIELD_COUNT:
            raise ManifestError(f"manifest must be a msgpack array of {_FIELD_COUNT} fields")
        magic, version, name, label, fmt, size, chunk_size, digests, zeros, digest = fields
        if magic != MAGIC:
            raise ManifestError(f"not a vmswarm manifest (magic {_show(magic)})")
        if type(version) is not int or version != FORMAT_VERSION:
            raise ManifestError(f"unsupported manifest format version {_show(version)}")
        # Only a str can name a format; ImageFormat(x) would put repr(x) of others in its error.
        if type(fmt) is not str or fmt not in _FORMATS:
            raise ManifestError(f"unknown image format {_show(fmt)}")
        image_format = ImageFormat(fmt)
        chunk_size = check_chunk_size(chunk_size)
        if type(size) is not int or not 0 <= size <= MAX_IMAGE_SIZE:
            raise ManifestError(f"image size must be in 0..{MAX_IMAGE_SIZE}, got {_show(size)}")
        count = -(-size // chunk_size)
        if type(digests) is not bytes or len(digests) != count * DIGEST_SIZE:
            raise ManifestError(f"chunk digests must be {count} x {DIGEST_SIZE} bytes")
        if type(zeros) is not bytes:
            raise ManifestError("zero-chunk bitmap must be bytes")
        try:
            zero_field = Bitfield(count, zeros)
        except ValueError as exc:
            raise ManifestError(f"bad zero-chunk bitmap: {exc}") from None
        return cls(
            name=name,
            version=label,
            format=image_format,
            size=size,
            chunk_size=chunk_size,
            chunk_digests=tuple(
                digests[i : i + DIGEST_SIZE] for i in range(0, len(digests), DIGEST_SIZE)
            ),
            zero_chunks=frozenset(zero_field),
            digest=digest,
        )


class ManifestBuilder:
    """Feed an image's bytes in any pieces with `update`, then `finish` to get its Manifest."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, *, multithreaded: bool = True) -> None:
        self._chunk_size = check_chunk_size(chunk_size)
        # Single-threaded hashing is for callers that run the two update halves on two threads.
        self._threads = blake3.blake3.AUTO if multithreaded else 1
        self._whole = blake3.blake3(max_threads=self._threads)
        self._whole_size = 0
        self._zeros = bytes(chunk_size)  # compared against with startswith (a memcmp)
        self._pending = bytearray()  # the current partial chunk
        self._head = bytearray()  # the image's first bytes, for format detection
        self._format: ImageFormat | None = None
        self._digests: list[bytes] = []
        self._zero_chunks: list[int] = []
        self._size = 0
        self._finished = False

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Feed the image's next bytes."""
        self.update_whole(data)
        self.update_chunks(data)

    def update_whole(self, data: bytes | bytearray | memoryview) -> None:
        """The whole-image half of `update`; may run on another thread than `update_chunks`."""
        if self._finished:
            raise ManifestError("manifest builder already finished")
        view = memoryview(data).cast("B")
        self._whole_size += len(view)
        self._whole.update(view)

    def update_chunks(self, data: bytes | bytearray | memoryview) -> None:
        """The per-chunk half of `update`: each half must see every byte, in order."""
        if self._finished:
            raise ManifestError("manifest builder already finished")
        view = memoryview(data).cast("B")
        if not view:
            return
        self._size += len(view)
        if self._format is None:
            self._head += view[: HEADER_SAMPLE_SIZE - len(self._head)]
            if len(self._head) == HEADER_SAMPLE_SIZE:
                self._format = detect_format(self._head)  # refuse an overlay before hashing it
        pos = 0
        chunk_size = self._chunk_size
        if self._pending:
            pos = min(chunk_size - len(self._pending), len(view))
            self._pending += view[:pos]
            if len(self._pending) == chunk_size:
                self._add_chunk(self._pending)
                self._pending.clear()
        end = len(view)
        while end - pos >= chunk_size:
            self._add_chunk(view[pos : pos + chunk_size])  # whole chunks straight from the caller
            pos += chunk_size
        if pos < end:
            self._pending += view[pos:]

    def _add_chunk(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._zeros.startswith(chunk):
            self._zero_chunks.append(len(self._digests))
            self._digests.append(zero_chunk_digest(len(chunk)))
        else:
            self._digests.append(blake3.blake3(chunk, max_threads=self._threads).digest())

    def finish(self, name: str, version: str) -> Manifest:
        """The manifest of everything fed; raises ManifestError if the image can't be a template."""
        if self._finished:
            raise ManifestError("manifest builder already finished")
        self._finished = True
        if self._whole_size != self._size:
            raise ManifestError(
                f"whole-image hash saw {self._whole_size} bytes but chunks saw {self._size}"
            )
        if self._pending:
            self._add_chunk(self._pending)
            self._pending = bytearray()
        return Manifest(
            name=name,
            version=version,
            format=self._format or detect_format(self._head),
            size=self._size,
            chunk_size=self._chunk_size,
            chunk_digests=tuple(self._digests),
            zero_chunks=frozenset(self._zero_chunks),
            digest=self._whole.digest(),
        )


def build_manifest(
    data: bytes | bytearray | memoryview,
    name: str,
    version: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Manifest:
    """The manifest of an image held in memory."""
    builder = ManifestBuilder(chunk_size)
    builder.update(data)
    return builder.finish(name, version)
