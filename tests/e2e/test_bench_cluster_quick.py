"""`python -m bench.cluster --quick` with 2 hosts: images byte-identical, nothing left behind.

Needs root (network namespaces, tc). Asserts correctness and clean teardown only, never timing:
after a normal run, after Ctrl-C mid-run, and after a SIGKILL mid-run followed by
`cleanup_stale()`. Skipped without root or the tools, except under CI, where it must run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.cluster import report
from bench.cluster.netns import cleanup_stale, cleanup_stale_scratch, list_namespaces
from bench.cluster.procstat import pids_in
from bench.cluster.scenarios import SCENARIOS, HostFigure, NodeFigure, RunResult

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 170.0
SIZE = "8MiB"


def _problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces and tc"
    for tool in ("ip", "tc", "aria2c", "lighttpd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    for module in ("libtorrent", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            return f"python module {module} is not installed"
    return None


@pytest.fixture
def cluster_tools() -> None:
    reason = _problem()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the cluster benchmark, but {reason}")
        pytest.skip(reason)


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            cmdline = _cmdline(int(entry.name))
            if cmdline is not None and text in cmdline:
                found.append(int(entry.name))
    return found


def _snapshot(namespaces: list[str]) -> dict[int, str]:
    """pid → command line of every process in `namespaces` right now."""
    pids = pids_in(_inodes(namespaces))
    return {pid: cmd for pid in pids if (cmd := _cmdline(pid)) is not None}


def _survivors(snapshot: dict[int, str]) -> list[int]:
    # A pid counts only if it still runs the same command (pids may be reused meanwhile).
    return [pid for pid, cmd in snapshot.items() if _cmdline(pid) == cmd]


def _bench(out: Path, *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "bench.cluster", "--quick", "--hosts", "2", "--size", SIZE]
    return subprocess.Popen(
        [*argv, "--out", str(out), *extra],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ours(pid: int) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(f"vmsb{pid}x")]


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def _inodes(namespaces: list[str]) -> set[int]:
    found = set()
    for ns in namespaces:
        try:
            found.add(os.stat(f"/run/netns/{ns}").st_ino)
        except FileNotFoundError:
            continue
    return found


def _started_daemons(pid: int) -> bool:
    """Has the run under `pid` started processes inside its host namespaces?"""
    hosts = [ns for ns in _ours(pid) if ns.endswith(("-h1", "-h2"))]
    return len(hosts) == 2 and bool(pids_in(_inodes(hosts)))


def test_quick_run_gives_identical_images_and_leaves_nothing(
    cluster_tools: None, tmp_path: Path
) -> None:
    links_before = _root_links()
    out = tmp_path / "out"
    bench = _bench(out)
    try:
        stdout, stderr = bench.communicate(timeout=RUN_TIMEOUT)
    finally:
        bench.kill()
    assert bench.returncode == 0, f"bench.cluster failed:\n{stderr[-4000:]}"
    doc = json.loads((out / "results.json").read_text())
    runs = {run["scenario"]: run for run in doc["runs"]}
    assert set(runs) == set(SCENARIOS)
    for name, run in runs.items():
        assert run["hosts"] == 2
        assert [h["identical"] for h in run["host_figures"]] == [True, True], name
        assert all(h["seconds"] > 0 for h in run["host_figures"]), name
        if SCENARIOS[name].engine == "vmswarm" and not SCENARIOS[name].peers:
            # Peers off: every byte came from the storage centers.
            assert [h["bytes_from_peers"] for h in run["host_figures"]] == [0, 0], name
    assert doc["teardown_clean"] is True
    assert json.loads(stdout.splitlines()[0])["benchmark"] == "cluster"
    assert (out / "figure3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| N |" in (out / "results.md").read_text()
    # Nothing left: no namespace of the run, no process of it, none of its links in the root
    # namespace (other software may add links there meanwhile, so only ours are checked).
    assert [ns for ns in list_namespaces() if ns.startswith(doc["run_id"])] == []
    assert _processes_mentioning(doc["scratch"]) == []
    assert not Path(doc["scratch"]).exists()
    ours = {"br0", "eth0"} | {f"v{node}" for node in ("tracker", "c1", "c2", "c3", "h1", "h2")}
    assert (_root_links() - links_before) & ours == set()


def test_ctrl_c_mid_run_tears_everything_down(cluster_tools: None, tmp_path: Path) -> None:
    bench = _bench(tmp_path / "out", "--scenarios", "swarm")
    try:
        _, running = _running_snapshot(bench)
        bench.send_signal(signal.SIGINT)
        bench.wait(timeout=60)
    finally:
        bench.kill()
        bench.wait()
    assert running, "the run had no processes in its namespaces"
    assert _ours(bench.pid) == []
    assert _survivors(running) == []


def _running_snapshot(bench: subprocess.Popen[str]) -> tuple[list[str], dict[int, str]]:
    """Our namespaces and their processes, taken together once the hosts run (a check and a
    later snapshot could straddle a fast run's teardown); empty if the run ended first."""
    taken: list[tuple[list[str], dict[int, str]]] = []

    def hosts_up() -> bool:
        if _started_daemons(bench.pid):
            namespaces = _ours(bench.pid)
            running = _snapshot(namespaces)
            if running:
                taken.append((namespaces, running))
                return True
        return bench.poll() is not None

    _wait_for(hosts_up, "hosts up")
    return taken[0] if taken else ([], {})


def test_cleanup_stale_removes_a_killed_runs_leftovers(cluster_tools: None, tmp_path: Path) -> None:
    bench = _bench(tmp_path / "out", "--scenarios", "swarm")
    try:
        namespaces, running = _running_snapshot(bench)
        bench.kill()
    finally:
        bench.kill()
        _, stderr = bench.communicate()
    assert namespaces and running, f"the run never started its processes:\n{stderr[-2000:]}"
    removed = cleanup_stale()
    assert set(namespaces) <= set(removed)
    assert _ours(bench.pid) == []
    assert _survivors(running) == []
    scratch = [p for p in cleanup_stale_scratch(Path("/var/tmp")) if f"-{bench.pid}-" in p.name]
    assert len(scratch) == 1 and not scratch[0].exists()


def _fake_run(scenario: str, hosts: int, seconds: float) -> RunResult:
    return RunResult(
        scenario=scenario,
        hosts=hosts,
        size=1 << 20,
        rate=100_000_000,
        t_min=0.1,
        t_min_scenario=0.1 * hosts,
        host_figures=[
            HostFigure(f"h{i + 1}", seconds + i, True, 0.5, 1 << 20, 0) for i in range(hosts)
        ],
        nodes=[NodeFigure("c1", "center", 0.2, 3 << 20, 1000)],
        cpu_busy=0.95 if hosts > 1 else 0.3,
        peak_memory_bytes=100 << 20,
        peak_memory_by_node={"c1": 50 << 20},
        bench_cpu_seconds=0.01,
    )


def test_report_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    results = [_fake_run(s, n, 1.0 + n) for s in ("central", "swarm") for n in (1, 2)]
    paths = report.write(results, tmp_path, {"size": 1 << 20, "rate": 100_000_000})
    doc = json.loads(paths["json"].read_text())
    assert [(r["scenario"], r["N"]) for r in doc["rows"]] == [
        ("central", 1),
        ("central", 2),
        ("swarm", 1),
        ("swarm", 2),
    ]
    assert doc["rows"][1]["slowest_s"] == 4.0
    assert doc["rows"][1]["ratio"] == 40.0
    assert doc["cpu_bound_runs"] == ["central-n2", "swarm-n2"]
    assert set(report.COLUMNS) == set(doc["rows"][0])
    text = paths["markdown"].read_text()
    assert "4.0 (40.00) cpu" in text
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
