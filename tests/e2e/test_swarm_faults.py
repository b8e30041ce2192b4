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
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import trio
from vmswarm.daemon.cluster import LocalCluster, ManagedProcess, Node, vmswarm_script
from vmswarm.daemon.control import call_control
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.daemon.mixed_image import write_mixed_image
from vmswarm.swarm.manifest import Manifest

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 16 << 20
ZERO_FRACTION = 0.3
# Small chunks: progress moves in fine steps, so a kill lands close to where it was aimed.
CHUNK_SIZE = 256 << 10
TEMPLATE = "disk:1"
# This seed gives 15 all-zero chunks of 64: zero chunks never travel, and the counts show it.
IMAGE_SEED = 3
# Per center: slow enough that a fetch lasts seconds, fast enough that the file stays short.
CENTER_UPLOAD_LIMIT = "2MB"
# Bounds on waiting for something observable (a progress point, a fetch's end); never asserted.
PROGRESS_DEADLINE = 60.0
FETCH_TIMEOUT = 120.0
POLL_INTERVAL = 0.05

Status = dict[str, Any]


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster with nothing started yet (each test starts its tracker with its options)."""
    with LocalCluster(tmp_path / "cluster") as c:
        yield c


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    write_mixed_image(path, IMAGE_SIZE, zero_fraction=ZERO_FRACTION, seed=IMAGE_SEED)
    return path


def _start_centers(
    cluster: LocalCluster, count: int, upload_limit: str = CENTER_UPLOAD_LIMIT
) -> list[Node]:
    return [cluster.start_center(f"c{i}", "--upload-limit", upload_limit) for i in range(count)]


def _publish(cluster: LocalCluster, image: Path, replicas: int) -> str:
    name, version = TEMPLATE.split(":")
    result = cluster.run_cli(
        "publish",
        str(image),
        "--name",
        name,
        "--version",
        version,
        "--tracker",
        cluster.tracker_address,
        "--replicas",
        str(replicas),
        "--chunk-size",
        str(CHUNK_SIZE),
        "--json",
    )
    template_id: str = json.loads(result.stdout)["template_id"]
    return template_id


def _start_fetch(cluster: LocalCluster, host: Node) -> subprocess.Popen[str]:
    """`vmswarm fetch disk:1 --json` on `host`, running in the background."""
    return subprocess.Popen(
        [str(vmswarm_script()), "fetch", TEMPLATE, "--json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cluster.cli_env(host),
    )


def _finish_fetch(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=FETCH_TIMEOUT)
    assert process.returncode == 0, f"fetch failed ({process.returncode}): {err.strip()}"
    result: dict[str, Any] = json.loads(out)
    return result


def _control_status(node: Node) -> Status:
    """The daemon's `status` control call (what `vmswarm status --json` prints)."""
    assert node.control is not None
    result: Status = trio.run(call_control, node.control, "status", {})
    return result


def _cli_status(cluster: LocalCluster, node: Node) -> Status:
    result: Status = json.loads(cluster.run_cli("status", "--json", node=node).stdout)
    return result


def _template(status: Status, template_id: str) -> Status:
    found: list[Status] = [t for t in status["templates"] if t["template_id"] == template_id]
    assert len(found) == 1, f"template {template_id} not in status: {status['templates']}"
    return found[0]


def _wait_for(
    cluster: LocalCluster,
    what: str,
    check: Callable[[], Status | None],
    watched: list[subprocess.Popen[str]] | None = None,
    processes: list[ManagedProcess] | None = None,
) -> Status:
    """Poll `check` until it returns a status; fail early if a watched fetch or process ends."""
    deadline = time.monotonic() + PROGRESS_DEADLINE
    while True:
        for fetch in watched or []:
            if fetch.poll() is not None:
                out, err = fetch.communicate()
                pytest.fail(f"a fetch ended before {what}: rc={fetch.returncode} {out} {err}")
        for process in processes or []:
            if not process.running:
                pytest.fail(f"{process.name} died before {what}:\n{process.log_tail(20)}")
        found = check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {name}\n{tail}" for name, tail in cluster.iter_logs())
            pytest.fail(f"no {what} within {PROGRESS_DEADLINE}s\n{logs}")
        time.sleep(POLL_INTERVAL)


def _wait_progress(
    cluster: LocalCluster,
    host: Node,
    template_id: str,
    percent: float,
    watched: list[subprocess.Popen[str]],
) -> Status:
    """Wait until `host` holds at least `percent` of the template; its template status then."""

    def check() -> Status | None:
        status = _control_status(host)
        held: list[Status] = [t for t in status["templates"] if t["template_id"] == template_id]
        if held and held[0]["percent"] >= percent:
            return held[0]
        return None

    return _wait_for(
        cluster, f"{percent}% on {host.name}", check, watched, [host.process, *_tracker(cluster)]
    )


def _tracker(cluster: LocalCluster) -> list[ManagedProcess]:
    return [cluster.tracker.process] if cluster.tracker is not None else []


