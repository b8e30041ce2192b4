"""Run a local cluster of vmswarm processes (tracker, storage centers, hosts) on this machine.

Used by the demo, the end-to-end tests and the benchmarks. Synchronous on purpose: it only starts,
watches and stops processes. Start processes from the main thread (or another long-lived thread):
the kernel's parent-death signal fires when the *thread* that forked the child exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from .keys import generate_keypair
from .pki import CA_CERT_NAME, IssuedFiles, TlsRole, init_ca, issue

# Not `-m vmswarm.cli.main`: that runs the module as __main__, a second copy beside the one the
# command modules import and register on. This is exactly what the console script does.
VMSWARM_ENTRY = "import sys; sys.argv[0] = 'vmswarm'; from vmswarm.cli.main import main; main()"
DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1
_POLL_INTERVAL = 0.05
# sun_path holds 108 bytes including the terminating NUL.
_MAX_UNIX_PATH = 107
_TAIL_BYTES = 64 * 1024

Role = Literal["tracker", "storage", "host"]


class ProcessExitedError(TimeoutError):
    """A process died before it became ready (a TimeoutError so one except clause covers both)."""


class CliError(subprocess.CalledProcessError):
    """A `vmswarm` command exited non-zero; the message carries its stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip()
        out = (self.stdout or "").strip()
        detail = err or out or "(no output)"
        return f"{super().__str__()}\n{_last_lines(detail, 20)}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host` (the kernel picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size (VmHWM) of a live process, in bytes."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(f"no process with pid {pid}") from None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected VmHWM unit {unit!r} for pid {pid}")
            return int(value) * 1024
    # Zombies and kernel threads have no memory lines.
    raise ProcessLookupError(f"pid {pid} has no VmHWM (exited or a kernel thread)")


def die_with_parent_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGKILL when its parent dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c") or "libc.so.6"
    # Load libc before the fork: the child should only call into already-resolved code.
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    parent_pid = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        # The parent may have died between fork and prctl; then nobody would ever signal us.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def die_with_parent() -> None:
    """Make the calling process get SIGKILL when its parent dies (Linux; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _last_lines(text: str, n: int) -> str:
    lines = text.splitlines()
    return "\n".join(lines[-n:]) if n > 0 else ""


def _describe(process: ManagedProcess | None) -> str:
    return f"process {process.name!r} (pid {process.pid})" if process is not None else "the process"


def _check_alive(process: ManagedProcess | None, waiting_for: str) -> None:
    if process is None:
        return
    code = process.returncode
    if code is not None:
        raise ProcessExitedError(
            f"{_describe(process)} exited with code {code} before {waiting_for}; "
            f"last lines of {process.log_path}:\n{process.log_tail(20)}"
        )


def _timeout(process: ManagedProcess | None, waiting_for: str, timeout: float) -> TimeoutError:
    tail = f"; last lines of {process.log_path}:\n{process.log_tail(20)}" if process else ""
    return TimeoutError(f"{_describe(process)} did not get {waiting_for} within {timeout}s{tail}")


def wait_for_port(
    host: str,
    port: int,
    timeout: float = DEFAULT_READY_TIMEOUT,
    process: ManagedProcess | None = None,
) -> None:
    """Poll until `host:port` accepts a TCP connection; fail early if `process` dies."""
    what = f"listening on {host}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        _check_alive(process, what)
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise _timeout(process, what, timeout)
        time.sleep(_POLL_INTERVAL)


def wait_for_path(
    path: Path, timeout: float = DEFAULT_READY_TIMEOUT, process: ManagedProcess | None = None
) -> None:
    """Poll until `path` exists; fail early if `process` dies."""
    what = f"{path} created"
    deadline = time.monotonic() + timeout
    while True:
        _check_alive(process, what)
        if path.exists():
            return
        if time.monotonic() >= deadline:
            raise _timeout(process, what, timeout)
        time.sleep(_POLL_INTERVAL)


class ManagedProcess:
    """One child process with its output in a log file; it dies with its parent."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self.env = dict(env or {})
        self.cwd = cwd
        self.command = list(command) if command is not None else vmswarm_command()
        self.starts = 0
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        return [*self.command, *self.args]

    def start(self) -> None:
        """Start the process (again, with the same arguments, if it ran before)."""
        if self.running:
            raise RuntimeError(f"process {self.name!r} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}: {shlex.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                preexec_fn=die_with_parent_preexec(),
                # Own session: a terminal's Ctrl-C reaches only us; we stop the children in order.
                start_new_session=True,
            )

    @property
    def started(self) -> bool:
        return self._popen is not None

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"process {self.name!r} was never started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """None while running; the exit code (negative signal number if killed) afterwards."""
        return None if self._popen is None else self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` (SIGKILL by default) if the process is running."""
        if self._popen is not None and self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit code; raises subprocess.TimeoutExpired after `timeout` seconds."""
        if self._popen is None:
            raise RuntimeError(f"process {self.name!r} was never started")
        return self._popen.wait(timeout)

    def terminate_and_wait(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL if it is still alive after `timeout`; the exit code."""
        if self._popen is None:
            return None
        try:
            self.kill(signal.SIGTERM)
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            # Reached also on KeyboardInterrupt while waiting: never leave it running.
            if self._popen.poll() is None:
                self.kill(signal.SIGKILL)
        return self._popen.wait(DEFAULT_STOP_TIMEOUT)

    def restart(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop it if it runs (SIGTERM, then SIGKILL) and start it again with the same arguments."""
        self.terminate_and_wait(timeout)
        self.start()

    def log_tail(self, n: int = 20) -> str:
        """The last `n` lines of the process's log (stdout and stderr)."""
        try:
            with self.log_path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(0, size - _TAIL_BYTES))
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return _last_lines(text, n)

    def peak_rss_bytes(self) -> int:
        return peak_rss_bytes(self.pid)

    def __repr__(self) -> str:
        state = "never started" if self._popen is None else f"pid {self._popen.pid}"
        return f"ManagedProcess({self.name!r}, {state}, returncode={self.returncode})"


