"""The tracker's peer handout: which peers an asker should connect to, best first.

Order (each step a tie-break of the one before):
1. useful peers before useless ones; a peer is useless when it holds nothing the asker lacks
   (a striped storage center often is). Useless peers are still listed, last, because a
   partial host may want the asker's chunks and will gain chunks of its own soon;
2. class: complete hosts, then storage centers, then partial hosts;
3. same rack as the asker before other racks;
4. more chunks that the asker lacks first;
5. ties: shuffled by the injected `random.Random` (so askers spread over equal peers), else
   by peer id.

What the asker lacks: its bitfield's missing chunks; with no bitfield it lacks everything.
A complete asker (a seeder) lacks nothing, so every peer is "useless" to it and the list is
ordered by class and rack only.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from .bitfield import Bitfield
from .messages import Role


class PeerClass(enum.IntEnum):
    """Ranking classes, best first."""

    COMPLETE_HOST = 0
    STORAGE = 1
    PARTIAL_HOST = 2


@dataclass(frozen=True)
class PeerRecord:
    """What the tracker knows of one announced peer.

    Give either `bitfield` (then `have_count` and `complete` follow from it) or just
    `have_count` and `complete` for a peer that announced counts only.
    """

    peer_id: bytes  # as in the handshake
    address: tuple[str, int]
    role: Role
    rack: str | None = None
    # Bitfield is mutable and unhashable; keep the record hashable by its other fields.
    bitfield: Bitfield | None = field(default=None, hash=False)
    have_count: int = 0
    complete: bool = False

    def __post_init__(self) -> None:
        if not self.peer_id:
            raise ValueError("peer id must be non-empty")
        if self.have_count < 0:
            raise ValueError(f"peer {self.peer_id!r}: have_count must be >= 0")
        if self.bitfield is None:
            return
        derived = (len(self.bitfield), self.bitfield.complete)
        given = (self.have_count, self.complete)
        if given not in ((0, False), derived):
            raise ValueError(
                f"peer {self.peer_id!r}: have_count={self.have_count}, complete={self.complete}"
                f" contradict its bitfield ({derived[0]} chunks, complete={derived[1]})"
            )
        object.__setattr__(self, "have_count", derived[0])
        object.__setattr__(self, "complete", derived[1])

    @property
    def peer_class(self) -> PeerClass:
        if self.role is Role.STORAGE:
            return PeerClass.STORAGE
        return PeerClass.COMPLETE_HOST if self.complete else PeerClass.PARTIAL_HOST


def useful_chunks(peer: PeerRecord, asker_bitfield: Bitfield | None) -> int:
    """How many chunks the asker lacks that `peer` has (an estimate for count-only peers)."""
    if asker_bitfield is None:
        return peer.have_count
    lacking = asker_bitfield.size - len(asker_bitfield)
    if peer.bitfield is not None:
        if peer.bitfield.size != asker_bitfield.size:
            raise ValueError(
                f"peer {peer.peer_id!r} has a bitfield of {peer.bitfield.size} chunks,"
                f" the asker's has {asker_bitfield.size}"
            )
        theirs = int.from_bytes(peer.bitfield.to_bytes(), "big")
        ours = int.from_bytes(asker_bitfield.to_bytes(), "big")
        return (theirs & ~ours).bit_count()
    if peer.complete:
        return lacking
    if peer.have_count == 0 or lacking == 0:
        return 0
    # Count-only peer: expect overlap as if chunks were independent, rounded up so a peer
    # that might help is never written off as useless.
    return min(peer.have_count, lacking, -(-peer.have_count * lacking // asker_bitfield.size))


def rank_peers(
    asker_id: bytes,
    candidates: Iterable[PeerRecord],
    *,
    asker_bitfield: Bitfield | None,
    asker_rack: str | None,
    cap: int,
    rng: random.Random | None = None,
) -> list[PeerRecord]:
    """At most `cap` candidates, best first, never the asker itself (see module doc)."""
    if cap < 0:
        raise ValueError(f"peer handout cap must be >= 0, got {cap}")
    by_id: dict[bytes, PeerRecord] = {}
    for peer in candidates:
        if peer.peer_id in by_id:
            raise ValueError(f"duplicate peer id {peer.peer_id!r} among candidates")
        by_id[peer.peer_id] = peer
    by_id.pop(asker_id, None)
    # Draw tie-breakers in peer-id order so the result never depends on the input order.
    ordered = sorted(by_id.values(), key=lambda p: p.peer_id)
    ties = [rng.random() if rng is not None else 0.0 for _ in ordered]

    def key(item: tuple[PeerRecord, float]) -> tuple[bool, int, bool, int, float, bytes]:
        peer, tie = item
        useful = useful_chunks(peer, asker_bitfield)
        same_rack = asker_rack is not None and peer.rack == asker_rack
        return (useful == 0, peer.peer_class, not same_rack, -useful, tie, peer.peer_id)

    ranked = sorted(zip(ordered, ties, strict=True), key=key)
    return [peer for peer, _ in ranked[:cap]]
