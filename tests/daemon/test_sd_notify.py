"""The sd_notify protocol against real AF_UNIX datagram sockets (a path one and an abstract one)."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from vmswarm.daemon import sd_notify, tracker
from vmswarm.daemon.node import Node, NodeConfig
from vmswarm.daemon.sd_notify import (
    NotifySocketError,
    SystemdNotifier,
    encode_message,
    notify_address,
    notify_service,
    watchdog_interval,
)
from vmswarm.swarm.messages import Role

# Generous: a loaded 2-core machine may be slow, and no test asserts how fast pings come.
WAIT = 20.0
# 0.1 s of watchdog: pings every 0.05 s, so several arrive quickly even on a busy machine.
FAST_WATCHDOG_USEC = "100000"


def parse(datagram: bytes) -> dict[str, str]:
    fields = {}
    for line in datagram.decode().split("\n"):
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        fields[key] = value
    return fields


class Receiver:
    """systemd's end: a bound datagram socket and the messages it got."""

    def __init__(self, raw: socket.socket, notify_socket: str) -> None:
        self.raw = raw
        self.sock = trio.socket.from_stdlib_socket(raw)
        self.notify_socket = notify_socket

    async def next(self) -> dict[str, str]:
        with trio.fail_after(WAIT):
            return parse(await self.sock.recv(4096))

    async def until(self, key: str) -> list[dict[str, str]]:
        """Messages up to and including the first that carries `key`."""
        seen = []
        while True:
            message = await self.next()
            seen.append(message)
            if key in message:
                return seen

    def pending(self) -> list[dict[str, str]]:
        """Whatever has arrived so far, without waiting."""
        found = []
        while True:
            try:
                found.append(parse(self.raw.recv(4096, socket.MSG_DONTWAIT)))
            except BlockingIOError:
                return found


def bound_receiver(address: str | bytes, notify_socket: str) -> Receiver:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    raw.bind(address)
    return Receiver(raw, notify_socket)


@pytest.fixture
async def path_receiver(short_dir: Path) -> AsyncIterator[Receiver]:
    path = short_dir / "notify"
    receiver = bound_receiver(str(path), str(path))
    with receiver.sock:
        yield receiver


@pytest.fixture
async def abstract_receiver() -> AsyncIterator[Receiver]:
    name = f"vmswarm-test-notify-{secrets.token_hex(8)}"
    receiver = bound_receiver(b"\0" + name.encode(), "@" + name)
    with receiver.sock:
        yield receiver


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest) -> Receiver:
    name = "path_receiver" if request.param == "path" else "abstract_receiver"
    value: Receiver = request.getfixturevalue(name)
    return value


# --- parsing the environment -----------------------------------------------------------------


def test_a_path_is_used_as_is_and_an_at_sign_means_abstract() -> None:
    assert notify_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert notify_address("@vmswarm/notify") == b"\0vmswarm/notify"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "is empty"),
        ("run/systemd/notify", "neither an absolute path nor"),
        ("@", "names no abstract socket"),
        ("vsock:2:1234", "AF_VSOCK"),
        ("/" + "x" * 200, "at most 107"),
        ("@" + "x" * 200, "at most 107"),
        ("/run/a\0b", "NUL"),
    ],
)
def test_a_bad_notify_socket_is_named_in_the_error(value: str, says: str) -> None:
    with pytest.raises(NotifySocketError, match=says):
        notify_address(value)


def test_the_watchdog_pings_at_half_the_interval() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=10) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "10"}, pid=10) == 15.0
    assert watchdog_interval({}, pid=10) is None


def test_a_watchdog_meant_for_another_process_is_not_ours() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "11"}, pid=10) is None


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"},
    ],
)
def test_a_bad_watchdog_setting_is_warned_about_and_ignored(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=sd_notify.__name__):
        assert watchdog_interval(env, pid=10) is None
    assert any("WATCHDOG_" in r.getMessage() for r in caplog.records)


def test_messages_are_key_value_lines_and_values_stay_on_one_line() -> None:
    message = encode_message({"READY": "1", "STATUS": "listening\non 1.2.3.4:5"})
    assert message == b"READY=1\nSTATUS=listening on 1.2.3.4:5"
    with pytest.raises(ValueError, match="bad sd_notify key"):
        encode_message({"ready": "1"})


# --- the protocol over a real socket -----------------------------------------------------------


async def test_ready_watchdog_and_stopping_reach_the_socket(
    receiver: Receiver, nursery: trio.Nursery
) -> None:
    env = {"NOTIFY_SOCKET": receiver.notify_socket, "WATCHDOG_USEC": FAST_WATCHDOG_USEC}
    scope = trio.CancelScope()
    nursery.start_soon(_run_in_scope, scope, env)
    ready = await receiver.next()
    assert ready == {"READY": "1", "STATUS": "serving"}
    for _ in range(3):
        assert await receiver.next() == {"WATCHDOG": "1"}
    scope.cancel()
    messages = await receiver.until("STOPPING")
    assert messages[-1] == {"STOPPING": "1", "STATUS": "stopping"}
    assert all(m == {"WATCHDOG": "1"} for m in messages[:-1])


async def _run_in_scope(scope: trio.CancelScope, env: dict[str, str]) -> None:
    with scope:
        await notify_service("serving", environ=env)


async def test_the_service_runs_until_cancelled_even_without_a_watchdog(
    path_receiver: Receiver, nursery: trio.Nursery
) -> None:
    scope = trio.CancelScope()
    nursery.start_soon(_run_in_scope, scope, {"NOTIFY_SOCKET": path_receiver.notify_socket})
    assert (await path_receiver.next())["READY"] == "1"
    scope.cancel()
    assert await path_receiver.next() == {"STOPPING": "1", "STATUS": "stopping"}


