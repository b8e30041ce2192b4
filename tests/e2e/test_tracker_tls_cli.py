"""`vmswarm ca` certificates used by a real `tracker run --tls-*` and the real CLI queries."""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest
from vmswarm.daemon.cluster import LocalCluster
from vmswarm.daemon.mixed_image import write_mixed_image

pytestmark = pytest.mark.e2e

IMAGE_SIZE = 6 << 20


def _tls_args(ca: Path, name: str) -> list[str]:
    return [
        "--tls-ca",
        str(ca / "ca.crt"),
        "--tls-cert",
        str(ca / f"{name}.crt"),
        "--tls-key",
        str(ca / f"{name}.key"),
    ]


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("vmswarm: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_tracker_over_mutual_tls(tmp_path: Path) -> None:
    ca = tmp_path / "pki"
    with LocalCluster(tmp_path / "cluster") as cluster:
        cluster.run_cli("ca", "init", "--dir", str(ca))
        for role, name in (("tracker", "t1"), ("operator", "alice"), ("host", "h1")):
            cluster.run_cli("ca", "issue", "--dir", str(ca), "--role", role, name)

        # The tracker refuses to start with a certificate that is not a tracker's.
        wrong = cluster.run_cli("tracker", "run", *_tls_args(ca, "alice"), check=False)
        assert wrong.returncode == 2
        assert "has role operator; this command needs a tracker certificate" in _one_error_line(
            wrong.stderr
        )

        cluster.start_tracker(*_tls_args(ca, "t1"))
        address = cluster.tracker_address
        listed = cluster.run_cli("templates", "--tracker", address, *_tls_args(ca, "alice"))
        assert listed.stdout.strip() == "the catalog is empty"
        # Reads are open to every member of the cluster.
        cluster.run_cli("templates", "--tracker", address, *_tls_args(ca, "h1"))

        plain = cluster.run_cli("templates", "--tracker", address, check=False)
        assert plain.returncode == 3
        assert f"tracker {address}: lost during list_templates" in _one_error_line(plain.stderr)

        half = cluster.run_cli(
            "templates", "--tracker", address, "--tls-ca", str(ca / "ca.crt"), check=False
        )
        assert half.returncode == 2
        assert "tls.cert, tls.key not set" in _one_error_line(half.stderr)

        # The settings keys work as well as the flags, from a config file here.
        config = tmp_path / "vmswarm.toml"
        config.write_text(
            f'[tls]\nca = "{ca / "ca.crt"}"\n'
            f'cert = "{ca / "alice.crt"}"\nkey = "{ca / "alice.key"}"\n'
        )
        from_file = cluster.run_cli("templates", "--tracker", address, "--config", str(config))
        assert from_file.stdout.strip() == "the catalog is empty"


def test_publish_and_fetch_with_the_tracker_behind_mutual_tls(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    write_mixed_image(image, IMAGE_SIZE, zero_fraction=0.3, seed=5)
    ca = tmp_path / "pki"
    with LocalCluster(tmp_path / "cluster") as cluster:
        cluster.run_cli("ca", "init", "--dir", str(ca))
        for role, name in (
            ("tracker", "t1"),
            ("operator", "alice"),
            ("storage", "c1"),
            ("host", "h1"),
        ):
            cluster.run_cli("ca", "issue", "--dir", str(ca), "--role", role, name)

        # A daemon refuses to start with a certificate of another role.
        wrong = cluster.run_cli(
            "daemon", "run", "--role", "host", "--data-dir", str(tmp_path / "nowhere"),
            *_tls_args(ca, "c1"), check=False, timeout=60,
        )  # fmt: skip
        assert wrong.returncode == 2
        assert "has role storage; this command needs a host certificate" in _one_error_line(
            wrong.stderr
        )

        cluster.start_tracker(*_tls_args(ca, "t1"))
        cluster.start_center("c1", *_tls_args(ca, "c1"))
        host = cluster.start_host("h1", *_tls_args(ca, "h1"))
        publish = ["publish", str(image), "--name", "disk", "--version", "1"]
        publish += ["--replicas", "1", "--chunk-size", "1MiB", "--json"]

        # Publishing is an operator's act: the CLI refuses a host certificate before any link.
        as_host = cluster.run_cli(*publish, *_tls_args(ca, "h1"), check=False)
        assert as_host.returncode == 2
        assert "has role host; this command needs an operator certificate" in _one_error_line(
            as_host.stderr
        )

        published = json.loads(cluster.run_cli(*publish, *_tls_args(ca, "alice")).stdout)
        fetched = json.loads(cluster.run_cli("fetch", "disk:1", "--json", node=host).stdout)
        assert fetched["template_id"] == published["template_id"]
        got = blake3.blake3(Path(fetched["path"]).read_bytes()).digest()
        assert got == blake3.blake3(image.read_bytes()).digest()
