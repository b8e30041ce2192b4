"""bench.manifest_rate still runs: tiny image, output shape only (never speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vmswarm.swarm.manifest import MIN_CHUNK_SIZE

from bench import manifest_rate


def test_measure_gives_baselines_and_one_row_per_chunk_size_and_method(tmp_path: Path) -> None:
    path = tmp_path / "bench.img"
    random_bytes = manifest_rate.make_image(path, 40 * MIN_CHUNK_SIZE + 99)
    assert 0 < random_bytes < path.stat().st_size
    rows, warm = manifest_rate.measure(path, [MIN_CHUNK_SIZE, 2 * MIN_CHUNK_SIZE], repeats=1)
    assert warm["warmup_read_MBps"] > 0
    methods = [row["method"] for row in rows]
    assert methods[:4] == [
        "read only (readinto)",
        "blake3 1 thread",
        "blake3 AUTO threads",
        "sha256",
    ]
    built = rows[4:]
    assert [(r["method"], r["chunk_size"]) for r in built] == [
        ("manifest_from_file", MIN_CHUNK_SIZE),
        ("builder.update, 1 thread", MIN_CHUNK_SIZE),
        ("manifest_from_file", 2 * MIN_CHUNK_SIZE),
        ("builder.update, 1 thread", 2 * MIN_CHUNK_SIZE),
    ]
    assert built[0]["chunks"] == 41 and built[2]["chunks"] == 21
    assert built[0]["zeros"] == built[1]["zeros"] > 0
    for row in rows:
        assert row["best_MBps"] >= row["median_MBps"] > 0


def test_main_prints_json_then_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest_rate.main(
        ["--size", "1M", "--dir", str(tmp_path), "--repeats", "1", "--chunk-sizes", "64k,128KiB"]
    )
    out = capsys.readouterr().out
    doc = json.loads(out.splitlines()[0])
    assert doc["benchmark"] == "manifest_rate"
    assert doc["image_bytes"] == 1 << 20
    assert len(doc["results"]) == 4 + 2 * 2
    assert "| method" in out
    assert list(tmp_path.iterdir()) == []  # the image is cleaned up


def test_parse_size() -> None:
    assert manifest_rate.parse_size("1GiB") == 1 << 30
    assert manifest_rate.parse_size("256M") == 256 << 20
    assert manifest_rate.parse_size("4096") == 4096
