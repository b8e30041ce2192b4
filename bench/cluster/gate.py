"""Start a command at a common moment and record when it ended and what CPU it used.

Run: python -m bench.cluster.gate --ready FILE --go FILE --result FILE -- COMMAND [ARGS...]
Writes FILE `--ready` once polling, waits until `--go` exists, runs the command, and writes a JSON
`--result`: exit code, monotonic start and end (CLOCK_MONOTONIC is shared by all processes), and
the command's user and system CPU seconds from wait4. Exits with the command's exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vmswarm.daemon.cluster import die_with_parent

_POLL = 0.002


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--go", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    die_with_parent()
    args.ready.write_text(str(os.getpid()))
    while not args.go.exists():
        time.sleep(_POLL)
    started = time.monotonic()
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    ended = time.monotonic()
    code = os.waitstatus_to_exitcode(status)
    child.returncode = code  # reaped by wait4 above; keep Popen from waiting again
    partial = args.result.with_name(args.result.name + ".partial")
    partial.write_text(
        json.dumps(
            {
                "returncode": code,
                "started": started,
                "ended": ended,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "peak_rss_bytes": usage.ru_maxrss * 1024,
            }
        )
    )
    os.replace(partial, args.result)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
