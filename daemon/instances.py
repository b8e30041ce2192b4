"""The host's VM instances: durable records, and each VM's qcow2 overlay over its template.

Records live in DATA_DIR/vms/instances.json, replaced atomically on every change. Each VM has
its own directory DATA_DIR/vms/VM_ID/ holding `disk.qcow2` (the overlay, the only disk file the
VM writes) and `serial.log`. The template is the overlay's read-only backing file: it is opened
read-only here, made read-only on disk (0444), and never deleted. Plain blocking I/O: the trio
service calls these through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..swarm.flavors import Flavor, flavor_from_wire
from ..swarm.imageformat import ImageFormat
from .coded_error import CodedError
from .journal import atomic_write
from .storeerrors import StoreError

VMS_DIR = "vms"
RECORDS_FILE = "instances.json"
OVERLAY_NAME = "disk.qcow2"
SERIAL_NAME = "serial.log"
TEMPLATE_MODE = 0o444
# qemu runs as another user (libvirt-qemu): it must be able to enter the VM's directory.
VM_DIR_MODE = 0o755
_RECORDS_VERSION = 1
QEMU_IMG_TIMEOUT = 60.0


class InstanceError(CodedError):
    """An instance operation failed; `code` is an RPC error code, the message says why."""


@dataclass(frozen=True)
class Instance:
    """One VM on this host, as recorded."""

    vm_id: str
    name: str
    domain: str
    uuid: str
    template_id: str  # hex
    template_name: str
    template_version: str
    template_path: str
    template_format: ImageFormat
    flavor: Flavor
    overlay: str
    serial_log: str
    created: float  # Unix time
    vcpus: int  # what the VM has now: the flavor's, or a resize's
    memory: int
    # Streaming: the NBD socket the overlay reads the template through until the switch to
    # the local template file; None once switched, and for VMs launched from a complete one.
    template_socket: str | None = None

    def to_wire(self) -> dict[str, Any]:
        data = asdict(self)
        data["flavor"] = self.flavor.as_dict()
        data["template_format"] = self.template_format.value
        return data

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Instance:
        fields = dict(data)
        fields["flavor"] = flavor_from_wire(fields["flavor"])
        fields["template_format"] = ImageFormat(fields["template_format"])
        return cls(**fields)

    @property
    def streaming(self) -> bool:
        return self.template_socket is not None

    def resized(self, vcpus: int | None = None, memory: int | None = None) -> Instance:
        return replace(
            self,
            vcpus=self.vcpus if vcpus is None else vcpus,
            memory=self.memory if memory is None else memory,
        )


def new_vm_id() -> tuple[str, str]:
    """(vm_id, domain uuid): the id is the uuid's first 12 hex digits."""
    value = uuid.uuid4()
    return value.hex[:12], str(value)


class InstanceStore:
    """The durable set of instances on this host (one process owns it)."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = Path(data_dir) / VMS_DIR
        self.path = self.directory / RECORDS_FILE
        self._instances: dict[str, Instance] = {}
        # Launches write records from worker threads while the event loop reads them.
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            self.directory.chmod(VM_DIR_MODE)
        self._load()

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            data = json.loads(raw)
            if data.get("version") != _RECORDS_VERSION:
                raise ValueError(f"unknown records version {data.get('version')!r}")
            instances = [Instance.from_wire(item) for item in data["instances"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"instance records {self.path} are corrupt: {exc}") from exc
        self._instances = {i.vm_id: i for i in instances}

    def _save(self) -> None:
        data = {
            "version": _RECORDS_VERSION,
            "instances": [i.to_wire() for i in self._instances.values()],
        }
        atomic_write(self.path, json.dumps(data, indent=1).encode(), "instance records")

    def _snapshot(self) -> list[Instance]:
        with self._lock:
            return list(self._instances.values())

    def __iter__(self) -> Iterator[Instance]:
        return iter(sorted(self._snapshot(), key=lambda i: (i.created, i.vm_id)))

    def __len__(self) -> int:
        return len(self._instances)

    def get(self, vm_id: str) -> Instance | None:
        with self._lock:
            return self._instances.get(vm_id)

    def by_name(self, name: str) -> Instance | None:
        for instance in self._snapshot():
            if instance.name == name or instance.domain == name:
                return instance
        return None

    def find(self, key: str) -> Instance:
        """An instance by id, unique id prefix, name or domain; unknown_vm otherwise."""
        exact = self.get(key) or self.by_name(key)
        if exact is not None:
            return exact
        matches = [i for i in self._snapshot() if key and i.vm_id.startswith(key)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise InstanceError("unknown_vm", f"{key!r} matches {len(matches)} VMs; give more")
        raise InstanceError("unknown_vm", f"no VM {key!r} on this host")

    def add(self, instance: Instance) -> None:
        """Record a new instance; name_taken if its id, name or domain is in use."""
        with self._lock:
            if instance.vm_id in self._instances:
                raise InstanceError("name_taken", f"a VM with id {instance.vm_id} exists")
            for name in (instance.name, instance.domain):
                if any(name in (i.name, i.domain) for i in self._instances.values()):
                    raise InstanceError("name_taken", f"a VM named {name!r} exists on this host")
            self._instances[instance.vm_id] = instance
            try:
                self._save()
            except StoreError:
                del self._instances[instance.vm_id]
                raise

    def update(self, instance: Instance) -> None:
        with self._lock:
            old = self._instances[instance.vm_id]
            self._instances[instance.vm_id] = instance
            try:
                self._save()
            except StoreError:
                self._instances[instance.vm_id] = old
                raise

    def remove(self, vm_id: str) -> None:
        with self._lock:
            old = self._instances.pop(vm_id)
            try:
                self._save()
            except StoreError:
                self._instances[vm_id] = old
                raise

    def vm_dir(self, vm_id: str) -> Path:
        return self.directory / vm_id


def make_vm_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=False)
    directory.chmod(VM_DIR_MODE)


def protect_template(path: Path) -> None:
    """Make the template read-only on disk (0444): no VM, tool or typo writes it."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode != TEMPLATE_MODE:
        path.chmod(TEMPLATE_MODE)


