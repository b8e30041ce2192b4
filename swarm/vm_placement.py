"""Where the next VM runs: a pure policy over the hosts' reported capacity and template holdings.

The rule, in order:
1. **Capacity.** Only hosts whose free vCPUs and free memory both cover the flavor are
   eligible (free = total - used, never below 0). A host that reported no capacity is never
   eligible. An explicit `requested` host must be eligible too, or the launch is refused.
2. **Locality.** If some eligible host holds *most* of the template (more than half its
   chunks), the choice is among those: the most chunks held first (a complete copy needs no
   fetch at all), then the least loaded.
3. **Load.** Otherwise the least loaded eligible host wins; among equally loaded hosts, the
   one whose rack holds more of the template's chunks (its fetch stays in the rack).
4. **Ties.** Hosts still tied are broken by `rng.choice` when an rng is given, else by the
   smallest host id, so a decision is always reproducible.

"Load" is the host's dominant share *after* the VM is placed:
max((vcpus_used + vcpus) / vcpus_total, (memory_used + memory) / memory_total), compared
exactly as fractions, so hosts of different sizes compare fairly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

# Beyond any real host; bounds what an announce may claim.
MAX_CAPACITY_VALUE = 1 << 62
# The keys of a host's `capacity` in its announce, in HostCapacity's field order.
CAPACITY_KEYS = ("vcpus_total", "vcpus_used", "memory_total", "memory_used")


class PlacementError(Exception):
    """No host can take the VM; `code` is "no_capacity" or "unknown_host"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Demand(Protocol):
    """What the VM needs: a Flavor fits (memory in bytes)."""

    @property
    def name(self) -> str: ...

    @property
    def vcpus(self) -> int: ...

    @property
    def memory(self) -> int: ...


@dataclass(frozen=True)
class HostCapacity:
    """A host's reported resources: vCPUs and memory (bytes), total and in use by its VMs."""

    vcpus_total: int
    vcpus_used: int
    memory_total: int
    memory_used: int

    def __post_init__(self) -> None:
        for key in CAPACITY_KEYS:
            value = getattr(self, key)
            if type(value) is not int or not 0 <= value <= MAX_CAPACITY_VALUE:
                raise ValueError(
                    f"capacity {key} must be an integer in 0..2**62, got {value!r:.40}"
                )

    def as_dict(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in CAPACITY_KEYS}

    @property
    def vcpus_free(self) -> int:
        return max(0, self.vcpus_total - self.vcpus_used)

    @property
    def memory_free(self) -> int:
        return max(0, self.memory_total - self.memory_used)

    def fits(self, vcpus: int, memory: int) -> bool:
        return self.vcpus_free >= vcpus and self.memory_free >= memory

    def plus(self, vcpus: int, memory: int) -> HostCapacity:
        """The capacity once a VM of this size also runs here (a reservation)."""
        return HostCapacity(
            self.vcpus_total,
            min(MAX_CAPACITY_VALUE, self.vcpus_used + vcpus),
            self.memory_total,
            min(MAX_CAPACITY_VALUE, self.memory_used + memory),
        )

    def load_after(self, vcpus: int, memory: int) -> Fraction:
        """The dominant share of vCPUs or memory in use once the VM runs here."""
        shares = [
            Fraction(used + need, total)
            for used, need, total in (
                (self.vcpus_used, vcpus, self.vcpus_total),
                (self.memory_used, memory, self.memory_total),
            )
            if total > 0
        ]
        return max(shares, default=Fraction(1))


@dataclass(frozen=True)
class HostCandidate:
    """One live host as placement sees it.

    `chunks_held`: how many of the template's chunks the host holds; `rack_chunks`: how many
    are held somewhere in its rack (by any host or center there, itself included).
    """

    host_id: str
    capacity: HostCapacity | None
    chunks_held: int = 0
    rack: str | None = None
    rack_chunks: int = 0
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.host_id


@dataclass(frozen=True)
class PlacementDecision:
    """The chosen host and why: "requested", "locality" or "least_loaded"."""

    host: HostCandidate
    reason: str
    eligible: int  # how many hosts had room


def holds_most(chunks_held: int, template_chunks: int) -> bool:
    """More than half of the template's chunks."""
    return template_chunks > 0 and 2 * chunks_held > template_chunks


def _describe_free(candidate: HostCandidate) -> str:
    capacity = candidate.capacity
    if capacity is None:
        return f"{candidate.name} reported no capacity"
    return (
        f"{candidate.name} has {capacity.vcpus_free} free vCPUs and "
        f"{_mib(capacity.memory_free)} MiB free memory"
    )


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.0f}"


def _no_capacity(flavor: Demand, candidates: Sequence[HostCandidate], limit: int = 8) -> str:
    wanted = f"flavor {flavor.name!r} ({flavor.vcpus} vCPUs, {_mib(flavor.memory)} MiB)"
    if not candidates:
        return f"no host with capacity for {wanted}: no live host daemon is known to the tracker"
    shown = "; ".join(_describe_free(c) for c in candidates[:limit])
    more = f"; and {len(candidates) - limit} more" if len(candidates) > limit else ""
    return f"no host with capacity for {wanted}: {shown}{more}"


def _pick(tied: Sequence[HostCandidate], rng: random.Random | None) -> HostCandidate:
    ordered = sorted(tied, key=lambda c: c.host_id)
    return rng.choice(ordered) if rng is not None else ordered[0]


def choose_host(
    template_chunks: int,
    candidates: Sequence[HostCandidate],
    flavor: Demand,
    *,
    requested: str | None = None,
    rng: random.Random | None = None,
) -> PlacementDecision:
    """The host for a VM of `flavor` from a `template_chunks`-chunk template (rule above).

    `requested` is a host id that must be among the candidates. Raises PlacementError.
    """
    if template_chunks < 0:
        raise ValueError(f"template_chunks must be >= 0, got {template_chunks}")
    ids = [c.host_id for c in candidates]
    if len(set(ids)) != len(ids):
        raise ValueError("candidate host ids must be unique")
    eligible = [
        c
        for c in candidates
        if c.capacity is not None and c.capacity.fits(flavor.vcpus, flavor.memory)
    ]
    if requested is not None:
        matches = [c for c in candidates if c.host_id == requested]
        if not matches:
            raise PlacementError("unknown_host", f"no live host {requested!r} is known")
        if matches[0] not in eligible:
            raise PlacementError("no_capacity", _no_capacity(flavor, matches))
        return PlacementDecision(matches[0], "requested", len(eligible))
    if not eligible:
        raise PlacementError("no_capacity", _no_capacity(flavor, candidates))

    def load(c: HostCandidate) -> Fraction:
        assert c.capacity is not None
        return c.capacity.load_after(flavor.vcpus, flavor.memory)

    holders = [c for c in eligible if holds_most(c.chunks_held, template_chunks)]
    if holders:
        most = max(c.chunks_held for c in holders)
        best = [c for c in holders if c.chunks_held == most]
        lightest = min(load(c) for c in best)
        tied = [c for c in best if load(c) == lightest]
        return PlacementDecision(_pick(tied, rng), "locality", len(eligible))
    lightest = min(load(c) for c in eligible)
    best = [c for c in eligible if load(c) == lightest]
    nearest = max(c.rack_chunks for c in best)
    tied = [c for c in best if c.rack_chunks == nearest]
    return PlacementDecision(_pick(tied, rng), "least_loaded", len(eligible))
