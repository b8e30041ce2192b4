"""The loopback benchmark's core runs end to end on a tiny image (shape only, never speed)."""

from __future__ import annotations

from pathlib import Path

from bench.loopback import COLUMNS, PLAIN_LABEL, RATIO_COLUMNS, TLS_LABEL, medians, run, tls_cost

SIZE = 4 << 20


def test_loopback_benchmark_moves_a_small_template_plain_and_over_tls_with_every_column(
    tmp_path: Path,
) -> None:
    plain, secure = run(SIZE, [0.5], 1 << 16, libtorrent=False, workdir=tmp_path, tls=(False, True))
    assert (plain["tool"], plain["tls"]) == (PLAIN_LABEL, False)
    assert (secure["tool"], secure["tls"]) == (TLS_LABEL, True)
    for row in (plain, secure):
        assert set(COLUMNS) <= set(row)
        assert row["identical"] is True
        assert row["size"] == SIZE and row["zero_fraction"] == 0.5 and row["run"] == 1
        # The whole-image check comes after the last chunk is written, so it can only add time.
        assert 0 < row["chunks_s"] <= row["ready_s"]
        assert row["source_cpu_s"] >= 0 and row["receiver_cpu_s"] >= 0
        assert row["source_peak_rss_MiB"] > 0 and row["receiver_peak_rss_MiB"] > 0
        # Zero chunks never travel: the mixed image moves fewer bytes than it holds.
        assert 0 < row["figures"]["wire_bytes"] < SIZE
    # Both vmswarm runs get a median row, and the TLS one is compared with the plain one.
    summary = medians([plain, secure])
    assert {m["tool"] for m in summary} == {PLAIN_LABEL, TLS_LABEL}
    (cost,) = tls_cost(summary)
    assert cost["zero_fraction"] == 0.5
    for column in ("chunks_MB/s", "ready_MB/s"):
        assert column in RATIO_COLUMNS and cost[f"{column} tls/plain"] > 0


def test_plain_runs_alone_give_no_tls_comparison() -> None:
    rows = [{"tool": PLAIN_LABEL, "zero_fraction": 0.0, "chunks_MB/s": 1.0, "identical": True}]
    assert tls_cost(medians(rows)) == []
