"""The paper's experiment on an emulated cluster: N hosts fetch one template over shaped links.

Run as root from the repo: python -m bench.cluster [--quick] [--hosts 1,2,3,4,6,8,12]
    [--rate 100mbit|1gbit] [--size 256MiB] [--scenarios central,striped-r1,...] [--out DIR]
One bridge in a private namespace, one namespace per tracker, storage center and host, every
center and host link limited with htb in both directions. Each scenario runs for each N with all
hosts starting at one moment; per host the time until its image is complete and verified. Writes
results.json, results.md and figure3.png to --out (and process logs under --out/logs), prints
the figures with bench.report.emit. Everything is torn down at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.libtorrent_baseline import parse_size
from bench.report import emit

from . import report
from .args import DEFAULT_SCRATCH, fresh_scratch, host_counts, link_rate, raise_interrupt
from .fluid import TCP_PAYLOAD_FRACTION
from .netns import Network, rate_bits
from .scenarios import SCENARIOS, RunResult, Settings, Template, node_names, run_scenario

FULL_HOSTS = [1, 2, 3, 4, 6, 8, 12]
QUICK_HOSTS = [1, 2]
FULL_SIZE = "256MiB"
QUICK_SIZE = "16MiB"
DEFAULT_OUT = Path("bench/results/cluster")
# Not /tmp: on many systems a tmpfs, where 12 host images would count as memory.


def _scenario_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}"
        )
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument(
        "--boot",
        action="store_true",
        help="time to a running VM with and without launch --stream instead (first option; "
        "the rest go to python -m bench.boot_stream)",
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE}, N in 1,2")
    parser.add_argument("--hosts", type=host_counts, default=None, help="e.g. 1,2,3,4,6,8,12")
    parser.add_argument(
        "--rate", type=link_rate, default=rate_bits("100mbit"), help="100mbit|1gbit"
    )
    parser.add_argument("--size", type=parse_size, default=None, help="template size, e.g. 256MiB")
    parser.add_argument(
        "--scenarios", type=_scenario_list, default=list(SCENARIOS), help=",".join(SCENARIOS)
    )
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
    return args


def run(args: argparse.Namespace, say: Any = print) -> tuple[list[RunResult], dict[str, Any]]:
    """Run every scenario for every N; write the results and return them with their document."""
    if os.geteuid() != 0:
        raise SystemExit("bench.cluster needs root (network namespaces and tc)")
    out: Path = args.out
    logdir = out / "logs"
    scratch = fresh_scratch(args.workdir, out, say)
    results: list[RunResult] = []
    failures: list[str] = []
    started = time.monotonic()
    meta: dict[str, Any] = {
        "size": args.size,
        "rate": args.rate,
        "rate_payload_bits": args.rate * TCP_PAYLOAD_FRACTION,
        "hosts": args.hosts,
        "scenarios": args.scenarios,
        "quick": args.quick,
        "chunk_size": args.chunk_size,
        "scratch": str(scratch),
        "failures": failures,
    }
    try:
        settings = Settings(
            rate=args.rate, workdir=scratch / "runs", logdir=logdir, chunk_size=args.chunk_size
        )
        say(f"writing a {args.size >> 20} MiB random template")
        template = Template.create(scratch / "template" / "image.raw", args.size)
        with Network(node_names(max(args.hosts))) as net:
            meta["run_id"] = net.run_id
            meta["netns_inodes"] = sorted(
                os.stat(f"/run/netns/{ns}").st_ino for ns in net.namespaces
            )
            say(f"network {net.run_id}: {len(net.nodes)} namespaces, links at {args.rate:,} bit/s")
            for name in args.scenarios:
                for hosts in args.hosts:
                    say(f"{name} with {hosts} hosts")
                    began = time.monotonic()
                    try:
                        result = run_scenario(net, SCENARIOS[name], hosts, template, settings, say)
                    except Exception as exc:  # noqa: BLE001 (one failed run must not void the rest)
                        failures.append(f"{name}-n{hosts}: {exc}")
                        say(f"  FAILED: {exc}")
                        continue
                    results.append(result)
                    row = report.row(result)
                    say(
                        f"  slowest {row['slowest_s']}s mean {row['mean_s']}s "
                        f"(T_min {row['T_min_s']}s, ratio {row['ratio']}), "
                        f"centers sent {row['center_MiB_sent']} MiB, "
                        f"CPU {row['cpu_busy_%']}% busy, identical {row['identical']}; "
                        f"the run took {time.monotonic() - began:.1f}s"
                    )
                    meta["seconds"] = round(time.monotonic() - started, 1)
                    report.write(results, out, meta)
        meta["teardown_clean"] = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        meta["seconds"] = round(time.monotonic() - started, 1)
        paths = report.write(results, out, meta)
    say(f"wrote {', '.join(str(p) for p in paths.values())}")
    return results, report.document(results, meta)


def main(argv: list[str] | None = None) -> None:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["--boot"]:
        # The same cluster, timing VM launches instead of fetches: bench.boot_stream.
        from bench.boot_stream import main as boot_main

        boot_main(given[1:])
        return
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)

    def say(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    results, doc = run(args, say)
    emit("cluster", doc["rows"], report.COLUMNS, {k: v for k, v in doc.items() if k != "rows"})
    sys.stdout.write(f"\n## slowest host (ratio to T_min)\n\n{report.pivot(results)}\n")
    if doc["failures"]:
        say(f"{len(doc['failures'])} runs failed; logs under {args.out / 'logs'}")
        sys.exit(1)


if __name__ == "__main__":
    main()
