"""The host's VM service: launch VMs from swarm templates, stop/start/delete/resize, monitor.

Launch: check flavor, name, libvirt and capacity first (so a bad request changes nothing), get
the template complete and verified through the node's fetch path, make it read-only, create a
qcow2 overlay over it, record the instance durably, define and start the domain. Monitoring:
`getAllDomainStats` samples every `sample_interval`; CPU utilisation is the CPU time used between
two samples over the wall time times the VM's vCPUs (0..1).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import trio

from ..swarm.domain_xml import DomainSpec, DomainType, Nic, NicKind, build_domain_xml
from ..swarm.flavors import Flavor, flavor_list, format_size
from ..swarm.imageformat import QCOW2_MAGIC, ImageFormat
from .download import TemplateDownload
from .download_source import DownloadSource
from .instances import (
    OVERLAY_NAME,
    SERIAL_NAME,
    Instance,
    InstanceError,
    InstanceStore,
    create_overlay,
    make_vm_dir,
    new_vm_id,
    protect_template,
    read_head,
    rebase_overlay,
    remove_vm_files,
    unreachable_directory,
)
from .rpc import Handler, Notifier, RpcError
from .storeerrors import StoreError
from .vm_launcher import DomainStats, DomainTypeChoice, LauncherError, VmLauncher, VmState

log = logging.getLogger(__name__)

DOMAIN_PREFIX = "vmswarm-"
SAMPLE_INTERVAL = 5.0
STOP_TIMEOUT = 30.0
# Overcommit like a cloud scheduler: vCPUs are time-shared, memory is not.
CPU_ALLOCATION_RATIO = 4.0
MEMORY_ALLOCATION_RATIO = 1.0
# A `vms` call re-samples when the last sample is older than this.
FRESH_SAMPLE = 1.0
_STOP_POLL = 0.25
_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,55}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_BOOT_SIGNATURE = b"\x55\xaa"
# The first chunk of a streamed template (its boot sector) must arrive within this.
HEAD_TIMEOUT = 120.0
_HEAD_BYTES = 512
# The live switch from the NBD export to the local file (a shallow copy of the overlay).
SWITCH_TIMEOUT = 300.0
LOCAL_OVERLAY_NAME = "disk-local.qcow2"
# qemu's user-mode network: works with no bridge or libvirt network set up on the host.
DEFAULT_NIC = Nic(NicKind.USER)


@dataclass(frozen=True)
class ReadyTemplate:
    """A template complete and verified on this host, ready to back overlays."""

    template_id: bytes
    name: str
    version: str
    path: Path
    format: ImageFormat
    size: int


@dataclass(frozen=True)
class StreamingTemplate:
    """A template being fetched, served over NBD on `socket` (None: already complete here)."""

    ready: ReadyTemplate
    socket: Path | None
    head: bytes  # the image's first bytes, for the boot-sector check


class TemplateSource(Protocol):
    async def ready_template(
        self,
        name: str | None,
        version: str | None,
        template_id: bytes | None,
        notifier: Notifier,
    ) -> ReadyTemplate:
        """Fetch (or find) the template and wait until it is verified; RpcError if not."""

    async def stream_template(
        self,
        name: str | None,
        version: str | None,
        template_id: bytes | None,
        notifier: Notifier,
    ) -> StreamingTemplate:
        """Start fetching the template and serve it over NBD; returns at once."""

    async def resume_stream(self, template_id: bytes) -> Path | None:
        """Serve a known template over NBD again (after a restart); None if it is complete."""

    async def wait_complete(self, template_id: bytes) -> Path:
        """Wait until the template is complete and verified here; its image file."""


class FetchingNode(Protocol):
    """What NodeTemplates needs from the host daemon's Node."""

    templates: dict[bytes, TemplateDownload]

    async def fetch(self, name: str, version: str | None, notifier: Notifier) -> dict[str, Any]: ...

    async def open_stream(
        self, name: str, version: str | None
    ) -> tuple[TemplateDownload, Path | None]: ...