def nbd_backing(socket: Path) -> str:
    """qemu's name for the NBD export on a Unix socket (the path percent-encoded for qemu)."""
    return f"nbd+unix:///?socket={urllib.parse.quote(str(socket), safe='/')}"


def create_overlay(
    template: Path,
    template_format: ImageFormat,
    overlay: Path,
    size: int | None = None,
    *,
    template_socket: Path | None = None,
) -> None:
    """`qemu-img create -f qcow2 -b TEMPLATE -F FORMAT OVERLAY [SIZE]`; the template is only read.

    `size` (bytes) grows the VM's disk past the template's size; None keeps the template's.
    With `template_socket` the backing is the template's NBD export on that socket instead of
    the file: qemu-img connects to it (to learn the size), so the export must be serving.
    """
    backing = str(template) if template_socket is None else nbd_backing(template_socket)
    command = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        template_format.value,
        str(overlay),
    ]
    if size is not None:
        command.append(str(size))
    try:
        _qemu_img(command, "launch_failed", f"qemu-img could not create the overlay {overlay}")
    except InstanceError:
        with contextlib.suppress(FileNotFoundError):
            overlay.unlink()
        raise
    overlay.chmod(0o644)


def rebase_overlay(overlay: Path, template: Path, template_format: ImageFormat) -> None:
    """Point a stopped VM's overlay at the template file (`qemu-img rebase -u`): no data moves.

    Only for an overlay no qemu has open, whose old backing (the NBD export) had the same bytes.
    """
    _qemu_img(
        [
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            str(template),
            "-F",
            template_format.value,
            str(overlay),
        ],
        "switch_failed",
        f"qemu-img could not rebase the overlay {overlay} onto {template}",
    )


def _qemu_img(arguments: list[str], code: str, failure: str) -> None:
    """Run qemu-img; InstanceError(code, "FAILURE: qemu-img's last line") if it fails."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise InstanceError(code, "qemu-img is not installed (apt-get install qemu-utils)")
    try:
        result = subprocess.run(
            [qemu_img, *arguments],
            capture_output=True,
            text=True,
            timeout=QEMU_IMG_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InstanceError(
            code, f"{failure}: qemu-img {arguments[0]} took over {QEMU_IMG_TIMEOUT:.0f}s"
        ) from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise InstanceError(
            code, f"{failure}: {detail[-1] if detail else f'exit {result.returncode}'}"
        )


def remove_vm_files(directory: Path, template: Path) -> None:
    """Delete a VM's directory (overlay, serial log); refuses if the template lives inside it."""
    directory = directory.resolve()
    resolved = template.resolve()
    if resolved == directory or directory in resolved.parents:
        raise InstanceError(
            "launch_failed", f"refusing to delete {directory}: the template {template} is inside"
        )
    shutil.rmtree(directory, ignore_errors=True)


def unreachable_directory(path: Path) -> Path | None:
    """The first directory above `path` that other users (qemu) cannot enter, if any."""
    for parent in reversed(Path(path).resolve().parents):
        try:
            mode = parent.stat().st_mode
        except OSError:
            return parent
        if not mode & stat.S_IXOTH:
            return parent
    return None


def read_head(path: Path, count: int) -> bytes:
    """The first `count` bytes of a file, opened read-only."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, count, 0)
    finally:
        os.close(fd)


__all__ = [
    "OVERLAY_NAME",
    "SERIAL_NAME",
    "TEMPLATE_MODE",
    "Instance",
    "InstanceError",
    "InstanceStore",
    "create_overlay",
    "make_vm_dir",
    "nbd_backing",
    "new_vm_id",
    "protect_template",
    "read_head",
    "rebase_overlay",
    "remove_vm_files",
    "unreachable_directory",
]
