"""Chunk sets as Python ints, and per-chunk availability grouped into buckets (libtorrent style).

A chunk set is an int whose bit i stands for chunk i. CPython's big-int AND/OR/XOR run in C
over 30-bit digits, so one set operation on 10,000 chunks costs about a microsecond, which is
what keeps the picker off per-chunk Python loops.
"""

from __future__ import annotations

import random

from .bitfield import Bitfield

# Bitfield bytes are MSB-first; reversing each byte makes chunk i land on int bit i.
_REVERSE = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))
_OFFSETS = tuple(tuple(bit for bit in range(8) if b >> bit & 1) for b in range(256))
# Sets holding at least 1/_DENSE of their span are sampled by rejection (uniform), at most
# _REJECTION_TRIES times; sparser sets take the member after a random position.
_DENSE = 4
_REJECTION_TRIES = 16


def mask_of(bitfield: Bitfield) -> int:
    """The chunk set of a Bitfield."""
    return int.from_bytes(bitfield.to_bytes().translate(_REVERSE), "little")


def bit_indices(mask: int) -> list[int]:
    """The chunk indices in `mask`, ascending."""
    if mask < 0:
        raise ValueError("chunk set must not be negative")
    out: list[int] = []
    data = mask.to_bytes((mask.bit_length() + 7) // 8, "little")
    for byte_index, byte in enumerate(data):
        if byte:
            base = byte_index << 3
            out.extend(base + bit for bit in _OFFSETS[byte])
    return out


def random_member(mask: int, rng: random.Random) -> int:
    """A random chunk of the non-empty set `mask`.

    Uniform when the set is dense; for sparse sets the chunk after a random position is taken,
    which favours chunks after long gaps but never favours low indices.
    """
    if mask <= 0:
        raise ValueError("cannot pick from an empty chunk set")
    width = mask.bit_length()
    position = rng.randrange(width)
    if mask.bit_count() * _DENSE >= width:
        for _ in range(_REJECTION_TRIES):
            if mask >> position & 1:
                return position
            position = rng.randrange(width)
    above = mask >> position
    if above:
        return position + (above & -above).bit_length() - 1
    return (mask & -mask).bit_length() - 1


class Availability:
    """How many usable peers hold each chunk; chunks are grouped into one set per count."""

    __slots__ = ("_buckets", "_counts", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._counts = [0] * size
        # _buckets[k] is the set of chunks exactly k peers hold; every chunk is in one bucket.
        self._buckets = [(1 << size) - 1]

    def count(self, index: int) -> int:
        return self._counts[index]

    def add(self, mask: int) -> None:
        """A peer holding `mask` became usable."""
        counts = self._counts
        for index in bit_indices(mask):
            counts[index] += 1
        buckets = self._buckets
        buckets.append(0)
        # Top down, so a chunk moved up a bucket is not moved again.
        for level in range(len(buckets) - 2, -1, -1):
            moving = buckets[level] & mask
            if moving:
                buckets[level] ^= moving
                buckets[level + 1] |= moving
        self._trim()

    def remove(self, mask: int) -> None:
        """A peer holding `mask` is gone or no longer trusted."""
        counts = self._counts
        for index in bit_indices(mask):
            if counts[index] == 0:
                raise ValueError(f"chunk {index} has no holder to remove")
            counts[index] -= 1
        buckets = self._buckets
        # Bottom up, so a chunk moved down a bucket is not moved again.
        for level in range(1, len(buckets)):
            moving = buckets[level] & mask
            if moving:
                buckets[level] ^= moving
                buckets[level - 1] |= moving
        self._trim()

    def increment(self, index: int) -> None:
        level = self._counts[index]
        self._counts[index] = level + 1
        bit = 1 << index
        if level + 1 == len(self._buckets):
            self._buckets.append(0)
        self._buckets[level] ^= bit
        self._buckets[level + 1] |= bit

    def decrement(self, index: int) -> None:
        level = self._counts[index]
        if level == 0:
            raise ValueError(f"chunk {index} has no holder to remove")
        self._counts[index] = level - 1
        bit = 1 << index
        self._buckets[level] ^= bit
        self._buckets[level - 1] |= bit
        self._trim()

    def rarest(self, candidates: int, start: int = 1) -> tuple[int, int]:
        """The lowest count >= `start` held by some candidate, and those candidates.

        Returns (0, 0) when no candidate has a count >= `start`.
        """
        buckets = self._buckets
        for level in range(max(start, 0), len(buckets)):
            found = buckets[level] & candidates
            if found:
                return level, found
        return 0, 0

    def _trim(self) -> None:
        # Empty top buckets would only lengthen every scan.
        buckets = self._buckets
        while len(buckets) > 1 and not buckets[-1]:
            buckets.pop()
