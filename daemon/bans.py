"""A node-wide, time-limited ban list of misbehaving peers, keyed by peer id and by IP address.

Peers that send garbage, out-of-state messages, oversized frames or floods are banned here for
`duration` seconds; a ban by address also covers connections that never got to say who they are.
Time comes in as `now` (trio's clock in the daemon), so tests drive it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

# Why a peer was banned: a small fixed set, so it can be a metrics label.
BAN_REASONS = (
    "corrupt_chunk",
    "protocol_error",
    "oversized_frame",
    "request_flood",
    "message_flood",
    "bad_handshake",
)
DEFAULT_BAN_SECONDS = 600.0
# More entries than this and the oldest go first: a flood of addresses cannot grow it forever.
MAX_ENTRIES = 65536


@dataclass(frozen=True)
class Ban:
    """One ban: who (either key may be missing), why, and until when."""

    peer_id: bytes | None
    host: str | None
    reason: str
    detail: str
    until: float


class BanList:
    """Bans by peer id and by host; `on_ban(reason, role)` is told about each new ban."""

    def __init__(
        self,
        duration: float = DEFAULT_BAN_SECONDS,
        *,
        on_ban: Callable[[str, str], None] | None = None,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        if duration < 0:
            raise ValueError(f"ban duration must not be negative, got {duration!r}")
        self.duration = float(duration)
        self._on_ban = on_ban
        self._max_entries = max_entries
        self._by_peer: dict[bytes, Ban] = {}
        self._by_host: dict[str, Ban] = {}
        self.total = 0

    def ban(
        self,
        reason: str,
        now: float,
        *,
        peer_id: bytes | None = None,
        host: str | None = None,
        role: str = "unknown",
        detail: str = "",
    ) -> Ban | None:
        """Ban `peer_id` and/or `host` for `duration` from `now`; None with neither to key on."""
        if reason not in BAN_REASONS:
            raise ValueError(f"unknown ban reason {reason!r}")
        if peer_id is None and host is None:
            return None
        entry = Ban(peer_id, host, reason, detail[:200], now + self.duration)
        if peer_id is not None:
            _put(self._by_peer, peer_id, entry, self._max_entries)
        if host is not None:
            _put(self._by_host, host, entry, self._max_entries)
        self.total += 1
        if self._on_ban is not None:
            self._on_ban(reason, role)
        return entry

    def banned(
        self, now: float, *, peer_id: bytes | None = None, host: str | None = None
    ) -> Ban | None:
        """The ban in force on this peer id or host at `now`, if any (expired ones are dropped)."""
        if peer_id is not None:
            found = _live(self._by_peer, peer_id, now)
            if found is not None:
                return found
        if host is not None:
            return _live(self._by_host, host, now)
        return None

    def entries(self, now: float) -> list[Ban]:
        """The bans in force at `now`, each once."""
        seen: dict[int, Ban] = {}
        for table in (self._by_peer, self._by_host):
            for entry in table.values():
                if entry.until > now:
                    seen[id(entry)] = entry
        return list(seen.values())


def _put(table: dict[K, Ban], key: K, entry: Ban, limit: int) -> None:
    table.pop(key, None)
    while len(table) >= limit:
        del table[next(iter(table))]
    table[key] = entry


def _live(table: dict[K, Ban], key: K, now: float) -> Ban | None:
    entry = table.get(key)
    if entry is None:
        return None
    if entry.until <= now:
        del table[key]
        return None
    return entry


_OVERSIZED = ("frame length ", "control frame of ", "chunk payload of ")
_NOT_HOSTILE = ("peer closed the stream mid-frame",)


def offence_of(error: str) -> str | None:
    """The ban reason for a peer's protocol error (by its message); None if it may be an accident.

    A stream cut mid-frame is what a crash looks like, so it ends the link without a ban.
    """
    if error.startswith(_NOT_HOSTILE):
        return None
    if error.startswith(_OVERSIZED):
        return "oversized_frame"
    return "protocol_error"


# How peer_link words a failed handshake whose cause was the peer breaking the protocol.
_HANDSHAKE_PREFIXES = ("bad handshake: ", "bad bitfield: ")


def handshake_offence(error: str) -> str | None:
    """The ban reason for a failed handshake (by its message); None for a timeout or a hang-up."""
    if error.startswith("expected a Handshake"):
        return "bad_handshake"
    for prefix in _HANDSHAKE_PREFIXES:
        if error.startswith(prefix):
            offence = offence_of(error[len(prefix) :])
            return "bad_handshake" if offence == "protocol_error" else offence
    return None


__all__ = [
    "BAN_REASONS",
    "DEFAULT_BAN_SECONDS",
    "Ban",
    "BanList",
    "handshake_offence",
    "offence_of",
]
