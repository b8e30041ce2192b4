"""`bash run.sh demo`: a local cluster publishes a template and every host fetches it at once."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..daemon.cluster import CliError
from ..daemon.demo_cluster import DemoResult, run_demo
from .output import fail, human_bytes, print_json

demo_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _table(result: DemoResult) -> str:
    header = (
        f"{'host':<8} {'seconds':>8} {'from centers':>14} {'from peers':>14} {'sources':>7}  image"
    )
    lines = [header, "-" * len(header)]
    for h in result.hosts:
        lines.append(
            f"{h.name:<8} {h.seconds:>8.2f} {human_bytes(h.bytes_from_centers):>14} "
            f"{human_bytes(h.bytes_from_peers):>14} {h.sources:>7}  "
            f"{'verified' if h.digest_ok else 'DIGEST MISMATCH'}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{'total':<8} {'':>8} {human_bytes(result.bytes_from_centers):>14} "
        f"{human_bytes(result.bytes_from_peers):>14}"
    )
    return "\n".join(lines)


def _vm_line(result: DemoResult) -> str:
    vm = result.vm
    if vm is None:
        return f"no VM launched: {result.vm_problem}"
    return (
        f"VM {vm.domain} booted on {vm.host} ({vm.placement}, {vm.domain_type or '?'}): "
        f"its serial console said {vm.marker} {vm.seconds_to_marker:.1f}s after launch "
        f"(fetch {vm.seconds_fetch:.2f}s, define+start {vm.seconds_boot:.2f}s); deleted"
    )


@demo_app.command()
def demo(
    hosts: Annotated[int, typer.Option("--hosts", help="Host daemons to start.")] = 6,
    centers: Annotated[int, typer.Option("--centers", help="Storage centers to start.")] = 3,
    size_mib: Annotated[int, typer.Option("--size-mib", help="Template size in MiB.")] = 256,
    replicas: Annotated[int, typer.Option("--replicas", help="Centers per chunk.")] = 2,
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="Keep the cluster's files here.")
    ] = None,
    vm: Annotated[
        bool,
        typer.Option(
            "--vm/--no-vm", help="End by launching a VM from the template (needs libvirtd + qemu)."
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Start a tracker, storage centers and hosts, publish a template, fetch it everywhere."""
    if hosts < 1 or centers < 1 or size_mib < 1 or replicas < 1:
        fail("--hosts, --centers, --size-mib and --replicas must all be at least 1")

    def say(text: str) -> None:
        sys.stderr.write(f"demo: {text}\n")

    try:
        result = run_demo(
            hosts=hosts,
            centers=centers,
            size=size_mib << 20,
            replicas=replicas,
            workdir=workdir,
            launch=vm,
            say=say,
        )
    except CliError as exc:
        fail(
            f"a vmswarm command failed: {' '.join(map(str, exc.cmd[1:]))}: {exc.stderr.strip()}", 1
        )
    except TimeoutError as exc:
        fail(str(exc), 1)
    if as_json:
        print_json(
            {
                "template_id": result.template_id,
                "size": result.size,
                "publish_seconds": result.publish_seconds,
                "bytes_from_centers": result.bytes_from_centers,
                "bytes_from_peers": result.bytes_from_peers,
                "hosts": [h.__dict__ for h in result.hosts],
                "vm": None if result.vm is None else result.vm.__dict__,
                "vm_problem": result.vm_problem,
            }
        )
    else:
        typer.echo(_table(result))
        share = result.bytes_from_peers / max(
            1, result.bytes_from_peers + result.bytes_from_centers
        )
        typer.echo(f"hosts got {share:.0%} of their bytes from each other")
        typer.echo(_vm_line(result))
    if not result.all_verified:
        fail("some host's image does not match the template's digest", 1)


if __name__ == "__main__":
    demo_app()