def _stored_manifest(host: Node, template_id: str) -> Manifest:
    path = host.data_dir / "templates" / f"{template_id}.manifest"
    manifest = Manifest.decode(path.read_bytes())
    assert manifest.template_id.hex() == template_id
    return manifest


def _file_digest(path: Path) -> bytes:
    hasher = blake3.blake3()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            hasher.update(block)
    return hasher.digest()


def _check_identical(result: dict[str, Any], host: Node, template_id: str, original: Path) -> None:
    """The fetched file hashes to the manifest's whole-image digest (and to the original)."""
    assert result["template_id"] == template_id
    assert result["size"] == IMAGE_SIZE
    manifest = _stored_manifest(host, template_id)
    digest = _file_digest(Path(result["path"]))
    assert digest == manifest.digest, f"{host.name}: image differs from the manifest's digest"
    assert digest == _file_digest(original)


def _port(peer: Status) -> int | None:
    """The listening port a linked peer announced in its handshake (None if it has none)."""
    listen = peer["listen"]
    return None if listen is None else int(listen[1])


def _sigkill(process: ManagedProcess) -> None:
    process.kill(signal.SIGKILL)
    assert process.wait(10) == -signal.SIGKILL


# -- 1. a storage center dies --------------------------------------------------------------


def test_center_killed_mid_fetch_is_covered_by_replicas_and_peers(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster.start_tracker()
    centers = _start_centers(cluster, 3)
    hosts = [cluster.start_host(f"h{i}") for i in range(3)]
    image = _image(tmp_path)
    template_id = _publish(cluster, image, replicas=2)

    fetches = [_start_fetch(cluster, host) for host in hosts]
    watched = _wait_progress(cluster, hosts[0], template_id, 30.0, fetches)
    assert not watched["complete"]
    # Kill the center this host is getting the most from right now: its loss must show.
    by_port = {center.port: center for center in centers}
    serving = [p for p in watched["peers"] if p["role"] == "storage" and _port(p) in by_port]
    assert serving, f"h0 has no link to a center at {watched['percent']}%"
    busiest = max(serving, key=lambda p: p["bytes_in"])
    assert busiest["bytes_in"] > 0
    victim = next(center for center in centers if center.port == _port(busiest))
    _sigkill(victim.process)

    results = [_finish_fetch(fetch) for fetch in fetches]
    for host, result in zip(hosts, results, strict=True):
        _check_identical(result, host, template_id, image)
    assert not victim.process.running
    # Every host lost the victim: what it got after the kill came from the others.
    for host in hosts:
        template = _template(_control_status(host), template_id)
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
    template_id = _publish(cluster, image, replicas=1)

    fetch = _start_fetch(cluster, host)
    before = _wait_progress(cluster, host, template_id, 40.0, [fetch])
    assert not before["complete"]
    _sigkill(host.process)
    _, err = fetch.communicate(timeout=FETCH_TIMEOUT)
    assert fetch.returncode != 0 and "vmswarm: error:" in err

    manifest = _stored_manifest(host, template_id)
    durable = _durable_chunks(host, manifest)
    # Nothing the daemon reported verified before the kill was lost by it.
    assert len(durable) >= before["chunks_held"]
    nonzero = [i for i in range(manifest.chunk_count) if not manifest.is_zero(i)]
    missing = [i for i in nonzero if i not in durable]
    missing_bytes = sum(manifest.chunk_range(i)[1] for i in missing)
    total_bytes = sum(manifest.chunk_range(i)[1] for i in nonzero)
    assert 0 < missing_bytes < total_bytes, "the kill did not land mid-fetch"

    cluster.restart(host)
    result = cluster.run_cli("fetch", TEMPLATE, "--json", node=host, timeout=FETCH_TIMEOUT)
    fetched = json.loads(result.stdout)
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
    template_id = _publish(cluster, image, replicas=2)

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
        entry = _wait_for(cluster, "the corrupt peer announced", listed, processes=[liar])
        assert entry["role"] == "host" and entry["complete"]

        fetches = [_start_fetch(cluster, host) for host in hosts]
        results = [_finish_fetch(fetch) for fetch in fetches]
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
    template_id = _publish(cluster, image, replicas=2)

    fetches = [_start_fetch(cluster, host) for host in hosts]
    at_kill = _wait_progress(cluster, hosts[0], template_id, 25.0, fetches)
    assert not at_kill["complete"]
    _sigkill(tracker.process)

    # Known peers keep trading while the tracker is away.
    def progressed() -> Status | None:
        now = _template(_control_status(hosts[0]), template_id)
        return now if now["done_bytes"] > at_kill["done_bytes"] else None

    _wait_for(cluster, "progress without a tracker", progressed, fetches)
    cluster.restart(tracker)
    back = [_template(_control_status(host), template_id) for host in hosts]
    assert not all(t["complete"] for t in back), "the fetch ended before the tracker came back"

    results = [_finish_fetch(fetch) for fetch in fetches]
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

    _wait_for(cluster, "the hosts re-announced", reannounced, processes=[tracker.process])
