"""Key files: created with their final mode, never overwritten, refused when others can read them.

Shared by the publisher's signing keys (`keys.py`) and the TLS material (`pki.py`); each passes
the exception type its callers expect.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def write_new(path: Path, data: bytes, mode: int, error: type[Exception]) -> None:
    """Create `path` with `mode` from the start (never briefly world-readable); never overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise error(f"{path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise error(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise error(f"cannot write {path}: {exc.strerror or exc}") from None


def check_private_mode(path: Path, what: str, error: type[Exception]) -> None:
    """Refuse a private key that other users can read or write."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise error(f"cannot stat {what} {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise error(f"{what} {path} is open to other users (mode {mode:04o}); chmod 600 {path}")
