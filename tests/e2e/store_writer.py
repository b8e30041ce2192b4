"""The writer test_store_kill9 kills: fills an ImageStore in random order, reporting each commit.

Run as `python -m tests.e2e.store_writer DIR IMAGE MANIFEST ORDER_SEED`; the template comes from
files, so a restart costs little more than the interpreter's start. Prints `opening`, then `ready`
once the store is open (crash recovery done), then `committed <i>` (flushed) after each
`write_chunk` returns, and `done` after a clean close. Each line `N` on stdin allows N more chunk
writes, so the test decides how far ahead of its reading the writer may get.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import blake3
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.swarm.manifest import Manifest, build_manifest

CHUNK_SIZE = 1 << 16
# Small, so the journal also fills up and checkpoints by itself during a run.
JOURNAL_RECORDS = 24
CHECKPOINT_PROBABILITY = 0.08
ZERO_CHUNK_PROBABILITY = 0.1
# The last chunk is short, to exercise an image whose size is not a multiple of the chunk size.
SHORT_TAIL = 1000


def make_template(template_seed: int, chunks: int) -> tuple[bytes, Manifest]:
    """A deterministic image of `chunks` chunks (some all-zero) and its manifest."""
    rng = random.Random(template_seed)
    # blake3's XOF makes pseudo-random chunks far faster than Random.randbytes (startup matters).
    parts = [
        bytes(CHUNK_SIZE)
        if rng.random() < ZERO_CHUNK_PROBABILITY
        else blake3.blake3(f"{template_seed}:{i}".encode()).digest(length=CHUNK_SIZE)
        for i in range(chunks)
    ]
    data = b"".join(parts)[:-SHORT_TAIL]
    return data, build_manifest(data, "kill9", f"seed-{template_seed}", chunk_size=CHUNK_SIZE)


def main(argv: list[str]) -> int:
    directory, image, manifest_path, order_seed = Path(argv[0]), argv[1], argv[2], int(argv[3])
    data = Path(image).read_bytes()
    manifest = Manifest.decode(Path(manifest_path).read_bytes())
    rng = random.Random(order_seed)
    out = sys.stdout
    out.write("opening\n")
    out.flush()
    store = ImageStore(directory, manifest, journal_records=JOURNAL_RECORDS)
    out.write("ready\n")
    out.flush()
    order = list(store.have.missing())
    rng.shuffle(order)
    credits = 0
    for index in order:
        while credits == 0:
            line = sys.stdin.readline()
            if not line:
                store.close()
                return 0
            credits = int(line)
        credits -= 1
        offset, length = manifest.chunk_range(index)
        store.write_chunk(index, data[offset : offset + length])
        out.write(f"committed {index}\n")
        out.flush()
        if rng.random() < CHECKPOINT_PROBABILITY:
            store.checkpoint()
    store.close()
    out.write("done\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