@dataclass(frozen=True)
class Node:
    """One process of the cluster and where it lives."""

    name: str
    role: Role
    process: ManagedProcess
    host: str
    port: int
    data_dir: Path
    control: Path | None = None

    @property
    def listen_address(self) -> str:
        return f"{self.host}:{self.port}"


def vmswarm_command() -> list[str]:
    """The argv prefix that runs the vmswarm CLI with this interpreter."""
    return [sys.executable, "-c", VMSWARM_ENTRY]


def vmswarm_script() -> Path:
    """The installed `vmswarm` console script next to this interpreter."""
    script = Path(sys.executable).with_name("vmswarm")
    if not script.exists():
        raise FileNotFoundError(
            f"console script {script} not found; install vmswarm into this environment "
            "(pip install -e .)"
        )
    return script


class LocalCluster:
    """A tracker, storage centers and hosts as real processes on loopback; stop() kills them all.

    Template signing: with `signing=True` (or `use_signing_key`) every node trusts one publisher
    key and `sign_args` signs a publish with it; without, every node runs with --allow-unsigned.

    Mutual TLS: with `tls=True` the cluster gets its own CA, every node a certificate of its
    role and CLI calls an operator one; without, every process runs with --insecure (it warns).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        command: Sequence[str] | None = None,
        cli_command: Sequence[str] | None = None,
        signing: bool = False,
        tls: bool = False,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="vmswarm-cluster-")) if workdir is None else workdir
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._command = list(command) if command is not None else None
        self._cli_command = list(cli_command) if cli_command is not None else None
        self.tracker: Node | None = None
        self.centers: list[Node] = []
        self.hosts: list[Node] = []
        self._short_dir: Path | None = None
        self.signing_key: Path | None = None
        self.trusted_key: Path | None = None
        if signing:
            made = generate_keypair(self.workdir / "keys", "publisher")
            self.use_signing_key(made.private_path, made.public_path)
        self.ca_dir: Path | None = None
        if tls:
            self.ca_dir = self.workdir / "pki"
            init_ca(self.ca_dir, "vmswarm test cluster CA")
            operator = self.issue_certificate(TlsRole.OPERATOR, "operator")
            self.env.update(
                VMSWARM_TLS_CA=str(self.ca_dir / CA_CERT_NAME),
                VMSWARM_TLS_CERT=str(operator.cert),
                VMSWARM_TLS_KEY=str(operator.key),
            )
        else:
            self.env["VMSWARM_TLS_INSECURE"] = "true"

    # -- mutual TLS ---------------------------------------------------------------------------

    def issue_certificate(self, role: TlsRole, name: str) -> IssuedFiles:
        """A certificate of `role` from this cluster's CA (tls=True only), in the CA folder."""
        if self.ca_dir is None:
            raise RuntimeError("this cluster runs without TLS (LocalCluster(tls=True) for a CA)")
        return issue(self.ca_dir, role, name, self.ca_dir / "issued")

    def tls_args(self, role: TlsRole, name: str) -> list[str]:
        """--tls-* flags with a fresh `role` certificate for node `name` ([] without TLS)."""
        if self.ca_dir is None:
            return []
        made = self.issue_certificate(role, name)
        return [
            "--tls-ca",
            str(self.ca_dir / CA_CERT_NAME),
            "--tls-cert",
            str(made.cert),
            "--tls-key",
            str(made.key),
        ]

    # -- template signing ---------------------------------------------------------------------

    def use_signing_key(self, private_key: Path, public_key: Path) -> None:
        """Make every node started from now on trust `public_key`, and `sign_args` use the other."""
        if self.nodes:
            raise RuntimeError("choose the signing key before starting any node")
        self.signing_key, self.trusted_key = private_key, public_key

    @property
    def trust_args(self) -> list[str]:
        """What trackers and daemons accept: the cluster's publisher key, else unsigned ones."""
        if self.trusted_key is None:
            return ["--allow-unsigned"]
        return ["--trusted-key", str(self.trusted_key)]

    @property
    def sign_args(self) -> list[str]:
        """`vmswarm publish` arguments that sign with the cluster's key ([] when unsigned)."""
        return [] if self.signing_key is None else ["--sign-key", str(self.signing_key)]

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Keep the logs of a failed run for whoever investigates it.
        self.stop(remove_workdir=exc_type is None)

    @property
    def nodes(self) -> list[Node]:
        tracker = [self.tracker] if self.tracker is not None else []
        return [*tracker, *self.centers, *self.hosts]

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named {name!r} in this cluster")

    def stop(self, timeout: float | None = None, *, remove_workdir: bool = True) -> None:
        """Terminate every process (daemons first, then the tracker); SIGKILL what lingers.

        `timeout` (default: the cluster's stop_timeout) bounds each of the two SIGTERM waits.
        """
        timeout = self.stop_timeout if timeout is None else timeout
        daemons = [node.process for node in [*self.hosts, *self.centers]]
        tracker = [self.tracker.process] if self.tracker is not None else []
        try:
            self._terminate_all(daemons, timeout)
            self._terminate_all(tracker, timeout)
        finally:
            # Reached on any error or KeyboardInterrupt above: nothing may survive stop().
            for process in [*daemons, *tracker]:
                process.kill(signal.SIGKILL)
            for process in [*daemons, *tracker]:
                if process.started:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(DEFAULT_STOP_TIMEOUT)
            if self._short_dir is not None:
                shutil.rmtree(self._short_dir, ignore_errors=True)
            if remove_workdir and self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _terminate_all(processes: Sequence[ManagedProcess], timeout: float) -> None:
        """SIGTERM all at once, then wait for all against one deadline."""
        for process in processes:
            process.kill(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in processes:
            if process.started:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(max(0.0, deadline - time.monotonic()))

    # -- starting nodes -----------------------------------------------------------------------

    @property
    def tracker_address(self) -> str:
        if self.tracker is None:
            raise RuntimeError("the tracker has not been started (call start_tracker() first)")
        return self.tracker.listen_address

    def start_tracker(self, *extra_args: str, trust: Sequence[str] | None = None) -> Node:
        """Start `vmswarm tracker run` and wait until it accepts connections.

        `trust` replaces the cluster's `trust_args` (e.g. to trust another key).
        """
        if self.tracker is not None:
            raise RuntimeError("this cluster already has a tracker")
        port = free_port(self.host)
        state_dir = self.workdir / "tracker"
        state_dir.mkdir(parents=True, exist_ok=True)
        args = ["tracker", "run", "--listen", f"{self.host}:{port}", "--state-dir", str(state_dir)]
        trusting = self.trust_args if trust is None else list(trust)
        tls = self.tls_args(TlsRole.TRACKER, "tracker")
        process = self._process("tracker", [*args, *trusting, *tls, *extra_args])
        self.tracker = Node("tracker", "tracker", process, self.host, port, state_dir)
        process.start()
        self.wait_ready(self.tracker)
        return self.tracker

    def start_center(self, name: str, *extra_args: str, trust: Sequence[str] | None = None) -> Node:
        """Start a storage-center daemon and wait until it is ready (`trust`: see start_tracker)."""
        return self._start_daemon(name, "storage", extra_args, self.centers, trust)

    def start_host(self, name: str, *extra_args: str, trust: Sequence[str] | None = None) -> Node:
        """Start a host daemon and wait until it is ready (`trust`: see start_tracker)."""
        return self._start_daemon(name, "host", extra_args, self.hosts, trust)

    def _start_daemon(
        self,
        name: str,
        role: Role,
        extra_args: Sequence[str],
        group: list[Node],
        trust: Sequence[str] | None = None,
    ) -> Node:
        self._check_name(name)
        port = free_port(self.host)
        data_dir = self.workdir / name
        data_dir.mkdir(parents=True, exist_ok=True)
        control = self._control_path(name, data_dir)
        args = [
            "daemon",
            "run",
            "--role",
            role,
            "--tracker",
            self.tracker_address,
            "--listen",
            f"{self.host}:{port}",
            "--data-dir",
            str(data_dir),
            "--control",
            str(control),
            *(self.trust_args if trust is None else trust),
            *self.tls_args(TlsRole(role), name),
            *extra_args,
        ]
        node = Node(name, role, self._process(name, args), self.host, port, data_dir, control)
        # Registered before it starts, so stop() kills it even if it never gets ready.
        group.append(node)
        node.process.start()
        self.wait_ready(node)
        return node

    def wait_ready(self, node: Node, timeout: float | None = None) -> None:
        """Wait until the node's port accepts connections and its control socket (if any) exists."""
        limit = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        wait_for_port(node.host, node.port, limit, node.process)
        if node.control is not None:
            wait_for_path(node.control, max(0.0, deadline - time.monotonic()), node.process)

    def restart(self, node: Node, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop the node (SIGTERM, then SIGKILL) and start it again with the same arguments."""
        node.process.terminate_and_wait(timeout)
        if node.control is not None:
            # A stale socket file from a killed daemon must not pass for readiness.
            node.control.unlink(missing_ok=True)
        node.process.start()
        self.wait_ready(node)

    def _check_name(self, name: str) -> None:
        # The tracker's state and the logs live in work-dir folders of these names.
        if not name or "/" in name or name.startswith(".") or name in {"tracker", "logs"}:
            raise ValueError(f"bad node name {name!r}: use a plain name other than tracker/logs")
        if any(node.name == name for node in self.nodes):
            raise ValueError(f"a node named {name!r} already exists in this cluster")

    def _control_path(self, name: str, data_dir: Path) -> Path:
        path = data_dir / "control.sock"
        if len(os.fsencode(path)) <= _MAX_UNIX_PATH:
            return path
        # Deep work dirs (pytest's tmp_path) overflow sun_path; use a short private dir instead.
        if self._short_dir is None:
            self._short_dir = Path(tempfile.mkdtemp(prefix="vms-"))
        return self._short_dir / f"{name}.sock"

    def _process(self, name: str, args: Sequence[str]) -> ManagedProcess:
        return ManagedProcess(
            name,
            args,
            log_path=self.workdir / "logs" / f"{name}.log",
            env=self.env,
            command=self._command,
        )

    # -- the operator CLI ---------------------------------------------------------------------

    def cli_env(self, node: Node | None = None) -> dict[str, str]:
        """The environment for a CLI call: VMSWARM_TRACKER, and VMSWARM_CONTROL for `node`."""
        env = {**os.environ, **self.env}
        if self.tracker is not None:
            env["VMSWARM_TRACKER"] = self.tracker_address
        if node is not None and node.control is not None:
            env["VMSWARM_CONTROL"] = str(node.control)
        return env

    def run_cli(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120.0,
        node: Node | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real `vmswarm` console script; output captured as text."""
        command = self._cli_command if self._cli_command is not None else [str(vmswarm_script())]
        argv = [*command, *args]
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.cli_env(node),
            timeout=timeout,
            check=False,
            preexec_fn=die_with_parent_preexec(),
        )
        if check and result.returncode != 0:
            raise CliError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def iter_logs(self) -> Iterator[tuple[str, str]]:
        """(node name, last log lines) for every node, for failure reports."""
        for node in self.nodes:
            yield node.name, node.process.log_tail(40)
