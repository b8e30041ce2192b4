"""The cluster benchmark's output: a JSON document, markdown tables and a Figure-3-style plot."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.report import table

from .scenarios import RunResult

MIB = 1 << 20
# A run whose machine-wide CPU was this busy was limited by the 2 cores, not by the links.
CPU_BOUND = 0.9
COLUMNS = [
    "scenario",
    "N",
    "slowest_s",
    "mean_s",
    "T_min_s",
    "ratio",
    "center_MiB_sent",
    "host_MiB_from_peers",
    "host_MiB_wasted",
    "center_cpu_s",
    "host_cpu_s",
    "max_host_cpu_s",
    "cpu_busy_%",
    "peak_mem_MiB",
    "identical",
]


def row(result: RunResult) -> dict[str, Any]:
    """One run as a table row."""
    centers = [n for n in result.nodes if n.role == "center"]
    hosts = result.host_figures
    from_peers = [h.bytes_from_peers for h in hosts if h.bytes_from_peers is not None]
    wasted = [h.wasted_bytes for h in hosts if h.wasted_bytes is not None]
    return {
        "scenario": result.scenario,
        "N": result.hosts,
        "slowest_s": round(result.slowest, 2),
        "mean_s": round(result.mean, 2),
        "T_min_s": round(result.t_min, 2),
        "ratio": round(result.slowest / result.t_min, 3),
        "center_MiB_sent": round(result.center_bytes_sent / MIB, 1),
        "host_MiB_from_peers": round(sum(from_peers) / MIB, 1) if from_peers else "-",
        "host_MiB_wasted": round(sum(wasted) / MIB, 1) if wasted else "-",
        "center_cpu_s": round(sum(n.cpu_seconds for n in centers), 2),
        "host_cpu_s": round(sum(h.cpu_seconds for h in hosts), 2),
        "max_host_cpu_s": round(max(h.cpu_seconds for h in hosts), 2),
        "cpu_busy_%": round(100 * result.cpu_busy, 1),
        "peak_mem_MiB": round(result.peak_memory_bytes / MIB, 1),
        "identical": result.all_identical,
    }


def result_json(result: RunResult) -> dict[str, Any]:
    """Every figure of one run."""
    doc = dataclasses.asdict(result)
    doc.update(
        slowest=result.slowest,
        mean=result.mean,
        ratio=result.slowest / result.t_min,
        ratio_scenario_bound=result.slowest / result.t_min_scenario,
        center_bytes_sent=result.center_bytes_sent,
        all_identical=result.all_identical,
        cpu_bound=result.cpu_busy >= CPU_BOUND,
    )
    return doc


def document(results: Sequence[RunResult], meta: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **meta,
        "runs": [result_json(r) for r in results],
        "rows": [row(r) for r in results],
        "peak_memory_bytes": max((r.peak_memory_bytes for r in results), default=0),
        "cpu_bound_runs": [f"{r.scenario}-n{r.hosts}" for r in results if r.cpu_busy >= CPU_BOUND],
    }


def pivot(results: Sequence[RunResult]) -> str:
    """Slowest host (ratio to T_min) per N and scenario, like the issue's table."""
    scenarios = list(dict.fromkeys(r.scenario for r in results))
    counts = sorted({r.hosts for r in results})
    by_key = {(r.scenario, r.hosts): r for r in results}
    rows = []
    for n in counts:
        cells: dict[str, Any] = {"N": n}
        for name in scenarios:
            r = by_key.get((name, n))
            if r is None:
                cells[name] = "-"
                continue
            busy = " cpu" if r.cpu_busy >= CPU_BOUND else ""
            cells[name] = f"{r.slowest:.1f} ({r.slowest / r.t_min:.2f}){busy}"
        rows.append(cells)
    return table(rows, ["N", *scenarios])


def markdown(results: Sequence[RunResult], meta: Mapping[str, Any]) -> str:
    size = meta.get("size", 0) / MIB
    rate = meta.get("rate", 0) / 1e6
    return "\n".join(
        [
            f"# Cluster benchmark: {size:g} MiB template, {rate:g} Mbit/s links",
            "",
            "Slowest host in seconds (ratio to T_min); `cpu`: the machine's CPU was "
            f">= {CPU_BOUND:.0%} busy.",
            "",
            pivot(results),
            "",
            "## Every run",
            "",
            table([row(r) for r in results], COLUMNS),
            "",
            *(f"- FAILED {failure}" for failure in meta.get("failures", [])),
        ]
    )


def plot(results: Sequence[RunResult], path: Path, meta: Mapping[str, Any]) -> None:
    """Download time per template against the number of hosts, one line per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    scenarios = list(dict.fromkeys(r.scenario for r in results))
    markers = "osD^vx*"
    for i, name in enumerate(scenarios):
        runs = sorted((r for r in results if r.scenario == name), key=lambda r: r.hosts)
        ax.plot(
            [r.hosts for r in runs],
            [r.slowest for r in runs],
            marker=markers[i % len(markers)],
            label=name,
        )
    bound = sorted({(r.hosts, r.t_min) for r in results})
    if bound:
        ax.plot(
            [n for n, _ in bound],
            [t for _, t in bound],
            linestyle="--",
            marker="_",
            markersize=14,
            color="black",
            label="T_min (fluid bound)",
        )
    ax.set_xlabel("number of hosts")
    ax.set_ylabel("download time per template (s, slowest host)")
    size = meta.get("size", 0) / MIB
    rate = meta.get("rate", 0) / 1e6
    ax.set_title(f"{size:g} MiB template, {rate:g} Mbit/s links")
    ax.set_xticks(sorted({r.hosts for r in results}))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(results: Sequence[RunResult], out: Path, meta: Mapping[str, Any]) -> dict[str, Path]:
    """results.json, results.md and figure3.png in `out`; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "plot": out / "figure3.png",
    }
    paths["json"].write_text(json.dumps(document(results, meta), indent=1, sort_keys=True))
    paths["markdown"].write_text(markdown(results, meta))
    if results:
        plot(results, paths["plot"], meta)
    return paths


__all__ = ["COLUMNS", "document", "markdown", "pivot", "plot", "row", "write"]
