"""Ed25519 signatures over templates: the envelope, signing, and the trust check.

The signature travels beside the manifest and never changes it, so the template id stays the
blake3 of the manifest's bytes. What is signed is a domain-separation prefix, the template id
and the expiry (`not_after`, Unix seconds): a signature for a template can't be replayed for
another, nor be read as any other kind of vmswarm signature, and it stops counting at
`not_after`. Keys are named by a short id (the first bytes of blake3 of the raw public key).
Pure computation: the caller passes `now` and loads keys from files.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import blake3
import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .manifest import Manifest
from .packed_record import unpack_record

__all__ = [
    "DOMAIN",
    "KEY_ID_LENGTH",
    "MAX_NOT_AFTER",
    "PUBLIC_KEY_LENGTH",
    "SIGNATURE_LENGTH",
    "ManifestSignature",
    "SignatureError",
    "TrustPolicy",
    "format_time",
    "key_id_of",
    "public_key_bytes",
    "sign_template",
    "signed_message",
]

# Signed before everything else, so no other message vmswarm ever signs can be mistaken for this.
DOMAIN = b"vmswarm template signature v1\x00"
ENVELOPE_MAGIC = "vmswarm-signature"
ENVELOPE_VERSION = 1
_ENVELOPE_FIELDS = 5
KEY_ID_LENGTH = 8
PUBLIC_KEY_LENGTH = 32
SIGNATURE_LENGTH = 64
TEMPLATE_ID_LENGTH = 32
# 9999-12-31T23:59:59Z: the last instant a datetime can print ("--valid-for never" signs this).
MAX_NOT_AFTER = 253_402_300_799
# The envelope is ~100 bytes; anything far larger is not one.
MAX_ENVELOPE_BYTES = 512

# Why a signature check refused a template (SignatureError.reason).
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
UNTRUSTED_KEY = "untrusted_key"
EXPIRED = "expired"
MALFORMED = "malformed"


class SignatureError(ValueError):
    """A template's signature is missing, malformed, wrong, untrusted or expired; says which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def format_time(timestamp: int | float) -> str:
    """Unix seconds as UTC ISO 8601, e.g. 2026-03-01T12:00:00Z."""
    moment = datetime.datetime.fromtimestamp(int(timestamp), tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id_of(public_key: bytes) -> bytes:
    """A public key's short id: the first 8 bytes of blake3 of its 32 raw bytes."""
    if type(public_key) is not bytes or len(public_key) != PUBLIC_KEY_LENGTH:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_LENGTH} raw bytes")
    return blake3.blake3(public_key).digest()[:KEY_ID_LENGTH]


def _check_not_after(not_after: object) -> int:
    if type(not_after) is not int or not 0 < not_after <= MAX_NOT_AFTER:
        raise SignatureError(
            MALFORMED, f"signature expiry must be Unix seconds in 1..{MAX_NOT_AFTER}"
        )
    return not_after


def signed_message(template_id: bytes, not_after: int) -> bytes:
    """The exact bytes an Ed25519 signature covers: DOMAIN, template id, expiry (u64 BE)."""
    if type(template_id) is not bytes or len(template_id) != TEMPLATE_ID_LENGTH:
        raise ValueError(f"a template id is {TEMPLATE_ID_LENGTH} bytes")
    return DOMAIN + template_id + struct.pack(">Q", _check_not_after(not_after))


