"""The tracker's announce table: latest announce per peer, forgotten after the TTL."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.daemon.announces import AnnounceTable, Holding, PeerAnnounce
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.messages import Role

TEMPLATE = b"t" * 32
OTHER = b"o" * 32


def announce(
    peer: int, now: float, templates: dict[bytes, Holding] | None = None, role: Role = Role.HOST
) -> PeerAnnounce:
    return PeerAnnounce(
        peer_id=bytes([peer]) * 16,
        role=role,
        address=("10.0.0.1", 7000 + peer),
        rack=None,
        holdings=templates or {},
        last_seen=now,
    )


def test_an_announce_expires_after_the_ttl_and_comes_back_as_new() -> None:
    table = AnnounceTable(ttl=30.0)
    assert table.update(announce(1, now=100.0))
    assert not table.update(announce(1, now=110.0))  # a refresh, not a new peer
    assert table.get(bytes([1]) * 16, now=139.9) is not None
    assert [a.peer_id for a in table.live(139.9)] == [bytes([1]) * 16]
    assert table.live(140.0) == []  # 30 s after the last announce at 110
    assert table.get(bytes([1]) * 16, now=140.0) is None
    gone = table.expire(140.0)
    assert [a.last_seen for a in gone] == [110.0]
    assert len(table) == 0
    assert table.update(announce(1, now=150.0))


def test_an_expired_entry_not_yet_purged_counts_as_new_on_reannounce() -> None:
    table = AnnounceTable(ttl=10.0)
    table.update(announce(1, now=0.0))
    assert table.update(announce(1, now=50.0))


def test_holders_lists_only_live_announcers_of_the_template() -> None:
    table = AnnounceTable(ttl=10.0)
    holding = Holding(b"\xc0", complete=False)
    table.update(announce(1, 0.0, {TEMPLATE: holding}))
    table.update(announce(2, 5.0, {TEMPLATE: holding, OTHER: holding}, role=Role.STORAGE))
    table.update(announce(3, 5.0, {OTHER: holding}))
    assert [a.peer_id[0] for a, _ in table.holders(TEMPLATE, now=6.0)] == [1, 2]
    assert [a.peer_id[0] for a, _ in table.holders(TEMPLATE, now=12.0)] == [2]


def test_a_new_announce_replaces_the_previous_holdings() -> None:
    table = AnnounceTable(ttl=10.0)
    table.update(announce(1, 0.0, {TEMPLATE: Holding(b"\x80", False)}))
    table.update(announce(1, 1.0, {OTHER: Holding(b"\x80", False)}))
    assert table.holders(TEMPLATE, now=2.0) == []
    assert len(table.holders(OTHER, now=2.0)) == 1


def test_holding_resolves_raw_bits_once_the_chunk_count_is_known() -> None:
    holding = Holding(b"\xa0", complete=False)  # announced before the catalog knew the size
    assert holding.resolved(3) == Bitfield.from_string("101")
    assert holding.resolved(2) is None  # bit 2 set past the end
    assert holding.resolved(9) is None  # needs two bytes
    checked = Holding(b"\xe0", complete=True, bitfield=Bitfield.from_string("111"))
    assert checked.resolved(3) is checked.bitfield


def test_the_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="TTL"):
        AnnounceTable(ttl=0)


@settings(max_examples=60, deadline=None)
@given(
    ttl=st.floats(min_value=0.5, max_value=100),
    events=st.lists(st.tuples(st.integers(0, 5), st.floats(0, 50)), max_size=30),
    probe=st.floats(0, 200),
)
def test_live_peers_are_exactly_those_announced_within_the_ttl(
    ttl: float, events: list[tuple[int, float]], probe: float
) -> None:
    table = AnnounceTable(ttl)
    latest: dict[int, float] = {}
    for peer, offset in events:
        # Time only moves forward; each announce replaces the peer's previous one.
        now = max([offset, *latest.values()])
        table.update(announce(peer, now))
        latest[peer] = now
    probe_time = max([probe, *latest.values()])
    expected = sorted(p for p, seen in latest.items() if seen + ttl > probe_time)
    assert [a.peer_id[0] for a in table.live(probe_time)] == expected
    table.expire(probe_time)
    assert len(table) == len(expected)
