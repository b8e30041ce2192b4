"""The loopback benchmark's core runs end to end on a tiny image (shape only, never speed)."""

from __future__ import annotations

from pathlib import Path

from bench.loopback import COLUMNS, run

SIZE = 4 << 20


def test_loopback_benchmark_moves_a_small_template_and_reports_every_column(
    tmp_path: Path,
) -> None:
    (row,) = run(SIZE, [0.5], 1 << 16, libtorrent=False, workdir=tmp_path)
    assert set(COLUMNS) <= set(row)
    assert row["tool"] == "vmswarm" and row["identical"] is True
    assert row["size"] == SIZE and row["zero_fraction"] == 0.5 and row["run"] == 1
    # The whole-image check comes after the last chunk is written, so it can only add time.
    assert 0 < row["chunks_s"] <= row["ready_s"]
    assert row["source_cpu_s"] >= 0 and row["receiver_cpu_s"] >= 0
    assert row["source_peak_rss_MiB"] > 0 and row["receiver_peak_rss_MiB"] > 0
    # Zero chunks never travel: the mixed image moves fewer bytes than it holds.
    assert 0 < row["figures"]["wire_bytes"] < SIZE
