"""How fast a manifest is built from an image file, against plain hashing baselines.

    python -m bench.manifest_rate [--size 1GiB] [--dir /tmp] [--repeats 3]

The image mixes random and zero runs (about half each, not chunk-aligned); zero runs are holes.
The page cache is warmed first, so the figures are hashing rates, not disk rates.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import blake3
from vmswarm.daemon.imagefile import manifest_from_file
from vmswarm.swarm.manifest import DEFAULT_CHUNK_SIZE, Manifest, ManifestBuilder

from bench.report import emit

_READ_SIZE = 1 << 24
# cpu_per_wall below ~1.5 on two cores means other processes took CPU time: read MB_per_cpu_s
# (bytes per CPU-second, load-independent) alongside the wall-clock rates then.
_COLUMNS = [
    "method",
    "chunk_size",
    "best_MBps",
    "median_MBps",
    "MB_per_cpu_s",
    "cpu_per_wall",
    "chunks",
    "zeros",
    "zero_MiB",
]


def make_image(path: Path, size: int, seed: int = 1) -> int:
    """Write a sparse image of random and zero runs; return how many bytes are random."""
    rng = random.Random(seed)
    mean_run = max(1, min(8 << 20, size // 16))
    written = 0
    with path.open("wb") as f:
        f.truncate(size)
        pos = 0
        is_data = True
        while pos < size:
            run = min(
                size - pos, rng.randint(mean_run // 2, mean_run * 3 // 2) + rng.randrange(4096)
            )
            if is_data:
                f.seek(pos)
                f.write(rng.randbytes(run))
                written += run
            pos += run
            is_data = not is_data
    return written


def _read_all(path: Path, consume: Callable[[memoryview], object]) -> None:
    view = memoryview(bytearray(_READ_SIZE))
    with path.open("rb", buffering=0) as f:
        while count := f.readinto(view):
            consume(view[:count])


def _hash_file(path: Path, make: Callable[[], Any]) -> None:
    hasher = make()
    _read_all(path, hasher.update)
    hasher.digest()


def _sequential_manifest(path: Path, chunk_size: int) -> Manifest:
    """One thread feeding ManifestBuilder.update (blake3 uses its own threads)."""
    builder = ManifestBuilder(chunk_size)
    _read_all(path, builder.update)
    return builder.finish("bench", "1")


def _time(run: Callable[[], object], size: int, repeats: int) -> tuple[dict[str, float], Any]:
    rates: list[float] = []
    utilisation: list[float] = []
    efficiency: list[float] = []
    result: Any = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rates.append(size / wall / 1e6)
        utilisation.append(cpu / wall)
        efficiency.append(size / max(cpu, 1e-9) / 1e6)
    figures = {
        "best_MBps": max(rates),
        "median_MBps": statistics.median(rates),
        "MB_per_cpu_s": statistics.median(efficiency),
        "cpu_per_wall": statistics.median(utilisation),
    }
    return figures, result


def measure(
    path: Path, chunk_sizes: Sequence[int], repeats: int = 3
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of figures for the image at `path`, and the page-cache warm-up figures."""
    size = path.stat().st_size
    start = time.perf_counter()
    _read_all(path, lambda view: None)  # pull the whole file into the page cache
    warm = {"warmup_read_MBps": size / (time.perf_counter() - start) / 1e6}

    rows: list[dict[str, Any]] = []
    baselines: list[tuple[str, Callable[[], object]]] = [
        ("read only (readinto)", lambda: _read_all(path, lambda view: None)),
        ("blake3 1 thread", lambda: _hash_file(path, blake3.blake3)),
        (
            "blake3 AUTO threads",
            lambda: _hash_file(path, lambda: blake3.blake3(max_threads=blake3.blake3.AUTO)),
        ),
        ("sha256", lambda: _hash_file(path, hashlib.sha256)),
    ]
    for method, run in baselines:
        figures, _ = _time(run, size, repeats)
        rows.append({"method": method, "chunk_size": "", **figures})
    for chunk_size in chunk_sizes:
        for method, build in [
            ("manifest_from_file", lambda cs=chunk_size: manifest_from_file(path, "b", "1", cs)),
            ("builder.update, 1 thread", lambda cs=chunk_size: _sequential_manifest(path, cs)),
        ]:
            figures, manifest = _time(build, size, repeats)
            rows.append(
                {
                    "method": method,
                    "chunk_size": chunk_size,
                    **figures,
                    "chunks": manifest.chunk_count,
                    "zeros": len(manifest.zero_chunks),
                    # Zero bytes the swarm never sends: smaller chunks catch more of them.
                    "zero_MiB": sum(manifest.chunk_range(i)[1] for i in manifest.zero_chunks)
                    / (1 << 20),
                }
            )
    return rows, warm


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([kmg]i?b?)?", text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 1GiB, 256M or 1048576")
    shift = {"k": 10, "m": 20, "g": 30}[match[2][0]] if match[2] else 0
    return int(match[1]) << shift


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.manifest_rate", description=__doc__)
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="image size (1GiB)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--chunk-sizes",
        type=lambda s: [parse_size(x) for x in s.split(",")],
        default=[1 << 20, 2 << 20, 4 << 20],
        help="comma-separated (1M,2M,4M)",
    )
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="manifest-rate-", dir=args.dir))
    try:
        path = workdir / "bench.img"
        random_bytes = make_image(path, args.size)  # zeros are the rest
        rows, warm = measure(path, args.chunk_sizes, args.repeats)
        extra = {
            "image_bytes": args.size,
            "random_fraction": round(random_bytes / max(1, args.size), 3),
            "allocated_bytes": path.stat().st_blocks * 512,
            "default_chunk_size": DEFAULT_CHUNK_SIZE,
            "loadavg_1m": os.getloadavg()[0],
            **warm,
        }
    finally:
        shutil.rmtree(workdir)
    emit("manifest_rate", rows, _COLUMNS, extra)


if __name__ == "__main__":
    main()
