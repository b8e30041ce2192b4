"""The picker benchmark's core still runs a whole (tiny) download with both pickers."""

from __future__ import annotations

import pytest

from bench.picker_rate import COLUMNS, run


@pytest.mark.parametrize("impl", ["buckets", "naive"])
def test_picker_rate_core_completes_a_small_download(impl: str) -> None:
    row = run(impl, chunks=120, peers=6, seed=3)
    assert set(COLUMNS) <= set(row)
    assert row["picker"] == impl
    assert (row["chunks"], row["peers"]) == (120, 6)
    # Every chunk was picked at least once; endgame duplicates and expiries may add more.
    assert row["picked"] >= 120
    assert row["pick_calls"] == row["rounds"] * 6
    assert row["picker_seconds"] > 0


def test_picker_rate_rejects_an_unknown_picker() -> None:
    with pytest.raises(ValueError, match="unknown picker"):
        run("quantum", chunks=8, peers=2)
