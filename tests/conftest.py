"""Fixtures shared by every test folder."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh directory under /tmp, for AF_UNIX socket paths."""
    # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
    path = Path(tempfile.mkdtemp(prefix="vms-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
