"""`vmswarm scrub`: a storage center re-hashes every stored chunk now and repairs what fails."""

from __future__ import annotations

import trio
import typer

from ..daemon.control import call_control
from .config_options import ConfigOption, ControlOption, JsonOption, control_socket
from .output import print_json


def scrub(
    control: ControlOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Re-verify every chunk on the local storage center; corrupt ones are re-fetched."""
    result = trio.run(call_control, control_socket(config, control), "scrub", {})
    if json_output:
        print_json(result)
        return
    corrupt: list[str] = result["corrupt"]
    typer.echo(
        f"scrubbed {result['chunks']} chunks in {result['directory']}: "
        f"{len(corrupt)} corrupt" + ("" if corrupt else ", all intact")
    )
    for digest in corrupt:
        typer.echo(f"  deleted corrupt chunk {digest}")
    for template in result["repairing"]:
        chunks = ", ".join(str(i) for i in template["chunks"])
        typer.echo(f"  fetching {template['name']}:{template['version']} chunks {chunks} again")


def register(app: typer.Typer) -> None:
    """Add `scrub` to the vmswarm app."""
    app.command("scrub")(scrub)
