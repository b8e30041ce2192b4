"""The CLI for people and scripts, run as real processes: exit codes, JSON, pipes and terminals,
NO_COLOR, --debug, config show and status --watch; and help text on every option."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import typer
from vmswarm.cli import progress
from vmswarm.cli.main import app
from vmswarm.daemon.cluster import LocalCluster, free_port, vmswarm_script
from vmswarm.daemon.tracker_client import TrackerClient
from vmswarm.swarm.address import parse_address

from ..daemon.test_catalog import make_manifest

pytestmark = pytest.mark.e2e

TIMEOUT = 60.0
ESCAPE = "\x1b"
# Variables that would make a run depend on the machine it runs on.
_OURS = ("VMSWARM_TRACKER", "VMSWARM_CONTROL", "VMSWARM_CONFIG", "NO_COLOR", "FORCE_COLOR")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _OURS}
    return {**env, "VMSWARM_CONFIG": os.devnull, **extra}


def vmswarm(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed console script with stdout and stderr piped."""
    return subprocess.run(
        [str(vmswarm_script()), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env(**env),
        check=False,
    )


def on_terminal(*args: str, **env: str) -> tuple[int, str]:
    """Run with stdout and stderr on a pseudo-terminal; its exit code and everything it wrote."""
    parent, child = pty.openpty()
    process = subprocess.Popen(
        [str(vmswarm_script()), *args],
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
        env=clean_env(TERM="xterm-256color", COLUMNS="200", **env),
    )
    os.close(child)
    chunks: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([parent], [], [], 1.0)
        if not ready:
            continue
        try:
            data = os.read(parent, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(parent)
    code = process.wait(timeout=TIMEOUT)
    return code, b"".join(chunks).decode(errors="replace")


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vmswarm: error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("friendly")) as running:
        running.start_tracker()
        running.start_center("c1")

        async def register() -> None:
            client = await TrackerClient.connect(*parse_address(running.tracker_address))
            async with client:
                await client.register_template(make_manifest(), {})

        trio.run(register)
        yield running


def control(cluster: LocalCluster) -> str:
    socket = cluster.centers[0].control
    assert socket is not None
    return str(socket)


def test_exit_codes_say_what_happened(cluster: LocalCluster, tmp_path: Path) -> None:
    tracker = cluster.tracker_address
    assert vmswarm("templates", "--tracker", tracker).returncode == 0
    # 1: the operation failed
    unknown = vmswarm("peers", "nosuch", "--tracker", tracker)
    assert unknown.returncode == 1
    assert "no template 'nosuch'" in one_error_line(unknown)
    # 2: bad usage or input
    for args in (
        ["templates", "--bogus"],
        ["peers", "debian:", "--tracker", tracker],
        ["templates", "--tracker", "nowhere"],
        ["status", "--interval", "0", "--control", control(cluster)],
    ):
        result = vmswarm(*args)
        assert result.returncode == 2, (args, result.stderr)
        one_error_line(result)
    # 3: the daemon or tracker is unreachable (refused, no socket)
    nobody = f"127.0.0.1:{free_port()}"
    for args in (
        ["templates", "--tracker", nobody],
        ["launch", "debian", "--flavor", "tiny", "--tracker", nobody],
        ["status", "--control", str(tmp_path / "none.sock")],
        ["vms", "--control", str(tmp_path / "none.sock")],
        ["fetch", "debian:12", "--control", str(tmp_path / "none.sock")],
    ):
        result = vmswarm(*args)
        assert result.returncode == 3, (args, result.stderr)
        one_error_line(result)
    from_env = vmswarm("templates", VMSWARM_TRACKER=nobody)
    assert from_env.returncode == 3 and nobody in one_error_line(from_env)


def test_every_query_command_speaks_json(cluster: LocalCluster) -> None:
    tracker = cluster.tracker_address
    queries: list[list[str]] = [
        ["templates", "--tracker", tracker],
        ["peers", "debian", "--tracker", tracker],
        ["status", "--control", control(cluster)],
        ["flavors", "--tracker", tracker],
        ["config", "show"],
    ]
    found: dict[str, Any] = {}
    for args in queries:
        result = vmswarm(*args, "--json")
        assert result.returncode == 0, (args, result.stderr)
        found[args[0]] = json.loads(result.stdout)
    assert [t["name"] for t in found["templates"]["templates"]] == ["debian"]
    assert found["peers"]["version"] == "12"
    assert found["status"]["role"] == "storage"
    assert "tiny" in {f["name"] for f in found["flavors"]["flavors"]}
    assert found["config"]["settings"]["daemon.max_peers"] == {
        "value": 64,
        "source": "default",
        "where": "default",
    }


def test_piped_output_is_plain_text(cluster: LocalCluster) -> None:
    tracker = cluster.tracker_address
    for args in (
        ["templates", "--tracker", tracker],
        ["peers", "debian", "--tracker", tracker],
        ["status", "--control", control(cluster)],
        ["flavors", "--tracker", tracker],
        ["config", "show"],
    ):
        result = vmswarm(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stdout.strip(), args
        assert ESCAPE not in result.stdout + result.stderr, args
    listing = vmswarm("templates", "--tracker", tracker).stdout.splitlines()
    assert listing[0].split()[:2] == ["NAME", "VERSION"] and listing[1].startswith("debian")


def test_a_terminal_gets_styled_tables_unless_no_color(cluster: LocalCluster) -> None:
    code, styled = on_terminal("templates", "--tracker", cluster.tracker_address)
    assert code == 0, styled
    assert "debian" in styled and re.search(r"\x1b\[[0-9;]*m", styled), styled
    for args in (
        ["templates", "--tracker", cluster.tracker_address],
        ["status", "--control", control(cluster)],
        ["config", "show"],
    ):
        code, plain = on_terminal(*args, NO_COLOR="1")
        assert code == 0, plain
        assert ESCAPE not in plain, (args, plain)
    assert "debian" in on_terminal("templates", "--tracker", cluster.tracker_address)[1]


def test_debug_shows_the_traceback_and_default_does_not(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.sock")
    quiet = vmswarm("status", "--control", missing)
    assert quiet.returncode == 3
    assert "Traceback" not in quiet.stderr
    assert missing in one_error_line(quiet)
    loud = vmswarm("--debug", "status", "--control", missing)
    assert loud.returncode == 3
    assert "Traceback (most recent call last)" in loud.stderr
    assert "ControlUnreachable" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()


def test_config_show_says_where_each_value_came_from(tmp_path: Path) -> None:
    config = tmp_path / "vmswarm.toml"
    config.write_text('[cluster]\ntracker = "10.0.0.1:7000"\n\n[daemon]\nmax_peers = 12\n')
    shown = vmswarm(
        "config", "show", "--config", str(config), "--json", VMSWARM_DAEMON_UPLOAD_SLOTS="3"
    )
    assert shown.returncode == 0, shown.stderr
    settings = json.loads(shown.stdout)["settings"]
    assert settings["cluster.tracker"]["where"] == f"{config}:2"
    assert settings["daemon.max_peers"] == {
        "value": 12,
        "source": "file",
        "where": f"{config}:5",
    }
    assert settings["daemon.upload_slots"]["where"] == "env VMSWARM_DAEMON_UPLOAD_SLOTS"
    assert settings["daemon.listen"]["source"] == "default"
    # The same file through $VMSWARM_CONFIG, with a flag on top, as the daemon would start.
    checked = vmswarm(
        "daemon", "run", "--max-peers", "30", "--show-config", VMSWARM_CONFIG=str(config)
    )
    assert checked.returncode == 0, checked.stderr
    rows = {line.split()[0]: line.split()[1:] for line in checked.stdout.splitlines()[2:]}
    assert rows["daemon.max_peers"] == ["30", "flag", "--max-peers"]
    assert rows["cluster.tracker"] == ["10.0.0.1:7000", f"{config}:2"]
    # A query command uses the file's tracker.
    away = vmswarm("templates", "--config", str(config), "--tracker", f"127.0.0.1:{free_port()}")
    assert away.returncode == 3


def test_config_errors_name_the_file_the_key_and_the_line(tmp_path: Path) -> None:
    config = tmp_path / "vmswarm.toml"
    config.write_text('[daemon]\nrole = "host"\nmax_peer = 3\n')
    result = vmswarm("status", "--config", str(config))
    assert result.returncode == 2
    line = one_error_line(result)
    assert f"{config}:3: unknown key daemon.max_peer" in line and "max_peers" in line
    config.write_text('[daemon]\nrole = "host"\nmax_peers = "lots"\n')
    bad = vmswarm("daemon", "run", "--config", str(config))
    assert bad.returncode == 2
    assert f"{config}:3: daemon.max_peers: must be a whole number" in one_error_line(bad)
    missing = vmswarm("config", "show", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "does not exist" in one_error_line(missing)


def _read_until(stream: io.TextIOBase, wanted: str, times: int) -> list[str]:
    lines: list[str] = []
    while sum(wanted in line for line in lines) < times:
        line = stream.readline()
        assert line, f"the watch ended early: {lines}"
        lines.append(line)
    return lines


def test_status_watch_repeats_until_interrupted(cluster: LocalCluster) -> None:
    for extra, marker in (([], "storage daemon"), (["--json"], '"role": "storage"')):
        watch = subprocess.Popen(
            [str(vmswarm_script()), "status", "--watch", "--interval", "0.2", *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(VMSWARM_CONTROL=control(cluster)),
        )
        try:
            assert watch.stdout is not None
            lines = _read_until(watch.stdout, marker, 2)  # type: ignore[arg-type]
        finally:
            watch.send_signal(signal.SIGINT)
            _, err = watch.communicate(timeout=TIMEOUT)
        assert watch.returncode == 0, err
        if extra:
            assert all(json.loads(line)["role"] == "storage" for line in lines)
        assert ESCAPE not in "".join(lines)


def test_status_watch_on_a_terminal_redraws_in_place(cluster: LocalCluster) -> None:
    parent, child = pty.openpty()
    watch = subprocess.Popen(
        [str(vmswarm_script()), "status", "--watch", "--interval", "0.2"],
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
        env=clean_env(TERM="xterm", VMSWARM_CONTROL=control(cluster)),
    )
    os.close(child)
    seen = b""
    try:
        deadline = time.monotonic() + TIMEOUT
        while seen.count(b"storage daemon") < 2 and time.monotonic() < deadline:
            if select.select([parent], [], [], 1.0)[0]:
                seen += os.read(parent, 65536)
    finally:
        watch.send_signal(signal.SIGINT)
        watch.wait(timeout=TIMEOUT)
        os.close(parent)
    assert seen.count(b"storage daemon") >= 2
    assert b"\x1b[" in seen  # rich's live display moves the cursor to redraw
    assert watch.returncode == 0


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    notice = {"done_bytes": 50, "total_bytes": 100, "rate": 10.0, "sources": 2, "eta": 5}
    piped = io.StringIO()
    monkeypatch.setattr("sys.stderr", piped)
    view = progress.ProgressView("debian:12")
    view("progress", notice)
    view.finish()
    assert piped.getvalue().startswith("debian:12:  50.0%") and ESCAPE not in piped.getvalue()
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    view = progress.ProgressView("debian:12")
    view("progress", notice)
    view.finish()
    drawn = terminal.getvalue()
    assert "debian:12" in drawn and "━" in drawn and "50.0%" in drawn


def _undocumented(command: Any, path: str) -> list[str]:
    missing = []
    if not (command.help or "").strip():
        missing.append(f"{path}: the command has no help")
    for param in command.params:
        if param.name == "help":
            continue
        if not (getattr(param, "help", None) or "").strip():
            missing.append(f"{path} {param.opts[0]}: no help text")
    for name, sub in (getattr(command, "commands", None) or {}).items():
        missing += _undocumented(sub, f"{path} {name}")
    return missing


def test_every_command_and_option_has_help() -> None:
    root = typer.main.get_command(app)
    assert _undocumented(root, "vmswarm") == []
    assert {"config", "status", "templates", "daemon", "tracker"} <= set(
        getattr(root, "commands", {})
    )
