"""Fixtures shared by the daemon tests."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..ci import unavailable
from ..tmpfs import tmpfs_mounter


@pytest.fixture
def qemu() -> None:
    """qemu-io and qemu-img, the real NBD clients the export tests read with."""
    for tool in ("qemu-io", "qemu-img"):
        if shutil.which(tool) is None:
            unavailable("run qemu-io and qemu-img", f"{tool} is not installed")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a size-limited tmpfs, so ENOSPC is real; skip where mounting is not permitted."""
    numbers = itertools.count()
    with tmpfs_mounter() as mount:
        yield lambda size: mount(tmp_path / f"tmpfs{next(numbers)}", size)
