"""systemd's sd_notify protocol, written directly to $NOTIFY_SOCKET from trio (no libsystemd).

A `Type=notify` service tells systemd "READY=1" once it serves, "WATCHDOG=1" at least once per
`WatchdogSec=` (systemd passes it as WATCHDOG_USEC, for the process WATCHDOG_PID if set) and
"STOPPING=1" when it shuts down. Each message is one AF_UNIX datagram of newline-separated
KEY=VALUE lines; NOTIFY_SOCKET is a path, or an abstract name written with a leading '@'.
Without NOTIFY_SOCKET (not started by systemd) everything here is a no-op; a bad value or a
failed send is logged as a warning and the daemon keeps running.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
# sun_path holds 108 bytes; a path needs its terminating NUL, an abstract name does not.
_MAX_PATH_BYTES = 107
_MAX_ABSTRACT_BYTES = 107
# A send that cannot complete in this long (systemd not reading) is dropped, not waited on.
SEND_TIMEOUT = 5.0


class NotifySocketError(ValueError):
    """NOTIFY_SOCKET holds something that is not a usable AF_UNIX datagram address."""


def notify_address(value: str) -> bytes:
    """The AF_UNIX address NOTIFY_SOCKET names: a path, or '@name' for an abstract socket."""
    if not value:
        raise NotifySocketError(f"{NOTIFY_SOCKET_ENV} is empty")
    raw = os.fsencode(value)
    if b"\0" in raw:
        raise NotifySocketError(f"{NOTIFY_SOCKET_ENV}={value!r} contains a NUL byte")
    if raw.startswith(b"@"):
        name = raw[1:]
        if not name:
            raise NotifySocketError(f"{NOTIFY_SOCKET_ENV}='@' names no abstract socket")
        if len(name) > _MAX_ABSTRACT_BYTES:
            raise NotifySocketError(
                f"{NOTIFY_SOCKET_ENV}: abstract name is {len(name)} bytes, "
                f"at most {_MAX_ABSTRACT_BYTES} fit in sun_path"
            )
        return b"\0" + name
    if raw.startswith(b"/"):
        if len(raw) > _MAX_PATH_BYTES:
            raise NotifySocketError(
                f"{NOTIFY_SOCKET_ENV}: path is {len(raw)} bytes, "
                f"at most {_MAX_PATH_BYTES} fit in sun_path"
            )
        return raw
    if value.startswith("vsock:"):
        raise NotifySocketError(
            f"{NOTIFY_SOCKET_ENV}={value!r}: AF_VSOCK notify sockets are not supported"
        )
    raise NotifySocketError(
        f"{NOTIFY_SOCKET_ENV}={value!r} is neither an absolute path nor an '@' abstract name"
    )


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None: no watchdog for us."""
    usec_text = environ.get(WATCHDOG_USEC_ENV)
    if usec_text is None:
        return None
    pid_text = environ.get(WATCHDOG_PID_ENV)
    if pid_text is not None:
        if not pid_text.isdigit() or int(pid_text) <= 0:
            log.warning(
                "%s=%r is not a process id; not sending watchdog pings", WATCHDOG_PID_ENV, pid_text
            )
            return None
        if int(pid_text) != pid:
            # systemd set the watchdog up for another process (our parent, say), not this one.
            log.debug("watchdog is for pid %s, not %d; not pinging", pid_text, pid)
            return None
    if not usec_text.isdigit() or int(usec_text) <= 0:
        log.warning(
            "%s=%r is not a positive number of microseconds; not sending watchdog pings",
            WATCHDOG_USEC_ENV,
            usec_text,
        )
        return None
    return int(usec_text) / 2e6


def encode_message(fields: Mapping[str, str]) -> bytes:
    """KEY=VALUE lines; a value's own newlines would start a bogus key, so they become spaces."""
    lines = []
    for key, value in fields.items():
        if not key or not key.replace("_", "").isalnum() or not key.isupper():
            raise ValueError(f"bad sd_notify key {key!r}")
        lines.append(f"{key}={' '.join(value.splitlines())}")
    return "\n".join(lines).encode()


