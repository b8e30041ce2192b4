"""The checked-in systemd units: `systemd-analyze verify` passes, their ExecStart lines start the
services, and the hardening they ask for (MemoryDenyWriteExecute) does not break the daemons.

verify insists that ExecStart's binary exists, so it checks a copy of each unit whose ExecStart
runs this environment's `vmswarm` script; the units in systemd/ stay the installable ones.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vmswarm.daemon.cluster import free_port, vmswarm_script
from vmswarm.daemon.pki import CA_CERT_NAME, TlsRole, init_ca, issue

from ..ci import unavailable

pytestmark = pytest.mark.e2e

UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNITS = ["vmswarm-tracker.service", "vmswarm-storage.service", "vmswarm-host.service"]
UNIT_ROLES = {
    "vmswarm-tracker.service": "tracker",
    "vmswarm-storage.service": "storage",
    "vmswarm-host.service": "host",
}
INSTALLED_BINARY = "/usr/local/bin/vmswarm"
INSTALLED_CONFIG = Path("/etc/vmswarm/vmswarm.toml")
# `systemd-analyze security` rates 0.0 (locked down) to 10.0 (wide open); --threshold counts
# tenths. The units score 1.2-1.6; above 2.0 something was loosened.
MAX_EXPOSURE_TENTHS = 20
WAIT = 60.0
# prctl(2): PR_SET_MDWE with PR_MDWE_REFUSE_EXEC_GAIN, the kernel's MemoryDenyWriteExecute.
_PR_SET_MDWE = 65
_PR_MDWE_REFUSE_EXEC_GAIN = 1


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        unavailable(
            "check the systemd units", "systemd-analyze is not installed (apt-get install systemd)"
        )
    return found


def exec_start(unit: Path) -> list[str]:
    lines = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, f"{unit.name} must have exactly one ExecStart="
    return shlex.split(lines[0].removeprefix("ExecStart="))


def status_json(control: Path) -> dict[str, Any]:
    """`vmswarm status --json` against the daemon's control socket."""
    status = subprocess.run(
        [str(vmswarm_script()), "status", "--json", "--control", str(control)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    result: dict[str, Any] = json.loads(status.stdout)
    return result


def stop(processes: list[subprocess.Popen[bytes]]) -> list[int]:
    """SIGTERM each, then their exit codes (SIGKILL for any that ignores it)."""
    for process in processes:
        process.terminate()
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(WAIT))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait(WAIT))
    return codes


@pytest.fixture
def runnable_units(tmp_path: Path) -> Path:
    """Copies of the units whose ExecStart runs this environment's vmswarm script."""
    script = str(vmswarm_script())
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        assert f"ExecStart={INSTALLED_BINARY} " in text, f"{name} must run {INSTALLED_BINARY}"
        (tmp_path / name).write_text(
            text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={script} ")
        )
    return tmp_path


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_passes(name: str, runnable_units: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", str(runnable_units / name)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    # verify reports unknown keys and bad values as warnings with exit 0: those fail too.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("name", UNITS)
def test_the_unit_is_hardened(name: str, runnable_units: Path) -> None:
    result = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=yes",
            f"--threshold={MAX_EXPOSURE_TENTHS}",
            "--no-pager",
            str(runnable_units / name),
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    text = (UNIT_DIR / name).read_text()
    for setting in (
        "Type=notify",
        "WatchdogSec=30",
        "Restart=on-failure",
        "CapabilityBoundingSet=\n",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "MemoryDenyWriteExecute=yes",
        "User=vmswarm",
    ):
        assert setting in text, f"{name} lacks {setting.strip()}"


def unit_command(name: str, root: Path, config: Path) -> list[str]:
    """The unit's ExecStart, run from this environment with its system paths under `root`."""
    argv = exec_start(UNIT_DIR / name)
    assert argv[0] == INSTALLED_BINARY
    assert argv[argv.index("--config") + 1] == str(INSTALLED_CONFIG)
    moved = [str(vmswarm_script())]
    for arg in argv[1:]:
        if arg == str(INSTALLED_CONFIG):
            arg = str(config)
        elif arg.startswith(("/var/lib/", "/run/")):
            arg = str(root) + arg
            Path(arg).parent.mkdir(parents=True, exist_ok=True)  # systemd creates these
        moved.append(arg)
    return moved


def test_each_units_command_line_starts_its_service(tmp_path: Path, short_dir: Path) -> None:
    """ExecStart as written (flags, --config, paths) brings each service to READY=1."""
    tracker_port = free_port()
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(short_dir / "notify"))
    systemd.settimeout(WAIT)
    processes: list[subprocess.Popen[bytes]] = []
    init_ca(tmp_path / "pki")  # production runs mutual TLS: each unit gets a cert of its role
    with systemd:
        try:
            for name in UNITS:
                made = issue(tmp_path / "pki", TlsRole(UNIT_ROLES[name]), UNIT_ROLES[name])
                config = tmp_path / f"{name}.toml"
                config.write_text(
                    f'[cluster]\ntracker = "127.0.0.1:{tracker_port}"\n'
                    f'[tracker]\nlisten = "127.0.0.1:{tracker_port}"\n'
                    f'[daemon]\nlisten = "127.0.0.1:{free_port()}"\nlibvirt_uri = "none"\n'
                    f'[tls]\nca = "{tmp_path / "pki" / CA_CERT_NAME}"\n'
                    f'cert = "{made.cert}"\nkey = "{made.key}"\n'
                )
                log_path = tmp_path / f"{name}.log"
                with log_path.open("wb") as log:
                    processes.append(
                        subprocess.Popen(
                            unit_command(name, short_dir, config),
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "NOTIFY_SOCKET": str(short_dir / "notify")},
                        )
                    )
                try:
                    message = systemd.recv(4096).decode()
                except TimeoutError:
                    raise AssertionError(
                        f"{name}: no READY=1; log:\n{log_path.read_text()}"
                    ) from None
                assert message.startswith("READY=1\n"), (name, message)
            control = short_dir / "run/vmswarm/control.sock"
            assert status_json(control)["role"] == "host"
        finally:
            codes = stop(processes)
    assert codes == [0] * len(UNITS)


