"""The fuzz targets by name; each is the module tests.fuzz.target_<name>."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol, cast

# `canary` crashes on one of its own seeds: it proves findings are caught, saved and fatal.
TARGETS = ("framing", "connection", "manifest", "rpc")
SELF_TEST = "canary"


class Target(Protocol):
    NAME: str
    MAX_LEN: int
    DICTIONARY: list[bytes]
    fuzz_one: Callable[[bytes], Any]
    seeds: Callable[[], list[bytes]]


def load(name: str) -> Target:
    """Import a target (inside atheris.instrument_imports, for coverage)."""
    if name not in (*TARGETS, SELF_TEST):
        raise ValueError(f"unknown fuzz target {name!r}; choose from {', '.join(TARGETS)}")
    return cast(Target, importlib.import_module(f"tests.fuzz.target_{name}"))
