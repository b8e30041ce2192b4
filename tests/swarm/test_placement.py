"""Rendezvous placement of chunk digests onto storage centers."""

from __future__ import annotations

import math

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.swarm.placement import Rendezvous, assign, centers_for_chunk, weight

CHUNKS = 2_000


def make_digests(seed: int, count: int = CHUNKS) -> list[bytes]:
    return [blake3.blake3(f"{seed}/{i}".encode()).digest() for i in range(count)]


def make_centers(count: int) -> list[str]:
    return [f"storage-{i:02d}" for i in range(count)]


def five_sigma(trials: int, p: float) -> float:
    """Tolerance for a binomial count; +1 absorbs rounding for tiny variances."""
    return 5 * math.sqrt(trials * p * (1 - p)) + 1


digests = st.binary(min_size=1, max_size=40)
center_ids = st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=12, unique=True)


def test_golden_vector_is_stable_across_processes_and_versions() -> None:
    # Pinned values: if these change, every deployed chunk would move to other centers.
    assert weight("storage-00", bytes(32)) == 11118601376991315994
    assert centers_for_chunk(bytes(32), ["a", "b", "c", "d"], 2) == GOLDEN_ZERO_DIGEST
    assert centers_for_chunk(b"\xff" * 32, ["a", "b", "c", "d"], 4) == GOLDEN_FF_DIGEST


GOLDEN_ZERO_DIGEST = ["d", "a"]
GOLDEN_FF_DIGEST = ["b", "a", "c", "d"]


@settings(max_examples=200)
@given(digest=digests, centers=center_ids, replicas=st.integers(1, 15))
def test_replicas_are_distinct_known_centers(
    digest: bytes, centers: list[str], replicas: int
) -> None:
    chosen = centers_for_chunk(digest, centers, replicas)
    assert len(chosen) == min(replicas, len(centers))
    assert len(set(chosen)) == len(chosen)
    assert set(chosen) <= set(centers)


@settings(max_examples=200)
@given(digest=digests, centers=center_ids, replicas=st.integers(1, 15), data=st.data())
def test_deterministic_and_independent_of_center_order(
    digest: bytes, centers: list[str], replicas: int, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(centers))
    first = centers_for_chunk(digest, centers, replicas)
    assert centers_for_chunk(digest, centers, replicas) == first
    assert centers_for_chunk(digest, shuffled, replicas) == first


@settings(max_examples=200)
@given(digest=digests, centers=center_ids, replicas=st.integers(1, 14))
def test_more_replicas_extend_the_same_ranking(
    digest: bytes, centers: list[str], replicas: int
) -> None:
    fewer = centers_for_chunk(digest, centers, replicas)
    more = centers_for_chunk(digest, centers, replicas + 1)
    assert more[: len(fewer)] == fewer


@settings(max_examples=100)
@given(digest=digests, centers=center_ids)
def test_best_first_means_highest_weight_first(digest: bytes, centers: list[str]) -> None:
    ranked = centers_for_chunk(digest, centers, len(centers))
    weights = [weight(c, digest) for c in ranked]
    assert weights == sorted(weights, reverse=True)


@pytest.mark.parametrize(
    ("centers", "replicas", "message"),
    [
        ([], 1, "no storage centers"),
        (["a", "b"], 0, "replication factor must be >= 1"),
        (["a", "b"], -3, "replication factor must be >= 1"),
        (["a", "b", "a"], 1, "duplicate storage center id 'a'"),
        (["a", ""], 1, "non-empty string"),
    ],
)
def test_bad_arguments_are_rejected_clearly(
    centers: list[str], replicas: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        centers_for_chunk(b"digest", centers, replicas)


def test_a_single_string_is_not_taken_for_a_list_of_centers() -> None:
    with pytest.raises(TypeError, match="not one string"):
        centers_for_chunk(b"digest", "abc", 1)


def test_digest_must_be_bytes() -> None:
    with pytest.raises(TypeError, match="must be bytes"):
        Rendezvous(["a"], 1).centers_for("not bytes")  # type: ignore[arg-type]


def test_more_replicas_than_centers_puts_every_chunk_everywhere() -> None:
    placed = assign(make_digests(1, 50), ["x", "y", "z"], 5)
    assert placed == {c: list(range(50)) for c in ["x", "y", "z"]}


def test_assign_lists_every_center_and_matches_centers_for_chunk() -> None:
    chunk_digests = make_digests(2, 300)
    centers = make_centers(5)
    placed = assign(chunk_digests, centers, 2)
    assert set(placed) == set(centers)
    for index, digest in enumerate(chunk_digests):
        holders = {c for c, indices in placed.items() if index in indices}
        assert holders == set(centers_for_chunk(digest, centers, 2))
    for indices in placed.values():
        assert indices == sorted(indices)


def test_duplicate_digests_go_to_the_same_centers() -> None:
    a, b = make_digests(3, 2)
    placed = assign([a, b, a, a], make_centers(6), 2)
    for indices in placed.values():
        holds_a = {0, 2, 3} & set(indices)
        assert holds_a in (set(), {0, 2, 3})
    assert sum(len(v) for v in placed.values()) == 4 * 2


@settings(max_examples=15, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(2, 10), replicas=st.integers(1, 3))
def test_adding_a_center_moves_about_r_over_n_plus_one(seed: int, n: int, replicas: int) -> None:
    chunk_digests = make_digests(seed)
    centers = make_centers(n)
    before = Rendezvous(centers, replicas)
    after = Rendezvous([*centers, "storage-new"], replicas)
    moved = 0
    for digest in chunk_digests:
        old, new = set(before.centers_for(digest)), set(after.centers_for(digest))
        if old != new:
            moved += 1
            # Only the new center enters, and only one old holder gives way to it.
            assert new - old == {"storage-new"}
            assert len(old - new) == (1 if replicas <= n else 0)
    p = min(replicas, n + 1) / (n + 1)
    assert abs(moved - CHUNKS * p) <= five_sigma(CHUNKS, p)


@settings(max_examples=15, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(2, 10), replicas=st.integers(1, 3))
def test_removing_a_center_moves_only_its_chunks(seed: int, n: int, replicas: int) -> None:
    chunk_digests = make_digests(seed)
    centers = make_centers(n)
    gone = centers[seed % n]
    before = Rendezvous(centers, replicas)
    after = Rendezvous([c for c in centers if c != gone], replicas)
    moved = 0
    for digest in chunk_digests:
        old, new = set(before.centers_for(digest)), set(after.centers_for(digest))
        if gone in old:
            moved += 1
            assert old - new == {gone}
            assert len(new - old) == (1 if replicas < n else 0)
        else:
            assert old == new
    p = min(replicas, n) / n
    assert abs(moved - CHUNKS * p) <= five_sigma(CHUNKS, p)


@settings(max_examples=15, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(2, 12), replicas=st.integers(1, 3))
def test_load_is_balanced_across_centers(seed: int, n: int, replicas: int) -> None:
    placed = assign(make_digests(seed), make_centers(n), replicas)
    p = min(replicas, n) / n
    for center, indices in placed.items():
        assert abs(len(indices) - CHUNKS * p) <= five_sigma(CHUNKS, p), center
