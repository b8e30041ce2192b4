"""The VM placement policy: capacity first, then locality, then load; ties reproducible."""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.swarm.vm_placement import (
    HostCandidate,
    HostCapacity,
    PlacementError,
    choose_host,
    holds_most,
)

GIB = 1 << 30


@dataclass(frozen=True)
class Size:
    name: str
    vcpus: int
    memory: int


SMALL = Size("small", 1, 1 * GIB)
MEDIUM = Size("medium", 2, 2 * GIB)


def host(
    host_id: str,
    vcpus: tuple[int, int] = (4, 0),
    memory_gib: tuple[int, int] = (8, 0),
    chunks: int = 0,
    rack: str | None = None,
    rack_chunks: int = 0,
) -> HostCandidate:
    capacity = HostCapacity(vcpus[0], vcpus[1], memory_gib[0] * GIB, memory_gib[1] * GIB)
    return HostCandidate(host_id, capacity, chunks, rack, max(rack_chunks, chunks))


def test_holds_most_means_more_than_half() -> None:
    assert holds_most(6, 10) and not holds_most(5, 10) and not holds_most(0, 0)


# (hosts, template chunks, flavor, chosen id, reason)
CASES = [
    pytest.param([host("a"), host("b", vcpus=(4, 2))], 10, SMALL, "a", "least_loaded", id="load"),
    pytest.param(
        [host("a"), host("b", vcpus=(4, 3), chunks=6)], 10, SMALL, "b", "locality", id="most-wins"
    ),
    pytest.param(
        [host("a"), host("b", vcpus=(4, 3), chunks=5)],
        10,
        SMALL,
        "a",
        "least_loaded",
        id="half-is-not-most",
    ),
    pytest.param(
        [host("a", chunks=8), host("b", chunks=10, vcpus=(4, 2))],
        10,
        SMALL,
        "b",
        "locality",
        id="complete-copy-beats-load",
    ),
    pytest.param(
        [host("a", chunks=10, vcpus=(4, 4)), host("b", chunks=1)],
        10,
        SMALL,
        "b",
        "least_loaded",
        id="full-holder-without-vcpus",
    ),
    pytest.param(
        [host("a", chunks=10, memory_gib=(8, 7)), host("b")],
        10,
        MEDIUM,
        "b",
        "least_loaded",
        id="full-holder-without-memory",
    ),
    pytest.param(
        [host("a", chunks=9, vcpus=(4, 1)), host("b", chunks=9)],
        10,
        SMALL,
        "b",
        "locality",
        id="equal-holders-least-loaded",
    ),
    pytest.param(
        [host("a", vcpus=(2, 0), memory_gib=(2, 0)), host("b", vcpus=(16, 4), memory_gib=(64, 8))],
        10,
        SMALL,
        "b",
        "least_loaded",
        id="share-after-placement",
    ),
    pytest.param(
        [host("b", rack="r1"), host("a", rack="r2"), host("c", rack="r1", rack_chunks=4)],
        10,
        SMALL,
        "c",
        "least_loaded",
        id="rack-breaks-load-tie",
    ),
    pytest.param([host("b"), host("a"), host("c")], 10, SMALL, "a", "least_loaded", id="id-tie"),
    pytest.param([host("a", chunks=0)], 0, SMALL, "a", "least_loaded", id="empty-template"),
]


@pytest.mark.parametrize(("hosts", "chunks", "flavor", "chosen", "reason"), CASES)
def test_choice_table(
    hosts: list[HostCandidate], chunks: int, flavor: Size, chosen: str, reason: str
) -> None:
    decision = choose_host(chunks, hosts, flavor)
    assert (decision.host.host_id, decision.reason) == (chosen, reason)


def test_no_capacity_names_each_host_and_the_flavor() -> None:
    hosts = [
        host("a", vcpus=(2, 2)),
        HostCandidate("b", None, 10),
        host("c", memory_gib=(1, 1)),
    ]
    with pytest.raises(PlacementError) as caught:
        choose_host(10, hosts, SMALL)
    assert caught.value.code == "no_capacity"
    message = caught.value.message
    assert "'small' (1 vCPUs, 1024 MiB)" in message
    assert "a has 0 free vCPUs" in message
    assert "b reported no capacity" in message
    assert "c has 4 free vCPUs and 0 MiB free memory" in message


def test_no_hosts_at_all_says_so() -> None:
    with pytest.raises(PlacementError, match="no live host daemon"):
        choose_host(3, [], SMALL)


def test_memory_exactly_free_fits() -> None:
    decision = choose_host(1, [host("a", memory_gib=(2, 1))], SMALL)
    assert decision.host.host_id == "a"


def test_requested_host_is_used_even_if_another_is_better() -> None:
    hosts = [host("a", chunks=10), host("b", vcpus=(4, 3))]
    decision = choose_host(10, hosts, SMALL, requested="b")
    assert (decision.host.host_id, decision.reason) == ("b", "requested")


