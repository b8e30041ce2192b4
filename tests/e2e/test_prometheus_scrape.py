"""Debian's real `prometheus` scrapes a running cluster; its HTTP API shows sane vmswarm series."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from vmswarm.daemon.cluster import LocalCluster, die_with_parent_preexec, free_port

from .faults_common import finish_fetch, publish, start_fetch

pytestmark = pytest.mark.e2e

CHUNK = 1 << 20
# One letter per 1 MiB chunk, D data and 0 zeros; the last chunk is half a chunk long.
LAYOUT = "DD0DDD00DDD0D"
IMAGE_SIZE = len(LAYOUT) * CHUNK - CHUNK // 2
HOSTS = ("h1", "h2")
# Generous: two cores shared with other work; every wait ends as soon as its condition holds.
DEADLINE = 90.0


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        message = "the prometheus binary is missing (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


class Prometheus:
    """A prometheus process with its own config, storage and port; `query` asks its HTTP API."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(scrape_config(targets))
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent_preexec(),
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited: {self.log_tail()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus never got ready: {self.log_tail()}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector for `promql` (each item has `metric` and `value`)."""
        params = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=5) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def values(self, promql: str, key: str = "node") -> dict[str, float]:
        """`key` label -> value of each series `promql` returns ("" where it has no such label)."""
        return {
            str(item["metric"].get(key, "")): float(item["value"][1]) for item in self.query(promql)
        }

    def log_tail(self) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def scrape_config(targets: dict[str, str]) -> str:
    """A Prometheus config scraping every second, each target labelled with its node name."""
    lines = [
        "global:",
        "  scrape_interval: 1s",
        "  scrape_timeout: 1s",
        "scrape_configs:",
        "  - job_name: vmswarm",
        "    static_configs:",
    ]
    for node, address in targets.items():
        lines += [
            f"      - targets: ['{address}']",
            "        labels:",
            f"          node: '{node}'",
        ]
    return "\n".join(lines) + "\n"


def write_image(path: Path) -> None:
    rng = random.Random(5)
    data = b"".join(bytes(CHUNK) if c == "0" else rng.randbytes(CHUNK) for c in LAYOUT)
    path.write_bytes(data[:IMAGE_SIZE])


def nonzero_bytes(image: Path) -> int:
    """The bytes of the image's chunks that are not all zero: what a fetch moves."""
    data = image.read_bytes()
    zero = bytes(CHUNK)
    return sum(
        len(data[i : i + CHUNK])
        for i in range(0, len(data), CHUNK)
        if data[i : i + CHUNK] != zero[: len(data[i : i + CHUNK])]
    )


def wait_for(
    prometheus: Prometheus,
    promql: str,
    expected: dict[str, float],
    what: str,
    key: str = "node",
) -> dict[str, float]:
    """Query until the values are `expected` (scrapes lag a second or two), else fail saying so."""
    deadline = time.monotonic() + DEADLINE
    values: dict[str, float] = {}
    while time.monotonic() < deadline:
        values = prometheus.values(promql, key)
        if values == expected:
            return values
        time.sleep(0.5)
    raise AssertionError(f"{what}: {promql} is {values}, expected {expected}")


def test_prometheus_scrapes_tracker_center_and_hosts(cluster: LocalCluster, tmp_path: Path) -> None:
    prometheus_binary()
    ports = {name: free_port() for name in ("tracker", "c1", *HOSTS)}

    def metrics_args(name: str) -> tuple[str, str]:
        return "--metrics", f"127.0.0.1:{ports[name]}"

    cluster.start_tracker(*metrics_args("tracker"))
    cluster.start_center("c1", *metrics_args("c1"))
    hosts = [cluster.start_host(name, *metrics_args(name)) for name in HOSTS]
    prometheus = Prometheus(
        tmp_path / "prometheus", {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    )
    try:
        prometheus.wait_ready()
        wait_for(prometheus, 'up{job="vmswarm"}', dict.fromkeys(ports, 1.0), "every target up")

        image = tmp_path / "disk.raw"
        write_image(image)
        expected = nonzero_bytes(image)
        assert 0 < expected < IMAGE_SIZE  # the image really has zero chunks, which never travel
        publish(cluster, image, replicas=1, chunk_size=CHUNK)
        fetches = [start_fetch(cluster, host) for host in hosts]
        fetched = {
            host.name: finish_fetch(process) for host, process in zip(hosts, fetches, strict=True)
        }
        moved = {
            name: int(r["bytes_from_centers"]) + int(r["bytes_from_peers"])
            for name, r in fetched.items()
        }
        assert moved == dict.fromkeys(HOSTS, expected)
        fetched_at = time.time()

        received = wait_for(
            prometheus,
            'sum by (node) (vmswarm_received_bytes_total{node=~"h.*"})',
            dict.fromkeys(HOSTS, float(expected)),
            "bytes received add up to the image's non-zero bytes",
        )
        lag = time.time() - fetched_at
        ratio = wait_for(
            prometheus,
            'vmswarm_template_completion_ratio{template="disk:1", node=~"h.*"}',
            dict.fromkeys(HOSTS, 1.0),
            "both hosts complete",
        )
        # From here on every target's latest scrape is from after both fetches ended.
        wait_for(
            prometheus,
            f'timestamp(up{{job="vmswarm"}}) > bool {fetched_at}',
            dict.fromkeys(ports, 1.0),
            "a scrape of every target after the fetches",
        )
        missing = prometheus.values('vmswarm_template_missing_chunks{template="disk:1"}')
        # Hosts want every chunk, the center its share: none is missing anywhere.
        assert missing == dict.fromkeys((*HOSTS, "c1"), 0.0)
        failed = prometheus.values("sum(vmswarm_chunks_failed_verification_total)")
        assert failed == {"": 0.0}
        banned = prometheus.values("sum(vmswarm_peers_banned_total)")
        assert banned == {"": 0.0}
        # The center got each non-zero chunk once, from the publisher's seeder.
        center_in = prometheus.values('sum(vmswarm_received_bytes_total{node="c1"})')
        assert center_in == {"": float(expected)}
        sent = prometheus.values("sum(vmswarm_sent_bytes_total)")
        # Endgame duplicates are sent but never counted as received, so sent >= received.
        assert sent[""] >= 2 * expected
        verified = prometheus.values('sum by (node) (vmswarm_chunks_verified_total{node=~"h.*"})')
        assert verified == dict.fromkeys(HOSTS, float(LAYOUT.count("D")))
        latency = prometheus.values(
            'sum by (node) (vmswarm_chunk_fetch_duration_seconds_count{node=~"h.*"})'
        )
        assert latency == verified
        completed = prometheus.values(
            'sum by (node) (vmswarm_template_fetch_duration_seconds_count{node=~"h.*"})'
        )
        assert completed == dict.fromkeys(HOSTS, 1.0)
        stored = prometheus.values('vmswarm_stored_bytes{node=~"h.*|c1"}')
        assert stored == {name: float(expected) for name in ("c1", *HOSTS)}
        free = prometheus.values("vmswarm_disk_free_bytes")
        assert set(free) == {"c1", *HOSTS} and all(v > 0 for v in free.values())

        announces = prometheus.values('sum(vmswarm_tracker_announces_total{node="tracker"})')
        assert announces[""] > 0
        # Hosts announce the template soon after their fetch; the tracker sees all three.
        wait_for(
            prometheus,
            'vmswarm_tracker_active_peers{template="disk:1"}',
            {"center": 1.0, "host": 2.0},
            "the tracker's active peers of disk:1",
            key="role",
        )
        live = prometheus.values("vmswarm_tracker_live_peers", key="role")
        assert live == {"center": 1.0, "host": 2.0}
        names = prometheus.query('count by (__name__) ({__name__=~"vmswarm_.+"})')
        print(
            f"\nprometheus saw {len(names)} vmswarm metric names; received {received} "
            f"({lag:.1f}s after the fetches), ratio {ratio}, sent {sent}, "
            f"tracker announces {announces}"
        )
    finally:
        prometheus.stop()
