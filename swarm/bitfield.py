"""A fixed-size set of chunk indices, packed MSB-first like BitTorrent's bitfield."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .errors import RemoteProtocolError

# Popcount per byte value, so counting stays fast without per-bit Python loops.
_POPCOUNT = bytes(bin(i).count("1") for i in range(256))


class Bitfield:
    """Which of `size` chunks are present. Bit i is bit (7 - i % 8) of byte i // 8."""

    __slots__ = ("_bits", "_count", "size")

    def __init__(self, size: int, bits: bytes | bytearray | None = None) -> None:
        if size < 0:
            raise ValueError(f"bitfield size must be >= 0, got {size}")
        self.size = size
        nbytes = (size + 7) // 8
        if bits is None:
            self._bits = bytearray(nbytes)
            self._count = 0
            return
        if len(bits) != nbytes:
            raise ValueError(f"bitfield of {size} chunks needs {nbytes} bytes, got {len(bits)}")
        spare = nbytes * 8 - size
        if spare and bits[-1] & ((1 << spare) - 1):
            raise ValueError("bitfield has bits set past its last chunk")
        self._bits = bytearray(bits)
        self._count = sum(_POPCOUNT[b] for b in self._bits)

    @classmethod
    def from_wire(cls, size: int, bits: bytes) -> Bitfield:
        """Parse a peer's bitfield; a bad one is the peer's fault."""
        try:
            return cls(size, bits)
        except ValueError as exc:
            raise RemoteProtocolError(str(exc)) from exc

    @classmethod
    def full(cls, size: int) -> Bitfield:
        field = cls(size)
        for i in range(size):
            field.add(i)
        return field

    @classmethod
    def from_indices(cls, size: int, indices: Iterable[int]) -> Bitfield:
        field = cls(size)
        for i in indices:
            field.add(i)
        return field

    @classmethod
    def from_string(cls, text: str) -> Bitfield:
        """Compact test notation: "1101" has chunks 0, 1 and 3."""
        return cls.from_indices(len(text), (i for i, c in enumerate(text) if c == "1"))

    def _check(self, index: int) -> None:
        if not 0 <= index < self.size:
            raise IndexError(f"chunk {index} out of range 0..{self.size - 1}")

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self.size:
            return False
        return bool(self._bits[index >> 3] & (0x80 >> (index & 7)))

    def add(self, index: int) -> bool:
        """Set bit `index`; return True if it was not set before."""
        self._check(index)
        mask = 0x80 >> (index & 7)
        if self._bits[index >> 3] & mask:
            return False
        self._bits[index >> 3] |= mask
        self._count += 1
        return True

    def discard(self, index: int) -> bool:
        """Clear bit `index`; return True if it was set."""
        self._check(index)
        mask = 0x80 >> (index & 7)
        if not self._bits[index >> 3] & mask:
            return False
        self._bits[index >> 3] &= ~mask & 0xFF
        self._count -= 1
        return True

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        bits = self._bits
        for byte_index, byte in enumerate(bits):
            if byte:
                base = byte_index << 3
                for bit in range(8):
                    if byte & (0x80 >> bit):
                        yield base + bit

    def missing(self) -> Iterator[int]:
        """Indices not set, in ascending order."""
        bits = self._bits
        for byte_index, byte in enumerate(bits):
            if byte != 0xFF:
                base = byte_index << 3
                for bit in range(8):
                    i = base + bit
                    if i < self.size and not byte & (0x80 >> bit):
                        yield i

    @property
    def complete(self) -> bool:
        return self._count == self.size

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def to_string(self) -> str:
        return "".join("1" if i in self else "0" for i in range(self.size))

    def copy(self) -> Bitfield:
        return Bitfield(self.size, self._bits)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitfield) and self.size == other.size and self._bits == other._bits

    def __hash__(self) -> int:
        raise TypeError("Bitfield is mutable")

    def __repr__(self) -> str:
        if self.size <= 64:
            return f"Bitfield({self.to_string()!r})"
        return f"Bitfield(size={self.size}, count={self._count})"
