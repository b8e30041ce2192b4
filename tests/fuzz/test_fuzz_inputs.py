"""The fuzzing harness itself: seed writing, seeds that replay real exchanges, the stats parser."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import partial

import pytest

from .campaign import parse_stats
from .script import Input, InputWriter
from .targets import TARGETS, load


def _reads_int(inp: Input, low: int, high: int, value: int) -> bool:
    return inp.int(low, high) == value


def _reads_flag(inp: Input, value: bool) -> bool:
    return inp.flag() == value


def _reads_sized(inp: Input, value: bytes) -> bool:
    return inp.sized_bytes(64) == value


def _reads_choice(inp: Input, options: Sequence[str], value: str) -> bool:
    return inp.choice(options) == value


def test_input_reads_back_what_the_writer_wrote() -> None:
    rng = random.Random(7)
    options = ("a", "b", "c")
    for _ in range(200):
        writer = InputWriter()
        # Each check reads the next value and compares it with what was written.
        checks: list[Callable[[Input], bool]] = []
        for _ in range(rng.randint(0, 20)):
            kind = rng.randrange(4)
            if kind == 0:
                low = rng.choice((0, -3, 100))
                high = low + rng.choice((0, 1, 255, 256, 65535, 1 << 32, (1 << 64) - 1))
                value = rng.randint(low, high)
                writer.int(low, high, value)
                checks.append(partial(_reads_int, low=low, high=high, value=value))
            elif kind == 1:
                flag = rng.random() < 0.5
                writer.flag(flag)
                checks.append(partial(_reads_flag, value=flag))
            elif kind == 2:
                data = rng.randbytes(rng.randint(0, 40))
                writer.sized_bytes(64, data)
                checks.append(partial(_reads_sized, value=data))
            else:
                pick = rng.choice(options)
                writer.choice(options, pick)
                checks.append(partial(_reads_choice, options=options, value=pick))
        inp = Input(writer.build())
        assert [check(inp) for check in checks] == [True] * len(checks)
        assert inp.remaining() == 0


def test_writer_refuses_a_value_out_of_range() -> None:
    with pytest.raises(ValueError, match="outside"):
        InputWriter().int(0, 3, 4)
    with pytest.raises(ValueError, match="wider"):
        InputWriter().int(0, 1 << 64, 4)


@pytest.mark.parametrize("name", TARGETS)
def test_seeds_replay_real_exchanges_without_a_finding(name: str) -> None:
    target = load(name)
    outcomes = [target.fuzz_one(seed) for seed in target.seeds()]
    assert outcomes
    text = repr(outcomes)
    # Each target's seeds get past the first message, so coverage starts deep.
    deep = {"framing": "Goodbye", "connection": "Chunk", "manifest": "decoded", "rpc": "Reply"}
    assert deep[name] in text


def test_stats_come_from_libfuzzer_output() -> None:
    log = (
        "#6\tINITED cov: 197 ft: 324 corp: 5/1466b exec/s: 0 rss: 43Mb\n"
        "#3000\tDONE   cov: 205 ft: 565 corp: 43/13609b lim: 939 exec/s: 0 rss: 43Mb\n"
        "Done 3000 runs in 2 second(s)\n"
        "stat::number_of_executed_units: 3000\n"
        "stat::peak_rss_mb:              43\n"
    )
    stats = parse_stats(log)
    assert stats == {
        "executions": 3000,
        "coverage": 205,
        "features": 565,
        "corpus": 43,
        "peak_rss_mb": 43,
    }
    assert parse_stats("#17\tNEW    cov: 9 ft: 9 corp: 2/4b\n")["executions"] == 17
