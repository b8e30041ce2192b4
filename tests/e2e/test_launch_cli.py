"""`vmswarm launch` refusals through the real console script and a real tracker process
(with its flavors from a --flavors file)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trio
from vmswarm.daemon.cluster import LocalCluster
from vmswarm.daemon.tracker_client import TrackerClient
from vmswarm.swarm.address import parse_address

from ..daemon.test_catalog import make_manifest

pytestmark = pytest.mark.e2e


def register_debian(address: str) -> None:
    async def register() -> None:
        client = await TrackerClient.connect(*parse_address(address))
        async with client:
            await client.register_template(make_manifest(), {})

    trio.run(register)


def refused(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    result = cluster.run_cli("launch", *args, check=False, timeout=60)
    assert result.returncode != 0
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result


def test_launch_refusals_are_one_clear_line(tmp_path: Path) -> None:
    flavors = tmp_path / "flavors.toml"
    flavors.write_text('[flavors.tiny]\nvcpus = 1\nmemory = "64MiB"\ndisk = "1GiB"\n')
    with LocalCluster(tmp_path / "cluster") as cluster:
        cluster.start_tracker("--flavors", str(flavors))
        register_debian(cluster.tracker_address)
        cases = [
            (["debian:12", "--flavor", "small"], 1, "no flavor 'small'; the tracker knows: tiny"),
            (["nosuch", "--flavor", "tiny"], 1, "no template 'nosuch' in the catalog"),
            (["debian:12", "--flavor", "tiny"], 1, "no live host daemon is known"),
            (["debian", "--flavor", "tiny", "--host", "10.0.0.1:7"], 1, "no live host daemon"),
            (["debian", "--flavor", "tiny", "--host", "a:b"], 2, "--host: address 'a:b'"),
            (["debian:", "--flavor", "tiny"], 2, "is not NAME or NAME:VERSION"),
        ]
        for args, code, text in cases:
            result = refused(cluster, *args)
            assert result.returncode == code, (args, result.stderr)
            assert text in result.stderr, (args, result.stderr)
        no_tracker = cluster.run_cli(
            "launch", "debian", "--flavor", "tiny", "--tracker", "127.0.0.1:1", check=False
        )
        assert no_tracker.returncode == 3  # the tracker is unreachable
        assert "cannot reach tracker 127.0.0.1:1" in no_tracker.stderr
