"""The real `vmswarm tracker run` and `vmswarm daemon run` speak sd_notify to a socket we own.

This test plays systemd: it binds the datagram socket, passes it as NOTIFY_SOCKET (with a short
WATCHDOG_USEC), and checks READY=1 comes only once the service answers, then WATCHDOG=1 pings,
then STOPPING=1 after SIGTERM.
"""

from __future__ import annotations

import secrets
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmswarm.daemon.cluster import ManagedProcess, free_port, vmswarm_script

pytestmark = pytest.mark.e2e

# Generous: the first message waits for Python to start and import everything on a busy machine.
WAIT = 60.0
# Pings every 0.1 s, so a few arrive quickly; nothing here asserts their timing.
WATCHDOG_USEC = "200000"


class FakeSystemd:
    """The notify socket's receiving end."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket
        sock.settimeout(WAIT)

    def next(self, process: ManagedProcess) -> dict[str, str]:
        try:
            datagram = self.sock.recv(4096)
        except TimeoutError:
            raise AssertionError(
                f"no sd_notify message within {WAIT}s (exit code {process.returncode}); "
                f"log:\n{process.log_tail(30)}"
            ) from None
        fields = {}
        for line in datagram.decode().split("\n"):
            key, _, value = line.partition("=")
            fields[key] = value
        return fields


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[FakeSystemd]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = short_dir / "notify"
        sock.bind(str(path))
        notify_socket = str(path)
    else:
        name = f"vmswarm-e2e-notify-{secrets.token_hex(8)}"
        sock.bind(b"\0" + name.encode())
        notify_socket = "@" + name
    with sock:
        yield FakeSystemd(sock, notify_socket)


def start(name: str, args: list[str], systemd: FakeSystemd, log_dir: Path) -> ManagedProcess:
    process = ManagedProcess(
        name,
        args,
        log_path=log_dir / f"{name}.log",
        env={"NOTIFY_SOCKET": systemd.notify_socket, "WATCHDOG_USEC": WATCHDOG_USEC},
        command=[str(vmswarm_script())],
    )
    process.start()
    return process


def accepts_tcp(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def accepts_unix(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def watchdog_then_stopping(process: ManagedProcess, systemd: FakeSystemd) -> None:
    """Some WATCHDOG=1 pings; after SIGTERM, STOPPING=1 and a clean exit."""
    for _ in range(3):
        assert systemd.next(process) == {"WATCHDOG": "1"}
    process.kill(signal.SIGTERM)
    while (message := systemd.next(process)) == {"WATCHDOG": "1"}:
        pass
    assert message == {"STOPPING": "1", "STATUS": "stopping"}
    assert process.wait(WAIT) == 0, process.log_tail(30)


def test_the_tracker_is_ready_when_its_port_answers(systemd: FakeSystemd, tmp_path: Path) -> None:
    port = free_port()
    process = start(
        "tracker",
        ["tracker", "run", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "t")],
        systemd,
        tmp_path,
    )
    try:
        ready = systemd.next(process)
        assert ready == {"READY": "1", "STATUS": f"tracker listening on 127.0.0.1:{port}"}
        assert accepts_tcp(port)
        watchdog_then_stopping(process, systemd)
    finally:
        process.terminate_and_wait()


@pytest.mark.parametrize("role", ["storage", "host"])
def test_a_daemon_is_ready_when_its_port_and_control_socket_answer(
    role: str, systemd: FakeSystemd, tmp_path: Path, short_dir: Path
) -> None:
    port = free_port()
    control = short_dir / "control.sock"
    args = [
        "daemon",
        "run",
        "--role",
        role,
        "--data-dir",
        str(tmp_path / role),
        "--listen",
        f"127.0.0.1:{port}",
        "--control",
        str(control),
        "--libvirt-uri",
        "none",
    ]
    process = start(role, args, systemd, tmp_path)
    try:
        ready = systemd.next(process)
        assert ready["READY"] == "1", ready
        assert accepts_tcp(port)
        assert accepts_unix(control)
        assert ready["STATUS"] == (
            f"{role} daemon listening on 127.0.0.1:{port}, control {control}"
        )
        watchdog_then_stopping(process, systemd)
        assert not control.exists()
    finally:
        process.terminate_and_wait()
