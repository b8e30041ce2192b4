"""One storage center feeds one host a template over loopback; libtorrent does it side by side.

Run: python -m bench.loopback [--size 1GiB] [--zero-fraction 0.0] [--skip-libtorrent]
vmswarm: real tracker, center and host processes; timed is the host's fetch (every chunk
verified and written, then the whole image verified), as the fetch reply reports it.
MB/s counts the whole image (MB = 10^6 bytes); all-zero chunks never cross the wire, so a
mixed image also gets a wire-rate column. Peak RSS is each daemon's VmHWM; CPU seconds are each
daemon's user + system time during the fetch (a steadier figure than MB/s on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vmswarm.daemon.cluster import LocalCluster
from vmswarm.daemon.demo_cluster import file_digest
from vmswarm.daemon.mixed_image import write_mixed_image
from vmswarm.swarm.manifest import DEFAULT_CHUNK_SIZE

from bench.libtorrent_baseline import parse_size, run_libtorrent_transfer
from bench.report import emit

COLUMNS = [
    "tool",
    "size",
    "zero_fraction",
    "seconds",
    "MB/s",
    "wire_MB/s",
    "source_peak_rss_MiB",
    "receiver_peak_rss_MiB",
    "source_cpu_s",
    "receiver_cpu_s",
    "identical",
]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_vmswarm_transfer(image: Path, workdir: Path, *, chunk_size: int) -> dict[str, Any]:
    """Publish `image` to one center, fetch it on one host, and return the figures."""
    with LocalCluster(workdir / "cluster") as cluster:
        cluster.start_tracker()
        center = cluster.start_center("center1")
        cluster.run_cli(
            "publish",
            str(image),
            "--name",
            "bench",
            "--version",
            "1",
            "--replicas",
            "1",
            "--chunk-size",
            str(chunk_size),
            "--json",
            timeout=900,
        )
        host = cluster.start_host("host1")
        cpu_before = cpu_seconds(center.process.pid), cpu_seconds(host.process.pid)
        fetched = json.loads(
            cluster.run_cli("fetch", "bench:1", "--json", node=host, timeout=900).stdout
        )
        # CPU, unlike wall time, hardly moves when other work shares the machine.
        source_cpu = cpu_seconds(center.process.pid) - cpu_before[0]
        receiver_cpu = cpu_seconds(host.process.pid) - cpu_before[1]
        manifest = json.loads(
            cluster.run_cli(
                "manifest", str(image), "--json", "--chunk-size", str(chunk_size)
            ).stdout
        )
        identical = file_digest(Path(fetched["path"])) == file_digest(image)
        wire = int(fetched["bytes_from_centers"]) + int(fetched["bytes_from_peers"])
        seconds = float(fetched["seconds"])
        return {
            "tool": "vmswarm",
            "size": int(fetched["size"]),
            "chunk_size": chunk_size,
            "seconds": seconds,
            "mb_per_s": fetched["size"] / seconds / 1e6,
            "wire_bytes": wire,
            "wire_mb_per_s": wire / seconds / 1e6,
            "zero_chunks": manifest["zero_chunks"],
            "source_peak_rss_bytes": center.process.peak_rss_bytes(),
            "receiver_peak_rss_bytes": host.process.peak_rss_bytes(),
            "source_cpu_seconds": source_cpu,
            "receiver_cpu_seconds": receiver_cpu,
            "identical": identical,
        }


def _row(figures: dict[str, Any], zero_fraction: float) -> dict[str, Any]:
    tool = figures["tool"] if figures["tool"] == "vmswarm" else f"libtorrent {figures['version']}"
    wire = figures.get("wire_mb_per_s", figures.get("payload_bytes", 0) / figures["seconds"] / 1e6)
    source = figures.get("source_peak_rss_bytes", figures.get("seeder_peak_rss_bytes", 0))
    receiver = figures.get("receiver_peak_rss_bytes", figures.get("leecher_peak_rss_bytes", 0))
    return {
        "tool": tool,
        "size": figures["size"],
        "zero_fraction": zero_fraction,
        "seconds": figures["seconds"],
        "MB/s": figures["mb_per_s"],
        "wire_MB/s": wire,
        "source_peak_rss_MiB": source / (1 << 20),
        "receiver_peak_rss_MiB": receiver / (1 << 20),
        "source_cpu_s": figures.get("source_cpu_seconds", "-"),
        "receiver_cpu_s": figures.get("receiver_cpu_seconds", "-"),
        "identical": figures["identical"],
    }


def run(
    size: int, zero_fractions: list[float], chunk_size: int, *, libtorrent: bool, workdir: Path
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for zero_fraction in zero_fractions:
        image = workdir / f"image-{zero_fraction}.raw"
        write_mixed_image(image, size, zero_fraction=zero_fraction, seed=3)
        figures = run_vmswarm_transfer(
            image, workdir / f"vmswarm-{zero_fraction}", chunk_size=chunk_size
        )
        rows.append({**_row(figures, zero_fraction), "figures": figures})
        if libtorrent:
            lt_dir = workdir / f"lt-{zero_fraction}"
            (lt_dir / "seeder").mkdir(parents=True)
            lt_image = lt_dir / "seeder" / image.name
            shutil.copyfile(image, lt_image)
            lt = run_libtorrent_transfer(lt_image, lt_dir, piece_size=chunk_size)
            rows.append({**_row(lt, zero_fraction), "figures": lt})
        image.unlink()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument(
        "--zero-fraction",
        type=float,
        action="append",
        help="share of the image that is zero regions (repeatable; default 0.0 and 0.5)",
    )
    parser.add_argument("--skip-libtorrent", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="kept if given")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmswarm-bench-loopback-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rows = run(
            args.size,
            args.zero_fraction or [0.0, 0.5],
            args.chunk_size,
            libtorrent=not args.skip_libtorrent,
            workdir=workdir,
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    emit("loopback_one_center_one_host", rows, COLUMNS)


if __name__ == "__main__":
    main()
