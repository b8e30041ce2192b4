"""Which storage centers hold which chunk: rendezvous (highest-random-weight) hashing.

Every (center, chunk digest) pair gets a 64-bit weight from blake3; a chunk lives on the
`replicas` centers with the highest weights. Adding or removing one of n centers moves only
the chunks whose top-r set it enters or leaves, about r/n of them, and no other chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import blake3

# Versioned blake3 derive_key context: changing it would move every chunk, so it never changes.
_KEY_CONTEXT = "vmswarm 2025 placement center key v1"


def _center_key(center: str) -> bytes:
    return blake3.blake3(center.encode("utf-8"), derive_key_context=_KEY_CONTEXT).digest()


def weight(center: str, digest: bytes) -> int:
    """The rendezvous weight of `digest` on `center`; stable across processes and versions."""
    return _weight(_center_key(center), digest)


def _weight(key: bytes, digest: bytes) -> int:
    return int.from_bytes(blake3.blake3(digest, key=key).digest(8), "big")


class Rendezvous:
    """A fixed set of storage centers and a replication factor; places chunk digests."""

    __slots__ = ("_keys", "centers", "replicas")

    def __init__(self, centers: Sequence[str], replicas: int) -> None:
        if isinstance(centers, str):
            raise TypeError("centers must be a sequence of center ids, not one string")
        if not centers:
            raise ValueError("cannot place chunks: no storage centers given")
        if replicas < 1:
            raise ValueError(f"replication factor must be >= 1, got {replicas}")
        seen: set[str] = set()
        for center in centers:
            if not isinstance(center, str) or not center:
                raise ValueError(f"center id must be a non-empty string, got {center!r}")
            if center in seen:
                raise ValueError(f"duplicate storage center id {center!r}")
            seen.add(center)
        # Sorted so that the input order of centers never matters, even for weight ties.
        self.centers: tuple[str, ...] = tuple(sorted(centers))
        self.replicas = replicas
        self._keys = tuple(_center_key(c) for c in self.centers)

    def centers_for(self, digest: bytes) -> list[str]:
        """The centers that hold `digest`, best first; all centers if replicas > len(centers)."""
        if not isinstance(digest, bytes | bytearray | memoryview):
            raise TypeError(f"chunk digest must be bytes, got {type(digest).__name__}")
        data = bytes(digest)
        ranked = sorted(
            zip(self.centers, self._keys, strict=True),
            key=lambda pair: (-_weight(pair[1], data), pair[0]),
        )
        return [center for center, _ in ranked[: self.replicas]]

    def assign(self, digests: Iterable[bytes]) -> dict[str, list[int]]:
        """Map every center to the ascending chunk indices it holds.

        Content-addressed: chunks with the same digest land on the same centers, and each of
        their indices is listed, since the center can serve every one of them.
        """
        placed: dict[str, list[int]] = {center: [] for center in self.centers}
        cache: dict[bytes, list[str]] = {}
        for index, digest in enumerate(digests):
            data = bytes(digest)
            holders = cache.get(data)
            if holders is None:
                holders = cache[data] = self.centers_for(data)
            for center in holders:
                placed[center].append(index)
        return placed


def centers_for_chunk(digest: bytes, centers: Sequence[str], replicas: int) -> list[str]:
    """The `replicas` centers that hold the chunk `digest`, best first."""
    return Rendezvous(centers, replicas).centers_for(digest)


def assign(digests: Iterable[bytes], centers: Sequence[str], replicas: int) -> dict[str, list[int]]:
    """Map every center to the ascending indices of the chunks it holds."""
    return Rendezvous(centers, replicas).assign(digests)
