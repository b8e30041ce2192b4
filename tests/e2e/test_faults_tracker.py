"""The tracker restarts with its state directory, then without it (wiped).

With its state the catalog is simply back. Without it the catalog is empty, so the storage
centers re-register the templates they hold (manifest and the publisher's signature, kept
beside their chunks) as soon as they reach the tracker again, and every daemon re-announces:
a new host can look the template up and fetch it, signature-checked, with nobody re-publishing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from vmswarm.daemon.cluster import LocalCluster, Node

from .faults_common import TEMPLATE, check_identical, fetch, make_image, publish, sigkill, wait_for

pytestmark = pytest.mark.e2e

IMAGE_SIZE = 4 << 20


def _listed(cluster: LocalCluster, template_id: str) -> list[dict[str, Any]] | None:
    view = cluster.run_cli("templates", "--json", check=False)
    if view.returncode != 0:
        return None
    found = [t for t in json.loads(view.stdout)["templates"] if t["template_id"] == template_id]
    return found or None


def _announced(cluster: LocalCluster, nodes: list[Node]) -> list[dict[str, Any]] | None:
    """The tracker's peer list for the template once every node in `nodes` is on it."""
    view = cluster.run_cli("peers", TEMPLATE, "--json", check=False)
    if view.returncode != 0:
        return None
    peers: list[dict[str, Any]] = json.loads(view.stdout)["peers"]
    ports = {p["port"] for p in peers}
    return peers if all(node.port in ports for node in nodes) else None


def test_tracker_restarts_with_and_without_its_state(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "cluster", signing=True) as cluster:
        tracker = cluster.start_tracker("--announce-ttl", "6")
        centers = [cluster.start_center(f"c{i}") for i in range(2)]
        h0 = cluster.start_host("h0")
        image = make_image(tmp_path / "disk.raw", IMAGE_SIZE)
        template_id = publish(cluster, image, replicas=2)
        check_identical(fetch(cluster, h0), h0, template_id, image)

        # 1. SIGKILL and restart on the same state: the catalog is there at once.
        sigkill(tracker.process)
        cluster.restart(tracker)
        listed = _listed(cluster, template_id)
        assert listed is not None and (listed[0]["name"], listed[0]["version"]) == ("disk", "1")
        h1 = cluster.start_host("h1")
        check_identical(fetch(cluster, h1), h1, template_id, image)

        # 2. SIGKILL, wipe the state, restart: the centers re-register what they hold.
        sigkill(tracker.process)
        assert tracker.data_dir is not None
        shutil.rmtree(tracker.data_dir)
        tracker.data_dir.mkdir()
        cluster.restart(tracker)
        relisted = wait_for(
            cluster,
            "the template back in the wiped tracker's catalog",
            lambda: _listed(cluster, template_id),
            processes=[tracker.process],
        )
        assert (relisted[0]["name"], relisted[0]["version"]) == ("disk", "1")
        log = tracker.process.log_tail(400)
        assert "registered template disk:1" in log.split("--- start 3")[-1]
        wait_for(
            cluster,
            "every daemon re-announced",
            lambda: _announced(cluster, [*centers, h0, h1]),
            processes=[tracker.process],
        )
        # A new host fetches it: the lookup works and the signature still checks out.
        h2 = cluster.start_host("h2")
        check_identical(fetch(cluster, h2), h2, template_id, image)
