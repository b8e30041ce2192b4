"""Manifest building, canonical encoding, and strict decoding."""

from __future__ import annotations

import dataclasses
import itertools
import random
import struct
from typing import Any

import blake3
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.swarm.errors import ManifestError
from vmswarm.swarm.manifest import (
    DEFAULT_CHUNK_SIZE,
    DIGEST_SIZE,
    FORMAT_VERSION,
    MAGIC,
    MAX_CHUNK_SIZE,
    MAX_NAME_BYTES,
    MIN_CHUNK_SIZE,
    ImageFormat,
    Manifest,
    ManifestBuilder,
    build_manifest,
    zero_chunk_digest,
)

CS = MIN_CHUNK_SIZE


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def image(layout: str, *, tail: int = 0, seed: int = 0) -> bytes:
    """One chunk per letter: "d" random data, "z" zeros; `tail` extra random-or-zero bytes."""
    rng = random.Random(seed)
    parts = [bytes(CS) if c == "z" else rng.randbytes(CS) for c in layout]
    if tail:
        parts.append(rng.randbytes(tail))
    return b"".join(parts)


@pytest.fixture
def sample() -> Manifest:
    return build_manifest(image("dzdz", tail=1000), "debian-12", "2024.1", CS)


def fields_of(manifest: Manifest) -> list[Any]:
    decoded = msgpack.unpackb(manifest.encode(), raw=False)
    assert isinstance(decoded, list)
    return decoded


def pack(fields: list[Any]) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


# Building


def test_manifest_describes_the_image() -> None:
    data = image("dzdd", tail=1000)
    manifest = build_manifest(data, "debian-12", "2024.1", CS)
    assert manifest.name == "debian-12"
    assert manifest.version == "2024.1"
    assert manifest.format is ImageFormat.RAW
    assert manifest.size == len(data)
    assert manifest.chunk_size == CS
    assert manifest.chunk_count == 5
    assert manifest.zero_chunks == frozenset({1})
    assert manifest.digest == b3(data)
    for i in range(manifest.chunk_count):
        offset, length = manifest.chunk_range(i)
        assert manifest.chunk_digests[i] == b3(data[offset : offset + length])


def test_chunk_ranges_cover_the_image_and_the_last_is_short(sample: Manifest) -> None:
    ranges = [sample.chunk_range(i) for i in range(sample.chunk_count)]
    assert ranges == [(0, CS), (CS, CS), (2 * CS, CS), (3 * CS, CS), (4 * CS, 1000)]
    for bad in (-1, sample.chunk_count):
        with pytest.raises(IndexError):
            sample.chunk_range(bad)


def test_short_last_chunk_of_zeros_is_a_zero_chunk() -> None:
    data = image("d") + bytes(777)
    manifest = build_manifest(data, "t", "1", CS)
    assert manifest.zero_chunks == frozenset({1})
    assert manifest.chunk_digests[1] == b3(bytes(777))
    assert manifest.is_zero(1)
    assert not manifest.is_zero(0)


def test_image_of_only_zeros_is_all_zero_chunks() -> None:
    manifest = build_manifest(bytes(3 * CS + 5), "t", "1", CS)
    assert manifest.zero_chunks == frozenset(range(4))
    assert manifest.digest == b3(bytes(3 * CS + 5))


def test_empty_image_has_no_chunks() -> None:
    manifest = build_manifest(b"", "t", "1", CS)
    assert manifest.size == 0
    assert manifest.chunk_count == 0
    assert manifest.digest == b3(b"")
    assert Manifest.decode(manifest.encode()) == manifest