def test_requested_host_still_needs_capacity() -> None:
    hosts = [host("a"), host("b", vcpus=(4, 4))]
    with pytest.raises(PlacementError) as caught:
        choose_host(10, hosts, SMALL, requested="b")
    assert caught.value.code == "no_capacity"
    assert "b has 0 free vCPUs" in caught.value.message


def test_requested_host_must_be_known() -> None:
    with pytest.raises(PlacementError) as caught:
        choose_host(10, [host("a")], SMALL, requested="zz")
    assert caught.value.code == "unknown_host"


def test_rng_spreads_ties_only_among_the_tied() -> None:
    hosts = [host("a"), host("b"), host("c"), host("d", vcpus=(4, 1))]
    rng = random.Random(1)
    seen = {choose_host(5, hosts, SMALL, rng=rng).host.host_id for _ in range(60)}
    assert seen == {"a", "b", "c"}


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        choose_host(1, [host("a"), host("a")], SMALL)


def test_capacity_rejects_negative_values() -> None:
    with pytest.raises(ValueError, match="vcpus_used"):
        HostCapacity(4, -1, 8, 0)


def test_overcommitted_host_has_nothing_free() -> None:
    capacity = HostCapacity(2, 5, GIB, 2 * GIB)
    assert (capacity.vcpus_free, capacity.memory_free) == (0, 0)
    assert capacity.load_after(1, GIB) == Fraction(3, 1)


# --- properties ---

capacities = st.builds(
    HostCapacity,
    vcpus_total=st.integers(0, 8),
    vcpus_used=st.integers(0, 10),
    memory_total=st.integers(0, 8).map(lambda g: g * GIB),
    memory_used=st.integers(0, 10).map(lambda g: g * GIB),
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[HostCandidate], Size]:
    chunks = draw(st.integers(0, 12))
    count = draw(st.integers(0, 7))
    hosts = [
        HostCandidate(
            f"h{i}",
            draw(st.none() | capacities),
            chunks_held=draw(st.integers(0, chunks)),
            rack=draw(st.sampled_from([None, "r1", "r2"])),
            rack_chunks=draw(st.integers(0, chunks)),
        )
        for i in range(count)
    ]
    flavor = Size("f", draw(st.integers(1, 4)), draw(st.integers(1, 4)) * GIB)
    return chunks, hosts, flavor


def _fits(candidate: HostCandidate, flavor: Size) -> bool:
    cap = candidate.capacity
    return cap is not None and cap.fits(flavor.vcpus, flavor.memory)


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.integers(0, 3))
def test_properties_of_every_decision(
    scenario: tuple[int, list[HostCandidate], Size], seed: int
) -> None:
    chunks, hosts, flavor = scenario
    eligible = [h for h in hosts if _fits(h, flavor)]
    try:
        decision = choose_host(chunks, hosts, flavor, rng=random.Random(seed))
    except PlacementError as exc:
        # Refused exactly when no host has room for both the vCPUs and the memory.
        assert exc.code == "no_capacity"
        assert not eligible
        return
    chosen = decision.host
    # Never a host without capacity.
    assert _fits(chosen, flavor)
    assert decision.eligible == len(eligible)
    # Never worse locality than an eligible alternative, unless no eligible host holds most.
    if any(holds_most(h.chunks_held, chunks) for h in eligible):
        assert decision.reason == "locality"
        assert chosen.chunks_held == max(h.chunks_held for h in eligible)
    else:
        # Then the least loaded, and nobody equally loaded has more of the template in its rack.
        assert decision.reason == "least_loaded"
        assert chosen.capacity is not None
        load = chosen.capacity.load_after(flavor.vcpus, flavor.memory)
        for other in eligible:
            assert other.capacity is not None
            other_load = other.capacity.load_after(flavor.vcpus, flavor.memory)
            assert load <= other_load
            if other_load == load:
                assert chosen.rack_chunks >= other.rack_chunks


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_without_rng_the_decision_ignores_candidate_order(
    scenario: tuple[int, list[HostCandidate], Size],
) -> None:
    chunks, hosts, flavor = scenario
    try:
        first = choose_host(chunks, hosts, flavor).host.host_id
    except PlacementError:
        return
    assert choose_host(chunks, list(reversed(hosts)), flavor).host.host_id == first


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.data())
def test_requested_host_is_honoured_or_refused_for_capacity(
    scenario: tuple[int, list[HostCandidate], Size], data: st.DataObject
) -> None:
    chunks, hosts, flavor = scenario
    if not hosts:
        return
    wanted = data.draw(st.sampled_from(hosts))
    try:
        decision = choose_host(chunks, hosts, flavor, requested=wanted.host_id)
    except PlacementError as exc:
        assert exc.code == "no_capacity" and not _fits(wanted, flavor)
        return
    assert decision.host == wanted and _fits(wanted, flavor)
