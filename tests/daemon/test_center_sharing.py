"""Centers and hosts sharing the work: what a center is spared, and that it never sits idle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import trio
from vmswarm.daemon.download import DownloadConfig, PeerAddress, PeerFinder, TemplateDownload
from vmswarm.daemon.imagestore import ImageStore
from vmswarm.daemon.ratelimit import RateLimiter
from vmswarm.daemon.template_sources import HostTemplate
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.messages import Role

from .test_download import (
    CHUNK,
    FAST,
    center_store,
    finder,
    host_store,
    make_image,
    peer,
    seeding,
    until,
)


def hosts_first(hosts: list[PeerAddress], center: PeerAddress, links: list[int]) -> PeerFinder:
    """Offer the hosts until both are linked, then the center too (so the sharing rules apply)."""

    async def find(template_id: bytes, bits: Bitfield) -> list[PeerAddress]:
        return hosts + ([center] if links and links[0] >= len(hosts) else [])

    return find


async def fetch_with_center_last(
    tmp_path: Path,
    hosts_hold: list[list[int]],
    slow_hosts: bool,
    config: DownloadConfig = FAST,
) -> tuple[TemplateDownload, int]:
    """A leech linked to two hosts holding `hosts_hold`, then to a center holding everything.

    Returns the finished download and the number of chunks that carry data.
    """
    data, manifest = make_image("D" * 16, seed=7)
    n = manifest.chunk_count
    # One chunk a second from each host: the hosts alone would take many seconds.
    limit = RateLimiter(CHUNK) if slow_hosts else None
    async with trio.open_nursery() as nursery:
        a = host_store(tmp_path / "a", data, manifest, hosts_hold[0])
        b = host_store(tmp_path / "b", data, manifest, hosts_hold[1])
        center = center_store(tmp_path / "c", data, manifest, list(range(n)))
        async with (
            seeding(nursery, a, upload_limit=limit) as sa,
            seeding(nursery, b, upload_limit=limit) as sb,
            seeding(nursery, center, Role.STORAGE) as sc,
        ):
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
            links: list[int] = []
            download = TemplateDownload(
                target,
                peer(),
                upload_slots=trio.Semaphore(4),
                find_peers=hosts_first([sa.address, sb.address], sc.address, links),
                config=config,
            )
            await nursery.start(download.run)

            def linked() -> bool:
                links[:] = [len(download.status()["peers"])]
                return download.satisfied

            with trio.fail_after(30):
                await until(linked)
            assert target.path is not None and target.path.read_bytes() == data
            nursery.cancel_scope.cancel()
    return download, n


async def test_a_center_is_not_left_idle_while_slow_hosts_hold_everything(
    tmp_path: Path,
) -> None:
    everything = list(range(16))
    # Lent chunks from the start (by default only past 75% of the bytes, so hosts trade first).
    at_once = replace(FAST, center_help_after=0.0)
    download, n = await fetch_with_center_last(tmp_path, [everything, everything], True, at_once)
    progress = download.progress()
    # Two hosts hold every chunk, so the center is spared them all at first; once it has
    # nothing else to do it gets them back and serves most of what the slow hosts cannot.
    assert progress.bytes_from_centers >= (n // 2) * CHUNK
    assert progress.bytes_from_centers + progress.bytes_from_peers == n * CHUNK


async def test_before_the_tail_hosts_holding_a_chunk_serve_it(tmp_path: Path) -> None:
    everything = list(range(16))
    download, n = await fetch_with_center_last(tmp_path / "x", [everything, everything], True)
    progress = download.progress()
    # By default the idle center is lent chunks only for the last quarter of the bytes.
    assert progress.bytes_from_centers <= (n // 4) * CHUNK + CHUNK
    assert progress.bytes_from_peers >= (3 * n // 4 - 1) * CHUNK


async def test_a_chunk_only_one_host_holds_is_still_asked_of_a_center(tmp_path: Path) -> None:
    # Host a holds the first half, b nothing: every chunk has at most one host copy.
    download, n = await fetch_with_center_last(tmp_path, [list(range(8)), []], True)
    progress = download.progress()
    # The second half only the center has; of the first half it takes a share too.
    assert progress.bytes_from_centers > (n // 2) * CHUNK
    assert progress.bytes_from_centers + progress.bytes_from_peers == n * CHUNK


async def test_until_its_first_chunk_a_host_asks_one_center_at_a_time(tmp_path: Path) -> None:
    data, manifest = make_image("D" * 8, seed=8)
    n = manifest.chunk_count
    # Slow centers: the first chunk takes a while, long enough to watch the requests.
    limit = RateLimiter(CHUNK / 2)
    async with trio.open_nursery() as nursery:
        stores = [center_store(tmp_path / f"c{i}", data, manifest, list(range(n))) for i in "123"]
        async with (
            seeding(nursery, stores[0], Role.STORAGE, upload_limit=limit) as c1,
            seeding(nursery, stores[1], Role.STORAGE, upload_limit=limit) as c2,
            seeding(nursery, stores[2], Role.STORAGE, upload_limit=limit) as c3,
        ):
            target = HostTemplate(ImageStore(tmp_path / "leech", manifest))
            download = TemplateDownload(
                target,
                peer(),
                upload_slots=trio.Semaphore(4),
                find_peers=finder([c1.address, c2.address, c3.address]),
                config=FAST,
            )
            await nursery.start(download.run)
            most = 0
            with trio.fail_after(30):
                while download.progress().done_bytes == 0:
                    peers = download.status()["peers"]
                    most = max(most, sum(p["requests"] for p in peers))
                    await trio.sleep(0.01)
                # Afterwards every center gets requests again.
                await until(lambda: all(p["requests"] for p in download.status()["peers"]))
            assert most == 1
            nursery.cancel_scope.cancel()