def test_chunk_with_a_single_nonzero_byte_is_not_zero() -> None:
    data = bytearray(2 * CS)
    data[CS + CS // 2] = 1
    assert build_manifest(bytes(data), "t", "1", CS).zero_chunks == frozenset({0})


def test_chunk_matches_checks_content_and_length(sample: Manifest) -> None:
    data = image("dzdz", tail=1000)
    assert sample.chunk_matches(0, data[:CS])
    assert sample.chunk_matches(0, memoryview(data)[:CS])
    assert sample.chunk_matches(1, bytearray(CS))
    assert sample.chunk_matches(4, data[4 * CS :])
    assert not sample.chunk_matches(0, data[CS : 2 * CS])
    assert not sample.chunk_matches(1, bytes(CS - 1))
    assert not sample.chunk_matches(4, data[4 * CS :] + b"\0")
    corrupt = bytearray(data[:CS])
    corrupt[5] ^= 1
    assert not sample.chunk_matches(0, corrupt)


def test_default_chunk_size_is_between_one_and_four_mib() -> None:
    assert 1 << 20 <= DEFAULT_CHUNK_SIZE <= 4 << 20
    assert ManifestBuilder().finish("t", "1").chunk_size == DEFAULT_CHUNK_SIZE


@given(
    layout=st.text(alphabet="dz", max_size=6),
    tail=st.integers(0, CS - 1),
    cuts=st.lists(st.integers(0, 7 * CS), max_size=8),
)
@settings(max_examples=60, deadline=None)
def test_any_split_of_the_input_gives_the_same_manifest(
    layout: str, tail: int, cuts: list[int]
) -> None:
    data = image(layout, tail=tail)
    whole = build_manifest(data, "t", "1", CS)
    builder = ManifestBuilder(CS)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    for start, end in itertools.pairwise(bounds):
        builder.update(memoryview(data)[start:end] if start % 2 else data[start:end])
    assert builder.size == len(data)
    assert builder.finish("t", "1") == whole


def test_halves_fed_separately_give_the_same_manifest() -> None:
    data = image("dzd", tail=9)
    builder = ManifestBuilder(CS, multithreaded=False)
    builder.update_whole(data[:100])
    builder.update_whole(data[100:])
    builder.update_chunks(data[: CS + 3])
    builder.update_chunks(data[CS + 3 :])
    assert builder.finish("t", "1") == build_manifest(data, "t", "1", CS)


def test_halves_fed_different_lengths_are_refused() -> None:
    builder = ManifestBuilder(CS)
    builder.update_whole(b"abc")
    builder.update_chunks(b"ab")
    with pytest.raises(ManifestError, match="whole-image hash saw 3 bytes but chunks saw 2"):
        builder.finish("t", "1")


def test_qcow2_overlay_is_refused_as_soon_as_its_header_is_fed() -> None:
    header = bytearray(CS)
    struct.pack_into(">4sIQI", header, 0, b"QFI\xfb", 2, 512, 4)  # v2, backing name at 512
    header[512:516] = b"base"
    builder = ManifestBuilder(CS)
    builder.update(header[: CS - 1])  # not yet the whole sample: no verdict
    with pytest.raises(ManifestError, match="backing file 'base'"):
        builder.update(header[CS - 1 :])


def test_finished_builder_refuses_more() -> None:
    builder = ManifestBuilder(CS)
    builder.update(b"x")
    builder.finish("t", "1")
    with pytest.raises(ManifestError, match="already finished"):
        builder.update(b"y")
    with pytest.raises(ManifestError, match="already finished"):
        builder.finish("t", "1")


@pytest.mark.parametrize(
    ("chunk_size", "message"),
    [
        (3 * CS, "power of two"),
        (0, "power of two"),
        (-CS, "power of two"),
        (CS // 2, "out of range"),
        (MAX_CHUNK_SIZE * 2, "out of range"),
    ],
)
def test_bad_chunk_size_is_refused(chunk_size: int, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        ManifestBuilder(chunk_size)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("x" * (MAX_NAME_BYTES + 1), "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),
        ("bad\nname", "contains control characters"),
    ],
)
def test_bad_name_or_version_is_refused(name: str, message: str) -> None:
    with pytest.raises(ManifestError, match=f"name {message}"):
        build_manifest(b"x", name, "1", CS)
    with pytest.raises(ManifestError, match=f"version {message}"):
        build_manifest(b"x", "t", name, CS)


def test_longest_name_is_accepted() -> None:
    manifest = build_manifest(b"x", "n" * MAX_NAME_BYTES, "ü" * (MAX_NAME_BYTES // 2), CS)
    assert Manifest.decode(manifest.encode()) == manifest


# Encoding


def test_encoding_round_trips(sample: Manifest) -> None:
    decoded = Manifest.decode(sample.encode())
    assert decoded == sample
    assert decoded.template_id == sample.template_id


def test_encoding_is_deterministic() -> None:
    data = image("dzzd", tail=3)
    first = build_manifest(data, "t", "1", CS)
    second = build_manifest(bytearray(data), "t", "1", CS)
    assert first.encode() == second.encode()
    assert first.template_id == second.template_id == b3(first.encode())


def test_encoding_layout(sample: Manifest) -> None:
    fields = fields_of(sample)
    assert fields[:7] == [MAGIC, FORMAT_VERSION, "debian-12", "2024.1", "raw", sample.size, CS]
    assert fields[7] == b"".join(sample.chunk_digests)
    assert fields[8] == bytes([0b01010000])  # chunks 1 and 3 are zero, MSB first
    assert fields[9] == sample.digest


@pytest.mark.parametrize(
    "change",
    [{"name": "other"}, {"version": "2"}, {"format": ImageFormat.QCOW2}],
)
def test_template_id_depends_on_every_field(sample: Manifest, change: dict[str, Any]) -> None:
    changed = dataclasses.replace(sample, **change)
    assert changed.template_id != sample.template_id
    assert Manifest.decode(changed.encode()) == changed


def test_different_chunk_size_gives_a_different_template() -> None:
    data = image("dd")
    assert (
        build_manifest(data, "t", "1", CS).template_id
        != build_manifest(data, "t", "1", 2 * CS).template_id
    )


def test_manifests_are_hashable_values(sample: Manifest) -> None:
    assert len({sample, Manifest.decode(sample.encode())}) == 1


# Decoding: every way a manifest can be wrong


def mutate(sample: Manifest, index: int, value: Any) -> bytes:
    fields = fields_of(sample)
    fields[index] = value
    return pack(fields)


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        (0, "other-manifest", "not a vmswarm manifest"),
        (0, b"vmswarm-manifest", "not a vmswarm manifest"),
        (1, 2, "unsupported manifest format version 2"),
        (1, True, "unsupported manifest format version"),
        (1, "1", "unsupported manifest format version"),
        (2, "", "name must not be empty"),
        (2, 7, "name must be a string"),
        (2, b"debian", "name must be a string"),
        (3, None, "version must be a string"),
        (3, "a\x00b", "version contains control characters"),
        (4, "vmdk", "unknown image format 'vmdk'"),
        (4, 1, "unknown image format"),
        (5, -1, "image size must be in"),
        (5, 1.5, "image size must be in"),
        (5, True, "image size must be in"),
        (5, 2**64 - 1, "image size must be in"),
        (6, 3 * CS, "power of two"),
        (6, CS // 2, "out of range"),
        (6, float(CS), "power of two"),
        (7, b"\x00" * (4 * DIGEST_SIZE), "chunk digests must be 5 x 32 bytes"),
        (7, b"\x00" * (5 * DIGEST_SIZE + 1), "chunk digests must be 5 x 32 bytes"),
        (7, [b"\x00" * DIGEST_SIZE] * 5, "chunk digests must be"),
        (8, b"", "bad zero-chunk bitmap"),
        (8, b"\x50\x00", "bad zero-chunk bitmap"),
        (8, bytes([0b01010100]), "bad zero-chunk bitmap: bitfield has bits set past"),
        (8, [1, 3], "zero-chunk bitmap must be bytes"),
        (8, bytes([0b11010000]), "chunk 0 is marked zero but its digest is not of zeros"),
        (8, bytes([0b00010000]), "chunk 1 has the digest of zeros but is not marked zero"),
        (9, b"\x00" * 31, "image digest is not 32 bytes"),
        (9, "00" * 32, "image digest is not 32 bytes"),
    ],
)
def test_bad_field_is_refused(sample: Manifest, index: int, value: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.decode(mutate(sample, index, value))


def test_size_changing_the_chunk_count_is_refused(sample: Manifest) -> None:
    with pytest.raises(ManifestError, match="chunk digests must be 6 x 32 bytes"):
        Manifest.decode(mutate(sample, 5, sample.size + CS))


def test_size_within_the_last_chunk_changes_its_zero_digest() -> None:
    manifest = build_manifest(image("d") + bytes(100), "t", "1", CS)
    with pytest.raises(ManifestError, match="chunk 1 is marked zero but"):
        Manifest.decode(mutate(manifest, 5, manifest.size + 1))


def test_empty_image_with_a_wrong_digest_is_refused() -> None:
    manifest = build_manifest(b"", "t", "1", CS)
    with pytest.raises(ManifestError, match="empty image has a digest"):
        Manifest.decode(mutate(manifest, 9, b3(b"x")))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (b"\x9a\x01", "not valid msgpack"),
        (msgpack.packb({"magic": MAGIC}), "not valid msgpack"),
        (msgpack.packb(list(range(11))), "not valid msgpack"),
        (msgpack.packb([MAGIC, 1]), "array of 10 fields"),
        (msgpack.packb(MAGIC), "array of 10 fields"),
        (msgpack.packb(None), "array of 10 fields"),
        (b"\xa2\xff\xfe", "not valid msgpack"),
        (msgpack.packb(msgpack.ExtType(1, b"x")), "not valid msgpack"),
        (b"\xdb\xff\xff\xff\xff", "not valid msgpack"),
        (b"\xc6\x7f\xff\xff\xff" + b"x" * 10, "not valid msgpack"),
        (b"\xdd\x7f\xff\xff\xff", "not valid msgpack"),
    ],
)
def test_malformed_msgpack_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.decode(data)


def test_overlong_string_is_refused_before_it_is_decoded(sample: Manifest) -> None:
    with pytest.raises(ManifestError, match="not valid msgpack"):
        Manifest.decode(mutate(sample, 2, "x" * 2000))


def test_trailing_bytes_are_refused(sample: Manifest) -> None:
    with pytest.raises(ManifestError, match="not valid msgpack"):
        Manifest.decode(sample.encode() + b"\x00")


def test_extra_field_is_refused(sample: Manifest) -> None:
    with pytest.raises(ManifestError, match="not valid msgpack"):
        Manifest.decode(pack([*fields_of(sample), 0]))


def encode_parts(fields: list[Any], raw: dict[int, bytes], header: bytes = b"\x9a") -> bytes:
    """The manifest's msgpack by hand, with some fields given as raw (non-canonical) encodings."""
    return header + b"".join(raw.get(i, pack([f])[1:]) for i, f in enumerate(fields))


def test_hand_encoding_matches_when_canonical(sample: Manifest) -> None:
    assert encode_parts(fields_of(sample), {}) == sample.encode()


@pytest.mark.parametrize(
    ("raw", "header"),
    [
        ({1: b"\xcc\x01"}, b"\x9a"),  # uint8 for a fixint
        ({1: b"\xd3" + (1).to_bytes(8, "big")}, b"\x9a"),  # int64 for a fixint
        ({4: b"\xd9\x03raw"}, b"\x9a"),  # str8 for a fixstr
        ({}, b"\xdc\x00\x0a"),  # array16 for a fixarray
        ({9: b"\xc5\x00\x20"}, b"\x9a"),  # bin16 header for a 32-byte bin (patched below)
    ],
)
def test_non_canonical_encoding_is_refused(
    sample: Manifest, raw: dict[int, bytes], header: bytes
) -> None:
    fields = fields_of(sample)
    if 9 in raw:
        raw = {9: raw[9] + sample.digest}
    data = encode_parts(fields, raw, header)
    assert msgpack.unpackb(data, raw=False) == fields  # the same values...
    with pytest.raises(ManifestError, match="not canonically encoded"):
        Manifest.decode(data)  # ...but not the one encoding that names the template


def test_direct_construction_is_validated(sample: Manifest) -> None:
    with pytest.raises(ManifestError, match="needs 5 chunk digests"):
        dataclasses.replace(sample, chunk_digests=sample.chunk_digests[:-1])
    with pytest.raises(ManifestError, match="zero chunk 9 out of range"):
        dataclasses.replace(sample, zero_chunks=frozenset({1, 3, 9}))
    with pytest.raises(ManifestError, match="chunk 2 digest is not 32 bytes"):
        digests = list(sample.chunk_digests)
        digests[2] = digests[2][:-1]
        dataclasses.replace(sample, chunk_digests=tuple(digests))
    with pytest.raises(ManifestError, match="format must be an ImageFormat"):
        dataclasses.replace(sample, format="raw")  # type: ignore[arg-type]


def test_zero_chunk_digest_is_blake3_of_zeros() -> None:
    assert zero_chunk_digest(CS) == b3(bytes(CS))
    assert zero_chunk_digest(5) == b3(bytes(5))


def decodes_canonically_or_refuses(data: bytes) -> None:
    try:
        manifest = Manifest.decode(data)
    except ManifestError:
        return
    assert manifest.encode() == data


FUZZ_BASE = build_manifest(image("dzd", tail=33, seed=7), "fuzz", "1", CS).encode()
EMPTY_BASE = build_manifest(b"", "e", "1", CS).encode()


@given(
    base=st.sampled_from([FUZZ_BASE, EMPTY_BASE]),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4),
)
@settings(max_examples=400, deadline=None)
def test_byte_flips_never_decode_silently(base: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(base)
    for position, xor in flips:
        data[position % len(data)] ^= xor
    decodes_canonically_or_refuses(bytes(data))


@given(base=st.sampled_from([FUZZ_BASE, EMPTY_BASE]), cut=st.integers(0, 10_000))
@settings(max_examples=200, deadline=None)
def test_truncations_are_refused(base: bytes, cut: int) -> None:
    with pytest.raises(ManifestError):
        Manifest.decode(base[: cut % len(base)])


@given(
    position=st.integers(0, 10_000),
    inserted=st.binary(min_size=1, max_size=8),
    removed=st.integers(0, 8),
)
@settings(max_examples=300, deadline=None)
def test_splices_never_decode_silently(position: int, inserted: bytes, removed: int) -> None:
    at = position % (len(FUZZ_BASE) + 1)
    decodes_canonically_or_refuses(FUZZ_BASE[:at] + inserted + FUZZ_BASE[at + removed :])


@given(st.binary(max_size=512))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_decode_silently(data: bytes) -> None:
    decodes_canonically_or_refuses(data)
