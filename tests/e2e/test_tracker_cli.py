"""`vmswarm tracker run` as a real process, queried through the real console script."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from vmswarm.daemon.tracker_client import TemplateHave, TrackerClient
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.messages import Role

from ..daemon.test_catalog import make_manifest

pytestmark = pytest.mark.e2e

VMSWARM = str(Path(sys.executable).with_name("vmswarm"))
DEADLINE = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_listening(process: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"tracker exited early: {process.communicate()[1]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"tracker did not listen on port {port} within {DEADLINE}s")


class Tracker:
    """One `vmswarm tracker run` process."""

    def __init__(self, state_dir: Path, port: int) -> None:
        self.state_dir = state_dir
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                VMSWARM,
                "tracker",
                "run",
                "--listen",
                self.address,
                "--state-dir",
                str(self.state_dir),
                "--announce-ttl",
                "60",
                "--allow-unsigned",  # signing: tests/e2e/test_signed_publish.py
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until_listening(self.process, self.port)

    def stop(self, sig: signal.Signals) -> str:
        """Send `sig`, reap the process and return its log (stderr)."""
        assert self.process is not None
        self.process.send_signal(sig)
        _, log = self.process.communicate(timeout=DEADLINE)
        self.process = None
        return log


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[Tracker]:
    running = Tracker(tmp_path / "state", free_port())
    running.start()
    yield running
    if running.process is not None:
        running.stop(signal.SIGKILL)


def vmswarm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VMSWARM, *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env={**os.environ, **(env or {})},
    )


def json_of(*args: str) -> dict[str, object]:
    result = vmswarm(*args, "--json")
    assert result.returncode == 0, result.stderr
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


def populate(port: int) -> bytes:
    """Register two versions of a template and announce a host and a center holding it."""
    v1, v2 = make_manifest(version="1", seed=1), make_manifest(version="2", seed=2)

    async def run() -> None:
        async with await TrackerClient.connect("127.0.0.1", port) as client:
            await client.register_template(v1, {"aa" * 16: [0, 1, 2, 3, 4]})
            await client.register_template(v2, {"aa" * 16: [0, 1, 2]})
            full, half = Bitfield.from_string("11111"), Bitfield.from_string("11100")
            await client.announce(
                b"\x01" * 16,
                Role.HOST,
                ("127.0.0.1", 9001),
                [TemplateHave.from_bitfield(v2.template_id, full)],
                rack="r1",
            )
            await client.announce(
                b"\xaa" * 16,
                Role.STORAGE,
                ("127.0.0.1", 9002),
                [TemplateHave.from_bitfield(v2.template_id, half)],
            )

    trio.run(run)
    return v2.template_id


def test_queries_through_the_console_script_and_a_catalog_that_survives_kill_9(
    tracker: Tracker,
) -> None:
    assert json_of("templates", "--tracker", tracker.address) == {"templates": []}

    newest_id = populate(tracker.port)
    listing = json_of("templates", "--tracker", tracker.address)
    assert [(t["name"], t["version"]) for t in listing["templates"]] == [  # type: ignore[attr-defined]
        ("debian", "1"),
        ("debian", "2"),
    ]
    table = vmswarm("templates", env={"VMSWARM_TRACKER": tracker.address})
    assert table.returncode == 0, table.stderr
    assert "debian" in table.stdout and newest_id.hex()[:16] in table.stdout

    swarm = json_of("peers", "debian", "--tracker", tracker.address)
    assert swarm["template_id"] == newest_id.hex() and swarm["version"] == "2"
    peers = {p["peer_id"]: p for p in swarm["peers"]}  # type: ignore[attr-defined]
    assert peers["01" * 16]["role"] == "host" and peers["01" * 16]["percent"] == 100.0
    assert peers["aa" * 16]["role"] == "storage" and peers["aa" * 16]["percent"] == 60.0
    human = vmswarm("peers", "debian:2", "--tracker", tracker.address)
    assert human.returncode == 0, human.stderr
    assert "storage" in human.stdout and "60.0%" in human.stdout

    unknown = vmswarm("peers", "debian:9", "--tracker", tracker.address)
    assert unknown.returncode != 0
    assert unknown.stderr.strip().splitlines() == [
        "vmswarm: error: no template 'debian:9' in the catalog"
    ]

    tracker.stop(signal.SIGKILL)
    gone = vmswarm("templates", "--tracker", tracker.address)
    assert gone.returncode != 0
    [line] = gone.stderr.strip().splitlines()
    assert line.startswith(f"vmswarm: error: cannot reach tracker {tracker.address}")

    tracker.start()
    after = json_of("templates", "--tracker", tracker.address)
    assert after == listing
    # Announces live in memory only: after the restart nobody has announced yet.
    assert json_of("peers", "debian", "--tracker", tracker.address)["peers"] == []
    log = tracker.stop(signal.SIGTERM)
    assert "holds 2 templates" in log and "received SIGTERM" in log


def test_tracker_run_reports_a_port_in_use_in_one_line(tracker: Tracker, tmp_path: Path) -> None:
    second = vmswarm(
        "tracker", "run", "--listen", tracker.address, "--state-dir", str(tmp_path / "other")
    )
    assert second.returncode != 0
    errors = [line for line in second.stderr.splitlines() if line.startswith("vmswarm: error:")]
    assert len(errors) == 1 and "cannot run on" in errors[0]
    assert "Traceback" not in second.stderr


def test_query_commands_need_a_tracker_address() -> None:
    env = {k: v for k, v in os.environ.items() if k != "VMSWARM_TRACKER"}
    result = subprocess.run(
        [VMSWARM, "templates"], capture_output=True, text=True, timeout=DEADLINE, env=env
    )
    assert result.returncode != 0
    assert "VMSWARM_TRACKER" in result.stderr
    bad = vmswarm("peers", "debian", "--tracker", "nowhere")
    assert bad.returncode != 0 and "not HOST:PORT" in bad.stderr
