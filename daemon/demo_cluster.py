"""The local demo: tracker, storage centers and hosts as real processes; all hosts fetch at once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from .cluster import LocalCluster
from .mixed_image import write_mixed_image


@dataclass(frozen=True)
class HostResult:
    name: str
    seconds: float
    bytes_from_centers: int
    bytes_from_peers: int
    sources: int
    path: str
    digest_ok: bool


@dataclass(frozen=True)
class DemoResult:
    template_id: str
    size: int
    publish_seconds: float
    hosts: list[HostResult]

    @property
    def bytes_from_centers(self) -> int:
        return sum(h.bytes_from_centers for h in self.hosts)

    @property
    def bytes_from_peers(self) -> int:
        return sum(h.bytes_from_peers for h in self.hosts)

    @property
    def all_verified(self) -> bool:
        return bool(self.hosts) and all(h.digest_ok for h in self.hosts)


def file_digest(path: Path) -> bytes:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as image:
        while block := image.read(1 << 22):
            hasher.update(block)
    return hasher.digest()


def run_demo(
    *,
    hosts: int = 6,
    centers: int = 3,
    size: int = 256 << 20,
    replicas: int = 2,
    workdir: Path | None = None,
    say: Callable[[str], None] = lambda _text: None,
) -> DemoResult:
    """Run the whole demo and stop every process it started, whatever happens."""
    with LocalCluster(workdir) as cluster:
        say(f"work dir {cluster.workdir}")
        cluster.start_tracker()
        for i in range(centers):
            cluster.start_center(f"center{i + 1}")
        say(f"tracker at {cluster.tracker_address}, {centers} storage centers up")
        image = cluster.workdir / "demo.img"
        write_mixed_image(image, size, seed=7)
        say(f"generated a {size >> 20} MiB image mixing random data and zero regions")
        started = time.perf_counter()
        published = json.loads(
            cluster.run_cli(
                "publish",
                str(image),
                "--name",
                "demo",
                "--version",
                "1",
                "--replicas",
                str(replicas),
                "--json",
                timeout=600,
            ).stdout
        )
        publish_seconds = time.perf_counter() - started
        say(
            f"published demo:1 as {published['template_id']} "
            f"in {publish_seconds:.1f}s (r={replicas})"
        )
        for i in range(hosts):
            cluster.start_host(f"host{i + 1}")
        say(f"{hosts} hosts up; fetching on all of them at once")
        expected = bytes.fromhex(published["digest"]) if "digest" in published else None

        def fetch(index: int) -> dict[str, Any]:
            node = cluster.hosts[index]
            result = cluster.run_cli("fetch", "demo:1", "--json", node=node, timeout=900)
            return {"name": node.name, **json.loads(result.stdout)}

        with ThreadPoolExecutor(max_workers=hosts) as pool:
            fetched = list(pool.map(fetch, range(hosts)))
        if expected is None:
            manifest_json = json.loads(cluster.run_cli("manifest", str(image), "--json").stdout)
            expected = bytes.fromhex(manifest_json["digest"])
        results = [
            HostResult(
                name=f["name"],
                seconds=float(f["seconds"]),
                bytes_from_centers=int(f["bytes_from_centers"]),
                bytes_from_peers=int(f["bytes_from_peers"]),
                sources=int(f["sources"]),
                path=str(f["path"]),
                digest_ok=file_digest(Path(f["path"])) == expected,
            )
            for f in fetched
        ]
        return DemoResult(published["template_id"], size, publish_seconds, results)
