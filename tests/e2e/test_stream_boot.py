"""`vmswarm launch --stream` on the emulated cluster: the guest boots from a 1 GiB template
while the host holds well under half of it, and moves to the local file once it is complete.

The template is the tiny boot disk padded with random data the boot never reads (1 GiB, not
512 MiB: the background fetch goes on at link speed during the ~15 s TCG boot, and at 512 MiB
the host already holds 32-44% of it at the marker, too close to half); tracker, one
storage center and one host run in network namespaces with 100 Mbit/s links (bench.cluster's
setup), libvirtd and qemu in the root namespace. Asserts behaviour, never time. Needs root,
the namespace tools and libvirtd; skipped without them, except under CI, where it must run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from vmswarm.daemon.cluster import vmswarm_script
from vmswarm.daemon.control import call_control
from vmswarm.daemon.demo_cluster import LIBVIRT_URI, vm_launch_problem, wait_for_marker

from bench.cluster.boot import (
    FLAVOR,
    TEMPLATE_NAME,
    BootCluster,
    BootImage,
    run_domains,
    template_status,
)
from bench.cluster.netns import Network, list_namespaces, rate_bits
from tests.ci import unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SIZE = 1 << 30
RATE = rate_bits("100mbit")
MARKER_TIMEOUT = 300.0
COMPLETE_TIMEOUT = 600.0
SWITCH_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def real_vms_in_namespaces() -> None:
    reason = vm_launch_problem(LIBVIRT_URI)
    for tool in ("ip", "tc"):
        if reason is None and shutil.which(tool) is None:
            reason = f"{tool} is not installed"
    if reason is not None:
        unavailable("boot a streamed VM on the emulated cluster", reason)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # qemu runs as libvirt-qemu: every folder above the template and overlays must be enterable.
    path = Path(tempfile.mkdtemp(prefix="vmswarm-streamboot-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _status(control: Path) -> dict[str, Any]:
    return trio.run(call_control, control, "status", {})


def _wait(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {timeout:g}s waiting for {what}"
        time.sleep(0.25)


def _host_vms(control: Path) -> list[dict[str, Any]]:
    """`vmswarm vms --json` on the host's control socket."""
    listed = subprocess.run(
        [str(vmswarm_script()), "vms", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "VMSWARM_CONTROL": str(control)},
    )
    vms: list[dict[str, Any]] = json.loads(listed.stdout)["vms"]
    return vms


def _disk(domain: str) -> ET.Element:
    """The live domain's vda disk element."""
    xml = subprocess.run(
        ["virsh", "-c", LIBVIRT_URI, "dumpxml", domain],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for disk in ET.fromstring(xml).iter("disk"):
        target = disk.find("target")
        if target is not None and target.get("dev") == "vda":
            return disk
    raise AssertionError(f"domain {domain} has no vda disk:\n{xml}")


def _on_nbd(disk: ET.Element) -> bool:
    return any(
        source.get("protocol") == "nbd" or "nbd" in (source.get("file") or "")
        for source in disk.iter("source")
    )


def _domain_state(domain: str) -> str:
    return subprocess.run(
        ["virsh", "-c", LIBVIRT_URI, "domstate", domain],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_streamed_boot_runs_before_the_image_is_half_there_then_moves_to_the_local_file(
    real_vms_in_namespaces: None, workdir: Path
) -> None:
    marker = f"VMSWARM-STREAM-{uuid.uuid4().hex[:12]}"
    image = BootImage.create(workdir / "template", SIZE, marker)
    with Network(["tracker", "c1", "h1"]) as net:
        namespaces = net.namespaces
        tag = f"{net.run_id}-e2e"
        with BootCluster(
            net, workdir / "cluster", workdir / "logs", ["h1"], tag=tag, centers=1
        ) as cluster:
            cluster.start()
            cluster.publish(image.path, replicas=1, chunk_size=2 << 20)
            cluster.shape(RATE)
            control = cluster.controls["h1"]
            began = time.monotonic()
            launched = json.loads(
                cluster.cli(
                    "launch",
                    f"{TEMPLATE_NAME}:1",
                    *("--flavor", FLAVOR, "--host", cluster.address("h1")),
                    *("--name", f"{tag}-h1", "--stream", "--json"),
                ).stdout
            )
            cluster.track(control, launched["vm_id"], launched["domain"])
            assert launched["streaming"] is True
            assert launched["host"] == cluster.address("h1")

            wait_for_marker(Path(launched["serial_log"]), marker, MARKER_TIMEOUT)
            seconds = time.monotonic() - began
            at_marker = template_status(_status(control))
            assert at_marker is not None
            held, chunks = at_marker["chunks_held"], at_marker["chunks"]
            print(
                f"\nlaunch -> marker {seconds:.1f}s; the host held {held}/{chunks} chunks "
                f"({held / chunks:.1%})"
            )
            assert chunks == SIZE // (2 << 20)
            assert held < chunks / 2
            assert not at_marker["complete"]

            def complete() -> bool:
                entry = template_status(_status(control))
                return entry is not None and bool(entry["complete"])

            _wait(complete, "the image to complete", COMPLETE_TIMEOUT)
            status = _status(control)
            entry = template_status(status)
            assert entry is not None
            template_file = entry["path"]
            [stream] = status["streams"]
            assert stream["profile_chunks"] > 0

            # The VM now reads the local file: its overlay is backed by the template file.
            domain = launched["domain"]
            _wait(lambda: not _on_nbd(_disk(domain)), "the disk to leave NBD", SWITCH_TIMEOUT)
            [vm] = _host_vms(control)
            assert (vm["vm_id"], vm["state"]) == (launched["vm_id"], "running")
            assert _domain_state(domain) == "running"
            disk = _disk(domain)
            source = disk.find("source")
            backing = disk.find("backingStore/source")
            assert source is not None and source.get("file") == vm["overlay"]
            assert backing is not None and backing.get("file") == template_file
            assert not _on_nbd(disk)
            cluster.delete_vm(launched["vm_id"])
            assert run_domains(tag) == []
            assert _host_vms(control) == []
        # Leaving the cluster deleted the VM; nothing of the run is left in libvirtd.
        assert run_domains(tag) == []
    assert [ns for ns in list_namespaces() if ns in namespaces] == []
