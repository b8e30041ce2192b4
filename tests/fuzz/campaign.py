"""Run fuzz targets, each in its own libFuzzer process, and collect executions and findings."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# libFuzzer names what it saves after the kind of failure; each kind is a finding.
FINDING_KINDS = ("crash", "timeout", "oom", "leak")
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)\s*$", re.MULTILINE)
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", re.MULTILINE)
_DONE = re.compile(r"^Done (\d+) runs", re.MULTILINE)


@dataclass(frozen=True)
class Budget:
    """How long each target runs: a number of executions, or seconds, or both (first wins)."""

    runs: int | None = None
    seconds: int | None = None

    def flags(self) -> list[str]:
        flags = []
        if self.runs is not None:
            flags.append(f"-runs={self.runs}")
        if self.seconds is not None:
            flags.append(f"-max_total_time={self.seconds}")
        return flags


@dataclass(frozen=True)
class TargetResult:
    target: str
    executions: int
    seconds: float
    coverage: int
    features: int
    corpus: int
    peak_rss_mb: int
    findings: tuple[Path, ...]
    returncode: int
    log: Path | None

    @property
    def ok(self) -> bool:
        return not self.findings and self.returncode == 0

    def row(self) -> dict[str, Any]:
        rate = self.executions / self.seconds if self.seconds > 0 else 0.0
        return {
            "target": self.target,
            "executions": self.executions,
            "seconds": round(self.seconds, 1),
            "exec_per_s": round(rate),
            "coverage": self.coverage,
            "features": self.features,
            "corpus": self.corpus,
            "peak_rss_mb": self.peak_rss_mb,
            "crashes": len(self.findings),
            "status": "ok" if self.ok else _failure(self),
            "reproducers": [str(p) for p in self.findings],
        }


def _failure(result: TargetResult) -> str:
    if result.findings:
        kinds = sorted({p.name.split("-")[1] for p in result.findings})
        return "FOUND " + ",".join(kinds)
    return f"worker exited {result.returncode}"


def parse_stats(log: str) -> dict[str, int]:
    """Executions, coverage and corpus size from libFuzzer's output."""
    stats = {key: int(value) for key, value in _STAT.findall(log)}
    statuses = _STATUS.findall(log)
    done = _DONE.findall(log)
    executions = stats.get("number_of_executed_units")
    if executions is None:
        executions = int(done[-1]) if done else int(statuses[-1][0]) if statuses else 0
    last = statuses[-1] if statuses else ("0", "0", "0", "0")
    return {
        "executions": executions,
        "coverage": int(last[1]),
        "features": int(last[2]),
        "corpus": int(last[3]),
        "peak_rss_mb": stats.get("peak_rss_mb", 0),
    }


def run_target(
    name: str,
    budget: Budget,
    findings_dir: Path,
    *,
    corpus_dir: Path | None = None,
    timeout: int = 30,
    rss_limit_mb: int = 2048,
    seed: int | None = None,
) -> TargetResult:
    """Fuzz one target in a child process; findings are saved as `<dir>/<target>-<kind>-<sha1>`."""
    findings_dir.mkdir(parents=True, exist_ok=True)
    before = set(_findings(findings_dir, name))
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as scratch:
        corpus = (corpus_dir or Path(scratch)) / name
        command = [
            sys.executable,
            "-m",
            "tests.fuzz.worker",
            name,
            str(corpus),
            *budget.flags(),
            f"-artifact_prefix={findings_dir}/{name}-",
            f"-timeout={timeout}",
            f"-rss_limit_mb={rss_limit_mb}",
            "-print_final_stats=1",
            *([f"-seed={seed}"] if seed is not None else []),
        ]
        started = time.monotonic()
        proc = subprocess.run(
            command,
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
        elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    stats = parse_stats(output)
    found = tuple(sorted(set(_findings(findings_dir, name)) - before))
    log = None
    if found or proc.returncode != 0:
        log = findings_dir / f"{name}.log"
        log.write_text(output)
    return TargetResult(
        target=name,
        executions=stats["executions"],
        seconds=elapsed,
        coverage=stats["coverage"],
        features=stats["features"],
        corpus=stats["corpus"],
        peak_rss_mb=stats["peak_rss_mb"],
        findings=found,
        returncode=proc.returncode,
        log=log,
    )


def _findings(directory: Path, name: str) -> list[Path]:
    return [p for kind in FINDING_KINDS for p in directory.glob(f"{name}-{kind}-*")]
