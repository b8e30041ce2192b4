"""The upload rate limit: rate parsing, the pure bucket, and chunk servers paced on a MockClock."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner
from vmswarm.daemon.peer_link import LinkOptions, LinkUp, PeerLink
from vmswarm.daemon.ratelimit import RateLimiter, TokenBucket, limiter_for, parse_rate
from vmswarm.daemon.serving import ChunkServer
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.messages import Chunk, Request

from .daemon_cli import capture_node_configs
from .test_peer_link import CHUNK, MemoryTemplate, image, link_pair

# No keepalives or idle timeouts to speak of: the limiter's are the only deadlines that matter.
QUIET = LinkOptions(keepalive_interval=1e5, idle_timeout=1e6)


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("20MB", 20e6),
        ("100Mbit", 12.5e6),
        ("1GiB", 2.0**30),
        ("512KiB/s", 512 * 1024.0),
        ("1.5 GB", 1.5e9),
        ("500000", 500000.0),
        ("0", 0.0),
        ("8kbit", 1000.0),
    ],
)
def test_rates_parse_to_bytes_per_second(text: str, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("20Mb", "ambiguous"),
        ("fast", "not a rate"),
        ("3 parsecs", "unknown unit"),
        ("-1MB", "not a rate"),
    ],
)
def test_bad_rates_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rate(text)


def test_zero_means_unlimited_and_nonsense_rates_are_refused() -> None:
    assert limiter_for(0) is None
    assert isinstance(limiter_for(1000), RateLimiter)
    with pytest.raises(ValueError):
        limiter_for(-1)
    with pytest.raises(ValueError):
        TokenBucket(0)


@settings(max_examples=50, deadline=None)
@given(
    rate=st.floats(min_value=1.0, max_value=1e10),
    sizes=st.lists(st.integers(min_value=0, max_value=1 << 24), min_size=1, max_size=20),
)
def test_back_to_back_grants_are_paid_for_at_the_rate(rate: float, sizes: list[int]) -> None:
    bucket = TokenBucket(rate)
    when = 0.0
    for size in sizes:
        when = bucket.reserve(size, when)
    assert when == pytest.approx(sum(sizes) / rate)


def test_an_idle_bucket_grants_its_burst_at_once_but_no_more() -> None:
    bucket = TokenBucket(1000.0, burst=3000.0)
    assert bucket.reserve(3000, 10.0) == 10.0
    assert bucket.reserve(1000, 10.0) == pytest.approx(11.0)
    # Idle time beyond the burst is not saved up.
    assert bucket.reserve(1000, 100.0) == 100.0


async def test_limiter_paces_chunks_on_the_trio_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rate, size, count = 1e6, 250_000, 12
    limiter = RateLimiter(rate)
    start = trio.current_time()
    for _ in range(count):
        await limiter.acquire(size)
    assert trio.current_time() - start == pytest.approx(count * size / rate)
    assert limiter.granted_bytes == count * size


async def _fetch_all(
    left: PeerLink, count: int, receive: trio.MemoryReceiveChannel[tuple[PeerLink, object]]
) -> None:
    event = (await receive.receive())[1]
    assert isinstance(event, LinkUp)
    for index in range(count):
        left.post(Request(index))
    got = 0
    while got < count:
        _, event = await receive.receive()
        if isinstance(event, Chunk):
            assert len(event.data) == CHUNK
            got += 1


async def test_chunk_servers_of_a_node_share_one_upload_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pattern = "D" * 6
    data, manifest = image(pattern)
    count = len(pattern)
    rate = 10.0 * CHUNK  # ten chunks a second for the whole node
    limiter = RateLimiter(rate)
    slots = trio.Semaphore(8)
    done_at: list[float] = []

    async def one_peer() -> None:
        server_data = MemoryTemplate(data, manifest, set(range(count)))
        left, right = await link_pair(manifest, Bitfield(count), server_data.have(), options=QUIET)
        send, receive = trio.open_memory_channel[tuple[PeerLink, object]](16)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.run, send)
            server = ChunkServer(right, server_data, slots, rate_limit=limiter)
            nursery.start_soon(right.run, None, server)
            await _fetch_all(left, count, receive)
            done_at.append(trio.current_time())
            nursery.cancel_scope.cancel()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_peer)
        nursery.start_soon(one_peer)
    # Two peers, six chunks each, one budget: at least twelve chunks' worth of time, not six.
    # (Only a lower bound: MockClock's autojump may also advance while a worker thread reads.)
    assert max(done_at) - start >= 2 * count * CHUNK / rate - 1e-9
    assert limiter.granted_bytes == 2 * count * CHUNK


def test_daemon_run_parses_upload_limit_into_the_node_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    app, seen = capture_node_configs(monkeypatch)
    runner = CliRunner()
    base = ["daemon", "run", "--role", "storage", "--data-dir", str(tmp_path), "--insecure"]
    result = runner.invoke(app, [*base, "--upload-limit", "100Mbit"])
    assert result.exit_code == 0, result.output
    assert seen[-1].upload_limit == pytest.approx(12.5e6)
    result = runner.invoke(app, base)
    assert result.exit_code == 0, result.output
    assert seen[-1].upload_limit == 0
    result = runner.invoke(app, [*base, "--upload-limit", "20Mb"])
    assert result.exit_code == 2
    assert "--upload-limit" in result.output and "ambiguous" in result.output