class NodeTemplates:
    """Templates through the node's swarm fetch path (the local copy when complete and verified)."""

    def __init__(self, node: FetchingNode) -> None:
        self._node = node

    def _named(
        self, name: str | None, version: str | None, template_id: bytes | None
    ) -> tuple[str, str | None]:
        if name is not None:
            return name, version
        if template_id is None:
            raise ValueError("launch needs a template name or a template_id")
        held = self._node.templates.get(template_id)
        if held is None:
            raise RpcError(
                "unknown_template",
                f"template {template_id.hex()} is not on this host; launch it by name",
            )
        return held.manifest.name, held.manifest.version

    @staticmethod
    def _check_id(got: bytes, template_id: bytes | None, name: str, version: str | None) -> None:
        if template_id is not None and got != template_id:
            raise RpcError(
                "unknown_template",
                f"{name}:{version or 'latest'} is template {got.hex()}, not {template_id.hex()}",
            )

    async def ready_template(
        self,
        name: str | None,
        version: str | None,
        template_id: bytes | None,
        notifier: Notifier,
    ) -> ReadyTemplate:
        name, version = self._named(name, version, template_id)
        result = await self._node.fetch(name, version, notifier)
        got = bytes.fromhex(str(result["template_id"]))
        self._check_id(got, template_id, name, version)
        download = self._node.templates[got]
        if not download.complete:
            raise RpcError("unknown_template", f"template {got.hex()} is not complete here")
        return _ready(download, got)

    async def stream_template(
        self,
        name: str | None,
        version: str | None,
        template_id: bytes | None,
        notifier: Notifier,
    ) -> StreamingTemplate:
        name, version = self._named(name, version, template_id)
        download, socket = await self._node.open_stream(name, version)
        self._check_id(download.template_id, template_id, name, version)
        source = DownloadSource(download)
        count = min(_HEAD_BYTES, download.manifest.size)
        with trio.move_on_after(HEAD_TIMEOUT):
            if not source.is_zero(0):
                await source.wait_ready(0)
            head = await source.read(0, count)
            return StreamingTemplate(_ready(download, download.template_id), socket, head)
        raise RpcError(
            "fetch_failed",
            f"the first chunk of {name} did not arrive within {HEAD_TIMEOUT:.0f}s: "
            f"{source.why_missing(0)}",
        )

    async def resume_stream(self, template_id: bytes) -> Path | None:
        download = self._node.templates.get(template_id)
        if download is None:
            raise RpcError("unknown_template", f"template {template_id.hex()} is not on this host")
        _, socket = await self._node.open_stream(download.manifest.name, download.manifest.version)
        return socket

    async def wait_complete(self, template_id: bytes) -> Path:
        download = self._node.templates[template_id]
        await download.wait_verified()
        return _ready(download, template_id).path


def _ready(download: TemplateDownload, template_id: bytes) -> ReadyTemplate:
    manifest = download.manifest
    path = download.data.path
    if path is None:
        raise RpcError("unknown_template", f"{manifest.name} has no image file on this host")
    return ReadyTemplate(
        template_id,
        manifest.name,
        manifest.version,
        Path(path),
        manifest.format,
        manifest.size,
    )


@dataclass(frozen=True)
class _Sample:
    at: float  # trio clock
    stats: DomainStats
    utilisation: float


def cpu_utilisation(before_ns: int, after_ns: int, seconds: float, vcpus: int) -> float:
    """The share of `vcpus` busy between two CPU-time readings `seconds` apart (0..1)."""
    if seconds <= 0 or vcpus <= 0 or after_ns < before_ns:
        return 0.0
    return min(1.0, (after_ns - before_ns) / (seconds * 1e9 * vcpus))


def template_virtual_size(head: bytes, image_format: ImageFormat, file_size: int) -> int:
    """The guest-visible size of a template: a qcow2 header's size field, or a raw file's size."""
    if image_format is ImageFormat.QCOW2 and head.startswith(QCOW2_MAGIC) and len(head) >= 32:
        (size,) = struct.unpack_from(">Q", head, 24)
        return int(size)
    return file_size


def boot_problem(head: bytes, image_format: ImageFormat, size: int) -> str | None:
    """Why a BIOS could not boot this template, or None if it might."""
    if size < 512:
        return f"it is {size} bytes, smaller than one disk sector"
    if image_format is ImageFormat.RAW and head[510:512] != _BOOT_SIGNATURE:
        return "its first sector is no boot sector (no 0x55AA signature at byte 510)"
    return None


def _domain_name_for(text: str) -> str:
    cleaned = _UNSAFE.sub("-", text).strip("-.") or "vm"
    return cleaned[:40]


def libvirt_launcher(uri: str) -> VmLauncher:
    """The libvirt launcher for `uri` (imported here: only hosts that run VMs load libvirt)."""
    from .libvirt_launcher import LibvirtLauncher

    return LibvirtLauncher(uri)


