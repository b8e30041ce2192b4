"""Config files read at start-up: the flavors TOML (`--flavors PATH`).

    [flavors.tiny]
    vcpus = 1
    memory = "128MiB"
    disk = "1GiB"
    max_vcpus = 2          # optional: live resize ceiling (default: vcpus)
    max_memory = "256MiB"  # optional (default: memory)

A file's flavors replace the built-in ones; without a file the built-ins apply.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from ..swarm.flavors import Flavor, FlavorError, default_flavors, flavors_from_dict


class ConfigError(Exception):
    """A config file is missing or invalid; the message names the file and the problem."""


def load_flavors(path: Path | None) -> dict[str, Flavor]:
    """The flavors from a TOML file, or the built-ins when `path` is None."""
    if path is None:
        return default_flavors()
    try:
        with Path(path).open("rb") as source:
            data = tomllib.load(source)
    except FileNotFoundError:
        raise ConfigError(f"flavors file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read flavors file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"flavors file {path} is not valid TOML: {exc}") from None
    try:
        return flavors_from_dict(data)
    except FlavorError as exc:
        raise ConfigError(f"flavors file {path}: {exc}") from None


__all__ = ["ConfigError", "load_flavors"]
