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


@pytest.fixture(autouse=True)
def plain_tcp_unless_certificates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes these tests spawn by hand run --insecure, as LocalCluster(tls=False) does;
    certificates given to a process still win (the TLS tests give them)."""
    monkeypatch.setenv("VMSWARM_TLS_INSECURE", "true")