class SystemdNotifier:
    """One service's channel to systemd: a datagram socket and the watchdog interval."""

    def __init__(self, address: bytes, *, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog
        self._sock: trio.socket.SocketType | None = None
        self._failing = False

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> SystemdNotifier | None:
        """A notifier for $NOTIFY_SOCKET, or None when unset or unusable (then warned about)."""
        env = os.environ if environ is None else environ
        value = env.get(NOTIFY_SOCKET_ENV)
        if value is None:
            return None
        try:
            address = notify_address(value)
        except NotifySocketError as exc:
            log.warning("not notifying systemd: %s", exc)
            return None
        interval = watchdog_interval(env, os.getpid() if pid is None else pid)
        return cls(address, watchdog=interval)

    @property
    def label(self) -> str:
        """The address as NOTIFY_SOCKET spells it."""
        if self.address.startswith(b"\0"):
            return "@" + os.fsdecode(self.address[1:])
        return os.fsdecode(self.address)

    async def send(self, **fields: str) -> bool:
        """Send one message; False (and a warning, once per outage) if it could not be sent."""
        data = encode_message(fields)
        with trio.move_on_after(SEND_TIMEOUT):
            try:
                await self._send(data)
            except OSError as exc:
                self._report_failure(f"cannot notify systemd at {self.label}: {exc}")
                return False
            if self._failing:
                log.info("notifying systemd at %s works again", self.label)
                self._failing = False
            return True
        self._report_failure(f"systemd did not take a message within {SEND_TIMEOUT:g}s")
        return False

    async def _send(self, data: bytes) -> None:
        # Connected, so a full queue at systemd's end blocks the send instead of spinning on
        # EAGAIN; after any error the next send connects afresh (systemd may have come back).
        if self._sock is None:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                await sock.connect(self.address)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        try:
            await self._sock.send(data)
        except OSError:
            self.close()
            raise

    def _report_failure(self, message: str) -> None:
        if self._failing:
            log.debug("%s", message)
        else:
            log.warning("%s", message)
            self._failing = True

    async def ready(self, status: str) -> bool:
        return await self.send(READY="1", STATUS=status)

    async def stopping(self, status: str = "stopping") -> bool:
        return await self.send(STOPPING="1", STATUS=status)

    async def status(self, status: str) -> bool:
        return await self.send(STATUS=status)

    async def run_watchdog(self) -> None:
        """Ping WATCHDOG=1 every half interval until cancelled; sleeps forever without one."""
        interval = self.watchdog
        if interval is None:
            await trio.sleep_forever()
        while True:
            await trio.sleep(interval)
            await self.send(WATCHDOG="1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def notify_service(
    status: str,
    *,
    environ: Mapping[str, str] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Say READY=1 (with `status`) to systemd, feed its watchdog, and say STOPPING=1 when cancelled.

    Start it once the service listens; a no-op that returns at once outside systemd.
    """
    notifier = SystemdNotifier.from_environment(environ)
    if notifier is None:
        task_status.started()
        return
    try:
        await notifier.ready(status)
        if notifier.watchdog is not None:
            log.info("systemd watchdog: pinging every %gs", notifier.watchdog)
        task_status.started()
        await notifier.run_watchdog()
    finally:
        # Cancellation is how shutdown starts: tell systemd before the slow cleanup begins.
        with trio.CancelScope(shield=True):
            await notifier.stopping()
        notifier.close()


__all__ = [
    "NOTIFY_SOCKET_ENV",
    "WATCHDOG_PID_ENV",
    "WATCHDOG_USEC_ENV",
    "NotifySocketError",
    "SystemdNotifier",
    "encode_message",
    "notify_address",
    "notify_service",
    "watchdog_interval",
]
