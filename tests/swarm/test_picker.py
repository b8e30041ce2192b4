"""Piece picker policy, written in libtorrent's compact notation.

An availability string such as "2223333" gives each chunk's availability: background peers
bg0, bg1, ... are added so that chunk i is held by exactly that many of them. A peer's bitfield
is written "1101". Adding the peer under test raises the availability of its own chunks by one,
which keeps their order.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)
from vmswarm.swarm.availability import Availability, bit_indices, mask_of, random_member
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.picker import Picker, PickerConfig, chunk_lengths

CHUNK = 1 << 20
NO_RANDOM = PickerConfig(random_first=0)


def make(
    avail: str,
    *,
    have: str | None = None,
    skip: str | None = None,
    config: PickerConfig = NO_RANDOM,
    seed: int = 0,
    lengths: list[int] | None = None,
) -> Picker:
    n = len(avail)
    picker = Picker(
        lengths or [CHUNK] * n,
        Bitfield.from_string(have or "0" * n),
        random.Random(seed),
        skip=Bitfield.from_string(skip) if skip else None,
        config=config,
    )
    levels = [int(c) for c in avail]
    for k in range(max(levels, default=0)):
        holders = [i for i, level in enumerate(levels) if level > k]
        picker.add_peer(f"bg{k}", Bitfield.from_indices(n, holders))
    return picker


def peer(picker: Picker, bits: str, key: str = "p") -> str:
    picker.add_peer(key, Bitfield.from_string(bits))
    return key


# ---- rarest first ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("avail", "bits", "expected"),
    [
        ("3323312", "1111111", {5}),
        ("3323312", "1111101", {2, 6}),
        ("3323312", "1101001", {6}),
        ("2212212", "1111111", {2, 5}),
        ("0000009", "0000001", {6}),
        ("5555551", "1111110", {0, 1, 2, 3, 4, 5}),
    ],
)
def test_rarest_first_picks_rarest_chunk_the_peer_has(
    avail: str, bits: str, expected: set[int]
) -> None:
    for seed in range(8):
        picker = make(avail, seed=seed)
        assert set(picker.pick(peer(picker, bits), 0.0, limit=1)) <= expected
        assert len(picker.outstanding("p")) == 1


def test_rarest_first_orders_a_whole_pipeline() -> None:
    picker = make("4132")
    assert picker.pick(peer(picker, "1111"), 0.0, limit=4) == [1, 3, 2, 0]


def test_availability_counts_background_and_peer() -> None:
    picker = make("4132")
    peer(picker, "1010")
    assert [picker.availability(i) for i in range(4)] == [5, 1, 4, 2]


def test_ties_are_broken_randomly_not_by_index() -> None:
    firsts = set()
    for seed in range(40):
        picker = make("1" * 16, seed=seed)
        firsts.update(picker.pick(peer(picker, "1" * 16), 0.0, limit=1))
    assert len(firsts) >= 8


def test_already_held_chunks_are_never_picked() -> None:
    picker = make("1222", have="1000")
    assert sorted(picker.pick(peer(picker, "1111"), 0.0, limit=4)) == [1, 2, 3]


# ---- random first ---------------------------------------------------------------------------


def test_random_first_phase_ignores_rarity() -> None:
    config = PickerConfig(random_first=4)
    firsts = set()
    for seed in range(40):
        picker = make("1" + "9" * 19, config=config, seed=seed)
        got = picker.pick(peer(picker, "1" * 20), 0.0, limit=1)
        firsts.update(got)
    assert len(firsts) > 5


def test_random_first_only_picks_chunks_the_peer_has() -> None:
    config = PickerConfig(random_first=4)
    for seed in range(20):
        picker = make("9" * 12, config=config, seed=seed)
        got = picker.pick(peer(picker, "001100000011"), 0.0, limit=4)
        assert sorted(got) == [2, 3, 10, 11]


def test_random_first_ends_once_enough_chunks_are_held() -> None:
    config = PickerConfig(random_first=4)
    for seed in range(10):
        picker = make("9" * 4 + "1" + "9" * 15, have="1111" + "0" * 16, config=config, seed=seed)
        assert picker.pick(peer(picker, "1" * 20), 0.0, limit=1) == [4]


def test_random_first_counts_received_chunks() -> None:
    config = PickerConfig(random_first=1)
    for seed in range(10):
        picker = make("9" * 7 + "1", config=config, seed=seed)
        p = peer(picker, "1" * 8)
        first = picker.pick(p, 0.0, limit=1)
        picker.received(p, first[0])
        if first != [7]:
            assert picker.pick(p, 0.0, limit=1) == [7]


def test_zero_chunks_do_not_count_as_held_for_random_first() -> None:
    config = PickerConfig(random_first=1)
    firsts = set()
    for seed in range(30):
        picker = make("1999999999", skip="0000000011", config=config, seed=seed)
        firsts.update(picker.pick(peer(picker, "1" * 10), 0.0, limit=1))
    assert len(firsts) > 2 and not firsts & {8, 9}


# ---- pipeline -------------------------------------------------------------------------------


def test_pipeline_limit_caps_outstanding_requests() -> None:
    picker = make("1111111111")
    p = peer(picker, "1" * 10)
    first = picker.pick(p, 0.0, limit=3)
    assert len(first) == 3
    assert picker.pick(p, 0.0, limit=3) == []
    picker.received(p, first[0])
    assert len(picker.pick(p, 0.0, limit=3)) == 1
    assert len(picker.outstanding(p)) == 3
    assert len(picker.pick(p, 0.0, limit=5)) == 2


def test_default_pipeline_depth_comes_from_config() -> None:
    picker = make("1" * 10, config=PickerConfig(random_first=0, pipeline_depth=6))
    assert len(picker.pick(peer(picker, "1" * 10), 0.0)) == 6


def test_no_duplicate_requests_outside_endgame() -> None:
    picker = make("0" * 12)
    a = peer(picker, "1" * 12, "a")
    b = peer(picker, "1" * 12, "b")
    got_a = picker.pick(a, 0.0, limit=4)
    got_b = picker.pick(b, 0.0, limit=4)
    assert not set(got_a) & set(got_b)
    assert not picker.in_endgame
    assert all(len(picker.requesters(i)) == 1 for i in got_a + got_b)


def test_peer_with_nothing_we_need_gets_nothing() -> None:
    picker = make("1111", have="1100")
    assert picker.pick(peer(picker, "1100"), 0.0) == []


# ---- endgame --------------------------------------------------------------------------------


def test_endgame_duplicates_and_cancels() -> None:
    config = PickerConfig(random_first=0, endgame_duplicates=2, endgame_depth=4)
    picker = make("000", config=config)
    a, b, c = (peer(picker, "111", key) for key in "abc")
    assert sorted(picker.pick(a, 0.0, limit=4)) == [0, 1, 2]
    assert picker.in_endgame
    assert sorted(picker.pick(b, 0.0, limit=4)) == [0, 1, 2]
    assert picker.pick(c, 0.0, limit=4) == []
    assert picker.received(a, 1) == [("b", 1)]
    assert picker.outstanding(b) == [0, 2]
    assert picker.requesters(1) == []
    assert picker.received(b, 0) == [("a", 0)]
    assert picker.received(b, 2) == [("a", 2)]
    assert picker.complete and not picker.in_endgame


def test_endgame_prefers_least_duplicated_chunks() -> None:
    picker = make(
        "0000", config=PickerConfig(random_first=0, endgame_duplicates=3, endgame_depth=2)
    )
    a = peer(picker, "1100", "a")
    b = peer(picker, "0011", "b")
    c = peer(picker, "1111", "c")
    assert sorted(picker.pick(a, 0.0) + picker.pick(b, 0.0)) == [0, 1, 2, 3]
    assert len(picker.pick(c, 0.0, limit=2)) == 2
    d = peer(picker, "1111", "d")
    picked = picker.pick(d, 0.0, limit=2)
    assert len(picked) == 2
    # c duplicated two chunks; d takes the two that have only one request so far.
    assert not set(picked) & set(picker.outstanding(c))


def test_endgame_duplicates_go_only_to_peers_short_of_requests() -> None:
    picker = make("0000", config=PickerConfig(random_first=0, endgame_depth=1))
    a = peer(picker, "1100", "a")
    b = peer(picker, "0011", "b")
    c = peer(picker, "1111", "c")
    assert sorted(picker.pick(a, 0.0) + picker.pick(b, 0.0)) == [0, 1, 2, 3]
    # An idle peer gets one duplicate, not a full pipeline of them.
    assert len(picker.pick(c, 0.0, limit=4)) == 1
    assert picker.pick(c, 0.0, limit=4) == []
    # a still waits on two chunks: no duplicates for it.
    assert picker.pick(a, 0.0, limit=4) == []


def test_endgame_waits_for_the_grace_before_duplicating() -> None:
    picker = make("00", config=PickerConfig(random_first=0, endgame_grace=2.0))
    a = peer(picker, "11", "a")
    assert sorted(picker.pick(a, 10.0)) == [0, 1]
    b = peer(picker, "11", "b")
    assert picker.in_endgame
    assert picker.pick(b, 11.9) == []
    assert len(picker.pick(b, 12.0)) == 1
    picker.set_endgame_grace(0.5)
    assert picker.pick(peer(picker, "11", "c"), 12.0) != []
    with pytest.raises(ValueError):
        picker.set_endgame_grace(-1.0)


def test_the_grace_counts_from_the_first_request() -> None:
    picker = make("0", config=PickerConfig(random_first=0, endgame_grace=1.0))
    a = peer(picker, "1", "a")
    b = peer(picker, "1", "b")
    assert picker.pick(a, 0.0) == [0]
    picker.failed(a, 0)
    # Released and asked again from b at 5.0: the clock restarts there.
    assert picker.pick(b, 5.0) == [0]
    c = peer(picker, "1", "c")
    assert picker.pick(c, 5.5) == []
    assert picker.pick(c, 6.0) == [0]


def test_no_endgame_while_a_sourced_chunk_is_unrequested() -> None:
    picker = make("0000")
    a = peer(picker, "1100", "a")
    peer(picker, "0011", "b")
    assert sorted(picker.pick(a, 0.0)) == [0, 1]
    assert not picker.in_endgame
    assert picker.pick(a, 0.0, limit=4) == []


def test_unsourced_chunks_do_not_block_endgame() -> None:
    picker = make("0000", config=PickerConfig(endgame_depth=4))
    a = peer(picker, "1110", "a")
    b = peer(picker, "1110", "b")
    picker.pick(a, 0.0)
    assert picker.in_endgame
    assert sorted(picker.pick(b, 0.0)) == [0, 1, 2]


# ---- timeouts -------------------------------------------------------------------------------


def test_timeouts_release_and_scale_with_chunk_length() -> None:
    config = PickerConfig(random_first=0, timeout_base=5.0, min_rate_bytes_per_s=1000.0)
    picker = make("12", config=config, lengths=[1000, 3000])
    a = peer(picker, "10", "a")
    b = peer(picker, "01", "b")
    assert picker.pick(a, 0.0) == [0]
    assert picker.pick(b, 0.0) == [1]
    assert picker.next_expiry() == 6.0
    assert picker.expired(5.9) == []
    assert picker.expired(6.0) == [("a", 0)]
    assert picker.outstanding(a) == []
    assert picker.expired(7.9) == []
    assert picker.expired(8.0) == [("b", 1)]
    assert picker.next_expiry() is None


def test_timeout_covers_requests_queued_ahead_on_the_link() -> None:
    config = PickerConfig(random_first=0, timeout_base=1.0, min_rate_bytes_per_s=100.0)
    picker = make("1234", config=config, lengths=[100, 100, 200, 100])
    p = peer(picker, "1111")
    assert picker.pick(p, 0.0, limit=3) == [0, 1, 2]
    # Expiries 1+1, 1+2, 1+4: the third chunk waits behind the first two.
    assert picker.expired(2.0) == [("p", 0)]
    assert picker.expired(3.0) == [("p", 1)]
    assert picker.expired(4.9) == []
    assert picker.expired(5.0) == [("p", 2)]


def test_expired_chunk_is_requested_elsewhere() -> None:
    config = PickerConfig(random_first=0, timeout_base=1.0)
    picker = make("0", config=config, lengths=[1024 * 1024])
    a = peer(picker, "1", "a")
    b = peer(picker, "1", "b")
    assert picker.pick(a, 0.0) == [0]
    assert picker.expired(10.0) == [("a", 0)]
    assert picker.pick(b, 10.0) == [0]
    assert picker.requesters(0) == ["b"]


def test_late_chunk_from_expired_request_still_counts_and_cancels_others() -> None:
    config = PickerConfig(random_first=0, timeout_base=1.0)
    picker = make("0", config=config)
    a = peer(picker, "1", "a")
    b = peer(picker, "1", "b")
    picker.pick(a, 0.0)
    picker.expired(100.0)
    picker.pick(b, 100.0)
    assert picker.received(a, 0) == [("b", 0)]
    assert picker.complete
    assert picker.received(b, 0) == []


def test_answered_requests_never_expire() -> None:
    picker = make("1", config=PickerConfig(random_first=0, timeout_base=1.0))
    p = peer(picker, "1")
    picker.pick(p, 0.0)
    picker.received(p, 0)
    assert picker.expired(1e9) == []


# ---- deadlines ------------------------------------------------------------------------------


def test_deadline_beats_rarity() -> None:
    picker = make("1333")
    picker.set_deadline(3, 10.0)
    assert picker.pick(peer(picker, "1111"), 0.0, limit=2) == [3, 0]


def test_deadline_beats_random_first() -> None:
    for seed in range(10):
        picker = make("9" * 10, config=PickerConfig(random_first=4), seed=seed)
        picker.set_deadline(7, 1.0)
        assert picker.pick(peer(picker, "1" * 10), 0.0, limit=1) == [7]


def test_earliest_deadline_first() -> None:
    picker = make("1333")
    picker.set_deadline(2, 20.0)
    picker.set_deadline(3, 10.0)
    assert picker.pick(peer(picker, "1111"), 0.0, limit=3) == [3, 2, 0]


def test_cleared_deadline_loses_priority() -> None:
    picker = make("1333")
    picker.set_deadline(3, 10.0)
    picker.clear_deadline(3)
    assert picker.pick(peer(picker, "1111"), 0.0, limit=1) == [0]


def test_deadline_chunk_gets_a_second_source_when_late() -> None:
    picker = make("0000", config=PickerConfig(random_first=0, deadline_duplicates=2))
    a = peer(picker, "1111", "a")
    b = peer(picker, "1111", "b")
    c = peer(picker, "1111", "c")
    picker.set_deadline(3, 5.0)
    assert picker.pick(a, 0.0, limit=1) == [3]
    assert 3 not in picker.pick(b, 1.0, limit=1)
    assert picker.pick(b, 6.0, limit=2) == [3]
    assert picker.requesters(3) == ["a", "b"]
    assert 3 not in picker.pick(c, 7.0, limit=3)
    assert picker.received(b, 3) == [("a", 3)]


def test_deadline_chunk_jumps_a_full_pipeline_by_one_slot() -> None:
    picker = make("1111", config=PickerConfig(random_first=0, deadline_extra=1))
    p = peer(picker, "1111")
    assert len(picker.pick(p, 0.0, limit=2)) == 2
    waiting = next(i for i in range(4) if i not in picker.outstanding(p))
    picker.set_deadline(waiting, 0.0)
    assert picker.pick(p, 0.0, limit=2) == [waiting]
    assert picker.pick(p, 0.0, limit=2) == []  # one extra slot, not more


def test_no_extra_slot_without_a_deadline() -> None:
    picker = make("1111", config=PickerConfig(random_first=0, deadline_extra=0))
    p = peer(picker, "1111")
    picker.pick(p, 0.0, limit=2)
    picker.set_deadline(next(i for i in range(4) if i not in picker.outstanding(p)), 0.0)
    assert picker.pick(p, 0.0, limit=2) == []


def test_deadline_for_a_held_chunk_is_ignored() -> None:
    picker = make("11", have="01")
    picker.set_deadline(1, 0.0)
    assert picker.pick(peer(picker, "11"), 0.0) == [0]


def test_deadline_chunk_the_peer_lacks_falls_through() -> None:
    picker = make("1112")
    picker.set_deadline(3, 1.0)
    assert picker.pick(peer(picker, "1110"), 0.0, limit=1) in ([0], [1], [2])


# ---- banning, failures, rejects, departures -------------------------------------------------


def test_banned_peer_gets_nothing_and_releases_its_requests() -> None:
    picker = make("0000")
    a = peer(picker, "1111", "a")
    b = peer(picker, "1111", "b")
    got = picker.pick(a, 0.0, limit=2)
    assert sorted(picker.ban(a)) == sorted(got)
    assert picker.is_banned(a)
    assert picker.pick(a, 0.0) == []
    assert [picker.availability(i) for i in range(4)] == [1, 1, 1, 1]
    picker.peer_has(a, 0)
    picker.add_peer(a, Bitfield.from_string("1111"))
    assert picker.pick(a, 0.0) == []
    assert sorted(picker.pick(b, 0.0, limit=4)) == [0, 1, 2, 3]


def test_failed_chunk_is_not_rerequested_from_the_same_peer() -> None:
    picker = make("0000")
    a = peer(picker, "1000", "a")
    assert picker.pick(a, 0.0) == [0]
    picker.failed(a, 0)
    assert picker.outstanding(a) == []
    assert picker.pick(a, 1.0) == []
    picker.peer_has(a, 0)
    assert picker.pick(a, 2.0) == []
    assert picker.unavailable() == [0, 1, 2, 3]
    b = peer(picker, "1000", "b")
    assert picker.pick(b, 3.0) == [0]
    assert picker.unavailable() == [1, 2, 3]


def test_rejected_chunk_is_released_until_the_peer_announces_it_again() -> None:
    picker = make("0000")
    a = peer(picker, "1100", "a")
    first = picker.pick(a, 0.0, limit=1)[0]
    picker.rejected(a, first)
    assert picker.outstanding(a) == []
    assert picker.availability(first) == 0
    assert picker.pick(a, 0.0, limit=4) == [1 - first]
    picker.peer_has(a, first)
    assert picker.pick(a, 0.0, limit=4) == [first]


def test_remove_peer_releases_its_requests() -> None:
    picker = make("0000")
    a = peer(picker, "1111", "a")
    got = picker.pick(a, 0.0, limit=3)
    assert picker.remove_peer(a) == got
    assert picker.remove_peer(a) == []
    assert [picker.availability(i) for i in range(4)] == [0, 0, 0, 0]
    b = peer(picker, "1111", "b")
    assert sorted(picker.pick(b, 0.0, limit=4)) == [0, 1, 2, 3]
    # A removed (not banned) peer may come back.
    picker.add_peer(a, Bitfield.from_string("1000"))
    assert picker.availability(0) == 2


def test_have_message_makes_a_chunk_pickable() -> None:
    picker = make("0000")
    a = peer(picker, "0000", "a")
    assert picker.pick(a, 0.0) == []
    picker.peer_has(a, 2)
    assert picker.availability(2) == 1
    assert picker.pick(a, 0.0) == [2]
    picker.peer_has(a, 2)
    assert picker.availability(2) == 1


# ---- zero chunks and unavailable ------------------------------------------------------------


def test_zero_chunks_are_never_requested_and_count_as_held() -> None:
    picker = make("1111", skip="0110")
    p = peer(picker, "1111")
    assert picker.missing_count == 2
    got = picker.pick(p, 0.0, limit=4)
    assert sorted(got) == [0, 3]
    for index in got:
        picker.received(p, index)
    assert picker.complete
    assert not picker.is_missing(1)


def test_all_zero_image_is_complete_from_the_start() -> None:
    picker = make("11", skip="11")
    assert picker.complete
    assert picker.pick(peer(picker, "11"), 0.0) == []


def test_unavailable_lists_missing_chunks_without_a_source() -> None:
    picker = make("1021", have="0001")
    assert picker.unavailable() == [1]
    picker.peer_has("bg0", 1)
    assert picker.unavailable() == []
    picker.remove_peer("bg0")
    assert picker.unavailable() == [0, 1]
    picker.ban("bg1")
    assert picker.unavailable() == [0, 1, 2]


def test_skipped_chunks_are_never_unavailable() -> None:
    picker = make("000", skip="010")
    assert picker.unavailable() == [0, 2]


# ---- errors ---------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    picker = make("11")
    with pytest.raises(ValueError, match="image has 2"):
        picker.add_peer("x", Bitfield.from_string("111"))
    with pytest.raises(ValueError, match="already known"):
        picker.add_peer("bg0", Bitfield.from_string("11"))
    with pytest.raises(KeyError, match="unknown peer"):
        picker.pick("nobody", 0.0)
    with pytest.raises(KeyError, match="unknown peer"):
        picker.peer_has("nobody", 0)
    with pytest.raises(IndexError, match="out of range"):
        picker.set_deadline(2, 0.0)
    with pytest.raises(ValueError, match="have bitfield"):
        Picker([1, 1], Bitfield.from_string("1"), random.Random(0))
    with pytest.raises(ValueError, match="pipeline_depth"):
        PickerConfig(pipeline_depth=0)
    with pytest.raises(ValueError, match="min_rate"):
        PickerConfig(min_rate_bytes_per_s=0)


def test_chunk_lengths_of_an_image() -> None:
    assert chunk_lengths(10, 4) == [4, 4, 2]
    assert chunk_lengths(8, 4) == [4, 4]
    assert chunk_lengths(0, 4) == []


# ---- availability buckets and chunk sets ----------------------------------------------------


@given(st.lists(st.booleans(), max_size=70))
def test_mask_of_matches_bitfield(bits: list[bool]) -> None:
    field = Bitfield.from_indices(len(bits), (i for i, b in enumerate(bits) if b))
    mask = mask_of(field)
    assert bit_indices(mask) == list(field)


@given(st.integers(min_value=1, max_value=(1 << 200) - 1), st.integers())
def test_random_member_is_a_member(mask: int, seed: int) -> None:
    assert mask >> random_member(mask, random.Random(seed)) & 1


@settings(max_examples=60)
@given(
    st.integers(min_value=1, max_value=40).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.sets(st.integers(0, n - 1)), max_size=8),
            st.lists(st.integers(0, 7), max_size=8),
        )
    )
)
def test_availability_buckets_match_counts(
    case: tuple[int, list[set[int]], list[int]],
) -> None:
    n, peers, removals = case
    availability = Availability(n)
    present = list(peers)
    for held in peers:
        availability.add(sum(1 << i for i in held))
    for r in removals:
        if present:
            held = present.pop(r % len(present))
            availability.remove(sum(1 << i for i in held))
    for i in range(n):
        expected = sum(i in held for held in present)
        assert availability.count(i) == expected
        level, found = availability.rarest(1 << i, start=0)
        assert (level, found) == (expected, 1 << i)


# ---- randomized: a state machine against a simple model -------------------------------------

N = 24


class PickerMachine(RuleBasedStateMachine):
    """Random peers, haves, picks, receipts, failures and expiries against a plain model."""

    peers = Bundle("peers")

    def __init__(self) -> None:
        super().__init__()
        self.skip = {3, 17}
        self.picker = Picker(
            [1000 + i for i in range(N)],
            Bitfield.from_indices(N, [0, 1]),
            random.Random(1),
            skip=Bitfield.from_indices(N, self.skip),
            config=PickerConfig(random_first=2, timeout_base=2.0, min_rate_bytes_per_s=1000.0),
        )
        self.had = {0, 1}
        self.holds: dict[str, set[int]] = {}
        self.failed: dict[str, set[int]] = {}
        self.banned: set[str] = set()
        self.deadlines: dict[int, float] = {}
        self.now = 0.0
        self.next_key = 0

    def usable(self, key: str) -> set[int]:
        return self.holds[key] - self.failed[key]

    @rule(target=peers, held=st.sets(st.integers(0, N - 1)))
    def add_peer(self, held: set[int]) -> str:
        key = f"peer{self.next_key}"
        self.next_key += 1
        self.picker.add_peer(key, Bitfield.from_indices(N, held))
        self.holds[key] = set(held)
        self.failed[key] = set()
        return key

    @rule(key=consumes(peers))
    def remove_peer(self, key: str) -> None:
        before = set(self.picker.outstanding(key))
        assert set(self.picker.remove_peer(key)) == before
        self.holds.pop(key, None)
        self.failed.pop(key, None)

    @rule(key=consumes(peers))
    def ban(self, key: str) -> None:
        self.picker.ban(key)
        self.banned.add(key)
        self.holds.pop(key, None)
        self.failed.pop(key, None)
        assert self.picker.pick(key, self.now) == []

    @rule(key=peers, index=st.integers(0, N - 1))
    def have(self, key: str, index: int) -> None:
        self.picker.peer_has(key, index)
        if key in self.holds:
            self.holds[key].add(index)

    @rule(key=peers, limit=st.integers(1, 5))
    def pick(self, key: str, limit: int) -> None:
        before = {i: set(self.picker.requesters(i)) for i in range(N)}
        picked = self.picker.pick(key, self.now, limit)
        if key in self.banned:
            assert picked == []
            return
        assert len(picked) == len(set(picked))
        if picked:
            # Chunks a VM waits on may take one slot beyond the pipeline (deadline_extra).
            extra = PickerConfig().deadline_extra if set(picked) & set(self.deadlines) else 0
            assert len(self.picker.outstanding(key)) <= limit + extra
        for index in picked:
            assert index not in self.had and index not in self.skip
            assert index in self.usable(key)
            assert key not in before[index]
            if before[index]:
                # A second source only in endgame or for a late deadline chunk.
                late = index in self.deadlines and self.now >= self.deadlines[index]
                assert self.picker.in_endgame or late

    @rule(data=st.data())
    def receive(self, data: st.DataObject) -> None:
        pairs = [(k, i) for k in self.holds for i in self.picker.outstanding(k)]
        if not pairs:
            return
        key, index = data.draw(st.sampled_from(pairs))
        others = set(self.picker.requesters(index)) - {key}
        cancels = self.picker.received(key, index)
        assert {k for k, _ in cancels} == others
        assert all(i == index for _, i in cancels)
        self.had.add(index)
        self.deadlines.pop(index, None)

    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        pairs = [(k, i) for k in self.holds for i in self.picker.outstanding(k)]
        if not pairs:
            return
        key, index = data.draw(st.sampled_from(pairs))
        self.picker.failed(key, index)
        self.failed[key].add(index)

    @rule(data=st.data())
    def reject(self, data: st.DataObject) -> None:
        pairs = [(k, i) for k in self.holds for i in self.picker.outstanding(k)]
        if not pairs:
            return
        key, index = data.draw(st.sampled_from(pairs))
        self.picker.rejected(key, index)
        self.holds[key].discard(index)

    @rule(step=st.floats(0.0, 10.0))
    def advance(self, step: float) -> None:
        self.now += step
        for key, index in self.picker.expired(self.now):
            assert index not in self.picker.outstanding(key)

    @rule(index=st.integers(0, N - 1), offset=st.floats(-5.0, 5.0))
    def deadline(self, index: int, offset: float) -> None:
        self.picker.set_deadline(index, self.now + offset)
        if index not in self.had and index not in self.skip:
            self.deadlines[index] = self.now + offset

    @invariant()
    def matches_model(self) -> None:
        picker = self.picker
        missing = set(range(N)) - self.had - self.skip
        assert picker.missing_count == len(missing)
        assert picker.complete == (not missing)
        reachable: set[int] = set()
        for key in self.holds:
            reachable |= self.usable(key)
        assert picker.unavailable() == sorted(missing - reachable)
        for i in range(N):
            assert picker.availability(i) == sum(i in self.usable(k) for k in self.holds)
            requesters = picker.requesters(i)
            assert len(requesters) <= 2
            if requesters:
                assert i in missing
                assert all(i in self.usable(str(k)) for k in requesters)
        for key in self.banned:
            assert picker.outstanding(key) == []


TestPickerMachine = PickerMachine.TestCase
TestPickerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# ---- randomized: an honest swarm always completes -------------------------------------------


def simulate(seed: int) -> tuple[Picker, int]:
    """Honest peers cover every chunk; liars serve corrupt data and get banned."""
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    config = PickerConfig(
        random_first=rng.randint(0, 4),
        pipeline_depth=rng.randint(1, 4),
        endgame_duplicates=rng.randint(1, 3),
        timeout_base=1.0,
        min_rate_bytes_per_s=1e6,
    )
    have = Bitfield.from_indices(n, (i for i in range(n) if rng.random() < 0.1))
    skip = Bitfield.from_indices(n, (i for i in range(n) if rng.random() < 0.1))
    picker = Picker([1000] * n, have, random.Random(seed), skip=skip, config=config)
    honest = [f"h{k}" for k in range(rng.randint(1, 6))]
    liars = {f"l{k}" for k in range(rng.randint(0, 3))}
    holdings = {key: {i for i in range(n) if rng.random() < 0.3} for key in honest}
    for i in range(n):
        holdings[rng.choice(honest)].add(i)
    pending = {key: set(held) for key, held in holdings.items()}
    for key in honest:
        # Honest peers start with part of their set and announce the rest later.
        shown = {i for i in holdings[key] if rng.random() < 0.6}
        pending[key] -= shown
        picker.add_peer(key, Bitfield.from_indices(n, shown))
    for key in liars:
        picker.add_peer(key, Bitfield.full(n))
    now = 0.0
    for step in range(1, 2000):
        if picker.complete:
            return picker, step
        now += 0.1
        for key in honest:
            if pending[key] and rng.random() < 0.3:
                index = rng.choice(sorted(pending[key]))
                pending[key].discard(index)
                picker.peer_has(key, index)
        for key in [*honest, *sorted(liars)]:
            for index in picker.pick(key, now):
                assert picker.is_missing(index)
        for key in [*honest, *sorted(liars)]:
            for index in picker.outstanding(key):
                roll = rng.random()
                if key in liars:
                    if roll < 0.5:
                        picker.failed(key, index)
                        picker.ban(key)
                        break
                elif roll < 0.4:
                    picker.received(key, index)
                # Otherwise the request stays in flight and may time out.
        picker.expired(now)
    raise AssertionError(f"seed {seed}: swarm did not complete, {picker.missing_count} missing")


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32))
def test_honest_swarm_always_completes(seed: int) -> None:
    picker, _ = simulate(seed)
    assert picker.complete
    assert picker.unavailable() == []
    assert not picker.in_endgame


def test_rarity_follows_have_messages_and_departures() -> None:
    picker = make("2211")
    picker.peer_has("bg1", 2)
    assert picker.pick(peer(picker, "1111"), 0.0, limit=1) == [3]
    picker.remove_peer("bg0")
    # bg1 and p hold chunks 0, 1 and 2; only p holds chunk 3.
    assert [picker.availability(i) for i in range(4)] == [2, 2, 2, 1]


@pytest.mark.parametrize(
    "field, value",
    [("endgame_depth", 0), ("endgame_grace", -0.1), ("endgame_duplicates", 0)],
)
def test_config_refuses_bad_endgame_settings(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        PickerConfig(**{field: value})  # type: ignore[arg-type]


def test_has_wanted_says_whether_a_peer_holds_a_missing_chunk() -> None:
    picker = make("0000", have="1100")
    a = peer(picker, "1100", "a")
    b = peer(picker, "0010", "b")
    assert not picker.has_wanted(a)
    assert picker.has_wanted(b)
    assert not picker.has_wanted("nobody")
    picker.ban(b)
    assert not picker.has_wanted(b)