@dataclass(frozen=True)
class ManifestSignature:
    """Who signed a template (key id), until when it holds, and the Ed25519 signature."""

    key_id: bytes
    not_after: int
    signature: bytes

    def __post_init__(self) -> None:
        if type(self.key_id) is not bytes or len(self.key_id) != KEY_ID_LENGTH:
            raise SignatureError(MALFORMED, f"signature key id must be {KEY_ID_LENGTH} bytes")
        _check_not_after(self.not_after)
        if type(self.signature) is not bytes or len(self.signature) != SIGNATURE_LENGTH:
            raise SignatureError(MALFORMED, f"signature must be {SIGNATURE_LENGTH} bytes")

    @property
    def expires(self) -> str:
        return format_time(self.not_after)

    def encode(self) -> bytes:
        """Canonical msgpack: [magic, version, key id, not_after, signature]."""
        fields = [ENVELOPE_MAGIC, ENVELOPE_VERSION, self.key_id, self.not_after, self.signature]
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> ManifestSignature:
        """Parse an envelope; anything wrong raises SignatureError (reason "malformed")."""
        raw = bytes(data)
        if len(raw) > MAX_ENVELOPE_BYTES:
            raise SignatureError(MALFORMED, f"signature envelope larger than {MAX_ENVELOPE_BYTES}")
        try:
            fields = unpack_record(
                raw, fields=_ENVELOPE_FIELDS, max_bin=SIGNATURE_LENGTH, what="signature"
            )
        except ValueError as exc:
            raise SignatureError(MALFORMED, str(exc)) from None
        magic, version, key_id, not_after, signature = fields
        if magic != ENVELOPE_MAGIC:
            raise SignatureError(MALFORMED, f"not a vmswarm signature (magic {magic!r:.40})")
        if type(version) is not int or version != ENVELOPE_VERSION:
            raise SignatureError(MALFORMED, f"unsupported signature version {version!r:.40}")
        envelope = cls(key_id, not_after, signature)
        if envelope.encode() != raw:
            raise SignatureError(MALFORMED, "signature is not canonically encoded")
        return envelope


def sign_template(
    private_key: Ed25519PrivateKey, template_id: bytes, not_after: int
) -> ManifestSignature:
    """Sign `template_id` with `private_key`, valid until `not_after` (Unix seconds)."""
    key_id = key_id_of(public_key_bytes(private_key.public_key()))
    signature = private_key.sign(signed_message(template_id, not_after))
    return ManifestSignature(key_id, not_after, signature)


def _label(manifest: Manifest) -> str:
    return f"template {manifest.name}:{manifest.version} ({manifest.template_id.hex()[:16]})"


@dataclass(frozen=True)
class TrustPolicy:
    """The public keys a node trusts (by key id) and whether it takes unsigned templates.

    `allow_unsigned` only lets templates without a signature through: a signature that is there
    is always checked, so a wrong, untrusted or expired one is refused either way.
    """

    keys: Mapping[bytes, Ed25519PublicKey]
    allow_unsigned: bool = False

    @classmethod
    def of(cls, public_keys: Iterable[bytes], *, allow_unsigned: bool = False) -> TrustPolicy:
        """A policy trusting these raw 32-byte Ed25519 public keys."""
        keys = {key_id_of(raw): Ed25519PublicKey.from_public_bytes(raw) for raw in public_keys}
        return cls(MappingProxyType(keys), allow_unsigned)

    @property
    def key_ids(self) -> list[str]:
        return sorted(key_id.hex() for key_id in self.keys)

    def verify(
        self,
        manifest: Manifest,
        signature: ManifestSignature | bytes | None,
        now: float,
    ) -> ManifestSignature | None:
        """The template's checked signature (None: unsigned and allowed); else SignatureError.

        The error's message is one line naming the template and saying why it is refused.
        """
        label = _label(manifest)
        if signature is None:
            if self.allow_unsigned:
                return None
            hint = "" if self.keys else "; no trusted key is configured (--trusted-key)"
            raise SignatureError(
                UNSIGNED,
                f"{label} is unsigned and unsigned templates are not allowed (sign it with "
                f"`vmswarm publish --sign-key`, or run with --allow-unsigned){hint}",
            )
        if not isinstance(signature, ManifestSignature):
            try:
                signature = ManifestSignature.decode(signature)
            except SignatureError as exc:
                raise SignatureError(MALFORMED, f"{label}: malformed signature: {exc}") from None
        key = self.keys.get(signature.key_id)
        if key is None:
            trusted = ", ".join(self.key_ids) or "none"
            raise SignatureError(
                UNTRUSTED_KEY,
                f"{label} is signed by an untrusted key {signature.key_id.hex()} "
                f"(trusted: {trusted})",
            )
        try:
            key.verify(
                signature.signature, signed_message(manifest.template_id, signature.not_after)
            )
        except InvalidSignature:
            raise SignatureError(
                BAD_SIGNATURE,
                f"{label}: signature does not verify with key {signature.key_id.hex()}",
            ) from None
        if now >= signature.not_after:
            raise SignatureError(
                EXPIRED,
                f"{label}: signature by key {signature.key_id.hex()} expired at "
                f"{signature.expires}",
            )
        return signature