# --- MemoryDenyWriteExecute -------------------------------------------------------------------


MDWE_UNSUPPORTED = 99


def mdwe_preexec() -> Callable[[], None]:
    """A preexec_fn turning on the kernel's MDWE, which a child and its execs keep."""
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl

    def preexec() -> None:
        if prctl(_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            os._exit(MDWE_UNSUPPORTED)

    return preexec


WX_PROBE = (
    "import mmap\n"
    "try:\n"
    "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
    "except PermissionError:\n"
    "    raise SystemExit(3)\n"
)


@pytest.fixture
def mdwe() -> Callable[[], None]:
    """MDWE for children, after checking this kernel has it and that it refuses W+X memory."""
    preexec = mdwe_preexec()
    probe = subprocess.run(
        [sys.executable, "-c", WX_PROBE], preexec_fn=preexec, timeout=WAIT, check=False
    )
    if probe.returncode == MDWE_UNSUPPORTED:
        unavailable(
            "check the systemd units",
            "this kernel has no PR_SET_MDWE (Linux 6.3+), the check for W+X mappings",
        )
    assert probe.returncode == 3, "W+X memory was not refused under MDWE"
    return preexec


def test_manifest_hashing_works_without_writable_executable_memory(
    mdwe: Callable[[], None], tmp_path: Path
) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(3 << 20) + bytes(2 << 20) + os.urandom(1 << 20))
    command = [str(vmswarm_script()), "manifest", str(image), "--json"]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=WAIT, check=True)
    hardened = subprocess.run(
        command, capture_output=True, text=True, timeout=WAIT, check=False, preexec_fn=mdwe
    )
    assert hardened.returncode == 0, hardened.stderr
    assert hardened.stdout == plain.stdout


def test_a_host_daemon_with_libvirt_runs_without_writable_executable_memory(
    mdwe: Callable[[], None], tmp_path: Path, short_dir: Path
) -> None:
    notify = short_dir / "notify"
    control = short_dir / "control.sock"
    port = free_port()
    # As in production: mutual TLS on, so OpenSSL also loads under MemoryDenyWriteExecute.
    init_ca(tmp_path / "pki")
    made = issue(tmp_path / "pki", TlsRole.HOST, "h1")
    argv = [
        str(vmswarm_script()),
        *("daemon", "run", "--role", "host", "--data-dir", str(tmp_path / "host")),
        *("--listen", f"127.0.0.1:{port}", "--control", str(control)),
        *("--libvirt-uri", "test:///default"),
        *("--tls-ca", str(tmp_path / "pki" / CA_CERT_NAME)),
        *("--tls-cert", str(made.cert), "--tls-key", str(made.key)),
    ]
    log_path = tmp_path / "host.log"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd,
        log_path.open("wb") as log,
    ):
        systemd.bind(str(notify))
        systemd.settimeout(WAIT)
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": str(notify)},
            preexec_fn=mdwe,
        )
        try:
            try:
                message = systemd.recv(4096)
            except TimeoutError:
                raise AssertionError(f"no READY=1; log:\n{log_path.read_text()}") from None
            assert message.startswith(b"READY=1\n"), message
            vm_service = status_json(control)["vm_service"]
            assert vm_service["libvirt_uri"] == "test:///default"
            assert vm_service["last_error"] is None, vm_service
        finally:
            (code,) = stop([process])
        assert code == 0, log_path.read_text()
