"""A node-wide upload rate limit: a token bucket on trio's clock, shared by every chunk sender.

The arithmetic (`TokenBucket`) is pure and takes `now`; `RateLimiter` sleeps on trio's clock, so
tests run it on a MockClock. Rates are bytes per second.
"""

from __future__ import annotations

import math
import re

import trio

_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*(?:/s)?\s*$")
_PREFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1024.0, "mi": 1024.0**2, "gi": 1024.0**3}


def parse_rate(text: str) -> float:
    """Bytes per second from "20MB", "100Mbit", "1.5GiB", "500000" (0 means unlimited).

    Byte units end in B (MB = 10**6, MiB = 2**20), bit units in "bit" (Mbit = 10**6 / 8).
    A bare number is bytes; "Mb" is refused as ambiguous. ValueError says why.
    """
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"not a rate: {text!r} (try 20MB, 100Mbit or 1GiB)")
    number, unit = match.groups()
    if unit.lower().endswith("bit"):
        prefix, factor = unit[:-3], 1 / 8
    elif unit.endswith("B"):
        prefix, factor = unit[:-1], 1.0
    elif unit.endswith("b"):
        raise ValueError(f"ambiguous unit {unit!r} in {text!r}: say {unit[:-1]}B or {unit}it")
    else:
        prefix, factor = unit, 1.0
    scale = _PREFIXES.get(prefix.lower())
    if scale is None or (factor != 1.0 and "i" in prefix.lower()):
        raise ValueError(f"unknown unit {unit!r} in {text!r} (B, KB, MB, GB, KiB, MiB, Mbit)")
    return float(number) * scale * factor


class TokenBucket:
    """Pure pacing arithmetic (GCRA): each grant of n bytes takes n / rate seconds of the link.

    `burst` bytes may go out at once after an idle spell; with burst 0, n bytes are granted only
    when their time has been paid, so N grants of S bytes end at N * S / rate.
    """

    def __init__(self, rate: float, burst: float = 0.0, now: float = 0.0) -> None:
        if not rate > 0 or math.isinf(rate):
            raise ValueError(f"a rate limit must be a positive finite number, got {rate!r}")
        if burst < 0:
            raise ValueError(f"burst must not be negative, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        # When every byte granted so far has been paid for (the "theoretical arrival time").
        self._paid_until = now

    def reserve(self, amount: int, now: float) -> float:
        """Book `amount` bytes; returns when they may be sent (maybe `now`)."""
        if amount < 0:
            raise ValueError(f"cannot reserve {amount} bytes")
        self._paid_until = max(self._paid_until, now) + amount / self.rate
        return max(now, self._paid_until - self.burst / self.rate)

    def paid_until(self) -> float:
        return self._paid_until


class RateLimiter:
    """A shared upload budget; `await acquire(n)` returns when n more bytes may be sent."""

    def __init__(self, rate: float, burst: float = 0.0) -> None:
        self.bucket = TokenBucket(rate, burst, now=_now_or_zero())
        self.granted_bytes = 0

    @property
    def rate(self) -> float:
        return self.bucket.rate

    async def acquire(self, amount: int) -> None:
        """Wait until `amount` bytes fit the rate; the booking is made first, so waiters queue."""
        when = self.bucket.reserve(amount, trio.current_time())
        self.granted_bytes += amount
        await trio.sleep_until(when)


def limiter_for(rate: float, burst: float = 0.0) -> RateLimiter | None:
    """A RateLimiter for a positive rate; None (unlimited) for 0."""
    if rate < 0:
        raise ValueError(f"a rate limit must not be negative, got {rate!r}")
    return RateLimiter(rate, burst) if rate > 0 else None


def _now_or_zero() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # built outside trio.run: the first reservation catches up to now
        return -math.inf


__all__ = ["RateLimiter", "TokenBucket", "limiter_for", "parse_rate"]
