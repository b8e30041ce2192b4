"""`vmswarm daemon run` with the daemon itself replaced: which NodeConfig would it start?"""

from __future__ import annotations

import pytest
import typer
from vmswarm.cli import daemon_commands
from vmswarm.daemon.node import NodeConfig


def capture_node_configs(monkeypatch: pytest.MonkeyPatch) -> tuple[typer.Typer, list[NodeConfig]]:
    """A typer app with the daemon commands, and the list each `daemon run`'s config lands in."""
    seen: list[NodeConfig] = []

    async def fake_run(config: NodeConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(daemon_commands, "run_until_signalled", fake_run)
    app = typer.Typer()
    daemon_commands.register(app)
    return app, seen
