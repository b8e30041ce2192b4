"""One fuzz target under libFuzzer: `python -m tests.fuzz.worker NAME CORPUS_DIR [-flag=...]`.

Runs in its own process because atheris.Fuzz never returns (libFuzzer exits the process).
The swarm modules and the target are imported under instrumentation so coverage guides it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris


def main(argv: list[str]) -> None:
    name, corpus = argv[1], Path(argv[2])
    with atheris.instrument_imports(include=["vmswarm.swarm", "tests.fuzz"]):
        from .targets import load

        target = load(name)
    corpus.mkdir(parents=True, exist_ok=True)
    for number, seed in enumerate(target.seeds()):
        (corpus / f"seed-{number:03d}").write_bytes(seed)
    flags = [f"-max_len={target.MAX_LEN}", *argv[3:]]
    if target.DICTIONARY:
        dictionary = corpus.parent / f"{name}.dict"
        # libFuzzer dictionary syntax: one quoted token per line, bytes as \xNN escapes.
        tokens = ("".join(f"\\x{b:02x}" for b in token) for token in target.DICTIONARY)
        dictionary.write_text("".join(f'"{token}"\n' for token in tokens))
        flags.append(f"-dict={dictionary}")

    def test_one_input(data: bytes) -> None:
        target.fuzz_one(data)

    atheris.Setup([argv[0], *flags, str(corpus)], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
