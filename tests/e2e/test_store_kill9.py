"""kill -9 an ImageStore writer at random instants; the durable bitfield must never lie."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.swarm.manifest import Manifest

from .store_writer import make_template

REPO_ROOT = Path(__file__).resolve().parents[2]
ITERATIONS = 30

pytestmark = pytest.mark.e2e


def _committed(lines: list[str]) -> set[int]:
    return {int(line.split()[1]) for line in lines if line.startswith("committed ")}


def _start_writer(directory: Path, template: Path, order_seed: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.e2e.store_writer",
            str(directory),
            str(template.with_suffix(".img")),
            str(template.with_suffix(".manifest")),
            str(order_seed),
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_until(proc: subprocess.Popen[str], seen: list[str], done: Callable[[], bool]) -> None:
    """Collect the writer's lines until `done()` or its stdout closes."""
    assert proc.stdout is not None
    while not done():
        line = proc.stdout.readline()
        if not line:
            return
        seen.append(line.rstrip("\n"))


def _kill_at_random_point(
    proc: subprocess.Popen[str], rng: random.Random, remaining: int, iterations_left: int
) -> list[str]:
    """Let the writer run a random distance, SIGKILL it at a random instant; return its lines."""
    assert proc.stdin is not None and proc.stdout is not None
    seen: list[str] = []
    _read_until(proc, seen, lambda: "opening" in seen)
    if rng.random() < 0.2:
        # Land in the open: crash recovery, the initial checkpoint, or before it.
        time.sleep(rng.random() * 0.004)
    else:
        _read_until(proc, seen, lambda: "ready" in seen)
        # Credits bound how far the writer runs ahead of us, spreading the kills over the run.
        credits = rng.randint(1, max(1, 2 * remaining // iterations_left))
        wait_for = rng.randint(0, credits)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(f"{credits}\n")
            proc.stdin.flush()
        _read_until(proc, seen, lambda: len(_committed(seen)) >= wait_for)
        if rng.random() < 0.3:
            time.sleep(rng.random() * 0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen.extend(proc.stdout.read().splitlines())
    return seen


def _chunks_on_disk_that_verify(image: Path, manifest: Manifest, indices: set[int]) -> set[int]:
    """Which of `indices` hold exactly the right bytes, read straight from the image file."""
    good = set()
    with image.open("rb") as f:
        for i in indices:
            offset, length = manifest.chunk_range(i)
            f.seek(offset)
            if manifest.chunk_matches(i, f.read(length)):
                good.add(i)
    return good


def test_sigkill_never_marks_unwritten_and_never_loses_committed(tmp_path: Path) -> None:
    seed = int(os.environ.get("VMSWARM_KILL9_SEED", random.randrange(1 << 32)))
    print(f"kill -9 test seed: {seed} (rerun with VMSWARM_KILL9_SEED={seed})")
    rng = random.Random(seed)
    chunks = rng.randint(96, 192)
    template_seed = rng.randrange(1 << 32)
    data, manifest = make_template(template_seed, chunks)
    template = tmp_path / "template"
    template.with_suffix(".img").write_bytes(data)
    template.with_suffix(".manifest").write_bytes(manifest.encode())
    store_dir = tmp_path / "store"
    image_name = manifest.template_id.hex() + ".img"
    known = set(manifest.zero_chunks)  # marked at the last check, so they must stay marked
    ever_committed: set[int] = set()
    kills = 0

    for iteration in range(ITERATIONS):
        where = f"seed={seed} iteration={iteration}"
        proc = _start_writer(store_dir, template, rng.randrange(1 << 32))
        seen = _kill_at_random_point(proc, rng, chunks - len(known), ITERATIONS - iteration)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stderr = proc.stderr.read()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(BrokenPipeError):
                stream.close()
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        else:
            assert proc.returncode == 0, f"{where}: writer failed:\n{stderr}"
        committed = _committed(seen)
        ever_committed |= committed

        # Inspect a copy, so the writer's next start runs the crash recovery itself.
        check_dir = tmp_path / f"check-{iteration}"
        shutil.copytree(store_dir, check_dir)
        with ImageStore(check_dir, manifest) as store:
            have = set(store.have)
            assert store.dropped_on_open == frozenset(), f"{where}: journal ran ahead of data"
        assert committed <= have, f"{where}: committed but not marked: {committed - have}"
        assert known <= have, f"{where}: lost marks: {known - have}"
        extra = have - known - committed
        assert len(extra) <= 1, f"{where}: marked but never reported: {sorted(extra)}"
        on_disk = _chunks_on_disk_that_verify(check_dir / image_name, manifest, have)
        assert on_disk == have, f"{where}: marked but not on disk: {sorted(have - on_disk)}"
        known = have
        shutil.rmtree(check_dir)

    assert kills > ITERATIONS // 2, f"seed={seed}: writer finished too often to test kills"
    proc = _start_writer(store_dir, template, rng.randrange(1 << 32))
    out, err = proc.communicate(f"{chunks}\n", timeout=60)
    assert proc.returncode == 0, f"seed={seed}: final writer failed:\n{err}"
    assert out.splitlines()[-1] == "done"
    final = _committed(out.splitlines())
    assert final.isdisjoint(known | ever_committed), f"seed={seed}: wrote a chunk twice"
    assert final | known == set(range(chunks)), f"seed={seed}: final writer skipped chunks"
    with ImageStore(store_dir, manifest) as store:
        assert store.complete
        assert store.verify_image(), f"seed={seed}: final image does not verify"
