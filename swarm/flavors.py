"""Flavors: the named VM sizes (vCPUs, memory, disk) a launch picks from, and their parsing.

A flavor's `vcpus` and `memory` are what a VM gets at boot and what capacity accounting counts;
`max_vcpus` and `max_memory` are the ceilings a live resize may reach (libvirt's maximums).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

# Flavor names end up in domain names and on command lines: keep them plain.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": KIB,
    "kb": KIB,
    "kib": KIB,
    "m": MIB,
    "mb": MIB,
    "mib": MIB,
    "g": GIB,
    "gb": GIB,
    "gib": GIB,
    "t": TIB,
    "tb": TIB,
    "tib": TIB,
}
# Below this a guest cannot hold even a tiny kernel and initramfs.
MIN_MEMORY = 16 * MIB
MAX_VCPUS = 4096
_KEYS = frozenset({"vcpus", "memory", "disk", "max_vcpus", "max_memory"})


class FlavorError(ValueError):
    """A flavor definition or a size is invalid; the message says which and why."""


def parse_size(value: object, what: str = "size") -> int:
    """Bytes from an int or a text like "512MiB", "2G", "1.5GiB" (binary units; K, M, G, T)."""
    if type(value) is int:
        if value < 0:
            raise FlavorError(f"{what} must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise FlavorError(f"{what} must be a number of bytes or a text like '512MiB'")
    match = _SIZE_PATTERN.match(value)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise FlavorError(f"{what} {value!r} is not a size like 512MiB, 2GiB or 1073741824")
    return int(float(match.group(1)) * unit)


def format_size(count: int) -> str:
    """The shortest exact binary-unit text for a byte count ("512MiB", "1GiB", "1000")."""
    for unit, factor in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if count and count % factor == 0:
            return f"{count // factor}{unit}"
    return str(count)


@dataclass(frozen=True)
class Flavor:
    """A named VM size. Memory and disk in bytes."""

    name: str
    vcpus: int
    memory: int
    disk: int
    max_vcpus: int = 0  # 0: the same as vcpus (no live growth)
    max_memory: int = 0  # 0: the same as memory

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_PATTERN.match(self.name):
            raise FlavorError(
                f"flavor name {self.name!r:.70} must be 1-63 letters, digits, '.', '_' or '-'"
            )
        where = f"flavor {self.name!r}"
        for key in ("vcpus", "memory", "disk", "max_vcpus", "max_memory"):
            if type(getattr(self, key)) is not int:
                raise FlavorError(f"{where}: {key} must be an integer")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise FlavorError(f"{where}: vcpus must be in 1..{MAX_VCPUS}, got {self.vcpus}")
        if self.memory < MIN_MEMORY:
            raise FlavorError(
                f"{where}: memory must be at least {format_size(MIN_MEMORY)}, got {self.memory}"
            )
        if self.disk < 0:
            raise FlavorError(f"{where}: disk must not be negative, got {self.disk}")
        if self.max_vcpus == 0:
            object.__setattr__(self, "max_vcpus", self.vcpus)
        if self.max_memory == 0:
            object.__setattr__(self, "max_memory", self.memory)
        if not self.vcpus <= self.max_vcpus <= MAX_VCPUS:
            raise FlavorError(
                f"{where}: max_vcpus must be in {self.vcpus}..{MAX_VCPUS}, got {self.max_vcpus}"
            )
        if self.max_memory < self.memory:
            raise FlavorError(
                f"{where}: max_memory ({self.max_memory}) is below memory ({self.memory})"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vcpus": self.vcpus,
            "memory": self.memory,
            "disk": self.disk,
            "max_vcpus": self.max_vcpus,
            "max_memory": self.max_memory,
        }


# Built-ins: room to double vCPUs and memory live; "tiny" is enough for a small Linux under TCG.
DEFAULT_FLAVORS: tuple[Flavor, ...] = (
    Flavor("tiny", vcpus=1, memory=128 * MIB, disk=1 * GIB, max_vcpus=2, max_memory=256 * MIB),
    Flavor("small", vcpus=1, memory=512 * MIB, disk=10 * GIB, max_vcpus=2, max_memory=1 * GIB),
    Flavor("medium", vcpus=2, memory=2 * GIB, disk=20 * GIB, max_vcpus=4, max_memory=4 * GIB),
)


def default_flavors() -> dict[str, Flavor]:
    """The built-in flavors by name."""
    return {flavor.name: flavor for flavor in DEFAULT_FLAVORS}


def flavor_from_dict(name: str, data: Mapping[str, Any]) -> Flavor:
    """One flavor from its table: vcpus, memory, disk (sizes as bytes or "512MiB"), maximums."""
    if not isinstance(data, Mapping):
        raise FlavorError(f"flavor {name!r} must be a table of vcpus, memory and disk")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise FlavorError(f"flavor {name!r}: unknown keys {unknown}; allowed are {sorted(_KEYS)}")
    missing = [key for key in ("vcpus", "memory", "disk") if key not in data]
    if missing:
        raise FlavorError(f"flavor {name!r} lacks {', '.join(missing)}")
    where = f"flavor {name!r}"
    vcpus = data["vcpus"]
    max_vcpus = data.get("max_vcpus", 0)
    for key, count in (("vcpus", vcpus), ("max_vcpus", max_vcpus)):
        if type(count) is not int:
            raise FlavorError(f"{where}: {key} must be an integer, got {count!r:.40}")
    return Flavor(
        name=name,
        vcpus=vcpus,
        memory=parse_size(data["memory"], f"{where} memory"),
        disk=parse_size(data["disk"], f"{where} disk"),
        max_vcpus=max_vcpus,
        max_memory=parse_size(data.get("max_memory", 0), f"{where} max_memory"),
    )


def flavors_from_dict(data: Mapping[str, Any]) -> dict[str, Flavor]:
    """Flavors from a config's `flavors` table ({name: {...}}); they replace the built-ins."""
    table = data.get("flavors")
    if not isinstance(table, Mapping) or not table:
        raise FlavorError("the config needs a non-empty [flavors] table, e.g. [flavors.tiny]")
    return {name: flavor_from_dict(str(name), spec) for name, spec in table.items()}


def flavor_from_wire(data: Mapping[str, Any]) -> Flavor:
    """The inverse of `Flavor.as_dict` (a flavor sent over RPC)."""
    if not isinstance(data, Mapping) or type(data.get("name")) is not str:
        raise FlavorError("a flavor on the wire is a map with a name")
    rest = {key: value for key, value in data.items() if key != "name"}
    return flavor_from_dict(data["name"], rest)


def flavor_list(flavors: Mapping[str, Flavor]) -> list[dict[str, Any]]:
    """Flavors as plain dicts, smallest first (for RPC replies and `vmswarm flavors --json`)."""
    ordered = sorted(flavors.values(), key=lambda f: (f.vcpus, f.memory, f.disk, f.name))
    return [flavor.as_dict() for flavor in ordered]


__all__ = [
    "DEFAULT_FLAVORS",
    "GIB",
    "KIB",
    "MIB",
    "Flavor",
    "FlavorError",
    "default_flavors",
    "flavor_from_dict",
    "flavor_from_wire",
    "flavor_list",
    "flavors_from_dict",
    "format_size",
    "parse_size",
]
