"""The tracker's in-memory view of live peers: each peer's last announce, forgotten after a TTL.

Time enters as `now` (the tracker passes trio's clock), so expiry is testable without sleeping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..swarm.bitfield import Bitfield
from ..swarm.messages import Role
from ..swarm.vm_placement import HostCapacity


@dataclass(frozen=True)
class Holding:
    """What a peer announced for one template.

    `bitfield` is set when the tracker knew the template's chunk count at announce time;
    otherwise only the raw `bits` are kept, unchecked, until the catalog learns the template.
    """

    bits: bytes
    complete: bool
    bitfield: Bitfield | None = field(default=None, compare=False)

    def resolved(self, chunks: int) -> Bitfield | None:
        """The bitfield for a `chunks`-chunk template, or None if the raw bits don't fit it."""
        if self.bitfield is not None and self.bitfield.size == chunks:
            return self.bitfield
        try:
            return Bitfield(chunks, self.bits)
        except ValueError:
            return None


@dataclass(frozen=True)
class PeerAnnounce:
    """One peer's latest announce; it replaces whatever the peer announced before."""

    peer_id: bytes
    role: Role
    address: tuple[str, int]
    rack: str | None
    holdings: Mapping[bytes, Holding]
    last_seen: float
    # What a host daemon reported of its vCPUs and memory; None if it reported nothing.
    capacity: HostCapacity | None = None


class AnnounceTable:
    """Live announces by peer id; an entry expires `ttl` seconds after its last announce."""

    def __init__(self, ttl: float) -> None:
        if not ttl > 0:
            raise ValueError(f"announce TTL must be > 0 seconds, got {ttl}")
        self.ttl = ttl
        self._peers: dict[bytes, PeerAnnounce] = {}

    def update(self, announce: PeerAnnounce) -> bool:
        """Record an announce; True if the peer was not live before (a new peer)."""
        previous = self._peers.get(announce.peer_id)
        self._peers[announce.peer_id] = announce
        return previous is None or self._expired(previous, announce.last_seen)

    def _expired(self, announce: PeerAnnounce, now: float) -> bool:
        return announce.last_seen + self.ttl <= now

    def expire(self, now: float) -> list[PeerAnnounce]:
        """Drop and return every announce older than the TTL."""
        gone = [a for a in self._peers.values() if self._expired(a, now)]
        for announce in gone:
            del self._peers[announce.peer_id]
        return gone

    def get(self, peer_id: bytes, now: float) -> PeerAnnounce | None:
        announce = self._peers.get(peer_id)
        if announce is None or self._expired(announce, now):
            return None
        return announce

    def live(self, now: float) -> list[PeerAnnounce]:
        """Every unexpired announce, ordered by peer id."""
        return sorted(
            (a for a in self._peers.values() if not self._expired(a, now)),
            key=lambda a: a.peer_id,
        )

    def holders(self, template_id: bytes, now: float) -> list[tuple[PeerAnnounce, Holding]]:
        """Every live peer that announced `template_id`, with what it announced."""
        return [(a, a.holdings[template_id]) for a in self.live(now) if template_id in a.holdings]

    def __len__(self) -> int:
        return len(self._peers)
