"""Prefetch profiles: recording first reads, the digest-checked encoding and its refusals."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from vmswarm.swarm.manifest import MIN_CHUNK_SIZE, build_manifest
from vmswarm.swarm.prefetch import (
    MAGIC,
    MAX_PROFILE_BYTES,
    MAX_PROFILE_CHUNKS,
    VERSION,
    PrefetchProfile,
    ProfileError,
    ProfileRecorder,
    decode_profile,
    encode_profile,
    profile_digest,
)

TID = bytes(range(32))
OTHER = bytes(32)


def envelope(template_id: bytes, order: list[int], digest: bytes | None = None) -> bytes:
    """A profile built by hand, with the right digest unless one is given."""
    packed = struct.pack(f">{len(order)}I", *order)
    if digest is None:
        digest = profile_digest(template_id, packed)
    return msgpack.packb([MAGIC, VERSION, template_id, packed, digest], use_bin_type=True)


def test_round_trip_with_a_template_id_and_chunk_count() -> None:
    profile = PrefetchProfile(TID, (7, 0, 3, 9))
    data = encode_profile(profile)
    assert decode_profile(data, (TID, 10)) == profile
    assert len(profile) == 4
    assert encode_profile(profile) == data  # canonical


def test_round_trip_against_a_manifest() -> None:
    rng = random.Random(1)
    manifest = build_manifest(
        rng.randbytes(3 * MIN_CHUNK_SIZE), "debian", "12", chunk_size=MIN_CHUNK_SIZE
    )
    profile = PrefetchProfile(manifest.template_id, (2, 0))
    assert decode_profile(encode_profile(profile), manifest) == profile
    with pytest.raises(ProfileError, match=r"out of range 0\.\.2"):
        decode_profile(encode_profile(PrefetchProfile(manifest.template_id, (3,))), manifest)


def test_empty_profile_is_valid() -> None:
    assert decode_profile(encode_profile(PrefetchProfile(TID, ())), (TID, 0)).order == ()


@given(st.lists(st.integers(0, 999), unique=True, max_size=200))
def test_any_order_round_trips(order: list[int]) -> None:
    profile = PrefetchProfile(TID, tuple(order))
    assert decode_profile(encode_profile(profile), (TID, 1000)) == profile


def test_wrong_digest_is_refused() -> None:
    good = envelope(TID, [1, 2])
    assert decode_profile(good, (TID, 5)).order == (1, 2)
    with pytest.raises(ProfileError, match="digest does not match"):
        decode_profile(envelope(TID, [1, 2], digest=bytes(32)), (TID, 5))
    # The digest binds the order: swapping entries breaks it.
    swapped = envelope(TID, [2, 1], digest=profile_digest(TID, struct.pack(">2I", 1, 2)))
    with pytest.raises(ProfileError, match="digest does not match"):
        decode_profile(swapped, (TID, 5))


def test_a_flipped_byte_is_refused() -> None:
    data = bytearray(encode_profile(PrefetchProfile(TID, (4, 1, 2))))
    data[-40] ^= 1  # inside the packed order
    with pytest.raises(ProfileError):
        decode_profile(bytes(data), (TID, 5))


def test_a_profile_of_another_template_is_refused() -> None:
    data = encode_profile(PrefetchProfile(OTHER, (1,)))
    with pytest.raises(ProfileError, match=f"profile is for template {OTHER.hex()}, not"):
        decode_profile(data, (TID, 5))
    # The digest covers the template id: relabelling a profile breaks it.
    packed = struct.pack(">I", 1)
    relabelled = envelope(TID, [1], digest=profile_digest(OTHER, packed))
    with pytest.raises(ProfileError, match="digest does not match"):
        decode_profile(relabelled, (TID, 5))


@pytest.mark.parametrize(
    ("order", "chunks", "why"),
    [
        ([5], 5, r"out of range 0\.\.4"),
        ([0, 1, 0], 5, "more than once"),
        ([0, 1, 2], 2, "lists 3 chunks, the template has 2"),
    ],
)
def test_bad_indices_are_refused(order: list[int], chunks: int, why: str) -> None:
    with pytest.raises(ProfileError, match=why):
        decode_profile(envelope(TID, order), (TID, chunks))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([MAGIC, VERSION]), "array of 5 fields"),
        (msgpack.packb({"a": 1}), "not valid msgpack|array of 5 fields"),
        (msgpack.packb(["vmswarm-manifest", VERSION, TID, b"", bytes(32)]), "not a vmswarm"),
        (msgpack.packb([MAGIC, 2, TID, b"", bytes(32)]), "unsupported profile version"),
        (msgpack.packb([MAGIC, VERSION, b"short", b"", bytes(32)]), "template id must be 32"),
        (msgpack.packb([MAGIC, VERSION, TID, b"\x00\x01\x02", bytes(32)]), "4 per chunk index"),
        (msgpack.packb([MAGIC, VERSION, TID, [1, 2], bytes(32)]), "must be bytes"),
    ],
)
def test_malformed_profiles_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(ProfileError, match=why):
        decode_profile(data, (TID, 5))


def test_non_canonical_encoding_is_refused() -> None:
    packed = struct.pack(">I", 1)
    # The version as a 2-byte uint instead of a fixint: same values, other bytes.
    data = (
        b"\x95"
        + msgpack.packb(MAGIC)
        + b"\xcd\x00\x01"
        + msgpack.packb(TID, use_bin_type=True)
        + msgpack.packb(packed, use_bin_type=True)
        + msgpack.packb(profile_digest(TID, packed), use_bin_type=True)
    )
    with pytest.raises(ProfileError, match="not canonically encoded"):
        decode_profile(data, (TID, 5))


def test_oversize_profiles_are_refused() -> None:
    with pytest.raises(ProfileError, match=f"larger than {MAX_PROFILE_BYTES}"):
        decode_profile(bytes(MAX_PROFILE_BYTES + 1), (TID, 5))
    with pytest.raises(ProfileError, match=f"at most {MAX_PROFILE_CHUNKS}"):
        PrefetchProfile(TID, tuple(range(MAX_PROFILE_CHUNKS + 1)))
    # The largest profile allowed still fits the byte cap.
    biggest = encode_profile(PrefetchProfile(TID, tuple(range(MAX_PROFILE_CHUNKS))))
    assert len(biggest) <= MAX_PROFILE_BYTES
    assert len(decode_profile(biggest, (TID, MAX_PROFILE_CHUNKS))) == MAX_PROFILE_CHUNKS


def test_profile_checks_its_fields() -> None:
    with pytest.raises(ProfileError, match="template id must be 32"):
        PrefetchProfile(b"x", ())
    with pytest.raises(ProfileError, match="more than once"):
        PrefetchProfile(TID, (1, 1))
    with pytest.raises(ProfileError, match="not a u32"):
        PrefetchProfile(TID, (-1,))
    with pytest.raises(ProfileError, match="must be a tuple"):
        PrefetchProfile(TID, [1])  # type: ignore[arg-type]


# --- recorder ---


def test_recorder_keeps_first_reads_in_order() -> None:
    recorder = ProfileRecorder(10)
    assert recorder.read(5)
    assert recorder.read(2)
    assert not recorder.read(5)  # a re-read changes nothing
    assert recorder.read_span(1, 3) == 2  # 1 and 3 are new, 2 was read
    assert len(recorder) == 4
    profile = recorder.profile(TID)
    assert profile == PrefetchProfile(TID, (5, 2, 1, 3))
    assert decode_profile(encode_profile(profile), (TID, 10)) == profile


def test_recorder_refuses_out_of_range_reads() -> None:
    recorder = ProfileRecorder(3)
    with pytest.raises(IndexError):
        recorder.read(3)
    with pytest.raises(IndexError):
        recorder.read(-1)
    with pytest.raises(ValueError, match="chunk count"):
        ProfileRecorder(-1)


def test_recorder_memory_is_bounded_by_the_profile_cap() -> None:
    recorder = ProfileRecorder(MAX_PROFILE_CHUNKS + 10)
    assert recorder.read_span(0, MAX_PROFILE_CHUNKS - 1) == MAX_PROFILE_CHUNKS
    assert recorder.full
    assert not recorder.read(MAX_PROFILE_CHUNKS + 5)
    assert len(recorder) == MAX_PROFILE_CHUNKS
    data = encode_profile(recorder.profile(TID))
    assert len(data) <= MAX_PROFILE_BYTES
