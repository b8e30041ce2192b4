"""What `tracker run` and `daemon run` share before serving: settings, --show-config, logging."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..daemon.logfmt import setup_logging
from ..daemon.settings import Settings
from .config_command import print_settings
from .config_options import load


def run_settings(
    config: Path | None,
    flags: Mapping[str, object],
    *,
    trusted_key: list[Path] | None,
    allow_unsigned: bool,
    show_config: bool,
) -> Settings | None:
    """The effective settings with logging set up; None after printing them for --show-config."""
    settings = load(
        config,
        {
            **flags,
            "cluster.trusted_keys": trusted_key or None,
            "cluster.allow_unsigned": allow_unsigned or None,  # the flag can only turn it on
        },
    )
    if show_config:
        print_settings(settings, json_output=False)
        return None
    setup_logging(settings["log.level"])
    return settings
