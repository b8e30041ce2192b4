"""Size-limited tmpfs mounts, so a test's ENOSPC is real (mounting needs root; CI has it)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from .ci import unavailable


def _unavailable(reason: str) -> NoReturn:
    # CI runs as root and must exercise the real ENOSPC path, so a missing tmpfs fails there.
    unavailable("test a real full disk", reason)


@contextlib.contextmanager
def tmpfs_mounter() -> Iterator[Callable[[Path, str], Path]]:
    """`mount(target, size)` creates `target` and mounts a tmpfs of `size` there; all are
    unmounted on exit. Skips (fails under CI) where mounting is not permitted."""
    mounts: list[Path] = []

    def mount(target: Path, size: str) -> Path:
        target.mkdir(parents=True)
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

    try:
        yield mount
    finally:
        for target in reversed(mounts):
            subprocess.run(["umount", "-l", str(target)], check=False)
