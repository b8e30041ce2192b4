"""One storage center feeds one host a template over loopback; libtorrent does it side by side.

Run: python -m bench.loopback [--size 1GiB] [--zero-fraction 0.0] [--repeat 3] [--workdir DIR]
     [--skip-libtorrent] [--tls both|on|off]
vmswarm: real tracker, center and host processes, once over plain TCP (--insecure) and once
with mutual TLS 1.3 (`--tls`, default both), so the cost of TLS shows side by side in one run
as the ratio of the two median MB/s. Two times per fetch, from the fetch reply:
`chunks` until the last chunk was verified (blake3, against the manifest) and written, and
`ready` when, after that, the whole image also hashed to its digest (what a boot waits for).
libtorrent's one time (every piece hash-checked and written) goes in both columns.
MB/s counts the whole image (MB = 10^6 bytes); all-zero chunks never cross the wire, so a
mixed image also gets a wire-rate column. Peak RSS is each daemon's VmHWM; CPU seconds are each
daemon's user + system time during the fetch (a steadier figure than MB/s on a shared machine).
Both tools work on the same filesystem: by default a fresh directory on /dev/shm (tmpfs), so
the figures are of the transfer path, not of this machine's disk; `--workdir` picks another.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from vmswarm.daemon.cluster import LocalCluster
from vmswarm.daemon.demo_cluster import file_digest
from vmswarm.daemon.mixed_image import write_mixed_image
from vmswarm.swarm.manifest import DEFAULT_CHUNK_SIZE

from bench.libtorrent_baseline import parse_size, run_libtorrent_transfer
from bench.report import emit, table

PLAIN_LABEL = "vmswarm (plain TCP, --insecure)"
TLS_LABEL = "vmswarm (mutual TLS 1.3)"
# Which vmswarm runs each --tls choice makes: False is plain TCP, True mutual TLS.
TLS_CHOICES: dict[str, tuple[bool, ...]] = {"both": (False, True), "on": (True,), "off": (False,)}
# Median figures compared between the TLS and the plain run (TLS / plain).
RATIO_COLUMNS = ["chunks_MB/s", "ready_MB/s", "source_cpu_s", "receiver_cpu_s"]

COLUMNS = [
    "tool",
    "size",
    "zero_fraction",
    "run",
    "chunks_s",
    "chunks_MB/s",
    "ready_s",
    "ready_MB/s",
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


def run_vmswarm_transfer(
    image: Path, workdir: Path, *, chunk_size: int, tls: bool = False
) -> dict[str, Any]:
    """Publish `image` to one center, fetch it on one host, and return the figures."""
    with LocalCluster(workdir / "cluster", tls=tls) as cluster:
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
        chunks_seconds = float(fetched["chunks_seconds"])
        if seconds <= 0 or chunks_seconds <= 0:
            raise RuntimeError(f"the host had the template already: {fetched}")
        return {
            "tool": "vmswarm",
            "tls": tls,
            "size": int(fetched["size"]),
            "chunk_size": chunk_size,
            "seconds": seconds,
            "mb_per_s": fetched["size"] / seconds / 1e6,
            "chunks_seconds": chunks_seconds,
            "chunks_mb_per_s": fetched["size"] / chunks_seconds / 1e6,
            "wire_bytes": wire,
            "wire_mb_per_s": wire / chunks_seconds / 1e6,
            "zero_chunks": manifest["zero_chunks"],
            "source_peak_rss_bytes": center.process.peak_rss_bytes(),
            "receiver_peak_rss_bytes": host.process.peak_rss_bytes(),
            "source_cpu_seconds": source_cpu,
            "receiver_cpu_seconds": receiver_cpu,
            "identical": identical,
        }


def _row(figures: dict[str, Any], zero_fraction: float, run: int) -> dict[str, Any]:
    if figures["tool"] == "vmswarm":
        tool = TLS_LABEL if figures.get("tls") else PLAIN_LABEL
    else:
        tool = f"libtorrent {figures['version']}"
    wire = figures.get("wire_mb_per_s", figures.get("payload_bytes", 0) / figures["seconds"] / 1e6)
    source = figures.get("source_peak_rss_bytes", figures.get("seeder_peak_rss_bytes", 0))
    receiver = figures.get("receiver_peak_rss_bytes", figures.get("leecher_peak_rss_bytes", 0))
    return {
        "tool": tool,
        "size": figures["size"],
        "zero_fraction": zero_fraction,
        "run": run,
        "chunks_s": figures.get("chunks_seconds", figures["seconds"]),
        "chunks_MB/s": figures.get("chunks_mb_per_s", figures["mb_per_s"]),
        "ready_s": figures["seconds"],
        "ready_MB/s": figures["mb_per_s"],
        "wire_MB/s": wire,
        "source_peak_rss_MiB": source / (1 << 20),
        "receiver_peak_rss_MiB": receiver / (1 << 20),
        "source_cpu_s": figures.get("source_cpu_seconds", "-"),
        "receiver_cpu_s": figures.get("receiver_cpu_seconds", "-"),
        "identical": figures["identical"],
    }


def run(
    size: int,
    zero_fractions: list[float],
    chunk_size: int,
    *,
    libtorrent: bool,
    workdir: Path,
    repeat: int = 1,
    tls: tuple[bool, ...] = (False,),
) -> list[dict[str, Any]]:
    """Every run of every tool, one row each; each run in a fresh directory under `workdir`.

    `tls` lists the vmswarm runs per repeat (False: plain TCP, True: mutual TLS); they take
    turns within each repeat so a change in the machine's load hits both alike.
    """
    rows: list[dict[str, Any]] = []
    for zero_fraction in zero_fractions:
        image = workdir / f"image-{zero_fraction}.raw"
        write_mixed_image(image, size, zero_fraction=zero_fraction, seed=3)
        try:
            for number in range(1, repeat + 1):
                for secure in tls:
                    rows.append(
                        _vmswarm_row(image, workdir, chunk_size, zero_fraction, number, secure)
                    )
                if libtorrent:
                    rows.append(_libtorrent_row(image, workdir, chunk_size, zero_fraction, number))
        finally:
            image.unlink()
    return rows


def _vmswarm_row(
    image: Path, workdir: Path, chunk_size: int, zero_fraction: float, number: int, tls: bool
) -> dict[str, Any]:
    prefix = f"vmswarm-{'tls' if tls else 'plain'}-{zero_fraction}-"
    run_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    try:
        figures = run_vmswarm_transfer(image, run_dir, chunk_size=chunk_size, tls=tls)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {**_row(figures, zero_fraction, number), "tls": tls, "figures": figures}


def _libtorrent_row(
    image: Path, workdir: Path, chunk_size: int, zero_fraction: float, number: int
) -> dict[str, Any]:
    lt_dir = Path(tempfile.mkdtemp(prefix=f"lt-{zero_fraction}-", dir=workdir))
    try:
        (lt_dir / "seeder").mkdir()
        lt_image = lt_dir / "seeder" / image.name
        shutil.copyfile(image, lt_image)
        lt = run_libtorrent_transfer(lt_image, lt_dir, piece_size=chunk_size)
    finally:
        shutil.rmtree(lt_dir, ignore_errors=True)
    return {**_row(lt, zero_fraction, number), "figures": lt}


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per tool and zero fraction, the median of each figure over the runs."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["tool"], row["zero_fraction"]), []).append(row)
    summary = []
    for (tool, zero_fraction), group in groups.items():
        median: dict[str, Any] = {"tool": tool, "zero_fraction": zero_fraction, "runs": len(group)}
        for column in COLUMNS:
            values = [r[column] for r in group if isinstance(r.get(column), int | float)]
            if column not in ("run", "size", "zero_fraction", "identical") and values:
                median[column] = statistics.median(values)
        median["identical"] = all(r["identical"] for r in group)
        summary.append(median)
    return summary


def tls_cost(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per zero fraction with both vmswarm runs: each RATIO_COLUMNS median, TLS over plain."""
    by_tool = {(m["tool"], m["zero_fraction"]): m for m in summary}
    costs = []
    for (tool, zero_fraction), secure in by_tool.items():
        plain = by_tool.get((PLAIN_LABEL, zero_fraction))
        if tool != TLS_LABEL or plain is None:
            continue
        cost: dict[str, Any] = {"zero_fraction": zero_fraction}
        for column in RATIO_COLUMNS:
            if secure.get(column) is not None and plain.get(column):
                cost[f"{column} tls/plain"] = secure[column] / plain[column]
        costs.append(cost)
    return costs


