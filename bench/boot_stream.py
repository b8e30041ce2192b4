"""Time to a running VM with and without `vmswarm launch --stream`, on the emulated cluster.

Run as root from the repo: python -m bench.boot_stream [--quick] [--hosts 1,4,8]
    [--rate 100mbit] [--size 512MiB] [--modes fetch,stream] [--prefetch-reps 3] [--out DIR]
Per N: N hosts (3 centers r=2, hosts trade) launch one VM each at one moment from the tiny boot
disk padded to --size with random data; time from the launch to the guest's serial marker.
`fetch` fetches the whole template before the boot, `stream` boots at once over NBD. Then the
prefetch figure: a first streaming boot on a fresh host (no profile), and once its image is
complete and the profile stored, a second one on another fresh host. Writes results.json and
results.md to --out (process logs under --out/logs) and prints them (bench.report.emit).
8 VMs under TCG on 2 cores are CPU-bound: the cpu_busy_% column says so, nothing hides it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.libtorrent_baseline import parse_size
from bench.report import emit, table

from .cluster.args import DEFAULT_SCRATCH, fresh_scratch, host_counts, link_rate, raise_interrupt
from .cluster.boot import BootImage, BootRun, BootSettings, PrefetchRun, run_boot, run_prefetch
from .cluster.netns import (
    Network,
    rate_bits,
)
from .cluster.report import CPU_BOUND
from .cluster.scenarios import node_names

MIB = 1 << 20
FULL_HOSTS = [1, 4, 8]
QUICK_HOSTS = [1, 2]
FULL_SIZE = "512MiB"
QUICK_SIZE = "64MiB"
MODES = ("fetch", "stream")
DEFAULT_OUT = Path("bench/results/boot-stream")
COLUMNS = [
    "mode",
    "N",
    "slowest_s",
    "mean_s",
    "launch_s",
    "held_%",
    "complete_s",
    "link_floor_s",
    "host_cpu_s",
    "vm_cpu_s",
    "center_cpu_s",
    "cpu_busy_%",
]
PREFETCH_COLUMNS = [
    "rep",
    "first_s",
    "second_s",
    "gain_s",
    "gain_%",
    "profile_chunks",
    "first_held_%",
    "second_held_%",
]


def _modes(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(n not in MODES for n in names):
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}, got {text!r}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.boot_stream",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE}, N in 1,2, 1 rep")
    parser.add_argument("--hosts", type=host_counts, default=None, help="e.g. 1,4,8")
    parser.add_argument("--rate", type=link_rate, default=rate_bits("100mbit"), help="e.g. 100mbit")
    parser.add_argument("--size", type=parse_size, default=None, help="template size, e.g. 512MiB")
    parser.add_argument("--modes", type=_modes, default=list(MODES), help="fetch,stream")
    parser.add_argument("--prefetch-reps", type=int, default=None, help="0: skip prefetch")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument(
        "--workdir", type=Path, default=None, help=f"scratch parent [{DEFAULT_SCRATCH}]"
    )
    parser.add_argument("--chunk-size", type=parse_size, default=parse_size("2MiB"))
    args = parser.parse_args(argv)
    if args.hosts is None:
        args.hosts = QUICK_HOSTS if args.quick else FULL_HOSTS
    if args.size is None:
        args.size = parse_size(QUICK_SIZE if args.quick else FULL_SIZE)
    if args.prefetch_reps is None:
        args.prefetch_reps = 1 if args.quick else 3
    return args


def boot_row(run: BootRun) -> dict[str, Any]:
    centers = {n: s for n, s in run.node_cpu.items() if not n.startswith("h")}
    completes = [b.seconds_complete for b in run.boots if b.seconds_complete is not None]
    held = sum(b.held_fraction for b in run.boots) / len(run.boots)
    return {
        "mode": run.mode,
        "N": run.hosts,
        "slowest_s": round(run.slowest, 2),
        "mean_s": round(run.mean, 2),
        "launch_s": round(max(b.seconds_launch for b in run.boots), 2),
        "held_%": round(100 * held, 1),
        "complete_s": round(max(completes), 2) if completes else "-",
        "link_floor_s": round(run.fetch_bound, 2),
        "host_cpu_s": round(sum(b.daemon_cpu_to_marker for b in run.boots), 2),
        "vm_cpu_s": round(sum(b.vm_cpu_to_marker for b in run.boots), 2),
        "center_cpu_s": round(sum(centers.values()), 2),
        "cpu_busy_%": round(100 * run.cpu_busy, 1),
    }


def prefetch_row(run: PrefetchRun) -> dict[str, Any]:
    return {
        "rep": run.rep,
        "first_s": round(run.first.seconds_marker, 2),
        "second_s": round(run.second.seconds_marker, 2),
        "gain_s": round(run.gain, 2),
        "gain_%": round(100 * run.gain / run.first.seconds_marker, 1),
        "profile_chunks": run.profile_chunks,
        "first_held_%": round(100 * run.first.held_fraction, 1),
        "second_held_%": round(100 * run.second.held_fraction, 1),
    }


def pivot(runs: Sequence[BootRun]) -> str:
    """Slowest host's launch → marker per N, fetch-first against streaming."""
    by_key: dict[tuple[str, int], BootRun] = {(r.mode, r.hosts): r for r in runs}
    rows = []
    for n in sorted({r.hosts for r in runs}):
        cells: dict[str, Any] = {"N": n}
        for mode in MODES:
            run = by_key.get((mode, n))
            busy = " cpu" if run is not None and run.cpu_busy >= CPU_BOUND else ""
            cells[mode] = "-" if run is None else f"{run.slowest:.1f}{busy}"
        fetch, stream = by_key.get(("fetch", n)), by_key.get(("stream", n))
        cells["speed-up"] = (
            f"{fetch.slowest / stream.slowest:.2f}x" if fetch is not None and stream else "-"
        )
        rows.append(cells)
    return table(rows, ["N", *MODES, "speed-up"])