async def test_without_notify_socket_nothing_happens() -> None:
    with trio.fail_after(WAIT):
        await notify_service("serving", environ={"WATCHDOG_USEC": FAST_WATCHDOG_USEC})
    assert SystemdNotifier.from_environment({}) is None


async def test_a_watchdog_for_another_pid_sends_no_pings(
    path_receiver: Receiver, abstract_receiver: Receiver, nursery: trio.Nursery
) -> None:
    ours = {"NOTIFY_SOCKET": path_receiver.notify_socket, "WATCHDOG_USEC": FAST_WATCHDOG_USEC}
    theirs = {
        "NOTIFY_SOCKET": abstract_receiver.notify_socket,
        "WATCHDOG_USEC": FAST_WATCHDOG_USEC,
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    nursery.start_soon(_run_forever, ours)
    nursery.start_soon(_run_forever, theirs)
    assert (await abstract_receiver.next())["READY"] == "1"
    assert (await path_receiver.next())["READY"] == "1"
    # While the watched service pings three times, the other one pings not at all.
    for _ in range(3):
        assert await path_receiver.next() == {"WATCHDOG": "1"}
    assert abstract_receiver.pending() == []
    nursery.cancel_scope.cancel()


async def _run_forever(env: dict[str, str]) -> None:
    await notify_service("serving", environ=env)


async def test_a_bad_notify_socket_is_a_warning_and_the_service_keeps_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger=sd_notify.__name__), trio.fail_after(WAIT):
        await notify_service("serving", environ={"NOTIFY_SOCKET": "relative/notify"})
    assert [r.getMessage() for r in caplog.records] == [
        "not notifying systemd: NOTIFY_SOCKET='relative/notify' is neither an absolute path "
        "nor an '@' abstract name"
    ]


async def test_an_unreachable_socket_is_warned_about_once_and_pinging_goes_on(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = short_dir / "gone"
    notifier = SystemdNotifier(os.fsencode(missing), watchdog=0.01)
    try:
        with caplog.at_level(logging.WARNING, logger=sd_notify.__name__):
            assert not await notifier.ready("serving")
            with trio.move_on_after(0.2):
                await notifier.run_watchdog()
            warnings = [r.getMessage() for r in caplog.records]
            assert len(warnings) == 1
            assert f"cannot notify systemd at {missing}" in warnings[0]
            # Once systemd listens again, messages arrive and the recovery is logged.
            receiver = bound_receiver(str(missing), str(missing))
            with receiver.sock, caplog.at_level(logging.INFO, logger=sd_notify.__name__):
                assert await notifier.status("back")
                assert await receiver.next() == {"STATUS": "back"}
            assert "works again" in caplog.records[-1].getMessage()
    finally:
        notifier.close()


async def test_a_receiver_that_stops_reading_costs_a_warning_not_a_hang(
    path_receiver: Receiver, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sd_notify, "SEND_TIMEOUT", 0.2)
    notifier = SystemdNotifier(os.fsencode(path_receiver.notify_socket))
    try:
        with caplog.at_level(logging.WARNING, logger=sd_notify.__name__), trio.fail_after(WAIT):
            sent = 0
            # Nobody reads: the receiver's queue fills, then a send gives up after the timeout.
            while await notifier.status(f"message {sent}"):
                sent += 1
        assert sent > 0
        assert "did not take a message" in caplog.records[-1].getMessage()
        assert path_receiver.pending()[0] == {"STATUS": "message 0"}
    finally:
        notifier.close()


# --- READY only once the services listen ---------------------------------------------------------


async def test_the_tracker_is_ready_only_once_it_accepts_connections(
    receiver: Receiver,
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.notify_socket)
    monkeypatch.setenv("WATCHDOG_USEC", FAST_WATCHDOG_USEC)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    scope = trio.CancelScope()
    nursery.start_soon(_run_tracker, scope, tmp_path / "tracker")
    ready = await receiver.next()
    assert ready["READY"] == "1"
    port = int(ready["STATUS"].rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.aclose()
    assert await receiver.next() == {"WATCHDOG": "1"}
    scope.cancel()
    assert (await receiver.until("STOPPING"))[-1]["STOPPING"] == "1"


async def _run_tracker(scope: trio.CancelScope, state_dir: Path) -> None:
    with scope:
        await tracker.run("127.0.0.1", 0, state_dir)


async def test_a_daemon_is_ready_once_its_port_and_control_socket_answer(
    path_receiver: Receiver,
    nursery: trio.Nursery,
    tmp_path: Path,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_receiver.notify_socket)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    control = short_dir / "control.sock"
    node = Node(NodeConfig(role=Role.STORAGE, data_dir=tmp_path / "center", control_path=control))
    scope = trio.CancelScope()
    nursery.start_soon(_run_node, scope, node)
    ready = await path_receiver.next()
    assert ready["READY"] == "1"
    assert node.bound is not None
    stream = await trio.open_tcp_stream(*node.bound)
    await stream.aclose()
    unix = await trio.open_unix_socket(str(control))
    await unix.aclose()
    assert str(control) in ready["STATUS"]
    scope.cancel()
    assert await path_receiver.next() == {"STOPPING": "1", "STATUS": "stopping"}


async def _run_node(scope: trio.CancelScope, node: Node) -> None:
    with scope:
        await node.run()
