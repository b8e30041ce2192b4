"""Picker decisions per second over a whole simulated download, against a naive O(n) scan.

Run: python -m bench.picker_rate [--chunks 10000] [--peers 64] [--seed 1]

Each round every peer answers some of its outstanding requests, announces some new chunks
(Have) and gets its pipeline refilled by `pick`; a few slow peers let requests time out. Only
time spent inside picker calls is counted; the simulation around them is not. "other" calls are
peer_has, received and expired; add_peer (one per connection) is reported on its own.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Hashable
from typing import Any, Protocol

from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.picker import Picker, PickerConfig

from .report import emit

CHUNK_SIZE = 4 << 20
COLUMNS = [
    "picker",
    "chunks",
    "peers",
    "rounds",
    "pick_calls",
    "picked",
    "pick_calls_per_s",
    "picked_per_s",
    "us_per_pick_call",
    "add_peer_ms",
    "other_calls",
    "other_calls_per_s",
    "picker_seconds",
    "expiries",
    "cancels",
]


class PickerLike(Protocol):
    @property
    def complete(self) -> bool: ...
    def add_peer(self, peer: Hashable, bitfield: Bitfield) -> None: ...
    def peer_has(self, peer: Hashable, index: int) -> None: ...
    def pick(self, peer: Hashable, now: float, limit: int | None = None) -> list[int]: ...
    def received(self, peer: Hashable, index: int) -> list[tuple[Hashable, int]]: ...
    def expired(self, now: float) -> list[tuple[Hashable, int]]: ...


class NaivePicker:
    """Baseline: the same policy, rescanning every chunk on every call."""

    def __init__(self, size: int, config: PickerConfig, rng: random.Random) -> None:
        self.size = size
        self._config = config
        self._rng = rng
        self._missing = [True] * size
        self._missing_count = size
        self._had = 0
        self._avail = [0] * size
        self._holds: dict[Hashable, list[bool]] = {}
        self._requests: dict[int, dict[Hashable, float]] = {}
        self._by_peer: dict[Hashable, dict[int, float]] = {}

    @property
    def complete(self) -> bool:
        return self._missing_count == 0

    def add_peer(self, peer: Hashable, bitfield: Bitfield) -> None:
        holds = [False] * self.size
        for index in bitfield:
            holds[index] = True
            self._avail[index] += 1
        self._holds[peer] = holds
        self._by_peer[peer] = {}

    def peer_has(self, peer: Hashable, index: int) -> None:
        holds = self._holds[peer]
        if not holds[index]:
            holds[index] = True
            self._avail[index] += 1

    def pick(self, peer: Hashable, now: float, limit: int | None = None) -> list[int]:
        mine = self._by_peer[peer]
        room = (limit or self._config.pipeline_depth) - len(mine)
        if room <= 0:
            return []
        holds, missing, requests, avail = (
            self._holds[peer],
            self._missing,
            self._requests,
            self._avail,
        )
        rng = self._rng
        fresh = [i for i in range(self.size) if missing[i] and holds[i] and not requests.get(i)]
        if self._had < self._config.random_first:
            chosen = rng.sample(fresh, min(room, len(fresh)))
        else:
            chosen = [i for _, _, i in sorted((avail[i], rng.random(), i) for i in fresh)[:room]]
        if len(chosen) < room and not fresh:
            dup = self._config.endgame_duplicates
            extra = [
                (len(requests.get(i, ())), rng.random(), i)
                for i in range(self.size)
                if missing[i] and holds[i] and i not in mine and len(requests.get(i, ())) < dup
            ]
            extra.sort()
            chosen += [i for _, _, i in extra[: room - len(chosen)]]
        expires = now + self._config.timeout_base + CHUNK_SIZE / self._config.min_rate_bytes_per_s
        for i in chosen:
            mine[i] = expires
            requests.setdefault(i, {})[peer] = expires
        return chosen

    def received(self, peer: Hashable, index: int) -> list[tuple[Hashable, int]]:
        holders = self._requests.pop(index, {})
        for other in holders:
            del self._by_peer[other][index]
        if not self._missing[index]:
            return []
        self._missing[index] = False
        self._missing_count -= 1
        self._had += 1
        return [(other, index) for other in holders if other != peer]

    def expired(self, now: float) -> list[tuple[Hashable, int]]:
        out = [
            (peer, index)
            for peer, mine in self._by_peer.items()
            for index, expires in mine.items()
            if expires <= now
        ]
        for peer, index in out:
            del self._by_peer[peer][index]
            holders = self._requests[index]
            del holders[peer]
            if not holders:
                del self._requests[index]
        return out


def run(impl: str, chunks: int, peers: int, seed: int = 1) -> dict[str, Any]:
    """Simulate one full download of `chunks` chunks from `peers` peers; return the figures."""
    sim = random.Random(seed)
    config = PickerConfig(timeout_base=0.5, min_rate_bytes_per_s=1e12)
    picker: PickerLike
    if impl == "buckets":
        picker = Picker([CHUNK_SIZE] * chunks, Bitfield(chunks), random.Random(seed), config=config)
    elif impl == "naive":
        picker = NaivePicker(chunks, config, random.Random(seed))
    else:
        raise ValueError(f"unknown picker {impl!r}: buckets or naive")
    keys = [f"peer{k:03d}" for k in range(peers)]
    holds: dict[str, set[int]] = {}
    for k, key in enumerate(keys):
        # Two seeds (complete hosts), the rest partial peers of assorted completeness.
        density = 1.0 if k < 2 else sim.uniform(0.05, 0.9)
        holds[key] = {i for i in range(chunks) if sim.random() < density}
    # Peers answer most requests promptly; a few are slow and let requests time out.
    answer_rate = {key: (0.05 if k % 16 == 15 else 0.6) for k, key in enumerate(keys)}
    inflight: dict[str, set[int]] = {key: set() for key in keys}
    pick_calls = picked = other_calls = expiries = cancels = 0
    pick_seconds = other_seconds = 0.0
    clock = time.perf_counter

    bitfields = {key: Bitfield.from_indices(chunks, holds[key]) for key in keys}
    started = clock()
    for key in keys:
        picker.add_peer(key, bitfields[key])
    add_seconds = clock() - started

    now = 0.0
    rounds = 0
    while not picker.complete:
        rounds += 1
        now += 0.05
        if rounds > 100_000:
            raise RuntimeError(f"{impl}: download did not finish")
        for key in keys:
            gained = [i for i in sim.sample(range(chunks), 8) if i not in holds[key]]
            answered = [i for i in inflight[key] if sim.random() < answer_rate[key]]
            started = clock()
            for index in gained:
                picker.peer_has(key, index)
            done = [picker.received(key, index) for index in answered]
            other_seconds += clock() - started
            other_calls += len(gained) + len(answered)
            holds[key].update(gained)
            inflight[key].difference_update(answered)
            for cancel_list in done:
                for other, index in cancel_list:
                    inflight[str(other)].discard(index)
                    cancels += 1
            started = clock()
            new = picker.pick(key, now)
            pick_seconds += clock() - started
            pick_calls += 1
            picked += len(new)
            inflight[key].update(new)
        started = clock()
        timed_out = picker.expired(now)
        other_seconds += clock() - started
        other_calls += 1
        expiries += len(timed_out)
        for peer, index in timed_out:
            inflight[str(peer)].discard(index)
    return {
        "picker": impl,
        "chunks": chunks,
        "peers": peers,
        "rounds": rounds,
        "pick_calls": pick_calls,
        "picked": picked,
        "pick_calls_per_s": pick_calls / pick_seconds if pick_seconds else 0.0,
        "picked_per_s": picked / pick_seconds if pick_seconds else 0.0,
        "us_per_pick_call": 1e6 * pick_seconds / pick_calls if pick_calls else 0.0,
        "add_peer_ms": 1e3 * add_seconds / peers,
        "other_calls": other_calls,
        "other_calls_per_s": other_calls / other_seconds if other_seconds else 0.0,
        "picker_seconds": add_seconds + pick_seconds + other_seconds,
        "expiries": expiries,
        "cancels": cancels,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--peers", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rows = [run(impl, args.chunks, args.peers, args.seed) for impl in ("buckets", "naive")]
    emit(
        "picker_rate",
        rows,
        COLUMNS,
        {"chunk_size": CHUNK_SIZE, "seed": args.seed},
    )


if __name__ == "__main__":
    main()
