"""Fixtures shared by the e2e tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vmswarm.daemon.cluster import LocalCluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster with nothing started yet (each test starts its tracker with its options)."""
    with LocalCluster(tmp_path / "cluster") as c:
        yield c
