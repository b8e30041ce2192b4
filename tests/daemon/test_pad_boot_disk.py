"""pad_boot_disk: the boot disk's bytes first, then seeded random data up to the size."""

from __future__ import annotations

from pathlib import Path

import pytest
from vmswarm.daemon.bootdisk import MIB, pad_boot_disk


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "boot.raw"
    src.write_bytes(bytes(range(256)) * (MIB // 256) * 2)
    return src


def test_keeps_the_disk_and_pads_with_seeded_random_data(tmp_path: Path) -> None:
    src = _source(tmp_path)
    padded = pad_boot_disk(src, tmp_path / "a.raw", 8 * MIB, seed=3)
    data = padded.read_bytes()
    assert len(data) == 8 * MIB
    assert data[: 2 * MIB] == src.read_bytes()
    tail = data[2 * MIB :]
    assert tail.count(0) < len(tail) // 100  # random, so no zero chunks to skip
    assert pad_boot_disk(src, tmp_path / "b.raw", 8 * MIB, seed=3).read_bytes() == data
    assert pad_boot_disk(src, tmp_path / "c.raw", 8 * MIB, seed=4).read_bytes()[2 * MIB :] != tail
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("size", [MIB, 4 * MIB + 1])
def test_refuses_a_size_below_the_disk_or_not_whole_mib(tmp_path: Path, size: int) -> None:
    with pytest.raises(ValueError, match="whole number of MiB"):
        pad_boot_disk(_source(tmp_path), tmp_path / "out.raw", size)
