"""The `VmLauncher` protocol: what the host's VM service needs from a hypervisor, and its data.

The real implementation is `libvirt_launcher.LibvirtLauncher` (the only module importing
libvirt); tests run it against libvirt's `test:///default` driver. Every method blocks, so the
trio service calls them through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from ..swarm.domain_xml import DomainType
from .coded_error import CodedError


class VmState(StrEnum):
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting_down"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    SUSPENDED = "suspended"
    MISSING = "missing"  # the record exists but libvirt has no such domain
    UNKNOWN = "unknown"

    @property
    def active(self) -> bool:
        """Does a domain in this state hold its vCPUs and memory on the host?"""
        return self in (
            VmState.RUNNING,
            VmState.BLOCKED,
            VmState.PAUSED,
            VmState.SHUTTING_DOWN,
            VmState.SUSPENDED,
        )


class LauncherError(CodedError):
    """A hypervisor operation failed; `code` is an RPC error code, the message says why."""


@dataclass(frozen=True)
class HostResources:
    """The hypervisor host's physical CPUs and memory (bytes)."""

    cpus: int
    memory: int


@dataclass(frozen=True)
class DomainTypeChoice:
    """The domain type VMs get here, and why (for logs and `status`)."""

    domain_type: DomainType
    reason: str


@dataclass(frozen=True)
class DomainStats:
    """One sample of a domain's counters (cumulative ones since the domain started)."""

    name: str
    state: VmState
    vcpus: int
    max_vcpus: int
    memory: int  # bytes the guest has now (balloon target)
    max_memory: int
    memory_used: int  # bytes in use: guest-reported if it can, else the qemu process RSS
    cpu_time_ns: int
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0


class VmLauncher(Protocol):
    """Defines, starts, stops, resizes and samples VMs; domains are named by the caller."""

    @property
    def uri(self) -> str: ...

    def connect(self) -> None:
        """Check the hypervisor answers; LauncherError("libvirt_unreachable") if not."""

    def choose_domain_type(self) -> DomainTypeChoice:
        """kvm when KVM really runs guests here, else qemu (TCG); decided once, then cached."""

    def host_resources(self) -> HostResources: ...

    def exists(self, name: str) -> bool: ...

    def define(self, xml: str) -> None:
        """Define a persistent domain; LauncherError("name_taken") if the name is in use."""

    def start(self, name: str) -> None: ...

    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (ACPI); returns at once."""

    def destroy(self, name: str) -> None:
        """Power the domain off now; nothing happens if it is not running."""

    def undefine(self, name: str) -> None:
        """Remove the domain's definition; nothing happens if there is none."""

    def state(self, name: str) -> VmState: ...

    def set_vcpus(self, name: str, count: int) -> None:
        """Live (and persistently) when running, persistently otherwise; cannot_resize if not."""

    def set_memory(self, name: str, size: int) -> None:
        """Bytes, rounded up to KiB; live when running; cannot_resize if libvirt refuses."""

    def stats(self, names: list[str]) -> dict[str, DomainStats]:
        """A sample of each named domain that exists."""

    def switch_backing(self, name: str, new_overlay: str, timeout: float) -> None:
        """Move a RUNNING domain's disk onto `new_overlay` live, in the definition too.

        The caller made `new_overlay` (qcow2, empty, backed by the local template file); a
        shallow block copy moves the old overlay's data into it, then the disk pivots, so the
        old backing (the NBD export) is no longer read. LauncherError codes: not_running (then
        rebase the stopped VM's overlay instead), unsupported (this hypervisor has no block
        copy), switch_failed (the copy failed or was not ready within `timeout` seconds; the
        job is cancelled and the domain keeps its old disk), unknown_vm.
        """

    def close(self) -> None: ...


__all__ = [
    "DomainStats",
    "DomainTypeChoice",
    "HostResources",
    "LauncherError",
    "VmLauncher",
    "VmState",
]
