"""A short fuzzing run of every target, as part of the test suite (the long one is manual).

`python -m tests.fuzz` runs in a subprocess: each target needs a process of its own, since
libFuzzer exits the process when it is done.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]
# Executions per target: 25-35 CPU-seconds for all four on this 2-core machine.
RUNS = 12_000


def fuzz(*args: str, findings: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", *args, "--findings", str(findings)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = json.loads(proc.stdout.splitlines()[0]) if proc.stdout else {}
    return proc, report


def test_every_target_runs_its_executions_without_a_crash(tmp_path: Path) -> None:
    proc, report = fuzz("--runs", str(RUNS), "--seed", "1", findings=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {row["target"]: row for row in report["results"]}
    assert set(rows) == set(TARGETS)
    for name, row in rows.items():
        assert row["executions"] >= RUNS, (name, row)
        assert row["crashes"] == 0 and row["status"] == "ok", (name, row)
        assert row["coverage"] > 0, (name, row)
    assert report["verdict"] == "no crashes"
    assert "no crashes" in proc.stdout
    assert not list(tmp_path.iterdir())  # no reproducers, no logs


def test_a_finding_is_saved_as_a_reproducer_and_fails_the_command(tmp_path: Path) -> None:
    proc, report = fuzz("--target", "canary", "--runs", "1000", findings=tmp_path)
    assert proc.returncode == 1
    (row,) = report["results"]
    assert row["crashes"] == 1 and row["status"] == "FOUND crash"
    (reproducer,) = tmp_path.glob("canary-crash-*")
    assert reproducer.read_bytes().startswith(b"canary:crash")
    assert str(reproducer) in proc.stdout
    assert (tmp_path / "canary.log").read_text().count("the canary target found its trigger")

    replay = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", "--target", "canary", "--reproduce", str(reproducer)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replay.returncode == 1
    assert "ValueError: the canary target found its trigger" in replay.stderr
