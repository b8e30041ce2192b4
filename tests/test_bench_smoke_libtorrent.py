"""The libtorrent baseline still runs end to end on a tiny image (figures are not checked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from vmswarm.daemon.mixed_image import write_mixed_image

from bench.libtorrent_baseline import COLUMNS, parse_size, run_libtorrent_transfer, table_row

needs_libtorrent = pytest.mark.skipif(
    importlib.util.find_spec("libtorrent") is None,
    reason="libtorrent is not installed (pip install 'vmswarm[bench]')",
)


@needs_libtorrent
def test_libtorrent_baseline_moves_a_small_image(tmp_path: Path) -> None:
    image = tmp_path / "seeder" / "image.raw"
    image.parent.mkdir()
    size = 5 * (1 << 20) + 12345
    write_mixed_image(image, size, seed=7)
    figures = run_libtorrent_transfer(image, tmp_path / "work", piece_size=1 << 20, timeout=60)
    assert figures["identical"] is True
    assert figures["size"] == size
    assert figures["pieces"] == 6
    assert figures["payload_bytes"] == size
    assert figures["uploaded_payload"] >= size
    assert figures["transport"] == "tcp"
    assert figures["seconds"] > 0 and figures["mb_per_s"] > 0
    assert figures["seeder_peak_rss_bytes"] > 0 and figures["leecher_peak_rss_bytes"] > 0
    assert set(table_row(figures)) == set(COLUMNS)


def test_sizes_parse_in_binary_and_decimal_units() -> None:
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("4 MiB") == 4 << 20
    assert parse_size("10MB") == 10_000_000
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("lots")
