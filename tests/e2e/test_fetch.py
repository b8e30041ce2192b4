"""`vmswarm fetch` and `vmswarm status` against real daemons: tracker, centers and hosts."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from vmswarm.daemon.cluster import LocalCluster, vmswarm_script
from vmswarm.daemon.mixed_image import write_mixed_image

pytestmark = pytest.mark.e2e

IMAGE_SIZE = 24 << 20
CHUNK_SIZE = "1MiB"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "cluster") as c:
        c.start_tracker()
        yield c


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    write_mixed_image(path, IMAGE_SIZE, zero_fraction=0.4, seed=7)
    return path


def _publish(cluster: LocalCluster, image: Path, replicas: int = 2) -> dict[str, object]:
    result = cluster.run_cli(
        "publish",
        str(image),
        "--name",
        "disk",
        "--version",
        "1",
        "--tracker",
        cluster.tracker_address,
        "--replicas",
        str(replicas),
        "--chunk-size",
        CHUNK_SIZE,
        "--json",
    )
    published: dict[str, object] = json.loads(result.stdout)
    return published


def test_hosts_fetch_at_once_and_get_identical_images(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    for name in ("c1", "c2", "c3"):
        cluster.start_center(name)
    hosts = [cluster.start_host(f"h{i}") for i in range(3)]
    image = _image(tmp_path)
    _publish(cluster, image)

    fetches = [
        subprocess.Popen(
            [str(vmswarm_script()), "fetch", "disk:1", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cluster.cli_env(host),
        )
        for host in hosts
    ]
    results = []
    for process in fetches:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert out.count("\n") == 1  # exactly one JSON object
        results.append(json.loads(out))

    expected = image.read_bytes()
    digest = blake3.blake3(expected).hexdigest()
    for result in results:
        assert set(result) == {
            "template_id",
            "path",
            "size",
            "seconds",
            "chunks_seconds",
            "bytes_from_centers",
            "bytes_from_peers",
            "sources",
            "wasted_bytes",
        }
        assert result["wasted_bytes"] >= 0
        assert 0 < result["chunks_seconds"] <= result["seconds"]
        assert result["size"] == IMAGE_SIZE
        assert blake3.blake3(Path(result["path"]).read_bytes()).hexdigest() == digest
        assert result["bytes_from_centers"] + result["bytes_from_peers"] <= IMAGE_SIZE
        assert result["sources"] >= 1

    status = json.loads(cluster.run_cli("status", "--json", node=hosts[0]).stdout)
    assert status["role"] == "host"
    (template,) = status["templates"]
    assert template["complete"] and template["percent"] == 100.0
    text = cluster.run_cli("status", node=hosts[0]).stdout
    assert "disk:1" in text and "100.0%" in text


def test_fetch_failures_are_one_clear_line(cluster: LocalCluster, tmp_path: Path) -> None:
    host = cluster.start_host("h1")
    unknown = cluster.run_cli("fetch", "nosuch:1", check=False, node=host)
    assert unknown.returncode != 0
    assert unknown.stderr.strip().count("\n") == 0
    assert "nosuch" in unknown.stderr and "vmswarm: error:" in unknown.stderr

    missing = tmp_path / "nowhere.sock"
    away = cluster.run_cli("fetch", "disk:1", "--control", str(missing), check=False)
    assert away.returncode != 0
    assert str(missing) in away.stderr and "daemon run" in away.stderr

    status = cluster.run_cli("status", "--control", str(missing), check=False)
    assert status.returncode != 0 and str(missing) in status.stderr


def test_second_daemon_on_the_same_control_socket_is_refused(cluster: LocalCluster) -> None:
    host = cluster.start_host("h1")
    assert host.control is not None
    second = subprocess.run(
        [
            str(vmswarm_script()),
            "daemon",
            "run",
            "--role",
            "host",
            "--tracker",
            cluster.tracker_address,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(host.data_dir.parent / "other"),
            "--control",
            str(host.control),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode != 0
    assert "already running" in second.stderr
