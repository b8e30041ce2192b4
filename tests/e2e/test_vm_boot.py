"""The whole path on this machine: build a tiny bootable disk, publish it, `vmswarm launch` it,
and watch the guest boot under libvirtd + qemu (TCG) until it prints its marker on the serial
console. The template's digest must be unchanged afterwards, and delete must clean up.

Needs root, libvirtd answering on qemu:///system, qemu and the boot-disk tools (bash run.sh
installs and starts them); elsewhere it is skipped, except under CI, where it must run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vmswarm.daemon.bootdisk import build_boot_disk
from vmswarm.daemon.cluster import LocalCluster, Node
from vmswarm.daemon.demo_cluster import (
    LIBVIRT_URI,
    file_digest,
    vm_launch_problem,
    wait_for_marker,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MARKER_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def real_vms() -> None:
    reason = vm_launch_problem(LIBVIRT_URI)
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must boot a real VM, but {reason}")
        pytest.skip(reason)


@pytest.fixture
def domains() -> Iterator[list[str]]:
    """Domains a test made; whatever a failed test leaves in libvirtd is destroyed and undefined."""
    made: list[str] = []
    yield made
    for domain in made:
        if domain_exists(domain):
            for action in ("destroy", "undefine"):
                subprocess.run(
                    ["virsh", "-c", LIBVIRT_URI, action, domain], capture_output=True, check=False
                )


@pytest.fixture
def workdir() -> Iterator[Path]:
    # qemu runs as libvirt-qemu: every folder above the template and overlays must be enterable.
    path = Path(tempfile.mkdtemp(prefix="vmswarm-vmboot-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def host_vms(cluster: LocalCluster, host: Node) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(cluster.run_cli("vms", "--json", node=host).stdout)[
        "vms"
    ]
    return listed


def cluster_vms(cluster: LocalCluster) -> dict[str, Any]:
    """Every host's VMs as `vmswarm vms --cluster --json` lists them through the tracker."""
    listed: dict[str, Any] = json.loads(cluster.run_cli("vms", "--cluster", "--json").stdout)
    return listed


def domain_exists(domain: str) -> bool:
    found = subprocess.run(
        ["virsh", "-c", LIBVIRT_URI, "domstate", domain], capture_output=True, check=False
    )
    return found.returncode == 0


def wait_until_complete(cluster: LocalCluster, template: str, host: Node) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        peers = json.loads(cluster.run_cli("peers", template, "--json").stdout)["peers"]
        if any(p["port"] == host.port and p["complete"] for p in peers):
            return
        time.sleep(0.2)
    raise AssertionError(f"{host.name} never announced {template} complete")


def test_launch_boots_the_published_template_and_delete_cleans_up(
    real_vms: None, workdir: Path, domains: list[str]
) -> None:
    marker = f"VMSWARM-E2E-{uuid.uuid4().hex[:12]}"
    # The guest stays up after its marker, so monitoring sees it running and delete stops it.
    disk = build_boot_disk(workdir / "tiny.raw", marker=marker, power_off=False)
    vmswarm = str(Path(sys.executable).with_name("vmswarm"))
    manifest = subprocess.run(
        [vmswarm, "manifest", str(disk.path), "--json"], capture_output=True, check=True, text=True
    )
    expected = bytes.fromhex(json.loads(manifest.stdout)["digest"])
    # As production runs: signed templates, mutual TLS on every link (tracker -> host included).
    with LocalCluster(workdir / "cluster", signing=True, tls=True) as cluster:
        cluster.start_tracker()
        cluster.start_center("center1")
        cluster.run_cli(
            "publish",
            str(disk.path),
            *("--name", "tiny", "--version", "1", "--replicas", "1"),
            *cluster.sign_args,
        )
        hosts = [cluster.start_host(f"host{i}", "--libvirt-uri", LIBVIRT_URI) for i in (1, 2)]

        began = time.monotonic()
        launched = json.loads(
            cluster.run_cli("launch", "tiny:1", "--flavor", "tiny", "--json", timeout=600).stdout
        )
        seconds_launch = time.monotonic() - began
        domains.append(launched["domain"])
        assert set(launched) >= {
            "vm_id",
            "host",
            "template_id",
            "seconds_fetch",
            "seconds_boot",
            "domain",
        }
        [host] = [h for h in hosts if launched["host"] == h.listen_address]
        serial = Path(launched["serial_log"])
        seconds_to_marker = wait_for_marker(serial, marker, MARKER_TIMEOUT)
        total = seconds_launch + seconds_to_marker
        print(
            f"\nlaunch -> marker {total:.2f}s: launch returned after {seconds_launch:.2f}s "
            f"(fetch {launched['seconds_fetch']:.2f}s, boot {launched['seconds_boot']:.2f}s, "
            f"{launched.get('domain_type')}), then {seconds_to_marker:.2f}s to the marker"
        )

        # The tracker sees the VM; the host that now holds the template gets the next launch.
        everywhere = cluster_vms(cluster)
        failures = "; ".join(f"{f['host']}: {f['error']}" for f in everywhere["unreachable"])
        seen = next((vm for vm in everywhere["vms"] if vm["vm_id"] == launched["vm_id"]), None)
        assert seen is not None, f"the tracker does not list the VM; {failures}"
        assert (seen["host"], seen["state"], seen["domain"]) == (
            host.listen_address,
            "running",
            launched["domain"],
        )
        assert seen["cpu_seconds"] >= 0 and seen["memory_bytes"] > 0
        wait_until_complete(cluster, "tiny:1", host)
        second = json.loads(
            cluster.run_cli("launch", "tiny:1", "--flavor", "tiny", "--json", timeout=600).stdout
        )
        domains.append(second["domain"])
        assert (second["host"], second["placement"]) == (host.listen_address, "locality")
        assert second["vm_id"] != launched["vm_id"]

        vms = {v["vm_id"]: v for v in host_vms(cluster, host)}
        for vm_id in (launched["vm_id"], second["vm_id"]):
            overlay = Path(vms[vm_id]["overlay"])
            domain = vms[vm_id]["domain"]
            assert overlay.exists() and domain_exists(domain)
            cluster.run_cli("vm", "delete", vm_id, node=host)
            assert not overlay.exists()
            assert not domain_exists(domain)
        assert host_vms(cluster, host) == []

        # The template the VMs booted from was never written: its digest is the manifest's.
        fetched = json.loads(cluster.run_cli("fetch", "tiny:1", "--json", node=host).stdout)
        assert file_digest(Path(fetched["path"])) == expected
    assert file_digest(disk.path) == expected
