"""Picker.set_preferred: a prefetch profile's order comes after deadlines, before the rest."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.picker import Picker, PickerConfig

from .test_picker import NO_RANDOM, make, peer


def test_preferred_order_beats_rarest_first() -> None:
    picker = make("1333")
    p = peer(picker, "1111")
    picker.set_preferred([3, 1])
    # Without it chunk 0 (the rarest) would come first.
    assert picker.pick(p, 0.0, limit=3) == [3, 1, 0]


def test_preferred_order_beats_random_first() -> None:
    for seed in range(10):
        picker = make("9" * 10, config=PickerConfig(random_first=4), seed=seed)
        picker.set_preferred([8, 2, 5])
        assert picker.pick(peer(picker, "1" * 10), 0.0, limit=3) == [8, 2, 5]


def test_deadlines_still_come_first() -> None:
    picker = make("1333")
    picker.set_preferred([2, 1])
    picker.set_deadline(3, 10.0)
    assert picker.pick(peer(picker, "1111"), 0.0, limit=3) == [3, 2, 1]


def test_held_requested_and_lacking_chunks_are_skipped() -> None:
    picker = make("11111", have="01000")
    a = peer(picker, "11111", "a")
    b = peer(picker, "11011", "b")
    picker.set_preferred([1, 4, 2, 3, 0])  # 1 is held
    assert picker.pick(a, 0.0, limit=1) == [4]
    # 4 is on its way from a, and b lacks 2.
    assert picker.pick(b, 0.0, limit=2) == [3, 0]
    assert picker.pick(a, 0.0, limit=2) == [2]


def test_a_released_preferred_chunk_is_picked_again_in_order() -> None:
    picker = make("1111")
    a = peer(picker, "1111", "a")
    b = peer(picker, "1111", "b")
    picker.set_preferred([2, 0, 3, 1])
    assert picker.pick(a, 0.0, limit=2) == [2, 0]
    picker.received(a, 0)
    assert picker.remove_peer(a) == [2]
    assert picker.pick(b, 0.0, limit=2) == [2, 3]


def test_zero_chunks_in_the_order_are_skipped() -> None:
    picker = make("111", skip="010")
    picker.set_preferred([1, 2])
    assert picker.pick(peer(picker, "111"), 0.0, limit=2) == [2, 0]


def test_a_new_order_replaces_the_old_and_empty_clears_it() -> None:
    picker = make("1333")
    picker.set_preferred([3])
    picker.set_preferred([2])
    a = peer(picker, "1111", "a")
    assert picker.pick(a, 0.0, limit=1) == [2]
    picker.set_preferred([])
    assert picker.pick(a, 0.0, limit=2) == [0]  # rarest again


def test_out_of_range_order_is_refused() -> None:
    picker = make("11")
    with pytest.raises(IndexError):
        picker.set_preferred([0, 2])


def test_endgame_is_unchanged() -> None:
    picker = make("11", config=PickerConfig(endgame_depth=2))
    a = peer(picker, "11", "a")
    b = peer(picker, "11", "b")
    picker.set_preferred([1, 0])
    assert picker.pick(a, 0.0, limit=2) == [1, 0]
    assert picker.in_endgame
    assert sorted(picker.pick(b, 0.0, limit=2)) == [0, 1]  # duplicates, as without an order
    assert picker.pick(b, 0.0, limit=2) == []


def test_a_peer_lacking_the_head_of_a_long_order_gets_its_best_ranked_chunks() -> None:
    n = 10_000
    order = list(range(n - 1, -1, -1))
    picker = Picker([1] * n, Bitfield(n), random.Random(0), config=NO_RANDOM)
    picker.set_preferred(order)
    # Only the last thousand entries of the order (chunks 0..999) are held by this peer.
    p = "p"
    picker.add_peer(p, Bitfield.from_indices(n, range(1000)))
    assert picker.pick(p, 0.0, limit=3) == [999, 998, 997]
    full = "full"
    picker.add_peer(full, Bitfield.from_indices(n, range(n)))
    assert picker.pick(full, 0.0, limit=2) == [n - 1, n - 2]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 40).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.permutations(list(range(n))),
            st.lists(st.booleans(), min_size=n, max_size=n),
            st.integers(1, 6),
        )
    )
)
def test_single_peer_download_follows_the_order(
    case: tuple[int, list[int], list[bool], int],
) -> None:
    n, order, peer_has, depth = case
    picker = Picker([1] * n, Bitfield(n), random.Random(1), config=NO_RANDOM)
    picker.set_preferred(order)
    held = [i for i in range(n) if peer_has[i]]
    picker.add_peer("p", Bitfield.from_indices(n, held))
    wanted = [i for i in order if peer_has[i]]
    fetched: list[int] = []
    while True:
        picked = picker.pick("p", 0.0, limit=depth)
        if not picked:
            break
        fetched.extend(picked)
        for index in picked:
            picker.received("p", index)
    assert fetched == wanted