class VmService:
    """The VMs of one host daemon; RPC handlers come from `handlers()`."""

    def __init__(
        self,
        launcher: VmLauncher,
        data_dir: Path,
        templates: TemplateSource,
        flavors: Mapping[str, Flavor],
        *,
        host_label: Callable[[], str] = lambda: "",
        nic: Nic = DEFAULT_NIC,
        cpu_allocation_ratio: float = CPU_ALLOCATION_RATIO,
        memory_allocation_ratio: float = MEMORY_ALLOCATION_RATIO,
        stop_timeout: float = STOP_TIMEOUT,
        sample_interval: float = SAMPLE_INTERVAL,
        fresh_sample: float = FRESH_SAMPLE,
        check_access: bool = True,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.launcher = launcher
        self.data_dir = Path(data_dir)
        self.templates = templates
        self.flavors = dict(flavors)
        self._host_label = host_label
        self.nic = nic
        self.cpu_allocation_ratio = cpu_allocation_ratio
        self.memory_allocation_ratio = memory_allocation_ratio
        self.stop_timeout = stop_timeout
        self.sample_interval = sample_interval
        self.fresh_sample = fresh_sample
        self.check_access = check_access
        # Told when capacity may have changed (the node announces sooner).
        self._on_change = on_change
        self._store: InstanceStore | None = None
        self._lock = trio.Lock()
        self._pending: dict[str, Flavor] = {}
        self._states: dict[str, VmState] = {}
        self._samples: dict[str, _Sample] = {}
        self._last_sample_at = -math.inf
        self._resources_total: tuple[int, int] | None = None
        self.choice: DomainTypeChoice | None = None
        self.last_error: str | None = None
        self._nursery: trio.Nursery | None = None
        # Streamed VMs waiting for their template to complete (then switched to the file).
        self._finishing: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the instance records, then sample stats until cancelled."""
        self._store = await trio.to_thread.run_sync(InstanceStore, self.data_dir)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._warm_up)
            nursery.start_soon(self._resume_streams)
            task_status.started()
            while True:
                await trio.sleep(self.sample_interval)
                before = self.capacity()
                try:
                    await self._sample()
                except LauncherError as exc:
                    self._note_error(str(exc))
                if self.capacity() != before:
                    self._on_change()  # a guest powered itself off, or came back

    async def _resume_streams(self) -> None:
        """After a restart: serve the exports streamed VMs still read from, and finish them."""
        for instance in list(self.store):
            if instance.template_socket is None:
                continue
            try:
                await self.templates.resume_stream(bytes.fromhex(instance.template_id))
            except RpcError as exc:
                self._note_error(f"cannot serve the template of {instance.domain}: {exc.message}")
                continue
            self._start_finishing(instance.vm_id)

    async def _warm_up(self) -> None:
        """Connect, read the host's size and decide kvm or TCG now, not at the first launch."""
        try:
            await self._host_totals()
            await self._sample()  # which recorded VMs run: capacity counts them
            self._on_change()
            await self._domain_type()
        except LauncherError as exc:
            self._note_error(str(exc))

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("VM service: %s", message)
        self.last_error = message

    @property
    def store(self) -> InstanceStore:
        if self._store is None:
            raise RpcError("not_ready", "the VM service is still starting")
        return self._store

    async def _domain_type(self) -> DomainTypeChoice:
        # The probe may take seconds; abandon it rather than hold up a daemon shutdown.
        choice = await trio.to_thread.run_sync(
            self.launcher.choose_domain_type, abandon_on_cancel=True
        )
        self.choice = choice
        return choice

    async def _host_totals(self) -> tuple[int, int]:
        if self._resources_total is None:
            host = await trio.to_thread.run_sync(
                self.launcher.host_resources, abandon_on_cancel=True
            )
            self._resources_total = (
                int(host.cpus * self.cpu_allocation_ratio),
                int(host.memory * self.memory_allocation_ratio),
            )
            self.last_error = None
        return self._resources_total

    # -- capacity --------------------------------------------------------------------------------

    def _used(self, skip: str | None = None) -> tuple[int, int]:
        vcpus = memory = 0
        if self._store is not None:
            for instance in self._store:
                if (
                    instance.vm_id != skip
                    and self._states.get(instance.vm_id, VmState.UNKNOWN).active
                ):
                    vcpus += instance.vcpus
                    memory += instance.memory
        for vm_id, flavor in self._pending.items():
            if vm_id != skip:
                vcpus += flavor.vcpus
                memory += flavor.memory
        return vcpus, memory

    def capacity(self) -> dict[str, int] | None:
        """{vcpus_total, vcpus_used, memory_total, memory_used} (bytes); None until libvirt answers.

        Totals are the host's CPUs and memory times the allocation ratios; used is the sum over
        active VMs (and launches under way) of what each has now.
        """
        if self._resources_total is None:
            return None
        vcpus_total, memory_total = self._resources_total
        vcpus_used, memory_used = self._used()
        return {
            "vcpus_total": vcpus_total,
            "vcpus_used": vcpus_used,
            "memory_total": memory_total,
            "memory_used": memory_used,
        }

    async def _check_capacity(self, vcpus: int, memory: int, skip: str | None = None) -> None:
        vcpus_total, memory_total = await self._host_totals()
        vcpus_used, memory_used = self._used(skip)
        short: list[str] = []
        if vcpus_used + vcpus > vcpus_total:
            short.append(f"{vcpus} vCPUs wanted, {max(vcpus_total - vcpus_used, 0)} free")
        if memory_used + memory > memory_total:
            free = max(memory_total - memory_used, 0)
            short.append(f"{format_size(memory)} memory wanted, {format_size(free)} free")
        if short:
            raise RpcError(
                "no_capacity",
                f"host {self._host_label() or 'here'} has no room: {'; '.join(short)} "
                f"(of {vcpus_total} vCPUs and {format_size(memory_total)})",
            )

    # -- launch ----------------------------------------------------------------------------------

    def flavor(self, name: object) -> Flavor:
        if type(name) is not str:
            raise ValueError("flavor must be a flavor name")
        flavor = self.flavors.get(name)
        if flavor is None:
            known = ", ".join(f["name"] for f in flavor_list(self.flavors))
            raise RpcError("unknown_flavor", f"no flavor {name!r}; known flavors: {known}")
        return flavor

    async def launch(
        self,
        *,
        name: str | None,
        version: str | None,
        template_id: bytes | None,
        flavor_name: str,
        vm_name: str | None,
        notifier: Notifier,
        stream: bool = False,
    ) -> dict[str, Any]:
        """Fetch the template if needed and boot a VM from it; the launch result.

        `stream`: boot at once over the host's NBD export of the template while it arrives;
        once complete, the VM's disk is switched live to the local file (`_finish_streaming`).
        """
        flavor = self.flavor(flavor_name)
        if vm_name is not None:
            if not _VM_NAME.match(vm_name):
                raise ValueError(
                    f"vm_name {vm_name!r:.80} must be 1-56 letters, digits, '.', '_' or '-'"
                )
            self._check_name_free(vm_name)
        choice = await self._call_launcher(self._domain_type)
        await self._call_launcher(lambda: self._check_capacity(flavor.vcpus, flavor.memory))
        began = trio.current_time()
        await notifier.notify("phase", {"phase": "fetch"})
        socket: Path | None = None
        if stream:
            streaming = await self.templates.stream_template(name, version, template_id, notifier)
            ready, socket, head = streaming.ready, streaming.socket, streaming.head
        else:
            ready = await self.templates.ready_template(name, version, template_id, notifier)
            head = await trio.to_thread.run_sync(read_head, ready.path, _HEAD_BYTES)
        seconds_fetch = trio.current_time() - began
        problem = boot_problem(head, ready.format, ready.size)
        if problem is not None:
            raise RpcError(
                "not_bootable", f"template {ready.name}:{ready.version} is not bootable: {problem}"
            )
        vm_id, domain_uuid = new_vm_id()
        label = vm_name or f"{_domain_name_for(ready.name)}-{vm_id[:8]}"
        async with self._lock:
            # Checked again: the fetch may have taken minutes, and others launched meanwhile.
            self._check_name_free(label)
            await self._call_launcher(lambda: self._check_capacity(flavor.vcpus, flavor.memory))
            self._pending[vm_id] = flavor
        try:
            boot_began = trio.current_time()
            await notifier.notify("phase", {"phase": "boot", "vm_id": vm_id})
            instance = Instance(
                vm_id=vm_id,
                name=label,
                domain=DOMAIN_PREFIX + label,
                uuid=domain_uuid,
                template_id=ready.template_id.hex(),
                template_name=ready.name,
                template_version=ready.version,
                template_path=str(ready.path),
                template_format=ready.format,
                flavor=flavor,
                overlay=str(self.store.vm_dir(vm_id) / OVERLAY_NAME),
                serial_log=str(self.store.vm_dir(vm_id) / SERIAL_NAME),
                created=time.time(),
                vcpus=flavor.vcpus,
                memory=flavor.memory,
                template_socket=None if socket is None else str(socket),
            )
            await self._call_launcher(
                lambda: trio.to_thread.run_sync(self._create, instance, choice.domain_type, head)
            )
            self._states[vm_id] = VmState.RUNNING
        finally:
            del self._pending[vm_id]
            self._on_change()
        if socket is not None:
            self._start_finishing(instance.vm_id)
        seconds_boot = trio.current_time() - boot_began
        log.info(
            "launched %s (%s) from %s:%s, flavor %s, %s: fetch %.2fs, boot %.2fs",
            instance.domain,
            vm_id,
            ready.name,
            ready.version,
            flavor.name,
            choice.domain_type.value,
            seconds_fetch,
            seconds_boot,
        )
        return {
            "vm_id": vm_id,
            "domain": instance.domain,
            "name": instance.name,
            "template_id": instance.template_id,
            "flavor": flavor.name,
            "domain_type": choice.domain_type.value,
            "serial_log": instance.serial_log,
            "seconds_fetch": round(seconds_fetch, 3),
            "seconds_boot": round(seconds_boot, 3),
            "host": self._host_label(),
            "streaming": socket is not None,
        }

    def _check_name_free(self, name: str) -> None:
        if self.store.by_name(name) is not None or self.store.by_name(DOMAIN_PREFIX + name):
            raise RpcError("name_taken", f"a VM named {name!r} already exists on this host")

    def _domain_xml(self, instance: Instance, domain_type: DomainType) -> str:
        flavor = instance.flavor
        return build_domain_xml(
            DomainSpec(
                name=instance.domain,
                domain_type=domain_type,
                flavor=flavor,
                overlay_path=instance.overlay,
                template_path=instance.template_path,
                template_format=instance.template_format,
                template_socket=instance.template_socket,
                serial_log=instance.serial_log,
                uuid=instance.uuid,
                nic=self.nic,
            )
        )

    def _create(self, instance: Instance, domain_type: DomainType, head: bytes) -> None:
        """Blocking: overlay, record, define, start; on failure nothing stays behind."""
        store = self.store
        template = Path(instance.template_path)
        socket = None if instance.template_socket is None else Path(instance.template_socket)
        vm_dir = store.vm_dir(instance.vm_id)
        if self.check_access and domain_type is not DomainType.TEST:
            for path in (template if socket is None else socket, vm_dir):
                blocked = unreachable_directory(path)
                if blocked is not None:
                    raise InstanceError(
                        "launch_failed",
                        f"qemu runs as another user and cannot enter {blocked} (to reach "
                        f"{path}); allow it with `chmod o+x {blocked}` or use another --data-dir",
                    )
        make_vm_dir(vm_dir)
        recorded = defined = False
        try:
            if socket is None:
                protect_template(template)  # a streamed one still arrives: made so once complete
            grow = self._grow(instance, head)
            create_overlay(
                template,
                instance.template_format,
                Path(instance.overlay),
                grow,
                template_socket=socket,
            )
            store.add(instance)
            recorded = True
            self.launcher.define(self._domain_xml(instance, domain_type))
            defined = True
            self.launcher.start(instance.domain)
        except BaseException:
            if defined:
                self._quietly(self.launcher.undefine, instance.domain)
            if recorded:
                self._quietly(store.remove, instance.vm_id)
            remove_vm_files(vm_dir, template)
            raise

    @staticmethod
    def _grow(instance: Instance, head: bytes) -> int | None:
        """The flavor's disk size when it is larger than the template's, else None."""
        # A streamed raw template's file is sparse but already has its full size.
        size = Path(instance.template_path).stat().st_size
        virtual = template_virtual_size(head, instance.template_format, size)
        return instance.flavor.disk if instance.flavor.disk > virtual else None

    # -- streaming: switch to the local template file once it is complete -----------------------

    def _start_finishing(self, vm_id: str) -> None:
        if self._nursery is None or vm_id in self._finishing:
            return
        self._finishing.add(vm_id)
        self._nursery.start_soon(self._finish_streaming, vm_id)

    async def _finish_streaming(self, vm_id: str) -> None:
        """Wait for the template, then move the VM's disk off the NBD export (live if running)."""
        try:
            instance = self.store.get(vm_id)
            if instance is None or instance.template_socket is None:
                return
            template_id = bytes.fromhex(instance.template_id)
            await self.templates.wait_complete(template_id)
            async with self._lock:
                instance = self.store.get(vm_id)
                if instance is None or instance.template_socket is None:
                    return  # deleted meanwhile
                state = await self._state(instance)
                choice = await self._call_launcher(self._domain_type)
                began = trio.current_time()
                try:
                    switched = await trio.to_thread.run_sync(
                        self._switch_to_file, instance, state.active, choice.domain_type
                    )
                except (LauncherError, InstanceError, StoreError, OSError) as exc:
                    self._note_error(
                        f"{instance.domain} stays on the NBD export of its template: {exc}"
                    )
                    return
            log.info(
                "%s now reads its template from %s (%s switch, %.2fs)",
                switched.domain,
                switched.template_path,
                "live" if state.active else "offline",
                trio.current_time() - began,
            )
        finally:
            self._finishing.discard(vm_id)

    async def _resume_or_switch(self, instance: Instance) -> Instance:
        """Before a streamed VM starts: the export up again, or (template complete) the file."""
        socket = await self.templates.resume_stream(bytes.fromhex(instance.template_id))
        if socket is not None:
            return instance
        choice = await self._call_launcher(self._domain_type)
        switched: Instance = await self._call_launcher(
            lambda: trio.to_thread.run_sync(
                self._switch_to_file, instance, False, choice.domain_type
            )
        )
        log.info("%s now reads its template from %s", switched.domain, switched.template_path)
        return switched

    def _switch_to_file(
        self, instance: Instance, running: bool, domain_type: DomainType
    ) -> Instance:
        """Blocking: back the VM's overlay by the verified local file instead of the export."""
        template = Path(instance.template_path)
        protect_template(template)
        old = Path(instance.overlay)
        if running:
            # A shallow block copy into a fresh overlay over the file, then a pivot (libvirt).
            new = old.with_name(OVERLAY_NAME if old.name != OVERLAY_NAME else LOCAL_OVERLAY_NAME)
            head = read_head(template, _HEAD_BYTES)
            with contextlib.suppress(FileNotFoundError):
                new.unlink()
            create_overlay(template, instance.template_format, new, self._grow(instance, head))
            try:
                self.launcher.switch_backing(instance.domain, str(new), SWITCH_TIMEOUT)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    new.unlink()
                raise
            switched = replace(instance, overlay=str(new), template_socket=None)
        else:
            rebase_overlay(old, template, instance.template_format)
            switched = replace(instance, template_socket=None)
        self.store.update(switched)
        if running:
            # The pivot updated libvirt's persistent definition too.
            old.unlink(missing_ok=True)
        elif self.launcher.exists(switched.domain):
            self.launcher.undefine(switched.domain)
            self.launcher.define(self._domain_xml(switched, domain_type))
        return switched

    @staticmethod
    def _quietly(action: Callable[[str], None], key: str) -> None:
        try:
            action(key)
        except (LauncherError, InstanceError, StoreError) as exc:
            log.error("cleanup after a failed launch: %s", exc)

    async def _call_launcher(self, action: Callable[[], Any]) -> Any:
        """Await `action()`, turning launcher and instance errors into RPC errors."""
        try:
            return await action()
        except (LauncherError, InstanceError) as exc:
            raise RpcError(exc.code, exc.message) from None
        except StoreError as exc:
            raise RpcError("store_error", str(exc)) from None

    # -- stop, start, delete ---------------------------------------------------------------------

    async def _state(self, instance: Instance) -> VmState:
        state: VmState = await self._call_launcher(
            lambda: trio.to_thread.run_sync(self.launcher.state, instance.domain)
        )
        self._states[instance.vm_id] = state
        return state

    async def stop(self, key: str, *, force: bool = False) -> dict[str, Any]:
        """Power a VM off: ACPI shutdown, then destroy after `stop_timeout` (at once if forced)."""
        instance = self._find(key)
        state = await self._state(instance)
        how = "already stopped"
        if state.active:
            launcher = self.launcher
            if not force:
                await self._call_launcher(
                    lambda: trio.to_thread.run_sync(launcher.shutdown, instance.domain)
                )
                how = "shut down"
                with trio.move_on_after(self.stop_timeout):
                    await self._wait_inactive(instance)
            if (await self._state(instance)).active:
                if not force:
                    log.warning(
                        "%s did not power off within %.0fs; destroying it",
                        instance.domain,
                        self.stop_timeout,
                    )
                await self._call_launcher(
                    lambda: trio.to_thread.run_sync(launcher.destroy, instance.domain)
                )
                how = "powered off"
        state = await self._state(instance)
        self._on_change()
        return {
            "vm_id": instance.vm_id,
            "domain": instance.domain,
            "state": state.value,
            "how": how,
        }

    async def _wait_inactive(self, instance: Instance) -> None:
        # libvirt's lifecycle events would need an event loop thread; polling is enough here.
        while (await self._state(instance)).active:  # noqa: ASYNC110
            await trio.sleep(_STOP_POLL)

    async def start(self, key: str) -> dict[str, Any]:
        """Start a stopped VM (redefining its domain from the record if libvirt lost it)."""
        async with self._lock:
            instance = self._find(key)
            state = await self._state(instance)
            if not state.active:
                await self._call_launcher(
                    lambda: self._check_capacity(instance.vcpus, instance.memory, instance.vm_id)
                )
                if instance.template_socket is not None:
                    instance = await self._resume_or_switch(instance)
                if state is VmState.MISSING:
                    choice = await self._call_launcher(self._domain_type)
                    xml = self._domain_xml(instance, choice.domain_type)
                    await self._call_launcher(
                        lambda: trio.to_thread.run_sync(self.launcher.define, xml)
                    )
                await self._call_launcher(
                    lambda: trio.to_thread.run_sync(self.launcher.start, instance.domain)
                )
            state = await self._state(instance)
        self._on_change()
        return {"vm_id": instance.vm_id, "domain": instance.domain, "state": state.value}

    async def delete(self, key: str) -> dict[str, Any]:
        """Remove the domain, the overlay and the record; the template stays."""
        async with self._lock:
            instance = self._find(key)
            await self._call_launcher(lambda: trio.to_thread.run_sync(self._remove, instance))
            self._states.pop(instance.vm_id, None)
            self._samples.pop(instance.vm_id, None)
        self._on_change()
        log.info("deleted %s (%s)", instance.domain, instance.vm_id)
        return {"vm_id": instance.vm_id, "domain": instance.domain, "deleted": True}

    def _remove(self, instance: Instance) -> None:
        if self.launcher.exists(instance.domain):
            self.launcher.destroy(instance.domain)
            self.launcher.undefine(instance.domain)
        remove_vm_files(self.store.vm_dir(instance.vm_id), Path(instance.template_path))
        self.store.remove(instance.vm_id)

    def _find(self, key: object) -> Instance:
        if type(key) is not str or not key:
            raise ValueError("vm_id must be a VM id, id prefix or name")
        try:
            return self.store.find(key)
        except InstanceError as exc:
            raise RpcError(exc.code, exc.message) from None

    # -- resize ----------------------------------------------------------------------------------

    async def resize(
        self, key: str, *, vcpus: int | None = None, memory: int | None = None
    ) -> dict[str, Any]:
        """Change vCPUs and/or memory, live when running, within the flavor's maximums."""
        if vcpus is None and memory is None:
            raise ValueError("resize needs vcpus or memory")
        if vcpus is not None and (type(vcpus) is not int or vcpus < 1):
            raise ValueError("vcpus must be a positive integer")
        if memory is not None and (type(memory) is not int or memory < 1):
            raise ValueError("memory must be a positive number of bytes")
        async with self._lock:
            instance = self._find(key)
            flavor = instance.flavor
            if vcpus is not None and vcpus > flavor.max_vcpus:
                raise RpcError(
                    "cannot_resize",
                    f"{instance.name} was defined with at most {flavor.max_vcpus} vCPUs (flavor "
                    f"{flavor.name}'s max_vcpus); {vcpus} needs a new VM with a larger flavor",
                )
            if memory is not None and memory > flavor.max_memory:
                raise RpcError(
                    "cannot_resize",
                    f"{instance.name} was defined with at most {format_size(flavor.max_memory)} "
                    f"of memory (flavor {flavor.name}'s max_memory); {format_size(memory)} "
                    "needs a new VM with a larger flavor",
                )
            state = await self._state(instance)
            new_vcpus = instance.vcpus if vcpus is None else vcpus
            new_memory = instance.memory if memory is None else memory
            if state.active:
                try:
                    await self._call_launcher(
                        lambda: self._check_capacity(new_vcpus, new_memory, instance.vm_id)
                    )
                except RpcError as exc:
                    raise RpcError("cannot_resize", exc.message) from None
            launcher = self.launcher
            if vcpus is not None and vcpus != instance.vcpus:
                await self._call_launcher(
                    lambda: trio.to_thread.run_sync(launcher.set_vcpus, instance.domain, vcpus)
                )
                instance = instance.resized(vcpus=vcpus)
                await trio.to_thread.run_sync(self.store.update, instance)
            if memory is not None and memory != instance.memory:
                await self._call_launcher(
                    lambda: trio.to_thread.run_sync(launcher.set_memory, instance.domain, memory)
                )
                instance = instance.resized(memory=memory)
                await trio.to_thread.run_sync(self.store.update, instance)
        self._on_change()
        log.info(
            "resized %s to %d vCPUs, %s (%s)",
            instance.domain,
            instance.vcpus,
            format_size(instance.memory),
            "live" if state.active else "from its next start",
        )
        return {
            "vm_id": instance.vm_id,
            "domain": instance.domain,
            "vcpus": instance.vcpus,
            "memory": instance.memory,
            "live": state.active,
        }

    # -- monitoring ------------------------------------------------------------------------------

    async def _sample(self) -> None:
        if self._store is None:
            return
        instances = list(self._store)
        by_domain = {i.domain: i for i in instances}
        stats = await trio.to_thread.run_sync(
            self.launcher.stats, list(by_domain), abandon_on_cancel=True
        )
        now = trio.current_time()
        self._last_sample_at = now
        for instance in instances:
            current = stats.get(instance.domain)
            if current is None:
                self._states[instance.vm_id] = VmState.MISSING
                self._samples.pop(instance.vm_id, None)
                continue
            self._states[instance.vm_id] = current.state
            before = self._samples.get(instance.vm_id)
            utilisation = 0.0
            if before is not None and current.state.active:
                utilisation = cpu_utilisation(
                    before.stats.cpu_time_ns, current.cpu_time_ns, now - before.at, current.vcpus
                )
            self._samples[instance.vm_id] = _Sample(now, current, utilisation)

    async def vms(self) -> dict[str, Any]:
        """Every VM here with its state and latest counters."""
        if trio.current_time() - self._last_sample_at >= self.fresh_sample:
            await self._call_launcher(self._sample)
        return {
            "host": self._host_label(),
            "domain_type": None if self.choice is None else self.choice.domain_type.value,
            "capacity": self.capacity(),
            "vms": [self.vm_entry(i) for i in self.store],
        }

    def vm_entry(self, instance: Instance) -> dict[str, Any]:
        sample = self._samples.get(instance.vm_id)
        stats = None if sample is None else sample.stats
        state = self._states.get(instance.vm_id, VmState.UNKNOWN)
        return {
            "vm_id": instance.vm_id,
            "domain": instance.domain,
            "name": instance.name,
            "host": self._host_label(),
            "template_id": instance.template_id,
            "template": f"{instance.template_name}:{instance.template_version}",
            "flavor": instance.flavor.name,
            "state": state.value,
            "vcpus": instance.vcpus if stats is None else stats.vcpus,
            "max_vcpus": instance.flavor.max_vcpus,
            "memory": instance.memory if stats is None else stats.memory,
            "max_memory": instance.flavor.max_memory,
            "cpu_seconds": 0.0 if stats is None else round(stats.cpu_time_ns / 1e9, 3),
            "cpu_utilisation": 0.0 if sample is None else round(sample.utilisation, 4),
            "memory_bytes": 0 if stats is None else stats.memory_used,
            "net_rx_bytes": 0 if stats is None else stats.net_rx_bytes,
            "net_tx_bytes": 0 if stats is None else stats.net_tx_bytes,
            "disk_read_bytes": 0 if stats is None else stats.disk_read_bytes,
            "disk_write_bytes": 0 if stats is None else stats.disk_write_bytes,
            "created": instance.created,
            "serial_log": instance.serial_log,
            "overlay": instance.overlay,
            # Still reading its template over the host's NBD export (switched once complete).
            "streaming": instance.template_socket is not None,
        }

    def status(self) -> dict[str, Any]:
        """The VM service's part of the daemon's status."""
        return {
            "libvirt_uri": self.launcher.uri,
            "domain_type": None if self.choice is None else self.choice.domain_type.value,
            "domain_type_reason": None if self.choice is None else self.choice.reason,
            "capacity": self.capacity(),
            "vms": 0 if self._store is None else len(self._store),
            "last_error": self.last_error,
        }

    # -- RPC -------------------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """launch, vms, vm_stop, vm_start, vm_delete, vm_resize, flavors, capacity."""

        async def launch(params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
            name = params.get("name")
            version = params.get("version")
            raw_id = params.get("template_id")
            vm_name = params.get("vm_name")
            for key, value in (("name", name), ("version", version), ("vm_name", vm_name)):
                if value is not None and (type(value) is not str or not value):
                    raise ValueError(f"{key} must be a non-empty string or nil")
            template_id: bytes | None = None
            if raw_id is not None:
                if isinstance(raw_id, bytes):
                    template_id = raw_id
                elif isinstance(raw_id, str):
                    template_id = bytes.fromhex(raw_id)
                else:
                    raise ValueError("template_id must be hex text or bytes")
            return await self.launch(
                name=name,
                version=version,
                template_id=template_id,
                flavor_name=params["flavor"],
                vm_name=vm_name,
                notifier=notifier,
                stream=_flag(params, "stream"),
            )

        async def vms(params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
            return await self.vms()

        async def vm_stop(params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
            return await self.stop(params["vm_id"], force=bool(params.get("force", False)))

        async def vm_start(params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
            return await self.start(params["vm_id"])

        async def vm_delete(params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
            return await self.delete(params["vm_id"])

        async def vm_resize(params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
            return await self.resize(
                params["vm_id"], vcpus=params.get("vcpus"), memory=params.get("memory")
            )

        async def flavors(params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
            return {"flavors": flavor_list(self.flavors)}

        async def capacity(params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
            return {"host": self._host_label(), "capacity": self.capacity()}

        return {
            "launch": launch,
            "vms": vms,
            "vm_stop": vm_stop,
            "vm_start": vm_start,
            "vm_delete": vm_delete,
            "vm_resize": vm_resize,
            "flavors": flavors,
            "capacity": capacity,
        }


__all__ = [
    "DOMAIN_PREFIX",
    "FetchingNode",
    "NodeTemplates",
    "ReadyTemplate",
    "TemplateSource",
    "VmService",
    "boot_problem",
    "cpu_utilisation",
    "libvirt_launcher",
    "template_virtual_size",
]


def _flag(params: dict[str, Any], key: str) -> bool:
    value = params.get(key, False)
    if value is None:
        return False
    if type(value) is not bool:
        raise ValueError(f"{key} must be true or false")
    return value
