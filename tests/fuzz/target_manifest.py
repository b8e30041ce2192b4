"""Fuzz target: Manifest.decode on raw bytes and on structured, nearly-valid field lists.

Properties: only ManifestError escapes; whatever decodes re-encodes byte-identically, decodes
again to an equal manifest, and has consistent chunk digests, zero chunks and template id.
"""

from __future__ import annotations

from typing import Any

from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.errors import ManifestError
from vmswarm.swarm.manifest import (
    DIGEST_SIZE,
    FORMAT_VERSION,
    MAGIC,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ImageFormat,
    Manifest,
    build_manifest,
    digest_of,
    zero_chunk_digest,
)

from .checks import hostile_value, pack, require
from .script import Input, InputWriter

NAME = "manifest"
MAX_LEN = 8192
MODE_RAW, MODE_FIELDS = 0, 1
CHUNK_SIZES = (MIN_CHUNK_SIZE, MIN_CHUNK_SIZE * 2, MAX_CHUNK_SIZE)
# Last-chunk lengths: hashing zeros of a fresh length is costly for 16 MiB chunks, so few.
LAST_LENGTHS = (1, 4096, MIN_CHUNK_SIZE - 1, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE - 1, MAX_CHUNK_SIZE)
MAX_CHUNKS = 40
FORMATS = ("raw", "qcow2", "vmdk")
NAMES = ("debian", "debian-12", "x" * 255, "x" * 256, "", "bad\nname", "\u00e9" * 128, "\x7f")


def fuzz_one(data: bytes) -> str:
    inp = Input(data)
    raw = inp.bytes(inp.remaining()) if inp.int(0, 1) == MODE_RAW else _fields(inp)
    try:
        manifest = Manifest.decode(raw)
    except ManifestError:
        return "refused"
    _check(manifest, raw)
    return "decoded"


def _check(manifest: Manifest, raw: bytes) -> None:
    require(manifest.encode() == raw, "a decoded manifest re-encodes differently")
    again = Manifest.decode(manifest.encode())
    require(again == manifest, "decode(encode(m)) != m")
    require(manifest.template_id == digest_of(raw), "template id is not blake3 of the bytes")
    count = manifest.chunk_count
    require(count == -(-manifest.size // manifest.chunk_size), "chunk count disagrees with size")
    for i in range(count):
        offset, length = manifest.chunk_range(i)
        require(offset == i * manifest.chunk_size and 1 <= length <= manifest.chunk_size, "range")
        zeros = manifest.chunk_digests[i] == zero_chunk_digest(length)
        require(zeros == manifest.is_zero(i), f"chunk {i}: zero mark disagrees with its digest")


def _fields(inp: Input) -> bytes:
    """A manifest's ten fields, each valid most of the time, packed as msgpack."""
    chunk_size = inp.choice(CHUNK_SIZES)
    count = inp.int(0, MAX_CHUNKS)
    last = chunk_size if count == 0 else min(inp.choice(LAST_LENGTHS), chunk_size)
    size = 0 if count == 0 else (count - 1) * chunk_size + last
    digests = []
    zeros = []
    for i in range(count):
        if inp.flag():
            digests.append(zero_chunk_digest(last if i == count - 1 else chunk_size))
            zeros.append(i)
        else:
            digests.append(inp.bytes(DIGEST_SIZE).ljust(DIGEST_SIZE, b"\x01"))
    bits = Bitfield.from_indices(count, zeros).to_bytes()
    if inp.int(0, 7) == 0 and bits:
        spot = inp.int(0, len(bits) - 1)
        bits = bits[:spot] + bytes([inp.int(0, 255)]) + bits[spot + 1 :]
    digest = digest_of(b"") if size == 0 else inp.bytes(DIGEST_SIZE).ljust(DIGEST_SIZE, b"\x02")
    fields: list[Any] = [
        MAGIC,
        FORMAT_VERSION,
        inp.choice(NAMES),
        inp.choice(NAMES),
        inp.choice(FORMATS),
        size,
        chunk_size,
        b"".join(digests),
        bits,
        digest,
    ]
    # Break some fields: wrong types, off-by-one sizes, hostile values.
    for _ in range(inp.int(0, 3)):
        spot = inp.int(0, len(fields) - 1)
        fields[spot] = _break(inp, fields[spot])
    shape = inp.int(0, 15)
    if shape == 0:
        fields.append(hostile_value(inp))
    elif shape == 1:
        fields.pop()
    elif shape == 2:
        return pack(hostile_value(inp))
    packed = pack(fields)
    if inp.int(0, 15) == 0:
        packed += inp.sized_bytes(8)  # trailing bytes
    return packed


def _break(inp: Input, value: Any) -> Any:
    how = inp.int(0, 3)
    if how == 0 and isinstance(value, int):
        return value + inp.int(-1, 1)
    if how == 1 and isinstance(value, bytes) and value:
        return value[:-1] if inp.flag() else value + b"\x00"
    if how == 2 and isinstance(value, str):
        return value.encode()
    return hostile_value(inp)


def _image(pieces: list[bytes]) -> bytes:
    return b"".join(pieces)


def seeds() -> list[bytes]:
    """Real encoded manifests (raw mode) and field scripts for valid ones (structured mode)."""
    chunk = MIN_CHUNK_SIZE
    images = [
        (b"", chunk),
        (b"a", chunk),
        (_image([b"x" * chunk, bytes(chunk), b"y" * 100]), chunk),
        (_image([bytes(chunk), bytes(chunk), b"z" * chunk, bytes(10)]), chunk),
        (_image([b"q" * (chunk * 2), bytes(chunk * 2)]), chunk * 2),
    ]
    out = []
    for image, chunk_size in images:
        manifest = build_manifest(image, "debian", "12.5", chunk_size)
        out.append(InputWriter().bytes(manifest.encode()).int(0, 1, MODE_RAW).build())
    qcow = Manifest(
        name="cirros",
        version="0.6",
        format=ImageFormat.QCOW2,
        size=chunk + 1,
        chunk_size=chunk,
        chunk_digests=(b"\x05" * 32, zero_chunk_digest(1)),
        zero_chunks=frozenset({1}),
        digest=b"\x06" * 32,
    )
    out.append(InputWriter().bytes(qcow.encode()).int(0, 1, MODE_RAW).build())
    # Structured: three chunks, the middle one zeros, a short last one; nothing broken.
    writer = InputWriter().int(0, 1, MODE_FIELDS).choice(CHUNK_SIZES, chunk).int(0, MAX_CHUNKS, 3)
    writer.choice(LAST_LENGTHS, 4096)
    writer.flag(False).bytes(b"\x11" * 32).flag(True).flag(False).bytes(b"\x12" * 32)
    writer.int(0, 7, 1).bytes(b"\x13" * 32)
    writer.choice(NAMES, "debian").choice(NAMES, "debian-12").choice(
        ("raw", "qcow2", "vmdk"), "raw"
    )
    writer.int(0, 3, 0).int(0, 15, 15).int(0, 15, 15)
    out.append(writer.build())
    return out


DICTIONARY = [MAGIC.encode(), b"\x9a", b"\xb0vmswarm-manifest", b"\xc4\x20", b"\xc5", b"\xa3raw"]
