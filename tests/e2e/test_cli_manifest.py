"""`vmswarm manifest` run as the installed console script."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmswarm.swarm.manifest import DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE, build_manifest

from ..ci import unavailable

pytestmark = pytest.mark.e2e

JSON_KEYS = {"template_id", "size", "format", "chunk_size", "chunks", "zero_chunks", "digest"}


def vmswarm_script() -> str:
    beside = Path(sys.executable).parent / "vmswarm"
    found = shutil.which("vmswarm", path=str(beside.parent)) or shutil.which("vmswarm")
    if found is None:
        pytest.fail("the vmswarm console script is not installed (pip install -e .)")
    return found


def run(*args: str | Path, user: int | None = None) -> subprocess.CompletedProcess[str]:
    command = [vmswarm_script(), *map(str, args)]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def assert_clean_failure(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit 2, nothing on stdout, exactly one `vmswarm: error:` line on stderr."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vmswarm: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    """An image of random and zero runs, not chunk-aligned, with a short last chunk."""
    rng = random.Random(3)
    parts = [rng.randbytes(300_000), bytes(700_000), rng.randbytes(1_000_000), bytes(123_457)]
    data = b"".join(parts)
    path = tmp_path / "ubuntu-24.04.raw"
    path.write_bytes(data)
    return path, data


def test_json_output_is_one_object_matching_the_manifest(image: tuple[Path, bytes]) -> None:
    path, data = image
    result = run("manifest", path, "--json", "--chunk-size", "64KiB")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1
    doc = json.loads(result.stdout)
    assert set(doc) == JSON_KEYS
    expected = build_manifest(data, "ubuntu-24.04", "1", MIN_CHUNK_SIZE)
    assert doc == {
        "template_id": expected.template_id.hex(),
        "size": len(data),
        "format": "raw",
        "chunk_size": MIN_CHUNK_SIZE,
        "chunks": expected.chunk_count,
        "zero_chunks": len(expected.zero_chunks),
        "digest": expected.digest.hex(),
    }
    assert doc["zero_chunks"] > 0


def test_name_and_version_options_name_the_template(image: tuple[Path, bytes]) -> None:
    path, data = image
    result = run("manifest", path, "--json", "--name", "noble", "--version", "2024.04")
    assert result.returncode == 0, result.stderr
    expected = build_manifest(data, "noble", "2024.04", DEFAULT_CHUNK_SIZE)
    assert json.loads(result.stdout)["template_id"] == expected.template_id.hex()


def test_human_output_shows_every_figure(image: tuple[Path, bytes]) -> None:
    path, data = image
    result = run("manifest", path, "--chunk-size", "1M")
    assert result.returncode == 0, result.stderr
    expected = build_manifest(data, "ubuntu-24.04", "1", 1 << 20)
    # "label        value": labels are padded to one column.
    fields = {line[:12].strip(): line[12:].strip() for line in result.stdout.splitlines()}
    assert fields["template id"] == expected.template_id.hex()
    assert fields["name"] == "ubuntu-24.04"
    assert fields["version"] == "1"
    assert fields["format"] == "raw"
    assert fields["size"] == f"{len(data):,} bytes (2.0 MiB)"
    assert fields["chunk size"] == "1,048,576 bytes (1 MiB)"
    assert fields["chunks"] == str(expected.chunk_count)
    assert fields["zero chunks"].split()[0] == str(len(expected.zero_chunks))
    assert fields["digest"] == expected.digest.hex()


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4194304", 4 << 20),
        ("4MiB", 4 << 20),
        ("1M", 1 << 20),
        ("64k", 1 << 16),
        ("2 mib", 2 << 20),
    ],
)
def test_chunk_size_spellings(image: tuple[Path, bytes], text: str, size: int) -> None:
    result = run("manifest", image[0], "--json", "--chunk-size", text)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["chunk_size"] == size


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("4MB", "invalid size '4MB'"),
        ("abc", "invalid size 'abc'"),
        ("-1", "invalid size '-1'"),
        ("3M", "power of two"),
        ("1G", "out of range"),
        ("1024", "out of range"),
    ],
)
def test_bad_chunk_size_fails_cleanly(image: tuple[Path, bytes], text: str, fragment: str) -> None:
    assert_clean_failure(run("manifest", image[0], "--chunk-size", text), "--chunk-size", fragment)


def test_missing_file_fails_cleanly(tmp_path: Path) -> None:
    assert_clean_failure(run("manifest", tmp_path / "nope.img"), "nope.img: no such file")


def test_directory_fails_cleanly(tmp_path: Path) -> None:
    assert_clean_failure(run("manifest", tmp_path), "is a directory")


def test_path_through_a_file_fails_cleanly(image: tuple[Path, bytes]) -> None:
    assert_clean_failure(run("manifest", image[0] / "inner.img"), "not a directory")


def test_fifo_fails_cleanly_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    assert_clean_failure(run("manifest", tmp_path / "pipe"), "not a regular file")


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        yield path


def test_socket_fails_cleanly(unix_socket: Path) -> None:
    assert_clean_failure(run("manifest", unix_socket), "cannot open")


@pytest.fixture
def unreadable_file() -> Iterator[Path]:
    """A mode-000 file in a directory anyone may enter."""
    directory = Path(tempfile.mkdtemp(prefix="vmswarm-e2e-"))
    try:
        directory.chmod(0o755)
        path = directory / "secret.img"
        path.write_bytes(b"secret")
        path.chmod(0)
        yield path
    finally:
        shutil.rmtree(directory)


def test_unreadable_file_fails_cleanly(unreadable_file: Path) -> None:
    if os.geteuid() != 0:
        result = run("manifest", unreadable_file)
    elif shutil.which("setpriv") is None:
        unavailable("test an unreadable file", "running as root without setpriv")
    else:
        result = run("manifest", unreadable_file, user=65534)  # root reads anything: be nobody
    assert_clean_failure(result, "secret.img: permission denied")


def test_qcow2_with_backing_file_is_refused(tmp_path: Path) -> None:
    head = bytearray(MIN_CHUNK_SIZE)
    struct.pack_into(">4sIQI", head, 0, b"QFI\xfb", 3, 104 + 8, 15)
    struct.pack_into(">QQQII", head, 72, 0, 0, 0, 4, 104)
    head[112:127] = b"/images/base.qc"
    path = tmp_path / "overlay.qcow2"
    path.write_bytes(head)
    assert_clean_failure(
        run("manifest", path),
        "overlay.qcow2: qcow2 image has a backing file '/images/base.qc'",
        "qemu-img convert",
    )


def test_clean_qcow2_is_accepted(tmp_path: Path) -> None:
    head = bytearray(MIN_CHUNK_SIZE + 17)
    struct.pack_into(">4sI", head, 0, b"QFI\xfb", 2)
    path = tmp_path / "clean.qcow2"
    path.write_bytes(head)
    result = run("manifest", path, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["format"] == "qcow2"


def test_empty_image_has_no_chunks(tmp_path: Path) -> None:
    path = tmp_path / "empty.raw"
    path.write_bytes(b"")
    doc = json.loads(run("manifest", path, "--json").stdout)
    assert (doc["size"], doc["chunks"], doc["zero_chunks"]) == (0, 0, 0)


def test_no_arguments_shows_help_with_the_manifest_command() -> None:
    result = run()
    assert "manifest" in result.stdout + result.stderr