def document(
    runs: Sequence[BootRun], prefetch: Sequence[PrefetchRun], meta: Mapping[str, Any]
) -> dict[str, Any]:
    gains = [p.gain for p in prefetch]
    return {
        **meta,
        "runs": [dataclasses.asdict(r) for r in runs],
        "rows": [boot_row(r) for r in runs],
        "prefetch": [dataclasses.asdict(p) for p in prefetch],
        "prefetch_rows": [prefetch_row(p) for p in prefetch],
        "prefetch_mean_gain_s": round(sum(gains) / len(gains), 3) if gains else None,
        "cpu_bound_runs": [f"{r.mode}-n{r.hosts}" for r in runs if r.cpu_busy >= CPU_BOUND],
    }


def markdown(doc: Mapping[str, Any]) -> str:
    size = doc.get("size", 0) / MIB
    rate = doc.get("rate", 0) / 1e6
    lines = [
        f"# Time to a running VM: {size:g} MiB template, {rate:g} Mbit/s links",
        "",
        "Slowest host, seconds from the launch to the guest's serial marker; `cpu`: the "
        f"machine's CPU was >= {CPU_BOUND:.0%} busy until the last marker.",
        "",
        doc["pivot"],
        "",
        "## Every run",
        "",
        "`held_%`: chunks the host held when the marker appeared; `complete_s`: the slowest "
        "host's image complete; `link_floor_s`: one link's time for the whole template; CPU "
        "seconds from the launch to the marker (`host` the daemons, `vm` the qemu processes).",
        "",
        table(doc["rows"], COLUMNS),
        "",
    ]
    if doc["prefetch_rows"]:
        lines += [
            "## Prefetch: a fresh host's streaming boot, without and with the boot profile",
            "",
            table(doc["prefetch_rows"], PREFETCH_COLUMNS),
            "",
            f"Mean gain: {doc['prefetch_mean_gain_s']} s.",
            "",
        ]
    lines += [f"- FAILED {failure}" for failure in doc.get("failures", [])]
    return "\n".join(lines)


