"""The libvirt `VmLauncher`: the only module that imports libvirt.

KVM is detected by trying, once: /dev/kvm must be usable, the hypervisor must offer kvm guests,
and a probe domain (a 512-byte boot sector that enters protected mode, executes an `iret` and
prints a marker on the serial port) must print its marker under kvm. Nested KVM that cannot
emulate what Linux boot code does (here: "emulation failure") pauses the probe instead, and VMs
then run under TCG (`<domain type='qemu'>`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import libvirt

from ..swarm.domain_xml import DomainType
from .vm_launcher import (
    DomainStats,
    DomainTypeChoice,
    HostResources,
    LauncherError,
    VmState,
)

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"
KVM_DEVICE = Path("/dev/kvm")
PROBE_MARKER = b"VMSWARM-KVM-PROBE-OK"
PROBE_TIMEOUT = 20.0
PROBE_PREFIX = "vmswarm-kvm-probe-"
# The probe's verdict for this boot (a tmpfs, emptied by a reboot); None disables the cache.
PROBE_CACHE: Path | None = Path("/run/vmswarm/kvm-probe.json")
_PROBE_POLL = 0.1
# Real mode: load a flat GDT, set CR0.PE, far-jump to 32-bit code; there push a frame and `iret`,
# then write PROBE_MARKER to COM1 (0x3f8) and halt. Assembled from a 40-line GNU as source.
_PROBE_BOOT_SECTOR_HEAD = bytes.fromhex(
    "fa31c08ed88ed0bc007c0f0116807c0f20c06683c8010f22c066ea217c0000080066b810008ed88ec08ed0"
    "bc007c00009c6a0868397c0000cf66baf803be4d7c0000ac84c07403eeebf8f4ebfd564d535741524d2d4b"
    "564d2d50524f42452d4f4b0a008d742600900000000000000000ffff0000009acf00ffff00000092cf0017"
    "00687c0000"
)
_PROBE_IMAGE_SIZE = 1 << 20
_SWITCH_POLL = 0.1
# A shallow copy into an overlay the caller made; the job vanishes if libvirtd restarts.
_SWITCH_FLAGS = (
    libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
    | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
    | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
)
_UNSUPPORTED_ERRORS = frozenset({libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED})

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: VmState.UNKNOWN,
    libvirt.VIR_DOMAIN_RUNNING: VmState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: VmState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: VmState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: VmState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: VmState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: VmState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: VmState.SUSPENDED,
}
# Errors that mean the connection itself is gone (libvirtd restarted or died).
_CONNECTION_ERRORS = frozenset(
    {
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_RPC,
    }
)

T = TypeVar("T")


def probe_boot_sector() -> bytes:
    """The KVM probe's 512-byte MBR."""
    head = _PROBE_BOOT_SECTOR_HEAD
    return head + bytes(510 - len(head)) + b"\x55\xaa"


def _ignore_libvirt_errors(_context: object, _error: object) -> None:
    """libvirt prints every error on stderr by default; ours are raised and reported instead."""


