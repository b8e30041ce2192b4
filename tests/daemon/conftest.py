"""Fixtures shared by the daemon tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _unavailable(reason: str) -> None:
    # CI runs as root and must exercise the real ENOSPC path, so a missing tmpfs fails there.
    if os.environ.get("CI"):
        pytest.fail(f"CI must test a real full disk, but {reason}")
    pytest.skip(reason)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a size-limited tmpfs, so ENOSPC is real; skip where mounting is not permitted."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        target = tmp_path / f"tmpfs{len(mounts)}"
        target.mkdir()
        if shutil.which("mount") is None:
            _unavailable("no mount command, so no small tmpfs for a real ENOSPC")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            _unavailable(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")
        mounts.append(target)
        return target

    yield mount
    for target in reversed(mounts):
        subprocess.run(["umount", "-l", str(target)], check=False)
