"""Signed templates end to end: `vmswarm key generate`, `publish --sign-key`, hosts that verify."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import blake3
import pytest
from vmswarm.daemon.cluster import LocalCluster
from vmswarm.daemon.mixed_image import write_mixed_image

pytestmark = pytest.mark.e2e

IMAGE_SIZE = 6 << 20


def _generate(cluster: LocalCluster, out: Path, name: str) -> dict[str, str]:
    made: dict[str, str] = json.loads(
        cluster.run_cli("key", "generate", "--out", str(out), "--name", name, "--json").stdout
    )
    return made


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("vmswarm: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_signed_publish_reaches_trusting_hosts_only(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    write_mixed_image(image, IMAGE_SIZE, zero_fraction=0.3, seed=11)
    with LocalCluster(tmp_path / "cluster") as cluster:
        keys = tmp_path / "keys"
        publisher = _generate(cluster, keys, "publisher")
        other = _generate(cluster, keys, "other")
        assert stat.S_IMODE(Path(publisher["private_key"]).stat().st_mode) == 0o600
        assert publisher["key_id"] != other["key_id"]
        shown = cluster.run_cli("key", "id", publisher["public_key"]).stdout.strip()
        assert shown == publisher["key_id"]
        cluster.use_signing_key(Path(publisher["private_key"]), Path(publisher["public_key"]))

        cluster.start_tracker()
        cluster.start_center("c1")
        trusting = cluster.start_host("trusting")
        wary = cluster.start_host("wary", trust=["--trusted-key", other["public_key"]])
        publish = ["publish", str(image), "--name", "disk", "--version", "1"]
        publish += ["--replicas", "1", "--chunk-size", "1MiB", "--json"]

        unsigned = cluster.run_cli(*publish, check=False)
        assert unsigned.returncode != 0
        error = _one_error_line(unsigned.stderr)
        assert "disk:1" in error and "unsigned" in error

        foreign = cluster.run_cli(*publish, "--sign-key", other["private_key"], check=False)
        assert foreign.returncode != 0
        assert f"untrusted key {other['key_id']}" in _one_error_line(foreign.stderr)
        assert json.loads(cluster.run_cli("templates", "--json").stdout)["templates"] == []

        signed = json.loads(
            cluster.run_cli(*publish, *cluster.sign_args, "--valid-for", "30d").stdout
        )
        assert signed["signed_by"] == publisher["key_id"]
        assert signed["signature_expires"].endswith("Z")

        fetched = json.loads(cluster.run_cli("fetch", "disk:1", "--json", node=trusting).stdout)
        got = blake3.blake3(Path(fetched["path"]).read_bytes()).digest()
        assert got == blake3.blake3(image.read_bytes()).digest()

        refused = cluster.run_cli("fetch", "disk:1", "--json", node=wary, check=False)
        assert refused.returncode != 0
        error = _one_error_line(refused.stderr)
        assert f"signed by an untrusted key {publisher['key_id']}" in error
        assert "disk:1" in error
        assert not list((wary.data_dir / "templates").glob("*"))
