"""Shared pieces of the e2e tests that publish and fetch (tests/e2e/test_faults_*.py and others).

Progress is polled with the control socket's `status` call in this process (what `vmswarm status
--json` prints, without an interpreter start per poll); outcomes go through the real CLI.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import blake3
import pytest
import trio
from vmswarm.daemon.cluster import LocalCluster, ManagedProcess, Node, vmswarm_script
from vmswarm.daemon.control import call_control
from vmswarm.daemon.mixed_image import write_mixed_image
from vmswarm.swarm.manifest import Manifest

TEMPLATE = "disk:1"
CHUNK_SIZE = 256 << 10
# Bounds on waiting for something observable; never asserted as durations.
DEADLINE = 60.0
FETCH_TIMEOUT = 120.0
POLL_INTERVAL = 0.05

Status = dict[str, Any]
T = TypeVar("T")


def make_image(path: Path, size: int, seed: int = 3, zero_fraction: float = 0.3) -> Path:
    write_mixed_image(path, size, zero_fraction=zero_fraction, seed=seed)
    return path


def publish(
    cluster: LocalCluster,
    image: Path,
    replicas: int,
    template: str = TEMPLATE,
    chunk_size: int = CHUNK_SIZE,
) -> str:
    name, version = template.split(":")
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
        str(chunk_size),
        "--json",
        *cluster.sign_args,
    )
    template_id: str = json.loads(result.stdout)["template_id"]
    return template_id


def start_fetch(
    cluster: LocalCluster, host: Node, template: str = TEMPLATE
) -> subprocess.Popen[str]:
    """`vmswarm fetch TEMPLATE --json` on `host`, in the background."""
    return subprocess.Popen(
        [str(vmswarm_script()), "fetch", template, "--json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cluster.cli_env(host),
    )


def finish_fetch(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=FETCH_TIMEOUT)
    assert process.returncode == 0, f"fetch failed ({process.returncode}): {err.strip()}"
    result: dict[str, Any] = json.loads(out)
    return result


def fetch(cluster: LocalCluster, host: Node, template: str = TEMPLATE) -> dict[str, Any]:
    out = cluster.run_cli("fetch", template, "--json", node=host, timeout=FETCH_TIMEOUT).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def control_status(node: Node) -> Status:
    assert node.control is not None
    result: Status = trio.run(call_control, node.control, "status", {})
    return result


def template_status(node: Node, template_id: str) -> Status | None:
    found = [t for t in control_status(node)["templates"] if t["template_id"] == template_id]
    return found[0] if found else None


def wait_for(
    cluster: LocalCluster,
    what: str,
    check: Callable[[], T | None],
    *,
    watched: list[subprocess.Popen[str]] | None = None,
    processes: list[ManagedProcess] | None = None,
    deadline: float = DEADLINE,
) -> T:
    """Poll `check` until it returns something; fail early if a watched process ends."""
    limit = time.monotonic() + deadline
    while True:
        for proc in watched or []:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"a fetch ended before {what}: rc={proc.returncode} {out} {err}")
        for process in processes or []:
            if not process.running:
                pytest.fail(f"{process.name} died before {what}:\n{process.log_tail(20)}")
        found = check()
        if found is not None:
            return found
        if time.monotonic() > limit:
            logs = "\n".join(f"--- {name}\n{tail}" for name, tail in cluster.iter_logs())
            pytest.fail(f"no {what} within {deadline}s\n{logs}")
        time.sleep(POLL_INTERVAL)


def wait_progress(
    cluster: LocalCluster,
    host: Node,
    template_id: str,
    percent: float,
    watched: list[subprocess.Popen[str]],
    *,
    also: Sequence[ManagedProcess] = (),
) -> Status:
    """Wait until `host` holds at least `percent` of the template; its template status then.

    Fails early if a watched fetch, the host or a process in `also` ends first."""

    def check() -> Status | None:
        found = template_status(host, template_id)
        return found if found is not None and found["percent"] >= percent else None

    return wait_for(
        cluster,
        f"{percent}% on {host.name}",
        check,
        watched=watched,
        processes=[host.process, *also],
    )


def stored_manifest(host: Node, template_id: str) -> Manifest:
    path = host.data_dir / "templates" / f"{template_id}.manifest"
    manifest = Manifest.decode(path.read_bytes())
    assert manifest.template_id.hex() == template_id
    return manifest


def center_manifest(center: Node, template_id: str) -> Manifest:
    path = center.data_dir / "chunks" / "manifests" / f"{template_id}.manifest"
    return Manifest.decode(path.read_bytes())


def chunk_path(center: Node, digest: bytes) -> Path:
    name = digest.hex()
    return center.data_dir / "chunks" / name[:2] / name


def file_digest(path: Path) -> bytes:
    hasher = blake3.blake3()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            hasher.update(block)
    return hasher.digest()


def check_identical(result: dict[str, Any], host: Node, template_id: str, original: Path) -> None:
    """The fetched file hashes to the manifest's whole-image digest and to the original."""
    assert result["template_id"] == template_id
    manifest = stored_manifest(host, template_id)
    digest = file_digest(Path(result["path"]))
    assert digest == manifest.digest, f"{host.name}: image differs from the manifest's digest"
    assert digest == file_digest(original)


def sigkill(process: ManagedProcess) -> None:
    process.kill(signal.SIGKILL)
    assert process.wait(10) == -signal.SIGKILL


def nonzero_bytes(manifest: Manifest, indices: object = None) -> int:
    """Bytes of the non-zero chunks (of `indices`, default all): what travels."""
    chosen = range(manifest.chunk_count) if indices is None else indices
    assert isinstance(chosen, range | list | set | tuple)
    return sum(manifest.chunk_range(i)[1] for i in chosen if not manifest.is_zero(i))
