"""`python -m tests.fuzz [--target NAME|all] [--runs N | --seconds S]`: fuzz the decoders.

Prints one JSON line and a table (executions per target, findings), and exits 1 if any target
found something: each finding is saved as a reproducer, replayed with `--reproduce FILE`.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from bench.report import emit

from .campaign import Budget, TargetResult, run_target
from .targets import SELF_TEST, TARGETS, load

COLUMNS = ("target", "executions", "seconds", "exec_per_s", "coverage", "corpus", "status")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument(
        "--target",
        default="all",
        choices=["all", *TARGETS, SELF_TEST],
        help="which target to fuzz (default: all)",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--runs", type=int, help="executions per target (default 20000)")
    budget.add_argument("--seconds", type=int, help="seconds per target")
    parser.add_argument(
        "--findings",
        type=Path,
        default=Path("fuzz-findings"),
        help="where reproducers and logs of findings go (default: ./fuzz-findings)",
    )
    parser.add_argument("--corpus", type=Path, help="keep the corpus here between runs")
    parser.add_argument("--timeout", type=int, default=30, help="seconds one input may take")
    parser.add_argument("--rss-limit-mb", type=int, default=2048, help="memory per target")
    parser.add_argument("--seed", type=int, help="libFuzzer's random seed (default: random)")
    parser.add_argument("--reproduce", type=Path, help="run one saved input against --target")
    return parser


def reproduce(target: str, path: Path) -> int:
    """Replay one input in this process, with a traceback if it still fails."""
    if target == "all":
        print("--reproduce needs --target NAME", file=sys.stderr)
        return 2
    data = path.read_bytes()
    try:
        load(target).fuzz_one(data)
    except Exception:  # noqa: BLE001 - any escape is the finding being reproduced
        traceback.print_exc()
        print(f"{target}: {path} still fails", file=sys.stderr)
        return 1
    print(f"{target}: {path} passes")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.reproduce is not None:
        return reproduce(args.target, args.reproduce)
    for value, flag in ((args.runs, "--runs"), (args.seconds, "--seconds")):
        if value is not None and value < 1:
            print(f"{flag} must be at least 1", file=sys.stderr)
            return 2
    budget = Budget(args.runs, args.seconds)
    if budget.runs is None and budget.seconds is None:
        budget = Budget(runs=20_000)
    names = TARGETS if args.target == "all" else (args.target,)
    results: list[TargetResult] = []
    for name in names:
        results.append(
            run_target(
                name,
                budget,
                args.findings.resolve(),
                corpus_dir=args.corpus.resolve() if args.corpus else None,
                timeout=args.timeout,
                rss_limit_mb=args.rss_limit_mb,
                seed=args.seed,
            )
        )
    failed = [r for r in results if not r.ok]
    verdict = "no crashes" if not failed else f"{len(failed)} target(s) failed"
    emit(
        "fuzz",
        [r.row() for r in results],
        COLUMNS,
        extra={
            "total_executions": sum(r.executions for r in results),
            "crashes": sum(len(r.findings) for r in results),
            "verdict": verdict,
        },
    )
    print(f"\n{verdict}; {sum(r.executions for r in results):,} executions in total")
    for result in failed:
        for path in result.findings:
            print(
                f"reproducer: {path}  (python -m tests.fuzz --target {result.target} "
                f"--reproduce {path})"
            )
        if result.log is not None:
            print(f"log: {result.log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
