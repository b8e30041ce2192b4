"""Prefetch profiles (VMTorrent's profile-based prefetch): the order a boot first read chunks.

A host records, during a streaming boot, the order in which the guest first touched each chunk
(`ProfileRecorder`); the profile is stored with the template at the tracker, and later streaming
launches fetch in that order first (Picker.set_preferred).

Encoding: canonical msgpack [magic, version, template id, order, digest], where `order` packs
each chunk index as a 4-byte big-endian integer and `digest` is blake3 of a domain prefix, the
template id and `order`. The digest catches corruption and binds the profile to its template; it
is no signature (a profile only reorders fetches, every chunk is still verified).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3
import msgpack

from .manifest import DIGEST_SIZE, Manifest
from .packed_record import unpack_record

__all__ = [
    "DOMAIN",
    "MAGIC",
    "MAX_PROFILE_BYTES",
    "MAX_PROFILE_CHUNKS",
    "VERSION",
    "PrefetchProfile",
    "ProfileError",
    "ProfileRecorder",
    "decode_profile",
    "encode_profile",
    "profile_digest",
]

MAGIC = "vmswarm-profile"
VERSION = 1
# Hashed before everything else, so no other vmswarm digest can be mistaken for a profile's.
DOMAIN = b"vmswarm prefetch profile v1\x00"
MAX_PROFILE_BYTES = 1 << 20
_INDEX = struct.Struct(">I")
_FIELD_COUNT = 5
# Room for the envelope around the order: magic, version, id, digest and msgpack headers.
_ENVELOPE_OVERHEAD = 128
MAX_PROFILE_CHUNKS = (MAX_PROFILE_BYTES - _ENVELOPE_OVERHEAD) // _INDEX.size
TEMPLATE_ID_LENGTH = DIGEST_SIZE


class ProfileError(ValueError):
    """A prefetch profile that cannot be accepted; the message says why."""


def _check_template_id(template_id: object) -> bytes:
    if type(template_id) is not bytes or len(template_id) != TEMPLATE_ID_LENGTH:
        raise ProfileError(f"template id must be {TEMPLATE_ID_LENGTH} bytes")
    return template_id


@dataclass(frozen=True)
class PrefetchProfile:
    """Chunk indices of one template in the order a boot first read them (each at most once)."""

    template_id: bytes
    order: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_template_id(self.template_id)
        if type(self.order) is not tuple:
            raise ProfileError("profile order must be a tuple of chunk indices")
        if len(self.order) > MAX_PROFILE_CHUNKS:
            raise ProfileError(
                f"profile lists {len(self.order)} chunks, at most {MAX_PROFILE_CHUNKS} allowed"
            )
        for index in self.order:
            if type(index) is not int or not 0 <= index < 1 << 32:
                raise ProfileError(f"profile chunk index {index!r:.40} is not a u32")
        if len(set(self.order)) != len(self.order):
            raise ProfileError("profile lists a chunk more than once")

    def __len__(self) -> int:
        return len(self.order)

    def check_chunk_count(self, chunk_count: int) -> None:
        """ProfileError unless every index names a chunk of a `chunk_count`-chunk image."""
        if len(self.order) > chunk_count:
            raise ProfileError(
                f"profile lists {len(self.order)} chunks, the template has {chunk_count}"
            )
        if self.order and max(self.order) >= chunk_count:
            raise ProfileError(
                f"profile chunk index {max(self.order)} out of range 0..{chunk_count - 1}"
            )


def profile_digest(template_id: bytes, packed_order: bytes) -> bytes:
    """blake3 over DOMAIN, the template id and the packed order: what the profile carries."""
    return blake3.blake3(DOMAIN + template_id + packed_order).digest()


def _pack(order: tuple[int, ...]) -> bytes:
    return struct.pack(f">{len(order)}I", *order)


def encode_profile(profile: PrefetchProfile) -> bytes:
    """Canonical msgpack: equal profiles always give equal bytes (at most MAX_PROFILE_BYTES)."""
    packed = _pack(profile.order)
    fields = [
        MAGIC,
        VERSION,
        profile.template_id,
        packed,
        profile_digest(profile.template_id, packed),
    ]
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    return data


def decode_profile(
    data: bytes | bytearray | memoryview, template: Manifest | tuple[bytes, int]
) -> PrefetchProfile:
    """Parse and check a profile for `template` (a manifest, or (template id, chunk count)).

    ProfileError when the bytes are oversize, malformed, not canonical, carry a wrong digest,
    belong to another template, or list an index out of range or twice.
    """
    if isinstance(template, Manifest):
        template_id, chunk_count = template.template_id, template.chunk_count
    else:
        template_id, chunk_count = template
    raw = bytes(data)
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError(f"profile is {len(raw)} bytes, larger than {MAX_PROFILE_BYTES}")
    try:
        fields = unpack_record(raw, fields=_FIELD_COUNT, max_bin=MAX_PROFILE_BYTES, what="profile")
    except ValueError as exc:
        raise ProfileError(str(exc)) from None
    magic, version, profile_id, packed, digest = fields
    if magic != MAGIC:
        raise ProfileError(f"not a vmswarm prefetch profile (magic {magic!r:.40})")
    if type(version) is not int or version != VERSION:
        raise ProfileError(f"unsupported profile version {version!r:.40}")
    _check_template_id(profile_id)
    if type(packed) is not bytes or len(packed) % _INDEX.size:
        raise ProfileError(f"profile order must be bytes, {_INDEX.size} per chunk index")
    if type(digest) is not bytes or profile_digest(profile_id, packed) != digest:
        raise ProfileError("profile digest does not match its contents")
    if profile_id != template_id:
        raise ProfileError(f"profile is for template {profile_id.hex()}, not {template_id.hex()}")
    order = tuple(struct.unpack(f">{len(packed) // _INDEX.size}I", packed))
    profile = PrefetchProfile(template_id, order)
    profile.check_chunk_count(chunk_count)
    if encode_profile(profile) != raw:
        raise ProfileError("profile is not canonically encoded")
    return profile


class ProfileRecorder:
    """Records the order of first reads of a template's chunks during one boot.

    Memory is one bit per chunk plus one entry per distinct chunk read, at most
    MAX_PROFILE_CHUNKS; reads past that cap are not recorded.
    """

    def __init__(self, chunk_count: int) -> None:
        if type(chunk_count) is not int or chunk_count < 0:
            raise ValueError(f"chunk count must be an int >= 0, got {chunk_count!r:.40}")
        self.chunk_count = chunk_count
        self._seen = bytearray((chunk_count + 7) // 8)
        self._order: list[int] = []

    def read(self, index: int) -> bool:
        """The guest read chunk `index`; True if this was its first read and it was recorded."""
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"chunk {index} out of range 0..{self.chunk_count - 1}")
        byte, bit = divmod(index, 8)
        mask = 0x80 >> bit
        if self._seen[byte] & mask or self.full:
            return False
        self._seen[byte] |= mask
        self._order.append(index)
        return True

    def read_span(self, first: int, last: int) -> int:
        """The guest read chunks `first`..`last` inclusive (one NBD read); returns how many new."""
        return sum(self.read(index) for index in range(first, last + 1))

    @property
    def full(self) -> bool:
        """The recorder holds as many chunks as a profile may list."""
        return len(self._order) >= MAX_PROFILE_CHUNKS

    def __len__(self) -> int:
        return len(self._order)

    def profile(self, template_id: bytes) -> PrefetchProfile:
        """The first reads so far, in order, as a profile of `template_id`."""
        return PrefetchProfile(template_id, tuple(self._order))
