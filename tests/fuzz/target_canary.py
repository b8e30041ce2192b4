"""Self-test target: one of its seeds breaks it, so a run must save a reproducer and fail."""

from __future__ import annotations

NAME = "canary"
MAX_LEN = 64
DICTIONARY: list[bytes] = []
TRIGGER = b"canary:crash"


def fuzz_one(data: bytes) -> None:
    if data.startswith(TRIGGER):
        raise ValueError("the canary target found its trigger")


def seeds() -> list[bytes]:
    return [b"canary:fine", TRIGGER]
