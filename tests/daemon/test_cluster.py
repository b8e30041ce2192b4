"""The process-cluster harness, driven by a stand-in command instead of the real vmswarm."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from vmswarm.daemon.cluster import (
    CliError,
    LocalCluster,
    ManagedProcess,
    ProcessExitedError,
    free_port,
    peak_rss_bytes,
    wait_for_path,
    wait_for_port,
)

# Listens on --listen, binds a Unix socket at --control, obeys a few test switches, then idles.
STANDIN = textwrap.dedent(
    """
    import signal, socket, sys, time
    args = sys.argv[1:]
    def opt(name):
        return args[args.index(name) + 1] if name in args else None
    print("stand-in argv:", " ".join(args), flush=True)
    if "--die-early" in args:
        print("boom: stand-in failed on purpose", flush=True)
        sys.exit(3)
    if "--ignore-term" in args:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--never-listen" not in args:
        host, port = opt("--listen").rsplit(":", 1)
        tcp = socket.socket()
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host, int(port)))
        tcp.listen()
        control = opt("--control")
        if control:
            unix = socket.socket(socket.AF_UNIX)
            unix.bind(control)
            unix.listen()
    print("ready", flush=True)
    while True:
        time.sleep(1)
    """
)
STANDIN_COMMAND = [sys.executable, "-c", STANDIN]
DEADLINE = 20.0


def _gone(pid: int) -> bool:
    """True once `pid` no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "Z" in state.split()[1]


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def _standin(tmp_path: Path, *args: str) -> ManagedProcess:
    port = free_port()
    return ManagedProcess(
        "standin",
        ["--listen", f"127.0.0.1:{port}", *args],
        log_path=tmp_path / "logs" / "standin.log",
        command=STANDIN_COMMAND,
    )


def _port_of(process: ManagedProcess) -> int:
    return int(process.args[process.args.index("--listen") + 1].rsplit(":", 1)[1])


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536


def test_managed_process_starts_gets_ready_and_logs(tmp_path: Path) -> None:
    process = _standin(tmp_path)
    process.start()
    try:
        wait_for_port("127.0.0.1", _port_of(process), DEADLINE, process)
        assert process.running
        assert "ready" in process.log_tail(5)
        assert peak_rss_bytes(process.pid) > 0
    finally:
        code = process.terminate_and_wait()
    assert code == -signal.SIGTERM
    assert process.returncode == -signal.SIGTERM
    assert _gone(process.pid)


def test_early_death_is_a_clear_error_with_the_log_tail(tmp_path: Path) -> None:
    process = _standin(tmp_path, "--die-early")
    process.start()
    with pytest.raises(ProcessExitedError) as info:
        wait_for_port("127.0.0.1", _port_of(process), DEADLINE, process)
    message = str(info.value)
    assert "'standin'" in message
    assert "code 3" in message
    assert "boom: stand-in failed on purpose" in message
    assert process.returncode == 3


def test_timeout_names_the_process(tmp_path: Path) -> None:
    process = _standin(tmp_path, "--never-listen")
    process.start()
    try:
        with pytest.raises(TimeoutError) as info:
            wait_for_path(tmp_path / "never", 0.2, process)
        assert not isinstance(info.value, ProcessExitedError)
        assert "'standin'" in str(info.value)
        assert "never" in str(info.value)
    finally:
        process.terminate_and_wait()


def test_terminate_escalates_to_sigkill(tmp_path: Path) -> None:
    process = _standin(tmp_path, "--ignore-term")
    process.start()
    wait_for_port("127.0.0.1", _port_of(process), DEADLINE, process)
    assert process.terminate_and_wait(timeout=0.3) == -signal.SIGKILL


def test_restart_reuses_the_arguments(tmp_path: Path) -> None:
    process = _standin(tmp_path)
    process.start()
    try:
        wait_for_port("127.0.0.1", _port_of(process), DEADLINE, process)
        first = process.pid
        process.kill()
        assert process.wait(DEADLINE) == -signal.SIGKILL
        process.restart()
        wait_for_port("127.0.0.1", _port_of(process), DEADLINE, process)
        assert process.pid != first
        assert process.starts == 2
        log = process.log_path.read_text()
        assert log.count("--- start") == 2
        assert log.count("stand-in argv: --listen") == 2
    finally:
        process.terminate_and_wait()


