"""Mutual TLS is on by default: `daemon run`, `tracker run` and `publish` refuse to go plain
unless told --insecure (or VMSWARM_TLS_INSECURE), and take a certificate of their role."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result
from vmswarm.cli import daemon_commands, publish_command, tracker_commands
from vmswarm.cli.main import app
from vmswarm.daemon.node import NodeConfig
from vmswarm.daemon.pki import CA_CERT_NAME, TlsRole, init_ca, issue
from vmswarm.daemon.rpc import RpcError

ON_BY_DEFAULT = "mutual TLS is on by default"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No VMSWARM_* from the outside, and an empty config file instead of /etc/vmswarm's."""
    for name in list(os.environ):
        if name.startswith("VMSWARM_"):
            monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "vmswarm.toml"
    empty.write_text("")
    monkeypatch.setenv("VMSWARM_CONFIG", str(empty))


@pytest.fixture
def seen_nodes(monkeypatch: pytest.MonkeyPatch) -> list[NodeConfig]:
    """The NodeConfigs `daemon run` would serve (nothing is served)."""
    seen: list[NodeConfig] = []

    async def fake_run(config: NodeConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(daemon_commands, "run_until_signalled", fake_run)
    return seen


@pytest.fixture
def seen_trackers(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments `tracker run` would serve with (nothing is served)."""
    seen: list[dict[str, Any]] = []

    async def fake_serve(*args: object, **kwargs: Any) -> None:
        seen.append(kwargs)

    monkeypatch.setattr(tracker_commands, "_serve_until_signal", fake_serve)
    return seen


@pytest.fixture
def no_publish(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Records each time `publish` would reach the network, and stops it there."""
    calls: list[object] = []

    async def fake_publish(*args: object, **kwargs: object) -> None:
        calls.append((args, kwargs))
        raise RpcError("stopped", "stopped by the test before any network")

    monkeypatch.setattr(publish_command, "publish", fake_publish)
    return calls


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def assert_refused_plain(result: Result) -> None:
    """Exit 2 with one error line that says TLS is on by default and how to opt out."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vmswarm: error:")
    assert ON_BY_DEFAULT in lines[0] and "--insecure" in lines[0]


def daemon_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["daemon", "run", "--role", "storage", "--data-dir", str(tmp_path / "data"), *extra]


def tls_flags(tmp_path: Path, role: TlsRole = TlsRole.STORAGE) -> list[str]:
    ca = tmp_path / "ca"
    init_ca(ca, "test CA")
    made = issue(ca, role, f"{role.value}-1", tmp_path / "issued")
    return [
        "--tls-ca",
        str(ca / CA_CERT_NAME),
        "--tls-cert",
        str(made.cert),
        "--tls-key",
        str(made.key),
    ]


def test_daemon_run_without_tls_or_insecure_is_refused(
    tmp_path: Path, seen_nodes: list[NodeConfig]
) -> None:
    assert_refused_plain(invoke(*daemon_args(tmp_path)))
    assert seen_nodes == []


def test_daemon_run_with_insecure_runs_without_tls(
    tmp_path: Path, seen_nodes: list[NodeConfig]
) -> None:
    result = invoke(*daemon_args(tmp_path, "--insecure"))
    assert result.exit_code == 0, result.output
    (node,) = seen_nodes
    assert node.tls is None


def test_daemon_run_with_insecure_from_the_environment(
    tmp_path: Path, seen_nodes: list[NodeConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMSWARM_TLS_INSECURE", "true")
    result = invoke(*daemon_args(tmp_path))
    assert result.exit_code == 0, result.output
    (node,) = seen_nodes
    assert node.tls is None


def test_daemon_run_with_a_storage_certificate_runs_with_tls(
    tmp_path: Path, seen_nodes: list[NodeConfig]
) -> None:
    result = invoke(*daemon_args(tmp_path, *tls_flags(tmp_path)))
    assert result.exit_code == 0, result.output
    (node,) = seen_nodes
    assert node.tls is not None
    assert node.tls.role is TlsRole.STORAGE
    assert node.tls.name == "storage-1"


def test_daemon_run_refuses_a_certificate_of_another_role(
    tmp_path: Path, seen_nodes: list[NodeConfig]
) -> None:
    result = invoke(*daemon_args(tmp_path, *tls_flags(tmp_path, TlsRole.HOST)))
    assert result.exit_code == 2, result.output
    assert "role host" in result.stderr and "storage certificate" in result.stderr
    assert seen_nodes == []


def test_tracker_run_without_tls_or_insecure_is_refused(
    tmp_path: Path, seen_trackers: list[dict[str, Any]]
) -> None:
    result = invoke("tracker", "run", "--state-dir", str(tmp_path / "tracker"))
    assert_refused_plain(result)
    assert seen_trackers == []


@pytest.mark.parametrize("opt_out", ["flag", "env"])
def test_tracker_run_with_insecure_serves_without_tls(
    tmp_path: Path,
    seen_trackers: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    opt_out: str,
) -> None:
    if opt_out == "env":
        monkeypatch.setenv("VMSWARM_TLS_INSECURE", "1")
    flag = ["--insecure"] if opt_out == "flag" else []
    result = invoke("tracker", "run", "--state-dir", str(tmp_path / "tracker"), *flag)
    assert result.exit_code == 0, result.output
    (kwargs,) = seen_trackers
    assert kwargs["tls"] is None


def test_tracker_run_with_a_tracker_certificate_serves_with_tls(
    tmp_path: Path, seen_trackers: list[dict[str, Any]]
) -> None:
    flags = tls_flags(tmp_path, TlsRole.TRACKER)
    result = invoke("tracker", "run", "--state-dir", str(tmp_path / "tracker"), *flags)
    assert result.exit_code == 0, result.output
    (kwargs,) = seen_trackers
    assert kwargs["tls"] is not None and kwargs["tls"].role is TlsRole.TRACKER


def test_publish_without_tls_or_insecure_is_refused_before_any_network(
    tmp_path: Path, no_publish: list[object]
) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\1" * 4096)
    # A port nobody listens on: the refusal must come first, whatever the tracker is.
    result = invoke("publish", str(image), "--tracker", "127.0.0.1:9")
    assert_refused_plain(result)
    assert no_publish == []


def test_publish_with_insecure_gets_as_far_as_the_network(
    tmp_path: Path, no_publish: list[object]
) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\1" * 4096)
    result = invoke("publish", str(image), "--tracker", "127.0.0.1:9", "--insecure")
    assert result.exit_code == 1, result.output
    assert "stopped by the test" in result.stderr
    assert len(no_publish) == 1