def default_workdir() -> Path:
    """A fresh directory on tmpfs (/dev/shm) when there is one, else in the temp dir."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="vmswarm-bench-loopback-", dir=parent))


def filesystem_of(path: Path) -> str:
    """The type of the filesystem `path` is on, from /proc/mounts (longest matching mount)."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 3 or len(fields[1]) <= len(best):
            continue
        if resolved == fields[1] or resolved.startswith(fields[1].rstrip("/") + "/"):
            best, kind = fields[1], fields[2]
    return kind


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
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool (default 3)")
    parser.add_argument("--skip-libtorrent", action="store_true")
    parser.add_argument(
        "--tls",
        choices=sorted(TLS_CHOICES),
        default="both",
        help="vmswarm over plain TCP (off), mutual TLS (on) or both side by side (default)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where both tools keep their files (default: tmpfs)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    workdir = args.workdir or default_workdir()
    workdir.mkdir(parents=True, exist_ok=True)
    filesystem = filesystem_of(workdir)
    try:
        rows = run(
            args.size,
            args.zero_fraction or [0.0, 0.5],
            args.chunk_size,
            libtorrent=not args.skip_libtorrent,
            workdir=workdir,
            repeat=args.repeat,
            tls=TLS_CHOICES[args.tls],
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = medians(rows)
    costs = tls_cost(summary)
    emit(
        "loopback_one_center_one_host",
        rows,
        COLUMNS,
        extra={"filesystem": filesystem, "medians": summary, "vmswarm_tls": costs},
    )
    print("\n## medians\n")
    print(
        table(summary, [c for c in ["tool", "zero_fraction", "runs", *COLUMNS[4:]] if c != "run"])
    )
    if costs:
        # Below 1 for MB/s means TLS is slower; above 1 for CPU means TLS costs more CPU.
        print("\n## mutual TLS cost (medians, TLS / plain TCP)\n")
        print(table(costs, ["zero_fraction", *(f"{c} tls/plain" for c in RATIO_COLUMNS)]))


if __name__ == "__main__":
    main()
