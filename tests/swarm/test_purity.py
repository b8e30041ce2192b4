"""`swarm/` is the sans-IO core: no I/O, no clock, no event loop, no global randomness.

Two checks over every module found under swarm/ (so files added later are covered):
- static: parse the source with `ast` and reject forbidden imports, dynamic imports,
  builtin I/O calls and module-level `random` functions;
- runtime: import each module in a fresh interpreter with a `builtins.__import__` hook that
  records forbidden imports made *by swarm modules* (cached ones such as `os` included), and
  a `sys.meta_path` finder that records any first import of an event loop, socket, libvirt
  or metrics module, whoever makes it (third-party helpers may use `os`, never those).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SWARM_DIR = Path(__file__).resolve().parents[2] / "swarm"
PACKAGE = "vmswarm.swarm"

# Top-level modules a swarm module may not import itself.
FORBIDDEN_MODULES = frozenset(
    {
        "trio",
        "socket",
        "os",
        "time",
        "libvirt",
        "prometheus_client",
        "asyncio",
        "subprocess",
        "threading",
        "multiprocessing",
        "concurrent",
        "select",
        "selectors",
        "io",
        "pathlib",
        "shutil",
        "tempfile",
        "glob",
        "signal",
        "sqlite3",
        "ssl",
        "http",
        "urllib",
        "mmap",
        "fcntl",
        "secrets",
        "importlib",
    }
)
# Modules that may not even be pulled in indirectly, through a third-party library.
FORBIDDEN_ANYWHERE = frozenset(
    {"trio", "libvirt", "prometheus_client", "socket", "asyncio", "subprocess", "selectors"}
)
# Builtins that do I/O or import behind the static check's back.
FORBIDDEN_CALLS = frozenset({"open", "__import__", "exec", "eval", "input", "print", "breakpoint"})
# Other vmswarm packages do I/O; the core must not depend on them.
SIBLING_PACKAGES = ("vmswarm.daemon", "vmswarm.cli")


def discover_modules(root: Path = SWARM_DIR, package: str = PACKAGE) -> dict[str, Path]:
    """Every module under `root`, by its dotted name in the installed namespace."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return module or ""
    base = importer if is_package else importer.rpartition(".")[0]
    for _ in range(level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{module}" if module else base


def _bad_target(name: str) -> str | None:
    top = name.partition(".")[0]
    if top in FORBIDDEN_MODULES:
        return f"imports {name}"
    for sibling in SIBLING_PACKAGES:
        if name == sibling or name.startswith(sibling + "."):
            return f"imports {name}, which does I/O"
    return None


def find_violations(
    source: str, module: str = f"{PACKAGE}.example", is_package: bool = False
) -> list[str]:
    """Purity violations in one module's source, as 'line N: what' strings."""
    tree = ast.parse(source)
    found: list[str] = []
    random_aliases: set[str] = set()

    def report(node: ast.AST, what: str) -> None:
        found.append(f"line {getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (why := _bad_target(alias.name)) is not None:
                    report(node, why)
                if alias.name == "random":
                    random_aliases.add(alias.asname or "random")
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, module, is_package)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for why in {w for t in targets if (w := _bad_target(t)) is not None}:
                report(node, why)
            if base == "random":
                for alias in node.names:
                    if alias.name != "Random":
                        report(node, f"imports random.{alias.name}: inject a random.Random")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in FORBIDDEN_CALLS
        ):
            report(node, f"calls {node.func.id}()")
    # Second pass, now that every `import random as X` is known.
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in random_aliases
            and node.attr != "Random"
        ):
            report(node, f"uses {node.value.id}.{node.attr}: inject a random.Random")
    return sorted(found)


# Runs in a fresh interpreter: argv[1] is JSON {prefix, modules, forbidden, anywhere}.
RUNTIME_PROBE = textwrap.dedent(
    """
    import builtins, importlib, importlib.util, json, sys, traceback

    args = json.loads(sys.argv[1])
    prefix, forbidden, anywhere = args["prefix"], set(args["forbidden"]), set(args["anywhere"])
    preloaded = sorted(set(sys.modules) & anywhere)
    direct, indirect, failed = [], [], {}

    def in_scope(name):
        return name == prefix or name.startswith(prefix + ".")

    real_import = builtins.__import__

    def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__", "")
        if in_scope(importer):
            target = name
            if level:
                target = importlib.util.resolve_name("." * level + name, globals["__package__"])
            if target.partition(".")[0] in forbidden:
                direct.append([importer, target])
        return real_import(name, globals, locals, fromlist, level)

    class RecordingFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.partition(".")[0] in anywhere:
                indirect.append(name)
            return None

    builtins.__import__ = recording_import
    sys.meta_path.insert(0, RecordingFinder)
    for module in args["modules"]:
        try:
            importlib.import_module(module)
        except BaseException:
            failed[module] = traceback.format_exc(limit=3)
    print(json.dumps({
        "direct": direct, "indirect": sorted(set(indirect)),
        "preloaded": preloaded, "failed": failed,
    }))
    """
)


