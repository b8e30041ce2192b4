"""The tracker's peer ranking, in table form.

A candidate is written "id role rack have": role is host/storage, rack "-" means unknown,
have is a bitfield string ("1101"), "n=3" for a peer that announced only a count, or
"n=all" for a count-only complete peer.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.handout import PeerClass, PeerRecord, rank_peers, useful_chunks
from vmswarm.swarm.messages import Role


def peer(spec: str) -> PeerRecord:
    peer_id, role, rack, have = spec.split()
    if have == "n=all":
        bitfield, have_count, complete = None, 4, True
    elif have.startswith("n="):
        bitfield, have_count, complete = None, int(have[2:]), False
    else:
        bitfield, have_count, complete = Bitfield.from_string(have), 0, False
    return PeerRecord(
        peer_id=peer_id.encode(),
        address=("10.0.0.1", 7000 + sum(map(ord, peer_id))),
        role=Role(role),
        rack=None if rack == "-" else rack,
        bitfield=bitfield,
        have_count=have_count,
        complete=complete,
    )


def ranked_ids(
    asker: str | None,
    rack: str | None,
    specs: list[str],
    cap: int = 50,
    rng: random.Random | None = None,
    asker_id: str = "me",
) -> list[str]:
    bitfield = None if asker is None else Bitfield.from_string(asker)
    result = rank_peers(
        asker_id.encode(),
        [peer(s) for s in specs],
        asker_bitfield=bitfield,
        asker_rack=rack,
        cap=cap,
        rng=rng,
    )
    return [p.peer_id.decode() for p in result]


CASES = [
    pytest.param(
        "0000",
        "r1",
        ["p host r1 1100", "s storage r2 1010", "c host r2 1111"],
        ["c", "s", "p"],
        id="complete hosts, then storage, then partial peers",
    ),
    pytest.param(
        "0000",
        "r1",
        ["p1 host r2 1000", "p3 host r2 1110", "p2 host r2 0110"],
        ["p3", "p2", "p1"],
        id="partial peers: most chunks first",
    ),
    pytest.param(
        "1100",
        "r1",
        ["a host r2 1110", "b host r2 0011", "c host r2 1101"],
        ["b", "a", "c"],
        id="partial peers counted by what the asker lacks, not by what they have",
    ),
    pytest.param(
        "0000",
        "r1",
        ["c2 host r2 1111", "c1 host r1 1111", "s2 storage r2 1100", "s1 storage r1 0011"],
        ["c1", "c2", "s1", "s2"],
        id="same rack first within each class",
    ),
    pytest.param(
        "0000",
        "r1",
        ["far host r2 1110", "near host r1 1000"],
        ["near", "far"],
        id="rack beats chunk count among partial peers",
    ),
    pytest.param(
        "0000",
        None,
        ["b host r1 1111", "a host r2 1111"],
        ["a", "b"],
        id="asker without rack: no rack preference, ties by peer id",
    ),
    pytest.param(
        "1100",
        "r1",
        [
            "s1 storage r1 1100",
            "s2 storage r2 0011",
            "p1 host r1 0100",
            "p2 host r2 0001",
        ],
        ["s2", "p2", "s1", "p1"],
        id="peers holding nothing the asker lacks come last, still in class order",
    ),
    pytest.param(
        None,
        "r1",
        ["s storage r1 0000", "p host r1 0110", "q host r1 0100"],
        ["p", "q", "s"],
        id="asker without bitfield lacks everything",
    ),
    pytest.param(
        "1111",
        "r1",
        ["p host r2 1000", "s storage r1 1100", "c host r2 1111", "q host r1 0000"],
        ["c", "s", "q", "p"],
        id="complete asker: every peer useless, class and rack order only",
    ),
    pytest.param(
        "0000",
        "r1",
        ["me host r1 1111", "a host r2 0001"],
        ["a"],
        id="never the asker itself",
    ),
    pytest.param(
        "1100",
        "r1",
        ["k host r1 n=all", "n1 host r1 n=1", "n3 host r1 n=3", "z host r1 n=0"],
        ["k", "n3", "n1", "z"],
        id="count-only peers: complete counts as complete, partial by estimate",
    ),
]


@pytest.mark.parametrize(("asker", "rack", "specs", "expected"), CASES)
def test_ranking_table(
    asker: str | None, rack: str | None, specs: list[str], expected: list[str]
) -> None:
    assert ranked_ids(asker, rack, specs) == expected


@pytest.mark.parametrize(
    ("cap", "expected"),
    [(0, []), (1, ["c"]), (2, ["c", "s"]), (3, ["c", "s", "p"]), (99, ["c", "s", "p"])],
)
def test_cap_keeps_the_best(cap: int, expected: list[str]) -> None:
    specs = ["p host r1 1100", "s storage r2 1010", "c host r2 1111"]
    assert ranked_ids("0000", "r1", specs, cap=cap) == expected


def test_negative_cap_is_rejected() -> None:
    with pytest.raises(ValueError, match="cap must be >= 0"):
        ranked_ids("0000", "r1", ["a host r1 1111"], cap=-1)


def test_duplicate_candidate_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate peer id b'a'"):
        ranked_ids("0000", "r1", ["a host r1 1111", "a host r2 0001"])


def test_bitfield_size_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="bitfield of 3 chunks"):
        ranked_ids("0000", "r1", ["a host r1 111"])


@pytest.mark.parametrize(
    ("spec", "cls", "have", "complete"),
    [
        ("a host r1 1111", PeerClass.COMPLETE_HOST, 4, True),
        ("a host r1 1011", PeerClass.PARTIAL_HOST, 3, False),
        ("a storage r1 1111", PeerClass.STORAGE, 4, True),
        ("a host r1 n=2", PeerClass.PARTIAL_HOST, 2, False),
        ("a host r1 n=all", PeerClass.COMPLETE_HOST, 4, True),
    ],
)
def test_record_derives_counts_and_class(
    spec: str, cls: PeerClass, have: int, complete: bool
) -> None:
    record = peer(spec)
    assert (record.peer_class, record.have_count, record.complete) == (cls, have, complete)


def test_record_rejects_counts_that_contradict_its_bitfield() -> None:
    with pytest.raises(ValueError, match="contradict its bitfield"):
        PeerRecord(b"a", ("h", 1), Role.HOST, bitfield=Bitfield.from_string("10"), have_count=2)
    with pytest.raises(ValueError, match="have_count must be >= 0"):
        PeerRecord(b"a", ("h", 1), Role.HOST, have_count=-1)


def test_record_stays_hashable_with_a_bitfield() -> None:
    record = peer("a host r1 1010")
    assert record in {record}


@pytest.mark.parametrize(
    ("asker", "spec", "useful"),
    [
        ("0000", "a host - 1010", 2),
        ("1000", "a host - 1010", 1),
        ("1010", "a host - 1010", 0),
        ("1100", "a host - n=all", 2),
        ("1100", "a host - n=1", 1),  # 1 chunk * 2 lacking / 4, rounded up
        ("1100", "a host - n=3", 2),  # capped by what the asker lacks
        ("1111", "a host - n=3", 0),
        (None, "a host - n=3", 3),
    ],
)
def test_useful_chunks(asker: str | None, spec: str, useful: int) -> None:
    bitfield = None if asker is None else Bitfield.from_string(asker)
    assert useful_chunks(peer(spec), bitfield) == useful


EQUAL_SEEDS = [f"c{i} host r1 1111" for i in range(8)]


def test_ties_shuffle_with_an_injected_rng_and_spread_the_first_pick() -> None:
    firsts = {
        ranked_ids("0000", "r1", EQUAL_SEEDS, cap=1, rng=random.Random(seed))[0]
        for seed in range(40)
    }
    assert len(firsts) >= 4
    assert firsts <= {f"c{i}" for i in range(8)}


def test_shuffle_never_crosses_class_or_rack() -> None:
    specs = [*EQUAL_SEEDS, "far host r2 1111", "s storage r1 1111", "p host r1 1110"]
    for seed in range(20):
        ids = ranked_ids("0000", "r1", specs, rng=random.Random(seed))
        assert sorted(ids[:8]) == sorted(f"c{i}" for i in range(8))
        assert ids[8:] == ["far", "s", "p"]


def test_same_rng_seed_same_answer() -> None:
    specs = [*EQUAL_SEEDS, "s storage r1 1111"]
    a = ranked_ids("0000", "r1", specs, rng=random.Random(7))
    b = ranked_ids("0000", "r1", specs, rng=random.Random(7))
    assert a == b


candidate_specs = st.lists(
    st.tuples(
        st.sampled_from(["host", "storage"]),
        st.sampled_from(["r1", "r2", "-"]),
        st.text(alphabet="01", min_size=6, max_size=6),
    ),
    max_size=12,
)


@settings(max_examples=150)
@given(
    specs=candidate_specs,
    asker=st.one_of(st.none(), st.text(alphabet="01", min_size=6, max_size=6)),
    cap=st.integers(0, 15),
    seed=st.one_of(st.none(), st.integers(0, 1000)),
    data=st.data(),
)
def test_properties_hold_for_any_swarm(
    specs: list[tuple[str, str, str]],
    asker: str | None,
    cap: int,
    seed: int | None,
    data: st.DataObject,
) -> None:
    lines = [f"p{i} {role} {rack} {bits}" for i, (role, rack, bits) in enumerate(specs)]
    lines.append("me host r1 000000")
    shuffled = data.draw(st.permutations(lines))

    def run(order: list[str]) -> list[str]:
        rng = None if seed is None else random.Random(seed)
        return ranked_ids(asker, "r1", order, cap=cap, rng=rng)

    ids = run(lines)
    # Deterministic, and the input order never matters.
    assert ids == run(lines) == run(shuffled)
    assert "me" not in ids
    assert len(ids) == min(cap, len(specs))
    assert len(set(ids)) == len(ids)
    # Anything left out is no better than the worst peer handed out.
    records = {p.peer_id.decode(): p for p in (peer(s) for s in lines)}
    bitfield = None if asker is None else Bitfield.from_string(asker)

    def grade(peer_id: str) -> tuple[bool, int, bool]:
        record = records[peer_id]
        return (
            useful_chunks(record, bitfield) == 0,
            record.peer_class,
            record.rack != "r1",
        )

    grades = [grade(i) for i in ids]
    assert grades == sorted(grades)
    if ids:
        left_out = set(records) - set(ids) - {"me"}
        assert all(grade(i) >= grades[-1] for i in left_out)
