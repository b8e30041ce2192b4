"""CPU and memory figures from /proc: per process, per set of namespaces, for the whole machine."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int, *, children: bool = True) -> float:
    """User + system CPU seconds of a live process (plus its reaped children's, by default)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    total = utime + stime + (cutime + cstime if children else 0)
    return total / _TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process, in bytes."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE


def pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages split among their users), in bytes: sums add up."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise ProcessLookupError(f"pid {pid} has no Pss line (exited or a kernel thread)")


@dataclass(frozen=True)
class MachineCpu:
    """Cumulative busy and total CPU time of the whole machine (all cores), in ticks."""

    busy: int
    total: int

    @staticmethod
    def now() -> MachineCpu:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
        values = [int(v) for v in first[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return MachineCpu(sum(values[:8]) - idle, sum(values[:8]))

    def busy_fraction_since(self, earlier: MachineCpu) -> float:
        """Share of all cores that was busy between `earlier` and this sample (0..1)."""
        total = self.total - earlier.total
        return 0.0 if total <= 0 else (self.busy - earlier.busy) / total


def netns_inodes(paths: Iterable[Path]) -> set[int]:
    """Inode numbers of network namespaces given by their /run/netns files."""
    inodes = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            inodes.add(path.stat().st_ino)
    return inodes


def pids_in(inodes: set[int]) -> list[int]:
    """Every process whose network namespace is one of `inodes`."""
    return list(namespace_of_pids(inodes))


def namespace_of_pids(inodes: set[int]) -> dict[int, int]:
    """pid → namespace inode, for every process in one of the namespaces `inodes`."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            inode = os.stat(f"/proc/{entry.name}/ns/net").st_ino
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if inode in inodes:
            found[int(entry.name)] = inode
    return found


class MemorySampler:
    """Samples the memory (PSS) of the processes in some namespaces, and of this one, in a thread.

    `peak_bytes` is the highest total seen; `peak_by_node` the highest per namespace.
    """

    def __init__(self, netns_files: Mapping[str, Path], interval: float = 1.0) -> None:
        self._names: dict[int, str] = {}
        for name, path in netns_files.items():
            with contextlib.suppress(FileNotFoundError):
                self._names[path.stat().st_ino] = name
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self.peak_bytes = 0
        self.peak_by_node: dict[str, int] = {}
        self.samples = 0

    def sample(self) -> int:
        by_node: dict[str, int] = {}
        total = 0
        pids = {os.getpid(): 0, **namespace_of_pids(set(self._names))}
        for pid, inode in pids.items():
            try:
                used = pss_bytes(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            total += used
            name = self._names.get(inode, "bench")
            by_node[name] = by_node.get(name, 0) + used
        self.peak_bytes = max(self.peak_bytes, total)
        for name, used in by_node.items():
            self.peak_by_node[name] = max(self.peak_by_node.get(name, 0), used)
        self.samples += 1
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


__all__ = [
    "MachineCpu",
    "MemorySampler",
    "cpu_seconds",
    "namespace_of_pids",
    "netns_inodes",
    "pids_in",
    "pss_bytes",
    "rss_bytes",
]
