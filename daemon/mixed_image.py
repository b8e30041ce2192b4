"""Test and demo images that mix random data with zero regions, the shape of real VM disks."""

from __future__ import annotations

import os
import random
from pathlib import Path

import blake3

_BLOCK = 1 << 20


def write_mixed_image(
    path: Path,
    size: int,
    *,
    zero_fraction: float = 0.5,
    seed: int = 0,
    run: int = 3 * _BLOCK + 4096,
) -> None:
    """Write `size` bytes: runs of random data and holes, about `zero_fraction` of them zero.

    Runs are deliberately not chunk-aligned so chunks mix data and zeros at the edges.
    """
    if size < 0:
        raise ValueError(f"image size must be >= 0, got {size}")
    if not 0.0 <= zero_fraction <= 1.0:
        raise ValueError(f"zero_fraction must be within 0..1, got {zero_fraction}")
    rng = random.Random(seed)
    # blake3's extendable output is a fast, deterministic stream of incompressible bytes.
    stream = blake3.blake3(seed.to_bytes(8, "big"))
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as out:
        out.truncate(size)
        offset = 0
        while offset < size:
            length = min(run, size - offset)
            if rng.random() >= zero_fraction:
                out.seek(offset)
                done = 0
                while done < length:
                    piece = min(_BLOCK, length - done)
                    out.write(stream.digest(length=piece, seek=offset + done))
                    done += piece
            offset += length
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
