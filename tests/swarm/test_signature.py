"""Template signatures: the envelope, sign/verify, and every way a signature gets refused."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from vmswarm.swarm.manifest import MIN_CHUNK_SIZE, Manifest, build_manifest
from vmswarm.swarm.signature import (
    DOMAIN,
    KEY_ID_LENGTH,
    MAX_NOT_AFTER,
    ManifestSignature,
    SignatureError,
    TrustPolicy,
    format_time,
    key_id_of,
    public_key_bytes,
    sign_template,
    signed_message,
)

NOW = 1_750_000_000  # a fixed "now": these tests never read the clock
LATER = NOW + 86400


def _key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(random.Random(seed).randbytes(32))


PUBLISHER = _key(1)
STRANGER = _key(2)
PUBLISHER_RAW = public_key_bytes(PUBLISHER.public_key())


def _manifest(seed: int = 0, name: str = "debian", version: str = "12") -> Manifest:
    data = random.Random(seed).randbytes(MIN_CHUNK_SIZE + 100)
    return build_manifest(data, name, version, MIN_CHUNK_SIZE)


MANIFEST = _manifest()
TRUST = TrustPolicy.of([PUBLISHER_RAW])


def _refusal(
    manifest: Manifest,
    signature: ManifestSignature | bytes | None,
    trust: TrustPolicy = TRUST,
    now: float = NOW,
) -> SignatureError:
    with pytest.raises(SignatureError) as info:
        trust.verify(manifest, signature, now)
    message = str(info.value)
    assert "\n" not in message
    assert "debian:12" in message or manifest.name in message  # names the template
    return info.value


def test_a_signed_template_verifies_and_the_manifest_is_untouched() -> None:
    before = (MANIFEST.encode(), MANIFEST.template_id)
    signature = sign_template(PUBLISHER, MANIFEST.template_id, LATER)
    assert signature.key_id == key_id_of(PUBLISHER_RAW)
    assert TRUST.verify(MANIFEST, signature, NOW) == signature
    assert TRUST.verify(MANIFEST, signature.encode(), NOW) == signature
    assert (MANIFEST.encode(), MANIFEST.template_id) == before


def test_the_signed_message_is_prefix_template_id_and_expiry() -> None:
    message = signed_message(MANIFEST.template_id, LATER)
    assert message == DOMAIN + MANIFEST.template_id + LATER.to_bytes(8, "big")
    signature = sign_template(PUBLISHER, MANIFEST.template_id, LATER)
    PUBLISHER.public_key().verify(signature.signature, message)  # raises if not


def test_envelope_round_trips_canonically() -> None:
    signature = sign_template(PUBLISHER, MANIFEST.template_id, LATER)
    encoded = signature.encode()
    assert ManifestSignature.decode(encoded) == signature
    assert ManifestSignature.decode(bytearray(encoded)).encode() == encoded
    assert len(signature.key_id) == KEY_ID_LENGTH


def test_unsigned_is_refused_unless_allowed() -> None:
    error = _refusal(MANIFEST, None)
    assert error.reason == "unsigned"
    assert "unsigned" in str(error) and "--allow-unsigned" in str(error)
    assert TrustPolicy.of([PUBLISHER_RAW], allow_unsigned=True).verify(MANIFEST, None, NOW) is None


def test_a_node_with_no_keys_says_so() -> None:
    error = _refusal(MANIFEST, None, TrustPolicy.of([]))
    assert "no trusted key" in str(error)


def test_allow_unsigned_still_checks_a_signature_that_is_there() -> None:
    lax = TrustPolicy.of([PUBLISHER_RAW], allow_unsigned=True)
    forged = sign_template(STRANGER, MANIFEST.template_id, LATER)
    assert _refusal(MANIFEST, forged, lax).reason == "untrusted_key"
    expired = sign_template(PUBLISHER, MANIFEST.template_id, NOW)
    assert _refusal(MANIFEST, expired, lax).reason == "expired"


def test_a_stranger_key_is_untrusted_and_named() -> None:
    signature = sign_template(STRANGER, MANIFEST.template_id, LATER)
    error = _refusal(MANIFEST, signature)
    assert error.reason == "untrusted_key"
    stranger_id = key_id_of(public_key_bytes(STRANGER.public_key())).hex()
    assert f"untrusted key {stranger_id}" in str(error)
    assert key_id_of(PUBLISHER_RAW).hex() in str(error)  # and which keys are trusted


def test_expiry_is_exclusive_and_reported_in_utc() -> None:
    signature = sign_template(PUBLISHER, MANIFEST.template_id, LATER)
    assert TRUST.verify(MANIFEST, signature, LATER - 0.5) == signature
    error = _refusal(MANIFEST, signature, now=LATER)
    assert error.reason == "expired"
    assert f"expired at {format_time(LATER)}" in str(error)
    assert format_time(LATER) == "2025-06-16T15:06:40Z"


def test_a_signature_for_another_template_does_not_verify() -> None:
    other = _manifest(seed=1, version="13")
    signature = sign_template(PUBLISHER, other.template_id, LATER)
    error = _refusal(MANIFEST, signature)
    assert error.reason == "bad_signature"
    assert "signature does not verify" in str(error)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


@pytest.mark.parametrize("field", ["key_id", "not_after", "signature"])
def test_tampering_with_any_field_is_refused(field: str) -> None:
    good = sign_template(PUBLISHER, MANIFEST.template_id, LATER)
    changes: dict[str, Any] = {
        "key_id": _flip(good.key_id, 0),
        "not_after": good.not_after + 3600,  # stretching the expiry breaks the signature
        "signature": _flip(good.signature, 10),
    }
    tampered = dataclasses.replace(good, **{field: changes[field]})
    reason = _refusal(MANIFEST, tampered.encode()).reason
    assert reason == ("untrusted_key" if field == "key_id" else "bad_signature")


def test_tampering_with_the_manifest_is_refused() -> None:
    signature = sign_template(PUBLISHER, MANIFEST.template_id, LATER)
    renamed = _manifest(name="debian", version="12-evil")
    assert _refusal(renamed, signature).reason == "bad_signature"


def _pack(fields: list[Any]) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


GOOD = sign_template(PUBLISHER, MANIFEST.template_id, LATER)
MALFORMED = [
    b"",
    b"\xc1",
    _pack(["vmswarm-signature", 1, GOOD.key_id, LATER]),
    _pack(["vmswarm-other", 1, GOOD.key_id, LATER, GOOD.signature]),
    _pack(["vmswarm-signature", 2, GOOD.key_id, LATER, GOOD.signature]),
    _pack(["vmswarm-signature", 1, GOOD.key_id[:4], LATER, GOOD.signature]),
    _pack(["vmswarm-signature", 1, GOOD.key_id, -5, GOOD.signature]),
    _pack(["vmswarm-signature", 1, GOOD.key_id, MAX_NOT_AFTER + 1, GOOD.signature]),
    _pack(["vmswarm-signature", 1, GOOD.key_id, float(LATER), GOOD.signature]),
    _pack(["vmswarm-signature", 1, GOOD.key_id, LATER, GOOD.signature[:63]]),
    _pack(["vmswarm-signature", 1, GOOD.key_id.hex(), LATER, GOOD.signature]),
    msgpack.packb({"key_id": GOOD.key_id}, use_bin_type=True),
    GOOD.encode() + b"\x00",
    b"\x00" * 4096,
]


@pytest.mark.parametrize("envelope", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_envelope_is_one_clear_error(envelope: bytes) -> None:
    with pytest.raises(SignatureError) as info:
        ManifestSignature.decode(envelope)
    assert info.value.reason == "malformed"
    error = _refusal(MANIFEST, envelope)
    assert error.reason == "malformed" and "malformed signature" in str(error)


def test_a_non_canonical_envelope_is_refused() -> None:
    # Same values, but not_after as a uint64 where msgpack would pick uint32.
    canonical = GOOD.encode()
    widened = canonical.replace(
        b"\xce" + LATER.to_bytes(4, "big"), b"\xcf" + LATER.to_bytes(8, "big")
    )
    assert widened != canonical
    with pytest.raises(SignatureError, match="canonical"):
        ManifestSignature.decode(widened)


@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_signature_error(data: bytes) -> None:
    try:
        ManifestSignature.decode(data)
    except SignatureError as exc:
        assert exc.reason == "malformed"


def test_several_trusted_keys_each_verify_their_own() -> None:
    both = TrustPolicy.of([PUBLISHER_RAW, public_key_bytes(STRANGER.public_key())])
    for key in (PUBLISHER, STRANGER):
        signature = sign_template(key, MANIFEST.template_id, LATER)
        assert both.verify(MANIFEST, signature, NOW) == signature
    assert both.key_ids == sorted(
        key_id_of(public_key_bytes(k.public_key())).hex() for k in (PUBLISHER, STRANGER)
    )


def test_sign_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError):
        sign_template(PUBLISHER, b"short", LATER)
    with pytest.raises(SignatureError):
        sign_template(PUBLISHER, MANIFEST.template_id, 0)
    with pytest.raises(ValueError):
        key_id_of(b"\x00" * 31)
