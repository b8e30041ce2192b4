"""Structured fuzz input: a FuzzedDataProvider reader, and a writer that builds seeds for it.

Seeds are written through `InputWriter` with the same calls a target makes on `Input`, so a
seed replays a real exchange (encoded messages, manifests) and coverage starts deep.
atheris's provider takes raw bytes from the front and integers, little-endian, from the back.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import TypeVar

import atheris

T = TypeVar("T")
# Widest integer range the provider reads as plain little-endian bytes (64 bits).
MAX_SPAN = (1 << 64) - 1


def _width(low: int, high: int) -> int:
    """Bytes the provider consumes for an integer in low..high."""
    return ((high - low).bit_length() + 7) // 8


class Input:
    """What a fuzz target reads its choices and payloads from."""

    def __init__(self, data: builtins.bytes) -> None:
        self._fdp = atheris.FuzzedDataProvider(data)

    def remaining(self) -> builtins.int:
        return int(self._fdp.remaining_bytes())

    def int(self, low: builtins.int, high: builtins.int) -> builtins.int:
        return int(self._fdp.ConsumeIntInRange(low, high))

    def flag(self) -> bool:
        return self.int(0, 1) == 1

    def choice(self, options: Sequence[T]) -> T:
        return options[self.int(0, len(options) - 1)]

    def bytes(self, count: builtins.int) -> builtins.bytes:
        return bytes(self._fdp.ConsumeBytes(count))

    def sized_bytes(self, most: builtins.int) -> builtins.bytes:
        """A length in 0..most, then that many bytes (fewer if the input runs out)."""
        return self.bytes(self.int(0, most))


class InputWriter:
    """Builds the input for which `Input` returns exactly the values written here, in order."""

    def __init__(self) -> None:
        self._front: list[bytes] = []
        self._back: list[bytes] = []

    def int(self, low: builtins.int, high: builtins.int, value: builtins.int) -> InputWriter:
        if not low <= value <= high:
            raise ValueError(f"{value} outside {low}..{high}")
        if high - low > MAX_SPAN:
            raise ValueError(f"the provider reads ranges wider than {MAX_SPAN} differently")
        self._back.append((value - low).to_bytes(_width(low, high), "little"))
        return self

    def flag(self, value: bool) -> InputWriter:
        return self.int(0, 1, int(value))

    def choice(self, options: Sequence[T], value: T) -> InputWriter:
        return self.int(0, len(options) - 1, options.index(value))

    def bytes(self, data: builtins.bytes) -> InputWriter:
        self._front.append(data)
        return self

    def sized_bytes(self, most: builtins.int, data: builtins.bytes) -> InputWriter:
        return self.int(0, most, len(data)).bytes(data)

    def build(self) -> builtins.bytes:
        # The provider eats integers from the end, so the first one written is the last byte.
        return b"".join(self._front) + b"".join(reversed(self._back))
