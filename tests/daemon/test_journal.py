"""The durable bitfield: checkpoint file plus journal, replay, torn tails, damaged checkpoints."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmswarm.daemon.journal import RECORD_SIZE, DurableBitfield
from vmswarm.daemon.storeerrors import StoreCorruptError

TAG = bytes(range(32))
SIZE = 40


def _open(
    base: Path,
    *,
    verify: Callable[[int], bool] = lambda _: True,
    initial: Iterable[int] = (),
    journal_records: int = 64,
    tag: bytes = TAG,
    size: int = SIZE,
    synced: list[int] | None = None,
) -> DurableBitfield:
    def sync() -> None:
        if synced is not None:
            synced.append(1)

    return DurableBitfield(
        base,
        size,
        tag,
        sync_data=sync,
        verify=verify,
        initial=initial,
        journal_records=journal_records,
    )


def _append_raw(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_create_writes_initial_marks_and_checkpoints(tmp_path: Path) -> None:
    bits = _open(tmp_path / "t", initial=[1, 5])
    assert bits.created and not bits.damaged
    assert set(bits.snapshot()) == {1, 5}
    assert bits.bits_path.exists() and bits.journal_path.exists()
    bits.close()
    again = _open(tmp_path / "t", initial=[7])  # initial only applies on creation
    assert not again.created
    assert set(again.snapshot()) == {1, 5}
    again.close()


def test_marks_survive_without_checkpoint_and_are_reverified(tmp_path: Path) -> None:
    first = _open(tmp_path / "t")
    for i in (3, 9, 12):
        first.add(i)
    assert first.journal_records == 3
    # No close: as after kill -9, only the journal (in the page cache) knows about them.
    checked: list[int] = []

    def verify(index: int) -> bool:
        checked.append(index)
        return True

    second = _open(tmp_path / "t", verify=verify)
    assert set(second.snapshot()) == {3, 9, 12}
    assert second.replayed == {3, 9, 12}
    assert sorted(checked) == [3, 9, 12]
    assert second.journal_records == 0  # recovery checkpointed
    second.close()
    first.close()


def test_unverified_journal_marks_are_dropped(tmp_path: Path) -> None:
    first = _open(tmp_path / "t")
    first.add(2)
    first.add(4)
    second = _open(tmp_path / "t", verify=lambda i: i != 4)
    assert set(second.snapshot()) == {2}
    assert second.dropped_on_open == {4}
    second.close()
    third = _open(tmp_path / "t", verify=lambda _: pytest.fail("clean open must not re-verify"))
    assert set(third.snapshot()) == {2}
    third.close()
    first.close()


def test_torn_tail_record_is_ignored(tmp_path: Path) -> None:
    first = _open(tmp_path / "t")
    first.add(1)
    first.add(2)
    first.add(3)
    raw = first.journal_path.read_bytes()
    # Tear the third record: half of it reached the disk.
    _append_raw(first.journal_path, 2 * RECORD_SIZE, bytes(RECORD_SIZE))
    _append_raw(first.journal_path, 2 * RECORD_SIZE, raw[2 * RECORD_SIZE : 2 * RECORD_SIZE + 7])
    second = _open(tmp_path / "t")
    assert set(second.snapshot()) == {1, 2}
    second.close()
    first.close()


def test_corrupt_record_ends_replay(tmp_path: Path) -> None:
    first = _open(tmp_path / "t")
    for i in (1, 2, 3):
        first.add(i)
    raw = bytearray(first.journal_path.read_bytes())
    raw[RECORD_SIZE + 9] ^= 0xFF  # flip a bit in record 2's index
    _append_raw(first.journal_path, 0, bytes(raw[: 3 * RECORD_SIZE]))
    second = _open(tmp_path / "t")
    assert set(second.snapshot()) == {1}  # record 3 came after the damage, so it is not trusted
    second.close()
    first.close()


def test_records_of_an_older_generation_are_ignored(tmp_path: Path) -> None:
    first = _open(tmp_path / "t")
    first.add(6)
    stale = first.journal_path.read_bytes()[:RECORD_SIZE]
    first.discard(6)
    first.checkpoint()
    _append_raw(first.journal_path, 0, stale)  # a record that a lost truncate left behind
    second = _open(tmp_path / "t")
    assert 6 not in second
    second.close()
    first.close()


def test_discard_is_durable_without_checkpoint(tmp_path: Path) -> None:
    first = _open(tmp_path / "t", initial=[0, 1])
    first.discard(0)
    first.add(5)
    first.discard(5)
    second = _open(tmp_path / "t")
    assert set(second.snapshot()) == {1}
    second.close()
    first.close()


def test_full_journal_checkpoints_by_itself(tmp_path: Path) -> None:
    synced: list[int] = []
    bits = _open(tmp_path / "t", journal_records=4, synced=synced)
    generation = bits.generation
    for i in range(10):
        bits.add(i)
    assert bits.generation == generation + 2
    assert bits.journal_records == 2
    assert len(synced) == 3  # creation plus two automatic checkpoints, each syncing data first
    again = _open(tmp_path / "t", journal_records=4)
    assert set(again.snapshot()) == set(range(10))
    again.close()
    bits.close()


def test_damaged_checkpoint_is_rebuilt_from_the_data(tmp_path: Path) -> None:
    bits = _open(tmp_path / "t", initial=[1, 2, 3])
    bits.close()
    raw = bytearray(bits.bits_path.read_bytes())
    raw[-1] ^= 0x55
    bits.bits_path.write_bytes(bytes(raw))
    rebuilt = _open(tmp_path / "t", verify=lambda i: i in (2, 3, 30))
    assert rebuilt.damaged
    assert set(rebuilt.snapshot()) == {2, 3, 30}
    rebuilt.close()


def test_checkpoint_of_another_store_is_refused(tmp_path: Path) -> None:
    _open(tmp_path / "t").close()
    with pytest.raises(StoreCorruptError, match="another store"):
        _open(tmp_path / "t", tag=bytes(32))
    with pytest.raises(StoreCorruptError, match="another store"):
        _open(tmp_path / "t", size=SIZE + 1)


def test_out_of_range_index_is_rejected(tmp_path: Path) -> None:
    bits = _open(tmp_path / "t")
    with pytest.raises(IndexError):
        bits.add(SIZE)
    bits.close()


# fsync is free on tmpfs, which keeps many hypothesis examples cheap; any directory works.
_FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 15)),
        st.tuples(st.just("discard"), st.integers(0, 15)),
        st.tuples(st.just("checkpoint"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS, cut=st.floats(0, 1), garbage=st.binary(max_size=RECORD_SIZE - 1))
def test_reopen_after_any_torn_tail_gives_a_prefix_state(
    ops: list[tuple[str, int]], cut: float, garbage: bytes
) -> None:
    with tempfile.TemporaryDirectory(dir=_FAST_TMP) as tmp:
        base = Path(tmp) / "t"
        bits = _open(base, size=16, journal_records=8)
        # The state after each journal length within the current generation.
        states: dict[int, set[int]] = {0: set()}
        for op, index in ops:
            if op == "add":
                bits.add(index)
            elif op == "discard":
                bits.discard(index)
            else:
                bits.checkpoint()
            if bits.journal_records == 0:
                states = {}
            states[bits.journal_records] = set(bits.snapshot())
        records = int(cut * bits.journal_records)
        offset = records * RECORD_SIZE
        # Everything after the cut is lost, with a partial record in its place.
        _append_raw(bits.journal_path, offset, bytes(RECORD_SIZE) + b"\0" * RECORD_SIZE)
        _append_raw(bits.journal_path, offset, garbage)
        reopened = _open(base, size=16, journal_records=8)
        assert set(reopened.snapshot()) == states[records]
        reopened.close()
        bits.close()


def test_a_larger_journal_from_an_earlier_run_is_replayed_whole(tmp_path: Path) -> None:
    first = _open(tmp_path / "t", journal_records=64)
    for i in range(20):
        first.add(i)
    second = _open(tmp_path / "t", journal_records=4)
    assert set(second.snapshot()) == set(range(20))
    second.close()
    first.close()


def test_checkpoint_without_changes_syncs_nothing(tmp_path: Path) -> None:
    synced: list[int] = []
    bits = _open(tmp_path / "t", synced=synced)
    generation = bits.generation
    bits.checkpoint()
    bits.close()
    assert (bits.generation, len(synced)) == (generation, 1)  # only creation synced
    again = _open(tmp_path / "t", synced=synced)
    again.add(3)
    again.close()
    assert again.generation == generation + 1