def kvm_device_problem(path: Path = KVM_DEVICE, *, for_other_user: bool = True) -> str | None:
    """Why `path` cannot serve KVM to qemu, or None if it looks usable."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path} does not exist (no KVM in this kernel or machine)"
    except OSError as exc:
        return f"cannot stat {path}: {exc.strerror or exc}"
    if not stat.S_ISCHR(st.st_mode):
        return f"{path} is not a character device"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by this daemon"
    if for_other_user and not st.st_mode & 0o066:
        # qemu:///system runs qemu as libvirt-qemu (group kvm); libvirt then re-probes slowly.
        return (
            f"{path} is accessible to its owner only, and qemu runs as another user; "
            f"fix it with `chgrp kvm {path}; chmod 660 {path}`"
        )
    return None


class LibvirtLauncher:
    """A `VmLauncher` over one libvirt connection (reconnected when libvirtd went away)."""

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        *,
        probe_timeout: float = PROBE_TIMEOUT,
        kvm_device: Path = KVM_DEVICE,
        probe_cache: Path | None = PROBE_CACHE,
    ) -> None:
        self._uri = uri
        self._probe_timeout = probe_timeout
        self._kvm_device = kvm_device
        self._probe_cache = probe_cache
        self._conn: Any = None
        self._lock = threading.Lock()
        self._choice: DomainTypeChoice | None = None
        self._choice_lock = threading.Lock()

    @property
    def uri(self) -> str:
        return self._uri

    # -- connection --------------------------------------------------------------------------

    def _connection(self) -> Any:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    if self._conn.isAlive():
                        return self._conn
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
            libvirt.registerErrorHandler(_ignore_libvirt_errors, None)
            try:
                self._conn = libvirt.open(self._uri)
            except libvirt.libvirtError as exc:
                raise LauncherError(
                    "libvirt_unreachable",
                    f"cannot connect to libvirt at {self._uri}: {_message(exc)}; is libvirtd "
                    "running (`virtlogd -d; libvirtd -d`), or is --libvirt-uri wrong?",
                ) from None
            return self._conn

    def _call(self, what: str, action: Callable[[Any], T]) -> T:
        """Run `action(conn)`; a lost connection is retried once, then libvirt_unreachable."""
        for attempt in (1, 2):
            conn = self._connection()
            try:
                return action(conn)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in _CONNECTION_ERRORS or not _dead(conn):
                    raise LauncherError("libvirt_error", f"{what}: {_message(exc)}") from None
                if attempt == 2:
                    raise LauncherError(
                        "libvirt_unreachable", f"lost libvirt at {self._uri} during {what}"
                    ) from None
        raise AssertionError("unreachable")

    def _domain(self, conn: Any, name: str) -> Any:
        try:
            return conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise LauncherError("unknown_vm", f"libvirt has no domain {name!r}") from None
            raise

    def connect(self) -> None:
        self._connection()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None

    # -- KVM or TCG ----------------------------------------------------------------------------

    def choose_domain_type(self) -> DomainTypeChoice:
        with self._choice_lock:
            if self._choice is None:
                self._choice = self._detect_domain_type()
                log.info(
                    "VMs on %s run as <domain type='%s'>: %s",
                    self._uri,
                    self._choice.domain_type.value,
                    self._choice.reason,
                )
            return self._choice

    def _detect_domain_type(self) -> DomainTypeChoice:
        driver = self._call("getType", lambda c: str(c.getType()))
        if driver.lower() == "test":
            return DomainTypeChoice(DomainType.TEST, "libvirt's test driver")
        if driver.upper() != "QEMU":
            raise LauncherError(
                "libvirt_unreachable", f"{self._uri} is a {driver} hypervisor; vmswarm drives qemu"
            )
        system = self._uri.startswith("qemu:///system") or self._uri.startswith("qemu+")
        problem = kvm_device_problem(self._kvm_device, for_other_user=system)
        if problem is not None:
            return DomainTypeChoice(DomainType.QEMU, f"TCG: {problem}")
        capabilities = self._call("getCapabilities", lambda c: str(c.getCapabilities()))
        if not offers_kvm(capabilities, os.uname().machine):
            return DomainTypeChoice(DomainType.QEMU, "TCG: libvirt offers no kvm guests")
        works, detail = self._cached_probe()
        if works:
            return DomainTypeChoice(DomainType.KVM, f"KVM: the probe guest ran ({detail})")
        return DomainTypeChoice(DomainType.QEMU, f"TCG: the KVM probe guest failed ({detail})")

    def _cached_probe(self) -> tuple[bool, str]:
        """The probe's verdict, shared by every daemon on this boot of this machine."""
        if self._probe_cache is None:
            return self._probe_kvm()
        key = self._probe_key()
        try:
            self._probe_cache.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(self._probe_cache.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.debug("no KVM probe cache at %s: %s", self._probe_cache, exc)
            return self._probe_kvm()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # daemons starting together probe once
            with contextlib.suppress(OSError, ValueError):
                cached = json.loads(self._probe_cache.read_text())
                if cached.get("key") == key:
                    return bool(cached["works"]), f"{cached['detail']}, probed earlier this boot"
            works, detail = self._probe_kvm()
            with contextlib.suppress(OSError):
                tmp = self._probe_cache.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps({"key": key, "works": works, "detail": detail}))
                tmp.replace(self._probe_cache)
            return works, detail
        finally:
            os.close(lock)

    def _probe_key(self) -> dict[str, Any]:
        """What the verdict depends on: this boot, the URI, the device and the hypervisor."""
        try:
            boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot_id = ""
        st = self._kvm_device.stat()
        version = self._call("getVersion", lambda c: int(c.getVersion()))
        return {
            "boot_id": boot_id,
            "uri": self._uri,
            "device": [st.st_rdev, st.st_mode, st.st_uid, st.st_gid],
            "hypervisor": version,
        }

    def _probe_kvm(self) -> tuple[bool, str]:
        """Boot the probe sector under kvm; (did it print its marker, what happened)."""
        # qemu runs as another user: the probe needs a directory anyone may enter.
        directory = Path(tempfile.mkdtemp(prefix="vmswarm-kvm-probe-"))
        try:
            directory.chmod(0o755)
            image = directory / "probe.img"
            serial = directory / "serial.log"
            with image.open("wb") as out:
                out.write(probe_boot_sector())
                out.truncate(_PROBE_IMAGE_SIZE)
            image.chmod(0o644)
            self._destroy_stale_probes()
            name = f"{PROBE_PREFIX}{os.getpid()}"
            xml = _probe_xml(name, image, serial)
            try:
                domain = self._call("probe", lambda c: c.createXML(xml, 0))
            except LauncherError as exc:
                if exc.code == "libvirt_unreachable":
                    raise
                return False, f"it did not start: {exc}"
            try:
                return self._watch_probe(domain, serial)
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    domain.destroy()
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _destroy_stale_probes(self) -> None:
        """Probe domains are transient; one whose daemon was killed mid-probe still runs."""

        def sweep(conn: Any) -> None:
            for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                name = str(domain.name())
                pid = name.removeprefix(PROBE_PREFIX)
                if name.startswith(PROBE_PREFIX) and pid.isdigit() and not _alive(int(pid)):
                    with contextlib.suppress(libvirt.libvirtError):
                        domain.destroy()
                        log.info("destroyed %s, left behind by a killed daemon", name)

        self._call("listAllDomains", sweep)

    def _watch_probe(self, domain: Any, serial: Path) -> tuple[bool, str]:
        started = time.monotonic()
        while True:
            elapsed = time.monotonic() - started
            with contextlib.suppress(FileNotFoundError):
                if PROBE_MARKER in serial.read_bytes():
                    return True, f"marker after {elapsed:.1f}s"
            try:
                state, reason = domain.state()
            except libvirt.libvirtError as exc:
                return False, f"the guest vanished: {_message(exc)}"
            if state != libvirt.VIR_DOMAIN_RUNNING:
                what = _STATES.get(state, VmState.UNKNOWN).value
                return False, f"the guest stopped ({what}, reason {reason}) after {elapsed:.1f}s"
            if elapsed > self._probe_timeout:
                return False, f"no marker within {self._probe_timeout:.0f}s"
            time.sleep(_PROBE_POLL)

    # -- host ----------------------------------------------------------------------------------

    def host_resources(self) -> HostResources:
        info = self._call("getInfo", lambda c: c.getInfo())
        # getInfo: [model, memory MiB, cpus, MHz, nodes, sockets, cores, threads]
        return HostResources(cpus=int(info[2]), memory=int(info[1]) << 20)

    # -- lifecycle -------------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        def look(conn: Any) -> bool:
            try:
                conn.lookupByName(name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise
            return True

        return self._call("lookup", look)

    def define(self, xml: str) -> None:
        name = ET.fromstring(xml).findtext("name") or ""
        if self.exists(name):
            raise LauncherError("name_taken", f"libvirt already has a domain named {name!r}")

        def define(conn: Any) -> None:
            try:
                conn.defineXML(xml)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in _CONNECTION_ERRORS and _dead(conn):
                    raise
                if exc.get_error_code() == libvirt.VIR_ERR_DOM_EXIST:
                    raise LauncherError(
                        "name_taken", f"libvirt already has a domain named {name!r}"
                    ) from None
                raise LauncherError(
                    "launch_failed", f"libvirt refused the domain {name!r}: {_message(exc)}"
                ) from None

        self._call("define", define)

    def start(self, name: str) -> None:
        def create(conn: Any) -> None:
            domain = self._domain(conn, name)
            if domain.isActive():
                return
            try:
                domain.create()
            except libvirt.libvirtError as exc:
                raise LauncherError(
                    "launch_failed", f"cannot start {name}: {_message(exc)}"
                ) from None

        self._call("start", create)

    def shutdown(self, name: str) -> None:
        def shut(conn: Any) -> None:
            domain = self._domain(conn, name)
            if not domain.isActive():
                return
            try:
                domain.shutdown()
            except libvirt.libvirtError as exc:
                if domain.isActive():
                    raise LauncherError(
                        "launch_failed", f"cannot shut {name} down: {_message(exc)}"
                    ) from None

        self._call("shutdown", shut)

    def destroy(self, name: str) -> None:
        def kill(conn: Any) -> None:
            domain = self._domain(conn, name)
            if not domain.isActive():
                return
            try:
                domain.destroy()
            except libvirt.libvirtError as exc:
                if domain.isActive():
                    raise LauncherError(
                        "launch_failed", f"cannot power {name} off: {_message(exc)}"
                    ) from None

        self._call("destroy", kill)

    def undefine(self, name: str) -> None:
        def remove(conn: Any) -> None:
            try:
                domain = self._domain(conn, name)
            except LauncherError:
                return
            domain.undefine()

        self._call("undefine", remove)

    def state(self, name: str) -> VmState:
        def look(conn: Any) -> VmState:
            try:
                domain = self._domain(conn, name)
            except LauncherError:
                return VmState.MISSING
            return _STATES.get(domain.state()[0], VmState.UNKNOWN)

        return self._call("state", look)

    # -- resize ----------------------------------------------------------------------------------

    def set_vcpus(self, name: str, count: int) -> None:
        def resize(conn: Any) -> None:
            domain = self._domain(conn, name)
            maximum = int(
                domain.vcpusFlags(
                    libvirt.VIR_DOMAIN_AFFECT_CONFIG | libvirt.VIR_DOMAIN_VCPU_MAXIMUM
                )
            )
            if not 1 <= count <= maximum:
                raise LauncherError(
                    "cannot_resize",
                    f"{name} can have 1..{maximum} vCPUs (its maximum, fixed when it was "
                    f"defined from its flavor), not {count}",
                )
            live = bool(domain.isActive())
            try:
                _live_and_config(live, lambda flags: domain.setVcpusFlags(count, flags))
            except libvirt.libvirtError as exc:
                how = "live " if live else ""
                raise LauncherError(
                    "cannot_resize",
                    f"libvirt refused the {how}change of {name} to {count} vCPUs: {_message(exc)}",
                ) from None

        self._call("setVcpusFlags", resize)

    def set_memory(self, name: str, size: int) -> None:
        kib = -(-size // 1024)

        def resize(conn: Any) -> None:
            domain = self._domain(conn, name)
            maximum = int(domain.maxMemory())
            if not 0 < kib <= maximum:
                raise LauncherError(
                    "cannot_resize",
                    f"{name} can have at most {maximum // 1024} MiB of memory (its maximum, "
                    f"fixed when it was defined from its flavor), not {size // (1 << 20)} MiB",
                )
            live = bool(domain.isActive())
            try:
                _live_and_config(live, lambda flags: domain.setMemoryFlags(kib, flags))
            except libvirt.libvirtError as exc:
                how = "live " if live else ""
                raise LauncherError(
                    "cannot_resize",
                    f"libvirt refused the {how}change of {name} to {kib // 1024} MiB of "
                    f"memory (a live change needs the guest's balloon driver): {_message(exc)}",
                ) from None

        self._call("setMemoryFlags", resize)

    # -- disk backing ----------------------------------------------------------------------------

    def switch_backing(self, name: str, new_overlay: str, timeout: float) -> None:
        target = self._call("switch_backing", lambda c: self._switch_target(c, name))
        destination = _file_disk_xml(new_overlay)

        def copy(conn: Any) -> None:
            domain = self._domain(conn, name)
            try:
                domain.blockCopy(target, destination, None, _SWITCH_FLAGS)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in _CONNECTION_ERRORS and _dead(conn):
                    raise
                code = "unsupported" if exc.get_error_code() in _UNSUPPORTED_ERRORS else None
                raise LauncherError(
                    code or "switch_failed",
                    f"cannot start copying {name}'s disk {target} to {new_overlay}: "
                    f"{_message(exc)}",
                ) from None

        self._call("blockCopy", copy)
        log.info(
            "copying %s's disk %s to %s",
            name,
            target,
            new_overlay,
            extra={"domain": name, "disk": target, "overlay": new_overlay},
        )
        try:
            self._pivot_when_ready(name, target, timeout)
        except BaseException:
            self._cancel_copy(name, target)
            raise
        source = self._call("XMLDesc", lambda c: _disk_source(self._domain(c, name), target))
        if source != new_overlay:
            raise LauncherError(
                "switch_failed",
                f"{name}'s disk {target} pivoted, but reads {source!r}, not {new_overlay}",
            )
        log.info(
            "%s's disk %s now runs on %s",
            name,
            target,
            new_overlay,
            extra={"domain": name, "disk": target, "overlay": new_overlay},
        )

    def _switch_target(self, conn: Any, name: str) -> str:
        """The running domain's first disk target (vda, sda), after checking a copy can run."""
        if str(conn.getType()).lower() == "test":
            raise LauncherError(
                "unsupported", f"{self._uri} (libvirt's test driver) cannot block-copy disks"
            )
        domain = self._domain(conn, name)
        if not domain.isActive():
            raise LauncherError("not_running", f"{name} is not running: rebase its overlay instead")
        target = _first_disk_target(str(domain.XMLDesc(0)))
        if target is None:
            raise LauncherError("switch_failed", f"{name} has no disk to switch")
        return target

    def _pivot_when_ready(self, name: str, target: str, timeout: float) -> None:
        """Wait for the copy to be ready (cur == end), then pivot the disk onto the copy."""
        deadline = time.monotonic() + timeout
        last: dict[str, int] = {}
        while True:
            info = self._call(
                "blockJobInfo", lambda c: self._domain(c, name).blockJobInfo(target, 0)
            )
            if not info:
                raise LauncherError(
                    "switch_failed",
                    f"the copy of {name}'s disk {target} ended before it was ready "
                    "(the guest stopped, or qemu failed the job)",
                )
            last = info
            # libvirt reports cur == end only once qemu says the mirror is ready.
            if info.get("end", 0) > 0 and info.get("cur") == info.get("end"):
                pivoted = self._call("blockJobAbort", lambda c: self._try_pivot(c, name, target))
                if pivoted:
                    return
            if time.monotonic() >= deadline:
                raise LauncherError(
                    "switch_failed",
                    f"the copy of {name}'s disk {target} was not ready within {timeout:g}s "
                    f"({last.get('cur', 0)} of {last.get('end', 0)} bytes); cancelled",
                )
            time.sleep(_SWITCH_POLL)

    def _try_pivot(self, conn: Any, name: str, target: str) -> bool:
        """Pivot; False if qemu says the mirror is not ready after all (try again later)."""
        try:
            self._domain(conn, name).blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in _CONNECTION_ERRORS and _dead(conn):
                raise
            if exc.get_error_code() == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
                return False
            raise LauncherError(
                "switch_failed", f"cannot pivot {name}'s disk {target}: {_message(exc)}"
            ) from None
        return True

    def _cancel_copy(self, name: str, target: str) -> None:
        """Abort the copy without pivoting: the domain keeps reading its old overlay."""
        try:
            self._call("blockJobAbort", lambda c: self._domain(c, name).blockJobAbort(target, 0))
        except LauncherError as exc:
            # No job left (it failed, or the domain stopped) is the usual reason.
            log.info(
                "cancelling the copy of %s's disk %s: %s",
                name,
                target,
                exc,
                extra={"domain": name, "disk": target},
            )

    # -- monitoring ------------------------------------------------------------------------------

    def stats(self, names: list[str]) -> dict[str, DomainStats]:
        wanted = set(names)

        def sample(conn: Any) -> dict[str, DomainStats]:
            domains = [d for d in conn.listAllDomains(0) if d.name() in wanted]
            if not domains:
                return {}
            try:
                records = conn.domainListGetStats(domains, 0, 0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in _CONNECTION_ERRORS and _dead(conn):
                    raise
                # One guest powering off (its monitor gone) must not hide the others.
                records = [_one_domain_stats(conn, domain) for domain in domains]
            found: dict[str, DomainStats] = {}
            for domain, record in records:
                with contextlib.suppress(libvirt.libvirtError):  # undefined meanwhile
                    found[domain.name()] = _domain_stats(domain, record)
            return found

        return self._call("getAllDomainStats", sample)


def _one_domain_stats(conn: Any, domain: Any) -> tuple[Any, dict[str, Any]]:
    """One domain's stats record; empty (so `domain.info()` fills it) if libvirt cannot say."""
    try:
        ((_, record),) = conn.domainListGetStats([domain], 0, 0)
    except (libvirt.libvirtError, ValueError):
        return domain, {}
    return domain, dict(record)


def _domain_stats(domain: Any, record: dict[str, Any]) -> DomainStats:
    """Counters from a getAllDomainStats record, with virDomainGetInfo filling what it lacks."""
    state, max_kib, kib, vcpus, cpu_ns = domain.info()
    try:
        max_vcpus = int(
            domain.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_CONFIG | libvirt.VIR_DOMAIN_VCPU_MAXIMUM)
        )
    except libvirt.libvirtError:
        max_vcpus = int(record.get("vcpu.maximum", vcpus))
    current_kib = int(record.get("balloon.current", kib))
    if "balloon.available" in record and "balloon.unused" in record:
        used_kib = int(record["balloon.available"]) - int(record["balloon.unused"])
    else:
        used_kib = int(record.get("balloon.rss", current_kib))
    return DomainStats(
        name=domain.name(),
        state=_STATES.get(int(record.get("state.state", state)), VmState.UNKNOWN),
        vcpus=int(record.get("vcpu.current", vcpus)),
        max_vcpus=max_vcpus,
        memory=current_kib * 1024,
        max_memory=int(record.get("balloon.maximum", max_kib)) * 1024,
        memory_used=used_kib * 1024,
        cpu_time_ns=int(record.get("cpu.time", cpu_ns)),
        net_rx_bytes=_sum(record, "net", "rx.bytes"),
        net_tx_bytes=_sum(record, "net", "tx.bytes"),
        disk_read_bytes=_sum(record, "block", "rd.bytes"),
        disk_write_bytes=_sum(record, "block", "wr.bytes"),
    )


def _sum(record: dict[str, Any], group: str, field: str) -> int:
    count = int(record.get(f"{group}.count", 0))
    return sum(int(record.get(f"{group}.{i}.{field}", 0)) for i in range(count))


def offers_kvm(capabilities_xml: str, arch: str) -> bool:
    """Does libvirt's capabilities XML offer kvm guests for `arch`?"""
    root = ET.fromstring(capabilities_xml)
    for guest in root.iter("guest"):
        arch_element = guest.find("arch")
        if arch_element is None or arch_element.get("name") != arch:
            continue
        if any(d.get("type") == "kvm" for d in arch_element.iter("domain")):
            return True
    return False


def _file_disk_xml(path: str) -> str:
    """The block copy's destination: a qcow2 file whose backing chain qemu reads from it."""
    disk = ET.Element("disk", {"type": "file"})
    ET.SubElement(disk, "driver", {"type": "qcow2"})
    ET.SubElement(disk, "source", {"file": path})
    return ET.tostring(disk, encoding="unicode")


def _disk_elements(domain_xml: str) -> list[ET.Element]:
    return [
        d
        for d in ET.fromstring(domain_xml).iterfind("devices/disk")
        if d.get("device", "disk") == "disk"
    ]


def _first_disk_target(domain_xml: str) -> str | None:
    for disk in _disk_elements(domain_xml):
        target = disk.find("target")
        if target is not None and target.get("dev"):
            return target.get("dev")
    return None


def _disk_source(domain: Any, target: str) -> str | None:
    """The file the live domain's disk `target` reads (its top image)."""
    for disk in _disk_elements(str(domain.XMLDesc(0))):
        found = disk.find("target")
        if found is not None and found.get("dev") == target:
            source = disk.find("source")
            return None if source is None else source.get("file")
    return None


def _probe_xml(name: str, image: Path, serial: Path) -> str:
    domain = ET.Element("domain", {"type": "kvm"})
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", {"unit": "MiB"}).text = "16"
    ET.SubElement(domain, "vcpu").text = "1"
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", {"arch": "x86_64"}).text = "hvm"
    ET.SubElement(os_element, "boot", {"dev": "hd"})
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_crash").text = "destroy"
    devices = ET.SubElement(domain, "devices")
    disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
    ET.SubElement(disk, "driver", {"name": "qemu", "type": "raw"})
    ET.SubElement(disk, "source", {"file": str(image)})
    ET.SubElement(disk, "target", {"dev": "vda", "bus": "virtio"})
    ET.SubElement(disk, "readonly")
    console = ET.SubElement(devices, "serial", {"type": "file"})
    ET.SubElement(console, "source", {"path": str(serial)})
    ET.SubElement(console, "target", {"port": "0"})
    return ET.tostring(domain, encoding="unicode")


def _live_and_config(live: bool, apply: Callable[[int], object]) -> None:
    """Change the running domain (if it runs), then its definition (some drivers refuse both)."""
    if live:
        apply(libvirt.VIR_DOMAIN_AFFECT_LIVE)
    apply(libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead(conn: Any) -> bool:
    try:
        return not conn.isAlive()
    except libvirt.libvirtError:
        return True


def _message(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc).strip()


__all__ = [
    "DEFAULT_URI",
    "PROBE_MARKER",
    "LibvirtLauncher",
    "kvm_device_problem",
    "offers_kvm",
    "probe_boot_sector",
]
