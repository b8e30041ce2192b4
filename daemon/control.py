"""The operator's control API: RPC on a Unix socket (mode 0660) next to the daemon's data.

Server side: `open_control_listener` (refuses if another daemon answers on the path, removes a
stale socket file) and `control_handlers` (`fetch`, `status`). Client side: `call_control`, used
by the CLI, which turns a missing or dead socket into one clear `ControlUnreachable` message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .rpc import LINK_ERRORS, Handler, NoticeCallback, Notifier, RpcClient, RpcError

if TYPE_CHECKING:
    from .node import Node

CONTROL_MODE = 0o660
DEFAULT_CONTROL_NAME = "control.sock"
ENV_CONTROL = "VMSWARM_CONTROL"


class ControlError(Exception):
    """The control socket cannot be opened (another daemon owns it, or the path is unusable)."""


class ControlUnreachable(Exception):
    """No daemon answers on the control socket; the message names the path and what to do."""


def _daemon_alive(path: Path) -> bool:
    """Does something accept connections on the Unix socket at `path`?"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            return False
        raise
    finally:
        probe.close()
    return True


def _clear_stale(path: Path) -> None:
    if os.path.lexists(path):
        if _daemon_alive(path):
            raise ControlError(f"another daemon is already running on control socket {path}")
        path.unlink()  # stale: its daemon died without cleaning up
    path.parent.mkdir(parents=True, exist_ok=True)


async def open_control_listener(path: Path) -> trio.SocketListener:
    """Bind the control socket; ControlError if another daemon is alive on it."""
    path = Path(path)
    _clear_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        os.chmod(path, CONTROL_MODE)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ControlError(
            f"cannot listen on control socket {path}: {exc.strerror or exc}"
        ) from exc
    return trio.SocketListener(sock)


def control_handlers(node: Node) -> dict[str, Handler]:
    """The methods the CLI may call on the control socket."""

    async def fetch(params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
        name = params["name"]
        version = params.get("version")
        if type(name) is not str or not name:
            raise ValueError("name must be a non-empty string")
        if version is not None and type(version) is not str:
            raise ValueError("version must be a string or nil")
        return await node.fetch(name, version, notifier)

    async def status(params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
        return node.status()

    return {"fetch": fetch, "status": status}


def _present(path: Path) -> bool:
    return os.path.lexists(path)


async def call_control(
    path: Path,
    method: str,
    params: dict[str, Any],
    on_notice: NoticeCallback | None = None,
) -> dict[str, Any]:
    """One call to the local daemon; ControlUnreachable or RpcError(code, message)."""
    hint = "is the daemon running? start it with `vmswarm daemon run ...`"
    if not _present(path):
        raise ControlUnreachable(f"no daemon control socket at {path}; {hint}")
    try:
        client = await RpcClient.connect_unix(str(path))
    except OSError as exc:
        raise ControlUnreachable(
            f"cannot connect to the daemon at {path} ({exc.strerror or exc}); {hint}"
        ) from exc
    try:
        return await client.call(method, params, on_notice)
    except LINK_ERRORS as exc:
        raise ControlUnreachable(f"lost the daemon at {path} during {method}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await client.aclose()


__all__ = [
    "CONTROL_MODE",
    "ENV_CONTROL",
    "ControlError",
    "ControlUnreachable",
    "RpcError",
    "call_control",
    "control_handlers",
    "open_control_listener",
]
