"""Faults in a running swarm, with real processes through the CLI (issue 3's "Done when").

A storage center SIGKILLed mid-fetch, a host SIGKILLed mid-fetch and restarted, a peer serving
corrupt chunks, and the tracker SIGKILLed and restarted mid-fetch. Centers are upload-limited so
a fetch lasts long enough to be interrupted; every kill starts at a progress point observed on the
fetching host, never after a bare sleep.

Progress is polled with the control socket's `status` call in this process (exactly what
`vmswarm status --json` prints, without an interpreter start per poll: a CLI process costs about
a second of CPU, on a machine whose two cores the daemons need); every assertion on the final
state goes through the real `vmswarm` console script.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from vmswarm.daemon.cluster import LocalCluster, ManagedProcess, Node
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.swarm.manifest import Manifest

from .faults_common import (
    FETCH_TIMEOUT,
    TEMPLATE,
    Status,
    check_identical,
    control_status,
    fetch,
    finish_fetch,
    make_image,
    nonzero_bytes,
    publish,
    sigkill,
    start_fetch,
    stored_manifest,
    wait_for,
    wait_progress,
)

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 16 << 20
# This seed gives 15 all-zero chunks of 64 (256 KiB chunks): zero chunks never travel.
IMAGE_SEED = 3
# Per center: slow enough that a fetch lasts seconds, fast enough that the file stays short.
CENTER_UPLOAD_LIMIT = "2MB"


# -- helpers ---------------------------------------------------------------------------------


def _image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.raw", IMAGE_SIZE, seed=IMAGE_SEED, zero_fraction=0.3)


def _start_centers(
    cluster: LocalCluster, count: int, upload_limit: str = CENTER_UPLOAD_LIMIT
) -> list[Node]:
    return [cluster.start_center(f"c{i}", "--upload-limit", upload_limit) for i in range(count)]


def _cli_status(cluster: LocalCluster, node: Node) -> Status:
    result: Status = json.loads(cluster.run_cli("status", "--json", node=node).stdout)
    return result


def _template(status: Status, template_id: str) -> Status:
    found: list[Status] = [t for t in status["templates"] if t["template_id"] == template_id]
    assert len(found) == 1, f"template {template_id} not in status: {status['templates']}"
    return found[0]


def _tracker(cluster: LocalCluster) -> list[ManagedProcess]:
    return [cluster.tracker.process] if cluster.tracker is not None else []


def _wait_progress(
    cluster: LocalCluster,
    host: Node,
    template_id: str,
    percent: float,
    watched: list[subprocess.Popen[str]],
) -> Status:
    """wait_progress that also fails early if the tracker dies."""
    return wait_progress(cluster, host, template_id, percent, watched, also=_tracker(cluster))


def _check_identical(result: Status, host: Node, template_id: str, original: Path) -> None:
    assert result["size"] == IMAGE_SIZE
    check_identical(result, host, template_id, original)


def _port(peer: Status) -> int | None:
    """The listening port a linked peer announced in its handshake (None if it has none)."""
    listen = peer["listen"]
    return None if listen is None else int(listen[1])


# -- 1. a storage center dies --------------------------------------------------------------


def test_center_killed_mid_fetch_is_covered_by_replicas_and_peers(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster.start_tracker()
    centers = _start_centers(cluster, 3)
    hosts = [cluster.start_host(f"h{i}") for i in range(3)]
    image = _image(tmp_path)
    template_id = publish(cluster, image, replicas=2)

    fetches = [start_fetch(cluster, host) for host in hosts]
    watched = _wait_progress(cluster, hosts[0], template_id, 30.0, fetches)
    assert not watched["complete"]
    # Kill the center this host is getting the most from right now: its loss must show.
    by_port = {center.port: center for center in centers}
    serving = [p for p in watched["peers"] if p["role"] == "storage" and _port(p) in by_port]
    assert serving, f"h0 has no link to a center at {watched['percent']}%"
    busiest = max(serving, key=lambda p: p["bytes_in"])
    assert busiest["bytes_in"] > 0
    victim = next(center for center in centers if center.port == _port(busiest))
    sigkill(victim.process)

    results = [finish_fetch(running) for running in fetches]
    for host, result in zip(hosts, results, strict=True):
        _check_identical(result, host, template_id, image)
    assert not victim.process.running
    # Every host lost the victim: what it got after the kill came from the others.
    for host in hosts:
        template = _template(control_status(host), template_id)
        assert template["complete"] and template["percent"] == 100.0
        assert all(_port(p) != victim.port for p in template["peers"])


# -- 2. a host dies and comes back -----------------------------------------------------------


def _durable_chunks(host: Node, manifest: Manifest) -> set[int]:
    """The chunks a restart of `host` will find present, read from its files after the kill.

    Opening the ImageStore runs the same crash recovery the daemon runs on start (journal
    replay, re-verification of what the journal claims) and checkpoints; the daemon, opening
    the store next, finds exactly this set. The flock it takes is free: its owner is dead, and
    the store is closed again before the daemon restarts.
    """
    with ImageStore(host.data_dir / "templates", manifest) as store:
        return set(store.have)


def test_host_killed_mid_fetch_refetches_only_chunks_it_did_not_hold(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster.start_tracker()
    # r=1 over two centers and no other host: every chunk has exactly one source, so no chunk
    # can arrive twice (no endgame duplicates) and the byte counts below must match exactly.
    _start_centers(cluster, 2)
    host = cluster.start_host("h0")
    image = _image(tmp_path)
    template_id = publish(cluster, image, replicas=1)

    interrupted = start_fetch(cluster, host)
    before = _wait_progress(cluster, host, template_id, 40.0, [interrupted])
    assert not before["complete"]
    sigkill(host.process)
    _, err = interrupted.communicate(timeout=FETCH_TIMEOUT)
    assert interrupted.returncode != 0 and "vmswarm: error:" in err

    manifest = stored_manifest(host, template_id)
    durable = _durable_chunks(host, manifest)
    # Nothing the daemon reported verified before the kill was lost by it.
    assert len(durable) >= before["chunks_held"]
    nonzero = [i for i in range(manifest.chunk_count) if not manifest.is_zero(i)]
    missing = [i for i in nonzero if i not in durable]
    missing_bytes = nonzero_bytes(manifest, missing)
    total_bytes = nonzero_bytes(manifest)
    assert 0 < missing_bytes < total_bytes, "the kill did not land mid-fetch"

    cluster.restart(host)
    fetched = fetch(cluster, host)
    _check_identical(fetched, host, template_id, image)
    # The restarted daemon resumes on its own, so the download may finish before this fetch
    # arrives (then the reply moved 0 bytes); its status counters count the resumed download.
    moved = fetched["bytes_from_centers"] + fetched["bytes_from_peers"]
    assert moved in (0, missing_bytes)

    template = _template(_cli_status(cluster, host), template_id)
    assert template["complete"]
    # Each chunk payload a link delivers is either written as new (bytes_from_*), or dropped
    # (wasted_bytes: late, duplicate or already held), or banned (corrupt_chunks).
    assert template["wasted_bytes"] == 0
    assert template["corrupt_chunks"] == 0
    received = template["bytes_from_centers"] + template["bytes_from_peers"]
    assert received + template["wasted_bytes"] == missing_bytes


# -- 3. a peer serves corrupt chunks ---------------------------------------------------------


def _start_corrupt_peer(cluster: LocalCluster, image: Path, peer_id: bytes) -> ManagedProcess:
    process = ManagedProcess(
        "corrupt-peer",
        [
            "--tracker",
            cluster.tracker_address,
            "--template",
            TEMPLATE,
            "--image",
            str(image),
            "--peer-id",
            peer_id.hex(),
        ],
        log_path=cluster.workdir / "logs" / "corrupt-peer.log",
        cwd=REPO_ROOT,
        command=[sys.executable, "-m", "tests.e2e.corrupt_peer"],
    )
    process.start()
    return process


def test_peer_serving_corrupt_chunks_is_banned_and_images_come_out_right(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster.start_tracker()
    _start_centers(cluster, 2)
    hosts = [cluster.start_host(f"h{i}") for i in range(2)]
    image = _image(tmp_path)
    template_id = publish(cluster, image, replicas=2)

    liar_id = secrets.token_bytes(16)
    liar = _start_corrupt_peer(cluster, image, liar_id)
    try:

        def listed() -> Status | None:
            view = cluster.run_cli("peers", TEMPLATE, "--json", check=False)
            if view.returncode != 0:
                return None
            peers = json.loads(view.stdout)["peers"]
            found: list[Status] = [p for p in peers if p["peer_id"] == liar_id.hex()]
            return found[0] if found else None

        # The tracker shows the liar as a complete host before any fetch starts.
        entry = wait_for(cluster, "the corrupt peer announced", listed, processes=[liar])
        assert entry["role"] == "host" and entry["complete"]

        fetches = [start_fetch(cluster, host) for host in hosts]
        results = [finish_fetch(running) for running in fetches]
        assert liar.running, f"the corrupt peer died:\n{liar.log_tail(20)}"
    finally:
        liar.terminate_and_wait()

    for host, result in zip(hosts, results, strict=True):
        _check_identical(result, host, template_id, image)
        template = _template(_cli_status(cluster, host), template_id)
        assert template["corrupt_chunks"] > 0
        banned = {b["peer_id"]: b for b in template["banned"]}
        assert liar_id.hex() in banned, f"{host.name} did not ban the corrupt peer: {banned}"
        assert banned[liar_id.hex()]["corrupt_chunks"] >= 1
        assert "corrupt" in banned[liar_id.hex()]["reason"]
        assert all(p["peer_id"] != liar_id.hex() for p in template["peers"])
    text = cluster.run_cli("status", node=hosts[0]).stdout
    assert f"banned {liar_id.hex()[:16]}" in text
    assert "served " in liar.log_tail(200)


# -- 4. the tracker dies and comes back ------------------------------------------------------


def test_tracker_killed_and_restarted_mid_fetch(cluster: LocalCluster, tmp_path: Path) -> None:
    # A short TTL, so the daemons re-announce to the restarted tracker within seconds.
    tracker = cluster.start_tracker("--announce-ttl", "6")
    # Slower centers: the fetch must outlast the tracker's restart (an interpreter start).
    _start_centers(cluster, 2, upload_limit="1MB")
    hosts = [cluster.start_host(f"h{i}") for i in range(2)]
    image = _image(tmp_path)
    template_id = publish(cluster, image, replicas=2)

    fetches = [start_fetch(cluster, host) for host in hosts]
    at_kill = _wait_progress(cluster, hosts[0], template_id, 25.0, fetches)
    assert not at_kill["complete"]
    sigkill(tracker.process)

    # Known peers keep trading while the tracker is away.
    def progressed() -> Status | None:
        now = _template(control_status(hosts[0]), template_id)
        return now if now["done_bytes"] > at_kill["done_bytes"] else None

    wait_for(cluster, "progress without a tracker", progressed, watched=fetches)
    cluster.restart(tracker)
    back = [_template(control_status(host), template_id) for host in hosts]
    assert not all(t["complete"] for t in back), "the fetch ended before the tracker came back"

    results = [finish_fetch(running) for running in fetches]
    for host, result in zip(hosts, results, strict=True):
        _check_identical(result, host, template_id, image)

    # The catalog survived the SIGKILL ...
    listed = json.loads(cluster.run_cli("templates", "--json").stdout)["templates"]
    assert [(t["name"], t["version"]) for t in listed if t["template_id"] == template_id] == [
        ("disk", "1")
    ]
    # ... and the hosts came back to the restarted tracker as complete holders.
    host_ports = {host.port for host in hosts}

    def reannounced() -> Status | None:
        view = cluster.run_cli("peers", TEMPLATE, "--json", check=False)
        if view.returncode != 0:
            return None
        found: Status = json.loads(view.stdout)
        complete = {
            p["port"]
            for p in found["peers"]
            if p["role"] == "host" and p["complete"] and p["port"] in host_ports
        }
        return found if complete == host_ports else None

    wait_for(cluster, "the hosts re-announced", reannounced, processes=[tracker.process])