def write(
    runs: Sequence[BootRun], prefetch: Sequence[PrefetchRun], out: Path, meta: Mapping[str, Any]
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    doc = document(runs, prefetch, meta)
    doc["pivot"] = pivot(runs)
    (out / "results.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    (out / "results.md").write_text(markdown(doc))
    return doc


def run(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Every mode for every N, then the prefetch reps; the results document."""
    if os.geteuid() != 0:
        raise SystemExit("bench.boot_stream needs root (network namespaces, tc, libvirtd)")
    out: Path = args.out
    logdir = out / "logs"
    scratch = fresh_scratch(args.workdir, out, say)
    # qemu (libvirt-qemu) must reach the hosts' templates and overlays under it.
    scratch.chmod(0o755)
    runs: list[BootRun] = []
    prefetch: list[PrefetchRun] = []
    failures: list[str] = []
    started = time.monotonic()
    meta: dict[str, Any] = {
        "size": args.size,
        "rate": args.rate,
        "hosts": args.hosts,
        "modes": args.modes,
        "prefetch_reps": args.prefetch_reps,
        "quick": args.quick,
        "chunk_size": args.chunk_size,
        "flavor": "tiny",
        "cpus": os.cpu_count(),
        # Other work on the machine skews TCG boots; the load says whether there was any.
        "loadavg_at_start": os.getloadavg(),
        "scratch": str(scratch),
        "failures": failures,
    }
    settings = BootSettings(
        rate=args.rate, workdir=scratch / "runs", logdir=logdir, chunk_size=args.chunk_size
    )
    try:
        marker = f"VMSWARM-BOOTBENCH-{uuid.uuid4().hex[:8]}"
        say(f"building the boot disk, padded to {args.size >> 20} MiB")
        image = BootImage.create(scratch / "template", args.size, marker)
        hosts_needed = max([*args.hosts, 2 if args.prefetch_reps else 1])
        with Network(node_names(hosts_needed)) as net:
            meta["run_id"] = net.run_id
            say(f"network {net.run_id}: {len(net.nodes)} namespaces, links at {args.rate:,} bit/s")
            for hosts in args.hosts:
                for mode in args.modes:
                    say(f"{mode} with {hosts} hosts")
                    try:
                        result = run_boot(net, image, hosts, mode, settings, say)
                    except Exception as exc:  # noqa: BLE001 (one failed run must not void the rest)
                        failures.append(f"{mode}-n{hosts}: {exc}")
                        say(f"  FAILED: {exc}")
                        continue
                    runs.append(result)
                    row = boot_row(result)
                    say(
                        f"  slowest {row['slowest_s']}s mean {row['mean_s']}s, held "
                        f"{row['held_%']}% at the marker, complete {row['complete_s']}s, "
                        f"CPU {row['cpu_busy_%']}% busy"
                    )
                    write(runs, prefetch, out, meta)
            for rep in range(1, args.prefetch_reps + 1):
                say(f"prefetch rep {rep}")
                try:
                    measured = run_prefetch(net, image, rep, settings, say)
                except Exception as exc:  # noqa: BLE001
                    failures.append(f"prefetch-{rep}: {exc}")
                    say(f"  FAILED: {exc}")
                    continue
                prefetch.append(measured)
                say(
                    f"  first {measured.first.seconds_marker:.2f}s, second "
                    f"{measured.second.seconds_marker:.2f}s, gain {measured.gain:.2f}s"
                )
                write(runs, prefetch, out, meta)
        meta["teardown_clean"] = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        meta["seconds"] = round(time.monotonic() - started, 1)
        doc = write(runs, prefetch, out, meta)
    say(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return doc


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)

    def say(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    doc = run(args, say)
    extra = {k: v for k, v in doc.items() if k not in ("rows", "runs", "pivot")}
    emit("boot_stream", doc["rows"], COLUMNS, extra)
    sys.stdout.write(f"\n## slowest host, launch -> marker (s)\n\n{doc['pivot']}\n")
    if doc["prefetch_rows"]:
        sys.stdout.write(f"\n## prefetch\n\n{table(doc['prefetch_rows'], PREFETCH_COLUMNS)}\n")
    if doc["failures"]:
        say(f"{len(doc['failures'])} runs failed; logs under {args.out / 'logs'}")
        sys.exit(1)


if __name__ == "__main__":
    main()
