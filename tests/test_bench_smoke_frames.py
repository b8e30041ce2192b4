"""The frame benchmark still runs and reports every case (figures are not checked)."""

from __future__ import annotations

from bench.frame_rate import COLUMNS, run


def test_frame_rate_benchmark_reports_every_case() -> None:
    rows = run(control_count=50, chunk_sizes=(1 << 12, 1 << 17), chunk_total=1 << 18, runs=1)
    assert len(rows) == 4 + 4 * 2
    for row in rows:
        assert set(COLUMNS) <= set(row)
        assert row["rate"] > 0
        assert row["unit"] in {"msg/s", "MB/s"}
    assert {row["size"] for row in rows if row["unit"] == "MB/s"} == {1 << 12, 1 << 17}