def test_cluster_starts_nodes_and_stop_kills_everything(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "c", command=STANDIN_COMMAND) as cluster:
        tracker = cluster.start_tracker("--announce-ttl", "5")
        center = cluster.start_center("center-1")
        host = cluster.start_host("host-1", "--rack", "r1")
        assert cluster.tracker_address == tracker.listen_address
        assert [n.name for n in cluster.centers] == ["center-1"]
        assert [n.name for n in cluster.hosts] == ["host-1"]
        assert center.control is not None and center.control.exists()
        assert host.data_dir == tmp_path / "c" / "host-1"
        host_argv = host.process.log_tail(10)
        assert f"--tracker {tracker.listen_address}" in host_argv
        assert "--role host" in host_argv and "--rack r1" in host_argv
        assert "tracker run" in tracker.process.log_tail(10)
        assert "--role storage" in center.process.log_tail(10)
        with pytest.raises(ValueError, match="already exists"):
            cluster.start_host("host-1")
        pids = [node.process.pid for node in cluster.nodes]
    assert all(_gone(pid) for pid in pids)
    assert (tmp_path / "c" / "logs" / "host-1.log").exists()


def test_cluster_stop_runs_on_exceptions(tmp_path: Path) -> None:
    pids: list[int] = []
    cluster = LocalCluster(tmp_path, command=STANDIN_COMMAND, stop_timeout=0.3)
    with pytest.raises(RuntimeError, match="test failure"), cluster:
        cluster.start_tracker()
        # Ignores SIGTERM: stop() has to escalate to SIGKILL.
        cluster.start_host("host-1", "--ignore-term")
        pids = [node.process.pid for node in cluster.nodes]
        raise RuntimeError("test failure")
    assert len(pids) == 2
    assert all(_gone(pid) for pid in pids)


def test_cluster_reports_a_daemon_that_dies_at_start(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, command=STANDIN_COMMAND) as cluster:
        cluster.start_tracker()
        with pytest.raises(ProcessExitedError, match="boom"):
            cluster.start_center("center-1", "--die-early")
        assert cluster.centers[0].process.returncode == 3


def test_cluster_restart_brings_a_node_back(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, command=STANDIN_COMMAND) as cluster:
        cluster.start_tracker()
        host = cluster.start_host("host-1")
        first = host.process.pid
        host.process.kill()
        cluster.restart(host)
        assert host.process.pid != first
        assert host.process.running


def test_long_work_dirs_get_short_control_sockets(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with LocalCluster(deep, command=STANDIN_COMMAND) as cluster:
        cluster.start_tracker()
        host = cluster.start_host("host-1")
        assert host.control is not None
        assert len(os.fsencode(host.control)) <= 107
        assert host.control.exists()


def test_run_cli_sets_the_tracker_and_reports_failures(tmp_path: Path) -> None:
    cli = [
        sys.executable,
        "-c",
        "import os, sys; print(os.environ['VMSWARM_TRACKER'], os.environ.get('VMSWARM_CONTROL'));"
        " print('cli said no', file=sys.stderr); sys.exit(int(sys.argv[1]))",
    ]
    with LocalCluster(tmp_path, command=STANDIN_COMMAND, cli_command=cli) as cluster:
        cluster.start_tracker()
        host = cluster.start_host("host-1")
        ok = cluster.run_cli("0", node=host)
        assert ok.stdout.split() == [cluster.tracker_address, str(host.control)]
        with pytest.raises(CliError) as info:
            cluster.run_cli("4")
        assert info.value.returncode == 4
        assert "cli said no" in str(info.value)
        assert cluster.run_cli("5", check=False).returncode == 5


def test_children_die_with_their_parent(tmp_path: Path) -> None:
    """SIGKILL the process that owns a ManagedProcess: the kernel kills the child too."""
    parent_code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from vmswarm.daemon.cluster import ManagedProcess, free_port, wait_for_port
        port = free_port()
        child = ManagedProcess(
            "orphan", ["--listen", f"127.0.0.1:{{port}}"],
            log_path=Path({str(tmp_path / "orphan.log")!r}), command={STANDIN_COMMAND!r},
        )
        child.start()
        wait_for_port("127.0.0.1", port, 20.0, child)
        print(child.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"parent did not report its child's pid: {line!r}"
        child_pid = int(line)
        assert not _gone(child_pid)
    finally:
        parent.kill()
        parent.wait(DEADLINE)
    assert _wait_gone(child_pid), f"child {child_pid} outlived its SIGKILLed parent"
