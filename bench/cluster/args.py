"""Argument types the cluster benchmarks share (bench.cluster, bench.boot_stream)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from .netns import cleanup_stale, cleanup_stale_scratch, rate_bits, scratch_prefix


def host_counts(text: str) -> list[int]:
    """'1,4,8' -> [1, 4, 8]: distinct host counts, each at least 1, ascending."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,4,8, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"host counts must be >= 1, got {text!r}")
    return values


def link_rate(text: str) -> int:
    """A link rate like 100mbit or 1gbit, in bits per second."""
    try:
        return rate_bits(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


DEFAULT_SCRATCH = Path("/var/tmp")


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP take the same path as Ctrl-C, so every `finally` tears down.
    raise KeyboardInterrupt(f"got signal {signum}")


def fresh_scratch(workdir: Path | None, out: Path, say: Callable[[str], object]) -> Path:
    """Clear what a killed run left (namespaces, scratch, old logs); a new scratch folder."""
    base = Path(workdir or DEFAULT_SCRATCH)
    removed = cleanup_stale()
    if removed:
        say(f"removed {len(removed)} namespaces left by a killed run")
    for path in cleanup_stale_scratch(base):
        say(f"removed {path}, left by a killed run")
    shutil.rmtree(out / "logs", ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=scratch_prefix(), dir=base))