def run_probe(prefix: str, modules: list[str], extra_path: Path | None = None) -> dict[str, object]:
    args = {
        "prefix": prefix,
        "modules": modules,
        "forbidden": sorted(FORBIDDEN_MODULES),
        "anywhere": sorted(FORBIDDEN_ANYWHERE),
    }
    command = [sys.executable, "-c", RUNTIME_PROBE, json.dumps(args)]
    env = None
    if extra_path is not None:
        env = {"PYTHONPATH": str(extra_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120, env=env)
    result: dict[str, object] = json.loads(done.stdout)
    return result


MODULES = discover_modules()


def test_discovery_finds_the_core_modules() -> None:
    assert {f"{PACKAGE}.bitfield", f"{PACKAGE}.errors", f"{PACKAGE}.placement"} <= set(MODULES)
    assert PACKAGE in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_swarm_module_source_is_pure(module: str) -> None:
    path = MODULES[module]
    source = path.read_text(encoding="utf-8")
    assert find_violations(source, module, path.name == "__init__.py") == []


def test_swarm_modules_import_nothing_impure_at_runtime() -> None:
    result = run_probe(PACKAGE, sorted(MODULES))
    assert result["failed"] == {}
    assert result["preloaded"] == [], "interpreter start-up already imported them"
    assert result["direct"] == []
    assert result["indirect"] == []


BAD_SOURCES = [
    ("import os", "imports os"),
    ("import os.path", "imports os.path"),
    ("from os import path", "imports os"),
    ("import time as clock", "imports time"),
    ("from time import monotonic", "imports time"),
    ("import trio", "imports trio"),
    ("import socket", "imports socket"),
    ("import libvirt", "imports libvirt"),
    ("from prometheus_client import Counter", "imports prometheus_client"),
    ("from concurrent.futures import Future", "imports concurrent.futures"),
    ("import importlib\nm = importlib.import_module('os')", "imports importlib"),
    ("from importlib import import_module", "imports importlib"),
    ("m = __import__('os')", "calls __import__()"),
    ("def f() -> None:\n    import selectors", "imports selectors"),
    ("class A:\n    from io import BytesIO", "imports io"),
    ("data = open('x').read()", "calls open()"),
    ("print('hello')", "calls print()"),
    ("import random\nx = random.random()", "uses random.random"),
    ("import random as r\nx = r.choice([1])", "uses r.choice"),
    ("from random import shuffle", "imports random.shuffle"),
    ("from ..daemon import storage", "imports vmswarm.daemon"),
    ("from .. import cli", "imports vmswarm.cli"),
    ("from vmswarm.daemon.peer import Link", "imports vmswarm.daemon.peer"),
]


@pytest.mark.parametrize(("source", "reason"), BAD_SOURCES)
def test_checker_catches_bad_source(source: str, reason: str) -> None:
    violations = find_violations(source)
    assert violations, source
    assert any(reason in v for v in violations), violations


GOOD_SOURCE = """
from __future__ import annotations
import random
import struct
from dataclasses import dataclass
import blake3
import msgpack
from .bitfield import Bitfield
from .errors import RemoteProtocolError
from . import errors
from vmswarm.swarm.bitfield import Bitfield as B
from random import Random

def pick(rng: random.Random, now: float) -> float:
    return rng.random() + now
"""


def test_checker_accepts_pure_source() -> None:
    assert find_violations(GOOD_SOURCE) == []


def test_relative_imports_resolve_from_packages_too() -> None:
    # In swarm/__init__.py, ".." is already above vmswarm.swarm.
    assert find_violations("from .. import daemon", PACKAGE, is_package=True) != []
    assert find_violations("from . import bitfield", PACKAGE, is_package=True) == []


def test_runtime_probe_catches_direct_and_indirect_imports(tmp_path: Path) -> None:
    core = tmp_path / "fakecore"
    core.mkdir()
    (core / "__init__.py").write_text("")
    (core / "uses_os.py").write_text("import os\n")
    (core / "uses_time.py").write_text("from time import monotonic\n")
    (core / "pure.py").write_text("import struct\nfrom . import helperless\n")
    (core / "helperless.py").write_text("X = 1\n")
    (core / "via_lib.py").write_text("import fakelib\n")
    # A third-party library may use os itself, but must not drag in socket.
    (tmp_path / "fakelib.py").write_text("import os\nimport socket\n")
    modules = [f"fakecore.{m}" for m in ("uses_os", "uses_time", "pure", "via_lib")]
    result = run_probe("fakecore", modules, extra_path=tmp_path)
    assert result["failed"] == {}
    assert sorted(map(tuple, result["direct"])) == [  # type: ignore[call-overload]
        ("fakecore.uses_os", "os"),
        ("fakecore.uses_time", "time"),
    ]
    # socket pulls in selectors; both are recorded, os (from fakelib) is not.
    assert result["indirect"] == ["selectors", "socket"]
