"""Which chunk to request from which peer: a pure policy, after libtorrent's piece_picker.

Availability and each peer's bitfield go in, chunk indices to request come out. Order of
preference for one peer: chunks a booting VM waits on (earliest deadline first), then chunks in
a preferred order (a prefetch profile: the order a boot first read them), then a few random
chunks until we hold `random_first` of them, then rarest-first with random tie-breaks, then,
once every sourced missing chunk is requested, endgame duplicates.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from .availability import Availability, bit_indices, mask_of, random_member
from .bitfield import Bitfield

PeerKey = Hashable
# Preferred-order entries scanned from the cursor before ranking a peer's candidates instead.
_PREFERRED_WINDOW = 64


@dataclass(frozen=True)
class PickerConfig:
    """Tunables; a request times out after timeout_base + queued bytes / min_rate_bytes_per_s."""

    random_first: int = 4
    pipeline_depth: int = 4
    endgame_duplicates: int = 2
    # Outstanding requests below which a peer gets endgame duplicates.
    endgame_depth: int = 1
    # Seconds a request must have been out before the endgame duplicates it: a copy that
    # arrives anyway costs a whole chunk of the link, right when the last ones come.
    endgame_grace: float = 0.0
    deadline_duplicates: int = 2
    # Requests a peer may have beyond its pipeline for chunks a booting VM waits on.
    deadline_extra: int = 1
    timeout_base: float = 10.0
    min_rate_bytes_per_s: float = 1024.0 * 1024.0

    def __post_init__(self) -> None:
        if self.random_first < 0:
            raise ValueError(f"random_first must be >= 0, got {self.random_first}")
        if self.pipeline_depth < 1:
            raise ValueError(f"pipeline_depth must be >= 1, got {self.pipeline_depth}")
        if self.endgame_depth < 1:
            raise ValueError(f"endgame_depth must be >= 1, got {self.endgame_depth}")
        if self.endgame_duplicates < 1:
            raise ValueError(f"endgame_duplicates must be >= 1, got {self.endgame_duplicates}")
        if self.deadline_extra < 0:
            raise ValueError(f"deadline_extra must be >= 0, got {self.deadline_extra}")
        if self.deadline_duplicates < 1:
            raise ValueError(f"deadline_duplicates must be >= 1, got {self.deadline_duplicates}")
        if self.timeout_base < 0:
            raise ValueError(f"timeout_base must be >= 0, got {self.timeout_base}")
        if self.endgame_grace < 0:
            raise ValueError(f"endgame_grace must be >= 0, got {self.endgame_grace}")
        if self.min_rate_bytes_per_s <= 0:
            raise ValueError(f"min_rate_bytes_per_s must be > 0, got {self.min_rate_bytes_per_s}")


def chunk_lengths(image_size: int, chunk_size: int) -> list[int]:
    """The length of every chunk of an image; only the last one may be short."""
    if chunk_size <= 0:
        raise ValueError(f"chunk size must be > 0, got {chunk_size}")
    if image_size < 0:
        raise ValueError(f"image size must be >= 0, got {image_size}")
    full, tail = divmod(image_size, chunk_size)
    return [chunk_size] * full + ([tail] if tail else [])


@dataclass
class _Peer:
    # Chunks this peer holds and we may ask it for (failed and rejected ones are dropped).
    has: int
    # Chunks it sent us corrupt: never asked again, even after a later Have.
    failed: int = 0
    # Outstanding requests: chunk index -> expiry time, in the order they were made.
    outstanding: dict[int, float] = field(default_factory=dict)
    queued_bytes: int = 0


class Picker:
    """Request bookkeeping and chunk choice for one template download."""

    def __init__(
        self,
        chunk_lengths: Sequence[int],
        have: Bitfield,
        rng: random.Random,
        *,
        skip: Bitfield | None = None,
        config: PickerConfig | None = None,
    ) -> None:
        """`have`: chunks already verified on disk; `skip`: all-zero chunks, never fetched.

        `rng` must be seeded per host, or every host would chase the same chunks.
        """
        size = len(chunk_lengths)
        if have.size != size:
            raise ValueError(f"have bitfield has {have.size} chunks, image has {size}")
        if skip is not None and skip.size != size:
            raise ValueError(f"skip bitfield has {skip.size} chunks, image has {size}")
        if any(length <= 0 for length in chunk_lengths):
            raise ValueError("every chunk length must be > 0")
        self.size = size
        self._lengths = list(chunk_lengths)
        self._config = config or PickerConfig()
        self._rng = rng
        had = mask_of(have)
        skipped = mask_of(skip) if skip is not None else 0
        # Wanted chunks: neither held nor all-zero.
        self._missing = ((1 << size) - 1) & ~had & ~skipped
        # Wanted chunks with no outstanding request.
        self._free = self._missing
        self._had_real = (had & ~skipped).bit_count()
        self._availability = Availability(size)
        self._peers: dict[PeerKey, _Peer] = {}
        self._banned: set[PeerKey] = set()
        self._requesters: dict[int, dict[PeerKey, None]] = {}
        # When each requested chunk was first asked for (while any request for it is out).
        self._asked_at: dict[int, float] = {}
        self._endgame_grace = self._config.endgame_grace
        self._outstanding_total = 0
        self._expiries: list[tuple[float, int, int, PeerKey]] = []
        self._seq = 0
        self._deadlines: dict[int, float] = {}
        self._deadline_order: list[tuple[float, int]] | None = None
        # Preferred fetch order; entries before the cursor are all held (or all-zero).
        self._preferred: list[int] = []
        self._preferred_rank: dict[int, int] = {}
        self._preferred_cursor = 0
        self._preferred_mask = 0
        # Union of every usable peer's set; rebuilt lazily after a peer loses chunks.
        self._reachable = 0
        self._reachable_stale = False

    # ---- peers ---------------------------------------------------------------------------

    def add_peer(self, peer: PeerKey, bitfield: Bitfield) -> None:
        """A peer announced its bitfield. A banned peer is ignored."""
        if bitfield.size != self.size:
            raise ValueError(f"peer bitfield has {bitfield.size} chunks, image has {self.size}")
        if peer in self._peers:
            raise ValueError(f"peer {peer!r} is already known")
        if peer in self._banned:
            return
        has = mask_of(bitfield)
        self._peers[peer] = _Peer(has=has)
        self._availability.add(has)
        self._reachable |= has

    def peer_has(self, peer: PeerKey, index: int) -> None:
        """A peer announced a new chunk (Have)."""
        self._check_index(index)
        if peer in self._banned:
            return
        state = self._peer(peer)
        bit = 1 << index
        if state.has & bit or state.failed & bit:
            return
        state.has |= bit
        self._availability.increment(index)
        self._reachable |= bit

    def remove_peer(self, peer: PeerKey) -> list[int]:
        """A peer disconnected; returns its outstanding chunks, now free for others."""
        state = self._peers.pop(peer, None)
        if state is None:
            return []
        released = list(state.outstanding)
        for index in released:
            self._release(peer, state, index)
        self._availability.remove(state.has)
        self._reachable_stale = True
        return released

    def ban(self, peer: PeerKey) -> list[int]:
        """Never request from `peer` again; returns its outstanding chunks, now released."""
        released = self.remove_peer(peer)
        self._banned.add(peer)
        return released

    def is_banned(self, peer: PeerKey) -> bool:
        return peer in self._banned

    # ---- picking -------------------------------------------------------------------------

    def pick(self, peer: PeerKey, now: float, limit: int | None = None) -> list[int]:
        """New requests to send to `peer`, filling its pipeline up to `limit` outstanding."""
        if peer in self._banned:
            return []
        state = self._peer(peer)
        depth = self._config.pipeline_depth if limit is None else limit
        room = depth - len(state.outstanding)
        if not self._missing or not state.has & self._missing:
            return []
        picked: list[int] = []
        if self._deadlines:
            # A waiting VM's chunk need not queue behind a full pipeline.
            self._pick_deadlines(peer, state, now, room + self._config.deadline_extra, picked)
        if room <= 0:
            return picked
        if len(picked) < room and self._preferred_mask:
            self._pick_preferred(peer, state, now, room, picked)
        if len(picked) < room:
            self._pick_fresh(peer, state, now, room, picked)
        if len(picked) < room and self.in_endgame:
            # A duplicate costs a whole chunk of the link: only peers short of requests get one.
            spare = self._config.endgame_depth - len(state.outstanding)
            if spare > 0:
                self._pick_endgame(peer, state, now, min(room, len(picked) + spare), picked)
        return picked

    def _pick_deadlines(
        self, peer: PeerKey, state: _Peer, now: float, room: int, picked: list[int]
    ) -> None:
        if self._deadline_order is None:
            self._deadline_order = sorted((d, i) for i, d in self._deadlines.items())
        for deadline, index in self._deadline_order:
            if len(picked) >= room:
                return
            if not state.has >> index & 1 or index in state.outstanding:
                continue
            holders = self._requesters.get(index)
            # A chunk already on its way gets a second source only once the VM is kept waiting.
            if holders and (now < deadline or len(holders) >= self._config.deadline_duplicates):
                continue
            self._request(peer, state, index, now)
            picked.append(index)

    def _pick_preferred(
        self, peer: PeerKey, state: _Peer, now: float, room: int, picked: list[int]
    ) -> None:
        self._preferred_mask &= self._missing
        order = self._preferred
        cursor = self._preferred_cursor
        # Held chunks never come back, so the cursor only moves forward: O(len) over the download.
        while cursor < len(order) and not self._missing >> order[cursor] & 1:
            cursor += 1
        self._preferred_cursor = cursor
        candidates = self._preferred_mask & self._free & state.has
        # The next few entries usually hold the picks (the ones before are on their way).
        end = min(len(order), cursor + _PREFERRED_WINDOW + room)
        while len(picked) < room and candidates and cursor < end:
            index = order[cursor]
            cursor += 1
            bit = 1 << index
            if candidates & bit:
                candidates ^= bit
                self._request(peer, state, index, now)
                picked.append(index)
        if len(picked) < room and candidates:
            # A peer lacking the next chunks: rank what it has rather than scan the whole order.
            rank = self._preferred_rank.__getitem__
            for index in heapq.nsmallest(room - len(picked), bit_indices(candidates), rank):
                self._request(peer, state, index, now)
                picked.append(index)

    def _pick_fresh(
        self, peer: PeerKey, state: _Peer, now: float, room: int, picked: list[int]
    ) -> None:
        candidates = self._free & state.has
        rng = self._rng
        while len(picked) < room and candidates and self._had_real < self._config.random_first:
            # Random first: a whole chunk soonest, so a new peer has something to trade.
            index = random_member(candidates, rng)
            candidates ^= 1 << index
            self._request(peer, state, index, now)
            picked.append(index)
        level = 1
        while len(picked) < room and candidates:
            level, tied = self._availability.rarest(candidates, level)
            if not tied:
                break
            while len(picked) < room and tied:
                # Random among equally rare chunks, so peers don't all chase the same one.
                index = random_member(tied, rng)
                bit = 1 << index
                tied ^= bit
                candidates ^= bit
                self._request(peer, state, index, now)
                picked.append(index)

    def _pick_endgame(
        self, peer: PeerKey, state: _Peer, now: float, room: int, picked: list[int]
    ) -> None:
        limit = self._config.endgame_duplicates
        grace = self._endgame_grace
        options: list[tuple[int, float, int]] = []
        for index in bit_indices(self._missing & state.has):
            if index in state.outstanding:
                continue
            holders = self._requesters.get(index)
            count = len(holders) if holders else 0
            if count and now - self._asked_at[index] < grace:
                continue
            if count < limit:
                options.append((count, self._rng.random(), index))
        options.sort()
        for _, _, index in options[: room - len(picked)]:
            self._request(peer, state, index, now)
            picked.append(index)

    # ---- outcomes ------------------------------------------------------------------------

    def received(self, peer: PeerKey, index: int) -> list[tuple[PeerKey, int]]:
        """Chunk `index` arrived from `peer` and verified; returns cancels for duplicates."""
        self._check_index(index)
        bit = 1 << index
        holders = self._requesters.get(index)
        cancels: list[tuple[PeerKey, int]] = []
        if holders:
            for other in list(holders):
                self._release(other, self._peers[other], index)
                if other != peer:
                    cancels.append((other, index))
        if not self._missing & bit:
            return []
        self._missing ^= bit
        self._free &= ~bit
        self._had_real += 1
        if self._deadlines.pop(index, None) is not None:
            self._deadline_order = None
        return cancels

    def failed(self, peer: PeerKey, index: int) -> None:
        """`peer` sent a corrupt copy of `index`: release it, never ask that peer for it again."""
        self._check_index(index)
        state = self._peers.get(peer)
        if state is None:
            return
        if index in state.outstanding:
            self._release(peer, state, index)
        self._forget(state, index)
        state.failed |= 1 << index

    def rejected(self, peer: PeerKey, index: int) -> None:
        """`peer` refused `index`: release it and treat the peer as not holding it until a Have."""
        self._check_index(index)
        state = self._peers.get(peer)
        if state is None:
            return
        if index in state.outstanding:
            self._release(peer, state, index)
        self._forget(state, index)

    def expired(self, now: float) -> list[tuple[PeerKey, int]]:
        """Requests past their timeout at `now`, released for re-request elsewhere."""
        heap = self._expiries
        out: list[tuple[PeerKey, int]] = []
        while heap and heap[0][0] <= now:
            expires_at, _, index, peer = heapq.heappop(heap)
            state = self._peers.get(peer)
            # Entries of answered or released requests stay in the heap until they surface.
            if state is None or state.outstanding.get(index) != expires_at:
                continue
            self._release(peer, state, index)
            out.append((peer, index))
        return out

    def next_expiry(self) -> float | None:
        """When the earliest outstanding request times out, for the daemon's sleep."""
        heap = self._expiries
        while heap:
            expires_at, _, index, peer = heap[0]
            state = self._peers.get(peer)
            if state is not None and state.outstanding.get(index) == expires_at:
                return expires_at
            heapq.heappop(heap)
        return None

    def set_endgame_grace(self, seconds: float) -> None:
        """How long a request must have been out before the endgame may duplicate it."""
        if seconds < 0:
            raise ValueError(f"endgame grace must be >= 0, got {seconds}")
        self._endgame_grace = seconds

    def set_deadline(self, index: int, deadline: float) -> None:
        """A booting VM needs `index` by `deadline`: it jumps the queue."""
        self._check_index(index)
        if not self._missing >> index & 1:
            return
        self._deadlines[index] = deadline
        self._deadline_order = None

    def clear_deadline(self, index: int) -> None:
        self._check_index(index)
        if self._deadlines.pop(index, None) is not None:
            self._deadline_order = None

    def set_preferred(self, order: Sequence[int]) -> None:
        """Fetch missing chunks in this order (a prefetch profile) before random and rarest.

        Deadline chunks still come first; chunks held, all-zero or already requested are
        skipped, and so are those the asked peer lacks. Replaces any earlier order; [] clears.
        """
        indices = list(order)
        for index in indices:
            self._check_index(index)
        self._preferred = indices
        self._preferred_rank = {}
        for rank, index in enumerate(indices):
            self._preferred_rank.setdefault(index, rank)
        self._preferred_cursor = 0
        self._preferred_mask = mask_of(Bitfield.from_indices(self.size, indices)) & self._missing

    # ---- queries -------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return not self._missing

    @property
    def missing_count(self) -> int:
        return self._missing.bit_count()

    def has_wanted(self, peer: PeerKey) -> bool:
        """Does `peer` hold a chunk still missing here (and may be asked for it)?"""
        state = self._peers.get(peer)
        return state is not None and peer not in self._banned and bool(state.has & self._missing)

    @property
    def held(self) -> int:
        """Chunks held here, all-zero ones not counted."""
        return self._had_real

    @property
    def in_endgame(self) -> bool:
        """Every missing chunk some usable peer holds is already requested."""
        return (
            self._outstanding_total > 0
            and bool(self._missing)
            and not self._free & self._reachable_mask()
        )

    def is_missing(self, index: int) -> bool:
        self._check_index(index)
        return bool(self._missing >> index & 1)

    def availability(self, index: int) -> int:
        """How many usable peers hold `index`."""
        self._check_index(index)
        return self._availability.count(index)

    def outstanding(self, peer: PeerKey) -> list[int]:
        """Chunks requested from `peer` and not yet answered, oldest first."""
        state = self._peers.get(peer)
        return list(state.outstanding) if state is not None else []

    def requesters(self, index: int) -> list[PeerKey]:
        """Peers `index` is currently requested from."""
        return list(self._requesters.get(index, ()))

    def unavailable(self) -> list[int]:
        """Missing chunks no usable peer holds: the daemon reports "no source holds chunk N"."""
        return bit_indices(self._missing & ~self._reachable_mask())

    # ---- internals -----------------------------------------------------------------------

    def _peer(self, peer: PeerKey) -> _Peer:
        try:
            return self._peers[peer]
        except KeyError:
            raise KeyError(f"unknown peer {peer!r}: add_peer it first") from None

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.size:
            raise IndexError(f"chunk {index} out of range 0..{self.size - 1}")

    def _request(self, peer: PeerKey, state: _Peer, index: int, now: float) -> None:
        length = self._lengths[index]
        state.queued_bytes += length
        # Requests queue behind each other on one link, so the timeout covers the bytes ahead.
        expires_at = (
            now + self._config.timeout_base + state.queued_bytes / self._config.min_rate_bytes_per_s
        )
        state.outstanding[index] = expires_at
        self._requesters.setdefault(index, {})[peer] = None
        self._asked_at.setdefault(index, now)
        self._free &= ~(1 << index)
        self._outstanding_total += 1
        self._seq += 1
        heapq.heappush(self._expiries, (expires_at, self._seq, index, peer))

    def _release(self, peer: PeerKey, state: _Peer, index: int) -> None:
        del state.outstanding[index]
        state.queued_bytes -= self._lengths[index]
        self._outstanding_total -= 1
        holders = self._requesters[index]
        del holders[peer]
        if not holders:
            del self._requesters[index]
            del self._asked_at[index]
            self._free |= self._missing & (1 << index)

    def _forget(self, state: _Peer, index: int) -> None:
        bit = 1 << index
        if state.has & bit:
            state.has ^= bit
            self._availability.decrement(index)
            self._reachable_stale = True

    def _reachable_mask(self) -> int:
        if self._reachable_stale:
            reachable = 0
            for state in self._peers.values():
                reachable |= state.has
            self._reachable = reachable
            self._reachable_stale = False
        return self._reachable
