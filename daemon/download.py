"""One template's swarm: a single owner task holds the picker, the links and the counters.

Per-link reader tasks push `(link, event)` into the owner's bounded memory channel; so do the
ticker (`_Tick`), the writer (`_Written`, `_Verified`) and the control calls. The owner handles
each event without awaiting anything, so its state never changes under it, and it never blocks
on a slow peer: control messages are queued on the link (`PeerLink.post`), chunk writes go to
the writer task, whose hashing and pwrite run in a worker thread. Memory stays bounded: every
chunk between a link's reader and the writer holds one of `chunks_in_memory` tokens.

The same class serves and downloads: a complete template simply wants nothing more.
"""

from __future__ import annotations

import logging
import math
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..swarm.bitfield import Bitfield
from ..swarm.connection import Connection
from ..swarm.messages import Cancel, Chunk, Handshake, Have, Reject, Request, Role
from ..swarm.picker import Picker, PickerConfig
from . import peer_link
from .bans import BanList, handshake_offence
from .limits import AddressLimits, remote_host
from .node_access import dial_roles, link_refusal
from .peer_link import (
    BufferPool,
    HandshakeError,
    LinkDown,
    LinkOptions,
    LinkUp,
    LocalPeer,
    PeerLink,
)
from .ratelimit import RateLimiter
from .serving import MAX_QUEUED_REQUESTS, ChunkServer
from .storeerrors import ChunkMismatch, StoreError
from .template_sources import TemplateData
from .tls import PeerIdentity, TlsError
from .tls import connect as tls_connect
from .transfer_events import TransferEvents, role_label

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadConfig:
    """Tunables of one template's swarm."""

    # Bytes of requests outstanding per peer: each holder serves many links at once, so a
    # deeper queue only makes requests wait there (bench.cluster N=12: 1.21 -> 1.17 at one 2 MiB).
    pipeline_bytes: int = 2 << 20
    min_pipeline: int = 1
    max_pipeline: int = 16
    tick_interval: float = 0.5
    # A wanted chunk no connected peer holds for this long fails the waiting fetch.
    no_source_timeout: float = 30.0
    # Fewer links than this (while downloading) asks the tracker for more peers.
    wanted_links: int = 8
    max_links: int = 40
    # Chunks received but not yet verified and written, over all links of this template.
    chunks_in_memory: int = 4
    # Worker threads verifying and writing chunks at once (the page cache fills faster so).
    writers: int = 2
    discovery_interval: float = 1.0
    connect_timeout: float = 5.0
    redial_after: float = 10.0
    max_queued_requests: int = MAX_QUEUED_REQUESTS
    # Linked hosts from which on each center gets only this many requests at a time.
    share_hosts: int = 2
    center_depth_when_sharing: int = 1
    # A center is spared a chunk only once this many linked hosts hold it: one holder alone
    # cannot serve everyone who wants it (bench.cluster N=6: 1.13 -> 1.08).
    share_copies: int = 2
    # Past this share of the bytes an idle center is lent chunks hosts hold (the last ones
    # otherwise wait on busy hosts); before it, hosts trade them among themselves.
    center_help_after: float = 0.75
    # A chunk a reader waits on gets a second source when the first has not sent it by then.
    urgent_grace: float = 1.0
    # A reader waiting on chunk k will likely want k+1.. next (a boot loads files in order):
    # these many chunks after it are asked for right behind it.
    urgent_readahead: int = 2
    # Until this many chunks are here, the centers get one request at a time in all: at the
    # start they serve every host at once, so a single chunk arrives whole (tradable) sooner.
    start_chunks: int = 1
    # The endgame duplicates a request once it is this many typical chunk latencies old.
    endgame_latencies: float = 2.0
    picker: PickerConfig | None = None
    link: LinkOptions | None = None

    def pipeline_depth(self, chunk_size: int) -> int:
        depth = self.pipeline_bytes // max(chunk_size, 1)
        return max(self.min_pipeline, min(self.max_pipeline, depth))


@dataclass(frozen=True)
class PeerAddress:
    """Somewhere to dial; `peer_id` and `role` when the tracker told us."""

    host: str
    port: int
    peer_id: bytes | None = None
    role: Role | None = None


PeerFinder = Callable[[bytes, Bitfield], Awaitable[list[PeerAddress]]]


class DownloadFailed(Exception):
    """The wanted chunks cannot be had right now; the message says why (for the operator)."""


class ConnectionBudget:
    """The node-wide cap on peer connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def try_acquire(self) -> bool:
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        self.in_use = max(0, self.in_use - 1)


@dataclass(frozen=True)
class Progress:
    """Where a download stands; bytes count only chunks that travel (never zero chunks)."""

    done_bytes: int
    total_bytes: int
    rate: float
    upload_rate: float
    sources: int
    bytes_from_centers: int
    bytes_from_peers: int
    links: int
    complete: bool
    error: str | None

    @property
    def eta(self) -> float | None:
        left = self.total_bytes - self.done_bytes
        if left <= 0:
            return 0.0
        return left / self.rate if self.rate > 0 else None

    @property
    def percent(self) -> float:
        return 100.0 if self.total_bytes == 0 else 100.0 * self.done_bytes / self.total_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "percent": round(self.percent, 2),
            "rate": self.rate,
            "upload_rate": self.upload_rate,
            "sources": self.sources,
            "bytes_from_centers": self.bytes_from_centers,
            "bytes_from_peers": self.bytes_from_peers,
            "links": self.links,
            "eta": self.eta,
            "complete": self.complete,
            "error": self.error,
        }


@dataclass
class _Peer:
    link: PeerLink
    verifying: int = 0
    chunks: int = 0
    bytes: int = 0
    timeouts: int = 0


@dataclass
class BanRecord:
    """A peer banned for this template, and why."""

    peer_id: bytes
    address: tuple[str, int] | None
    reason: str
    corrupt_chunks: int = 1


# -- owner events besides the links' ----------------------------------------------------------


@dataclass(frozen=True)
class _Tick:
    pass


@dataclass(frozen=True)
class _Written:
    link: PeerLink
    index: int
    size: int
    newly: tuple[int, ...] = ()
    corrupt: bool = False
    error: str | None = None


@dataclass(frozen=True)
class _Verified:
    ok: bool


@dataclass(frozen=True)
class _Found:
    addresses: tuple[PeerAddress, ...]
    explicit: bool = False


@dataclass(frozen=True)
class _Want:
    indices: tuple[int, ...] | None  # None: every chunk
    applied: trio.Event = field(default_factory=trio.Event)


@dataclass(frozen=True)
class _Retry:
    pass


@dataclass(frozen=True)
class _Urgent:
    index: int


@dataclass(frozen=True)
class _Prefer:
    order: tuple[int, ...]


@dataclass(frozen=True)
class _WriteJob:
    link: PeerLink
    index: int
    data: bytes | memoryview


@dataclass(frozen=True)
class _VerifyJob:
    pass


_Item = tuple[PeerLink | None, object]


@dataclass
class _RateMeter:
    """Bytes per second over the last `window` seconds, sampled at ticks."""

    window: float = 2.0
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def sample(self, now: float, total: int) -> float:
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        first_t, first_total = self.samples[0]
        span = now - first_t
        return (total - first_total) / span if span > 0 else 0.0


class _Ewma:
    """An exponentially weighted mean; None before the first sample."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.value: float | None = None

    def add(self, sample: float) -> None:
        old = self.value
        self.value = sample if old is None else old + self.weight * (sample - old)


class TemplateDownload:
    """The swarm of one template on this node: serves what it has, fetches what it wants."""

    def __init__(
        self,
        data: TemplateData,
        local: LocalPeer,
        *,
        upload_slots: trio.Semaphore,
        upload_limit: RateLimiter | None = None,
        want: Iterable[int] | None = None,
        want_all: bool = True,
        find_peers: PeerFinder | None = None,
        budget: ConnectionBudget | None = None,
        config: DownloadConfig | None = None,
        rng: random.Random | None = None,
        events: TransferEvents | None = None,
        bans: BanList | None = None,
        address_limits: AddressLimits | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.data = data
        # Node-wide: misbehaving peers banned for a while, and connections per IP address.
        self._bans = bans
        self._address_limits = address_limits
        self._tls = tls  # mutual TLS on the links we open (daemon/tls.py client_context)
        self.events = events or TransferEvents()
        self._label = f"{data.manifest.name}:{data.manifest.version}"
        # When each missing chunk was first requested: the fetch-latency histogram's start.
        self._requested_at: dict[int, float] = {}
        # Set when the first chunk is requested; `template_complete` reports from here.
        self._fetch_began: float | None = None
        self._latency = _Ewma(0.2)
        self.manifest = data.manifest
        self.template_id = data.manifest.template_id
        self.local = local
        self.config = config or DownloadConfig()
        self._upload_slots = upload_slots
        self._upload_limit = upload_limit
        self._find_peers = find_peers
        self._budget = budget
        self._rng = rng or random.Random()
        self._start_center = self._rng.randrange(1 << 30)
        self._depth = self.config.pipeline_depth(self.manifest.chunk_size)
        self._lengths = [self.manifest.chunk_range(i)[1] for i in range(self.manifest.chunk_count)]
        self._want_all = want is None and want_all
        self._wanted: set[int] = set() if want is None else set(want)
        self._send, self._receive = trio.open_memory_channel[_Item](256)
        self._write_send, self._write_receive = trio.open_memory_channel[_WriteJob | _VerifyJob](
            math.inf
        )
        self._tokens = trio.Semaphore(self.config.chunks_in_memory)
        # Chunk buffers for receiving (those holding tokens, one being filled per busy link) and
        # for serving (about one per upload slot in use).
        self._buffers = BufferPool(
            self.manifest.chunk_size, keep=self.config.chunks_in_memory + self.config.writers + 8
        )
        self._peers: dict[bytes, _Peer] = {}
        self._all_links: set[PeerLink] = set()
        self.banned: dict[bytes, BanRecord] = {}
        # Chunks being verified and written (one copy each), and a spare copy per chunk.
        self._writing: set[int] = set()
        self._spares: dict[int, _WriteJob] = {}
        # Per center: chunks hidden from its picker entry because a linked host holds them.
        self._masked: dict[bytes, set[int]] = {}
        self._dialing: set[tuple[str, int]] = set()
        self._dial_failed: dict[tuple[str, int], float] = {}
        self._discovering = False
        self._next_discovery = -math.inf
        self._unavailable_since: float | None = None
        self._lost: set[int] = set()
        # Chunks a reader (a VM booting over NBD) waits on, and the order a boot profile prefers.
        self._urgent: dict[int, trio.Event] = {}
        self._preferred: tuple[int, ...] = ()
        # Chunks received but not stored (the disk failed or filled up), by the peer that sent
        # them: no more requests until `retry`, which asks for them again.
        self._unstored: set[tuple[bytes, int]] = set()
        self._verifying_image = False
        self.verified = False
        # The first chunk the running whole-image hash still needs, and the nudge to feed it.
        self._hash_frontier = 0
        self._hash_due = trio.Event()
        # trio times: every wanted chunk verified and written; then the whole image verified.
        self.chunks_done_at: float | None = None
        self.error: str | None = None
        self.bytes_from_centers = 0
        self.bytes_from_peers = 0
        self.wasted_bytes = 0
        self.corrupt_chunks = 0
        self.timeouts = 0
        # Time spent verifying and writing chunks (worker thread): shows when the disk limits.
        self.write_seconds = 0.0
        self._sources: set[bytes] = set()
        self._retired_out = 0
        self._down_meter = _RateMeter()
        self._up_meter = _RateMeter()
        self.rate = 0.0
        self.upload_rate = 0.0
        self._changed = trio.Event()
        self._running = False
        self._nursery: trio.Nursery | None = None
        self._picker = self._new_picker()
        self._total_bytes, self._done_bytes = self._count_bytes()

    # -- public API ------------------------------------------------------------------------------

    def _log_fields(self, link: PeerLink | None = None, index: int | None = None) -> dict[str, Any]:
        """Context for a structured log line: the template, and the peer and chunk if any."""
        fields: dict[str, Any] = {"template": self._label}
        if link is not None:
            fields["peer"] = link.peer_id.hex()[:16]
            fields["role"] = role_label(link.role)
        if index is not None:
            fields["chunk"] = index
        return fields

    @property
    def missing_chunks(self) -> int:
        """Wanted non-zero chunks not here yet (a center wants only its share)."""
        return self._picker.missing_count

    @property
    def satisfied(self) -> bool:
        """Is everything wanted here (and, when the whole image is wanted, verified)?"""
        if self._want_all:
            return self.verified
        return self._picker.complete and not self._writing

    @property
    def complete(self) -> bool:
        """Is the whole template present and verified on this node?"""
        return self.verified

    @property
    def wants_more(self) -> bool:
        return not self._picker.complete

    def progress(self) -> Progress:
        return Progress(
            done_bytes=self._done_bytes,
            total_bytes=self._total_bytes,
            rate=self.rate,
            upload_rate=self.upload_rate,
            sources=len(self._sources),
            bytes_from_centers=self.bytes_from_centers,
            bytes_from_peers=self.bytes_from_peers,
            links=len(self._peers),
            complete=self.satisfied,
            error=self.error,
        )

    def status(self) -> dict[str, Any]:
        """This template's swarm as the `status` control call shows it.

        `percent` is of the bytes wanted here; a storage center, which wants only its share,
        shows the share of all chunks it holds instead.
        """
        manifest = self.manifest
        held = len(self.data.have())
        progress = self.progress().as_dict()
        if not self._want_all:
            progress["percent"] = _percent(held, len(self._lengths))
        return {
            "template_id": self.template_id.hex(),
            "name": manifest.name,
            "version": manifest.version,
            "size": manifest.size,
            "path": None if self.data.path is None else str(self.data.path),
            "complete": self.complete,
            "wanted_complete": self.satisfied,
            "chunks": len(self._lengths),
            "chunks_held": held,
            "bytes_up": self._bytes_up(),
            "wasted_bytes": self.wasted_bytes,
            "corrupt_chunks": self.corrupt_chunks,
            "timeouts": self.timeouts,
            "write_seconds": round(self.write_seconds, 3),
            **progress,
            "peers": [
                {
                    "peer_id": pid.hex(),
                    "address": None if p.link.address is None else list(p.link.address),
                    "listen": None if p.link.their.listen is None else list(p.link.their.listen),
                    "role": p.link.role.value,
                    "direction": "out" if p.link.outbound else "in",
                    "bytes_in": p.link.bytes_in,
                    "bytes_out": p.link.bytes_out,
                    "chunks_from": p.chunks,
                    "requests": len(self._picker.outstanding(pid)),
                    "percent": round(
                        100.0 * len(p.link.their_bitfield) / max(len(self._lengths), 1), 2
                    ),
                }
                for pid, p in self._peers.items()
            ],
            "banned": [
                {
                    "peer_id": record.peer_id.hex(),
                    "address": None if record.address is None else list(record.address),
                    "reason": record.reason,
                    "corrupt_chunks": record.corrupt_chunks,
                }
                for record in self.banned.values()
            ],
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The owner loop; runs until cancelled, serving and fetching."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for _ in range(self.config.writers):
                    nursery.start_soon(self._writer)
                nursery.start_soon(self._ticker)
                hash_ahead = getattr(self.data, "hash_ahead", None)
                if self._want_all and hash_ahead is not None:
                    nursery.start_soon(self._hash_ahead, hash_ahead)
                self._running = True
                if self._want_all and self._picker.complete:
                    self._start_verify()
                task_status.started()
                async for link, event in self._receive:
                    self._handle(link, event)
        finally:
            self._running = False
            for link in list(self._all_links):
                link.close("shutting down")

    async def run_link(self, link: PeerLink) -> str:
        """Run a handshaken link of this template until it ends (serving and fetching on it)."""
        server = ChunkServer(
            link,
            self.data,
            self._upload_slots,
            max_queued=self.config.max_queued_requests,
            on_lost=self._lost.add,
            rate_limit=self._upload_limit,
            buffers=self._buffers,
            on_sent=lambda size: self.events.chunk_sent(self._label, role_label(link.role), size),
        )
        self._all_links.add(link)
        link.on_offence = self._ban_offender
        link.conn.set_allocator(self._buffers.take)
        try:
            return await link.run(self._send, server, chunk_tokens=self._tokens)
        finally:
            self._all_links.discard(link)
            self._retired_out += link.bytes_out
            if link.idle_timed_out:
                self.events.connection_dropped("idle_timeout")

    def _ban_offender(self, link: PeerLink) -> None:
        """A peer that broke the protocol or flooded us: banned node-wide for a while."""
        assert link.offence is not None
        log.warning(
            "banning %r (%s): %s",
            link,
            link.offence,
            link.close_reason or "misbehaved",
            extra=self._log_fields(link),
        )
        if self._bans is None:
            return
        self._bans.ban(
            link.offence,
            trio.current_time(),
            peer_id=link.peer_id,
            host=None if link.address is None else link.address[0],
            role=role_label(link.role),
            detail=link.close_reason or "",
        )

    def _node_ban(self, peer_id: bytes | None, host: str | None) -> str | None:
        """Why this peer is banned node-wide right now, or None."""
        if self._bans is None:
            return None
        found = self._bans.banned(trio.current_time(), peer_id=peer_id, host=host)
        return None if found is None else found.reason

    async def accept(self, stream: trio.abc.Stream, conn: Connection, their: Handshake) -> None:
        """Finish an inbound handshake for this template and run the link."""
        if their.peer_id in self.banned:
            await peer_link.refuse(stream, conn, "banned: sent corrupt chunks")
            return
        reason = self._node_ban(their.peer_id, None)
        if reason is not None:
            await peer_link.refuse(stream, conn, f"banned for a while: {reason}")
            return
        host = remote_host(stream)  # the stream is closed by the time a failure is known
        try:
            link = await peer_link.accept(
                stream, conn, their, self.local, self.data.have(), options=self.config.link
            )
        except HandshakeError as exc:
            log.info("inbound handshake for %s failed: %s", self.manifest.name, exc)
            if str(exc).startswith("no bitfield within"):
                self.events.connection_dropped("handshake_timeout")
            offence = handshake_offence(str(exc))
            if offence is not None and self._bans is not None:
                self._bans.ban(
                    offence,
                    trio.current_time(),
                    peer_id=their.peer_id,
                    host=host,
                    role=role_label(their.role),
                    detail=str(exc),
                )
            return
        await self.run_link(link)

    async def add_sources(self, addresses: Iterable[PeerAddress]) -> None:
        """Dial these peers now (explicit sources, e.g. a publisher's seeder)."""
        await self._send.send((None, _Found(tuple(addresses), explicit=True)))

    async def want(self, indices: Iterable[int] | None) -> None:
        """Also fetch these chunks (None: all of them); returns once the owner applied it."""
        event = _Want(None if indices is None else tuple(indices))
        await self._send.send((None, event))
        await event.applied.wait()

    async def wait_chunk(self, index: int) -> None:
        """Return once chunk `index` is verified and stored here; it jumps the queue meanwhile.

        Waits without limit: the caller bounds it (an NBD read's timeout).
        """
        if not 0 <= index < len(self._lengths):
            raise ValueError(
                f"chunk {index} is outside {self.manifest.name} (0..{len(self._lengths) - 1})"
            )
        if self.data.has(index):
            return
        event = self._urgent.get(index)
        if event is None:
            event = self._urgent[index] = trio.Event()
            await self._send.send((None, _Urgent(index)))
        await event.wait()

    async def prefer(self, order: Iterable[int]) -> None:
        """Fetch these chunks first, in this order (a boot's prefetch profile)."""
        await self._send.send((None, _Prefer(tuple(order))))

    def why_missing(self, index: int) -> str:
        """Why chunk `index` is not here yet, for a reader that gave up on it."""
        if self.data.has(index):
            return "it is here"
        if self.error is not None:
            return f"the fetch failed: {self.error}"
        requested = self._picker.requesters(index)
        holders = [p for p in self._peers.values() if index in p.link.their_bitfield]
        if requested:
            return f"requested from {len(requested)} peer(s), not arrived yet"
        if not holders:
            return f"none of the {len(self._peers)} linked peers holds it"
        return f"{len(holders)} linked peer(s) hold it; waiting for a free request slot"

    def lost(self, indices: Iterable[int]) -> None:
        """These chunks are gone from the store (a scrub dropped them): fetch them again."""
        self._lost.update(indices)

    async def retry(self) -> None:
        """Forget the last failure and look for sources again now."""
        self.error = None
        self._unavailable_since = None
        await self._send.send((None, _Retry()))

    async def wait_verified(self) -> None:
        """Return once the whole template is here and verified; failures are waited out."""
        while not self.complete:
            await self._changed.wait()

    async def wait_done(
        self,
        on_progress: Callable[[Progress], Awaitable[None]] | None = None,
        *,
        interval: float = 0.5,
    ) -> Progress:
        """Wait until everything wanted is here; DownloadFailed when a failure is reported.

        `on_progress` is awaited about every `interval` seconds meanwhile.
        """
        while True:
            with trio.move_on_after(interval if on_progress is not None else math.inf):
                while not self.satisfied and self.error is None:
                    await self._changed.wait()
            if self.satisfied:
                return self.progress()
            if self.error is not None:
                raise DownloadFailed(self.error)
            if on_progress is not None:
                await on_progress(self.progress())

    # -- the owner's event handling (never awaits) -------------------------------------------------

    def _handle(self, link: PeerLink | None, event: object) -> None:
        if link is not None:
            if isinstance(event, Chunk):
                self._on_chunk(link, event)
            elif isinstance(event, Have):
                self._on_have(link, event.index)
            elif isinstance(event, Reject):
                self._on_reject(link, event)
            elif isinstance(event, LinkUp):
                self._on_link_up(link, event)
            elif isinstance(event, LinkDown):
                self._on_link_down(link, event.reason)
            return
        if isinstance(event, _Written):
            self._on_written(event)
        elif isinstance(event, _Tick):
            self._on_tick()
        elif isinstance(event, _Verified):
            self._on_verified(event.ok)
        elif isinstance(event, _Found):
            for address in event.addresses:
                self._dial(address, explicit=event.explicit)
        elif isinstance(event, _Want):
            self._on_want(event.indices)
            event.applied.set()
        elif isinstance(event, _Urgent):
            self._on_urgent(event.index)
        elif isinstance(event, _Prefer):
            self._preferred = event.order
            self._picker.set_preferred(event.order)
            self._fill_all()
        elif isinstance(event, _Retry):
            self._resume_storing()
            self.error = None
            self._unavailable_since = None
            self._next_discovery = -math.inf
            self._dial_failed.clear()
            self._on_tick()
        self._signal()

    def _current(self, link: PeerLink) -> _Peer | None:
        peer = self._peers.get(link.peer_id)
        return peer if peer is not None and peer.link is link else None

    def _on_link_up(self, link: PeerLink, up: LinkUp) -> None:
        pid = link.peer_id
        if pid == self.local.peer_id:
            link.close("connected to ourselves")
            return
        if pid in self.banned:
            link.close("banned: sent corrupt chunks")
            return
        reason = self._node_ban(pid, None)
        if reason is not None:
            link.close(f"banned for a while: {reason}")
            return
        old = self._peers.get(pid)
        if old is not None:
            if not _prefer(link, old.link):
                link.close("duplicate link")
                return
            old.link.close("duplicate link")
            self._drop_peer(pid)
        if len(self._peers) >= self.config.max_links:
            link.close("too many links for this template")
            return
        if (
            self.satisfied
            and self._want_all
            and (link.role is Role.STORAGE or up.bitfield.complete)
        ):
            link.close("nothing to trade: both sides are complete")
            return
        self._peers[pid] = _Peer(link)
        self._picker.add_peer(pid, link.their_bitfield)
        if link.role is Role.STORAGE:
            self._mask_centers(self._host_chunks(), [pid])
        elif self._host_links == self.config.share_hosts:
            self._mask_centers(self._host_chunks())
        else:
            self._mask_centers(link.their_bitfield)
        # Chunks we verified after the bitfield we sent was taken would otherwise go unannounced.
        have = self.data.have()
        for index in have:
            if index not in up.sent:
                link.post(Have(index))
        log.info(
            "link %s %r up (%d links)",
            self.manifest.name,
            link,
            len(self._peers),
            extra=self._log_fields(link),
        )
        self._fill(pid)

    def _on_link_down(self, link: PeerLink, reason: str) -> None:
        if self._current(link) is None:
            return
        log.info(
            "link %s %r down: %s", self.manifest.name, link, reason, extra=self._log_fields(link)
        )
        self._drop_peer(link.peer_id)
        self._restore_centers()
        self._fill_all()

    def _drop_peer(self, pid: bytes) -> None:
        del self._peers[pid]
        self._masked.pop(pid, None)
        self._picker.remove_peer(pid)

    def _on_have(self, link: PeerLink, index: int) -> None:
        if self._current(link) is None:
            return
        self._picker.peer_has(link.peer_id, index)
        if self._picker.is_missing(index):
            if link.role is Role.HOST:
                self._mask_centers([index])
            self._fill(link.peer_id)
        elif self.satisfied and self._want_all and link.their_bitfield.complete:
            link.close("nothing to trade: both sides are complete")

    def _on_reject(self, link: PeerLink, reject: Reject) -> None:
        if self._current(link) is None:
            return
        log.debug(
            "%r rejected chunk %d: %s",
            link,
            reject.index,
            reject.reason,
            extra=self._log_fields(link, reject.index),
        )
        self._picker.rejected(link.peer_id, reject.index)
        self._restore_centers()
        self._fill_all()

    def _on_chunk(self, link: PeerLink, chunk: Chunk) -> None:
        peer = self._current(link)
        index = chunk.index
        if peer is None or index >= len(self._lengths) or not self._picker.is_missing(index):
            # Late (a duplicate already written) or unasked: not worth a hash.
            self.wasted_bytes += chunk.size
            self._buffers.give(chunk.data)
            self._tokens.release()
            return
        peer.verifying += 1
        job = _WriteJob(link, index, chunk.data)
        if index in self._writing:
            # An endgame duplicate: kept as a spare in case the copy being written is corrupt.
            older = self._spares.pop(index, None)
            if older is not None:
                self._drop_job(older)
            self._spares[index] = job
        else:
            self._writing.add(index)
            self._write_send.send_nowait(job)
        self._fill(link.peer_id)

    def _drop_job(self, job: _WriteJob) -> None:
        """Let go of a received chunk without writing it."""
        self.wasted_bytes += len(job.data)
        self._buffers.give(job.data)
        self._tokens.release()
        peer = self._current(job.link)
        if peer is not None:
            peer.verifying -= 1

    def _on_written(self, written: _Written) -> None:
        index = written.index
        self._writing.discard(index)
        spare = self._spares.pop(index, None)
        link = written.link
        pid = link.peer_id
        peer = self._current(link)
        if peer is not None:
            peer.verifying -= 1
        if written.corrupt:
            self.events.chunk_failed(self._label, role_label(link.role))
            self._ban(link, index)
            if spare is not None and spare.link.peer_id not in self.banned:
                self._writing.add(index)
                self._write_send.send_nowait(spare)
            elif spare is not None:
                self._drop_job(spare)
            return
        if spare is not None:
            self._drop_job(spare)
        if written.error is not None:
            # Release the request (else it waits for its timeout) and stop asking for more.
            self._picker.rejected(pid, index)
            self._unstored.add((pid, index))
            self._fail(f"cannot store chunk {index}: {written.error}")
            return
        refill = {pid}
        if written.newly:
            began = self._requested_at.pop(index, None)
            latency = None if began is None else trio.current_time() - began
            self.events.chunk_verified(self._label, role_label(link.role), written.size, latency)
            if latency is not None:
                self._latency.add(latency)
            if link.role is Role.STORAGE:
                self.bytes_from_centers += written.size
            else:
                self.bytes_from_peers += written.size
            self._sources.add(pid)
            if peer is not None:
                peer.chunks += 1
                peer.bytes += written.size
            for got in written.newly:
                for other, cancelled in self._picker.received(pid, got):
                    other_peer = self._peers.get(other) if isinstance(other, bytes) else None
                    if other_peer is not None:
                        other_peer.link.post(Cancel(cancelled))
                        refill.add(other_peer.link.peer_id)
                if got not in self._wanted and not self._want_all:
                    continue
                self._done_bytes += self._lengths[got]
            self._release_waiters(written.newly)
            if self._hash_frontier in written.newly:
                self._hash_due.set()
            # Every peer hears it, holders too: a holder that loses it (scrub) must know we have it.
            for got in written.newly:
                for other_peer in self._peers.values():
                    other_peer.link.post(Have(got))
        else:
            self.wasted_bytes += written.size
            self._picker.received(pid, index)
        for key in refill:
            if key in self._peers:
                self._fill(key)
        if self._picker.complete and not self._writing:
            self._on_wanted_here()

    def _on_urgent(self, index: int) -> None:
        if self.data.has(index):
            self._release_waiters((index,))
            return
        now = trio.current_time()
        self._picker.set_deadline(index, now + self.config.urgent_grace)
        ahead = self._readahead(index)
        for step, later in enumerate(ahead, start=1):
            # Later deadlines: behind the waited chunk, and no duplicate request for a while.
            self._picker.set_deadline(later, now + self.config.urgent_grace * (1 + 4 * step))
        self._unmask([index, *ahead])  # whoever holds them, the centers too
        self._fill_all()

    def _readahead(self, index: int) -> list[int]:
        """The missing non-zero chunks among the few right after `index`."""
        end = min(index + 1 + self.config.urgent_readahead, len(self._lengths))
        return [i for i in range(index + 1, end) if self._picker.is_missing(i)]

    def _release_waiters(self, indices: Iterable[int]) -> None:
        for index in indices:
            event = self._urgent.pop(index, None)
            if event is not None:
                event.set()

    def _on_wanted_here(self) -> None:
        if self.chunks_done_at is None:
            self.chunks_done_at = trio.current_time()
        if self._want_all:
            if not self.verified:
                self._start_verify()
            return
        log.info(
            "template %s: every wanted chunk is here", self.manifest.name, extra=self._log_fields()
        )

    def _start_verify(self) -> None:
        if self._verifying_image:
            return
        self._verifying_image = True
        self._write_send.send_nowait(_VerifyJob())

    def _on_verified(self, ok: bool) -> None:
        self._verifying_image = False
        if ok:
            self.verified = True
            self.error = None
            if self._fetch_began is not None:
                self.events.template_complete(self._label, trio.current_time() - self._fetch_began)
            log.info(
                "template %s %s complete and verified (%d bytes from centers, %d from peers)",
                self.manifest.name,
                self.manifest.version,
                self.bytes_from_centers,
                self.bytes_from_peers,
            )
            for peer in list(self._peers.values()):
                if peer.link.role is Role.STORAGE or peer.link.their_bitfield.complete:
                    peer.link.close("nothing to trade: both sides are complete")
            return
        self._fail(
            f"image of {self.manifest.name} {self.manifest.version} does not match its "
            "whole-image digest although every chunk verified"
        )

    def _ban(self, link: PeerLink, index: int) -> None:
        pid = link.peer_id
        self.corrupt_chunks += 1
        record = self.banned.get(pid)
        if record is None:
            reason = f"sent a corrupt copy of chunk {index}"
            self.banned[pid] = BanRecord(pid, link.their.listen or link.address, reason)
            self.events.peer_banned(self._label, role_label(link.role), "corrupt_chunk")
            log.warning(
                "banning %r for %s: %s",
                link,
                self.manifest.name,
                reason,
                extra=self._log_fields(link, index),
            )
        else:
            record.corrupt_chunks += 1
        self._picker.failed(pid, index)
        if self._current(link) is not None:
            del self._peers[pid]
            self._masked.pop(pid, None)
        self._picker.ban(pid)
        link.close(f"you sent a corrupt copy of chunk {index}")
        self._restore_centers()
        self._fill_all()

    def _fail(self, reason: str) -> None:
        if self.error is None:
            log.error("template %s: %s", self.manifest.name, reason, extra=self._log_fields())
        self.error = reason

    def _on_want(self, indices: tuple[int, ...] | None) -> None:
        if indices is None:
            self._want_all = True
        else:
            self._wanted.update(i for i in indices if 0 <= i < len(self._lengths))
        self.error = None
        self._unavailable_since = None
        self._next_discovery = -math.inf
        self._picker = self._new_picker()
        now = trio.current_time()
        for index in self._urgent:
            self._picker.set_deadline(index, now)
        if self._preferred:
            self._picker.set_preferred(self._preferred)
        for pid, peer in self._peers.items():
            self._picker.add_peer(pid, peer.link.their_bitfield)
        for pid in self.banned:
            self._picker.ban(pid)
        self._masked.clear()
        self._mask_centers(self._host_chunks())
        self._total_bytes, self._done_bytes = self._count_bytes()
        self._fill_all()
        if self._picker.complete and not self._writing:
            self._on_wanted_here()

    def _on_tick(self) -> None:
        now = trio.current_time()
        timed_out = []
        for pid, index in self._picker.expired(now):
            self.timeouts += 1
            # Its latency counts from the next request: a timeout must not stretch the grace.
            self._requested_at.pop(index, None)
            peer = self._peers.get(pid) if isinstance(pid, bytes) else None
            if peer is not None:
                peer.timeouts += 1
                peer.link.post(Cancel(index))
                log.info(
                    "request for chunk %d to %r timed out",
                    index,
                    peer.link,
                    extra=self._log_fields(peer.link, index),
                )
                if peer.link.role is Role.HOST:
                    self._unmask([index])  # a slow host: let the centers have a go too
                self._picker.rejected(pid, index)
                timed_out.append((peer, index))
        if timed_out:
            # Other holders get the first chance; the slow peer only when no one else has it.
            self._fill_all()
            for peer, index in timed_out:
                if self._current(peer.link) is not None and index in peer.link.their_bitfield:
                    self._picker.peer_has(peer.link.peer_id, index)
        if self._lost:
            lost, self._lost = self._lost, set()
            log.warning("chunks %s became unreadable here; fetching them again", sorted(lost))
            self.verified = False
            # A center wants only its share: what it lost is part of it, so fetch it back.
            self._on_want(None if self._want_all else tuple(lost))
        self._restore_centers()
        if self._latency.value is not None:
            # Only a request well behind the usual pace is worth a second copy.
            self._picker.set_endgame_grace(self.config.endgame_latencies * self._latency.value)
        self._fill_all()
        self.rate = self._down_meter.sample(now, self.bytes_from_centers + self.bytes_from_peers)
        self.upload_rate = self._up_meter.sample(now, self._bytes_up())
        if self._picker.complete:
            self._unavailable_since = None
            return
        unavailable = self._picker.unavailable()
        if unavailable:
            if self._unavailable_since is None:
                self._unavailable_since = now
            elif now - self._unavailable_since >= self.config.no_source_timeout:
                more = f" (and {len(unavailable) - 1} more)" if len(unavailable) > 1 else ""
                self._fail(f"no source holds chunk {unavailable[0]}{more}")
        else:
            self._unavailable_since = None
            if self.error is not None and self.error.startswith("no source"):
                self.error = None
        short = len(self._peers) < self.config.wanted_links or bool(unavailable)
        if short and not self._discovering and now >= self._next_discovery:
            self._discover(now)

    # -- centers as sources of last resort -----------------------------------------------------

    def _sharing(self) -> bool:
        return self._host_links >= self.config.share_hosts

    def _host_chunks(self) -> set[int]:
        held: set[int] = set()
        for peer in self._peers.values():
            if peer.link.role is Role.HOST:
                held.update(peer.link.their_bitfield)
        return held

    def _host_copies(self, index: int) -> int:
        return sum(
            1
            for peer in self._peers.values()
            if peer.link.role is Role.HOST and index in peer.link.their_bitfield
        )

    def _mask_centers(self, indices: Iterable[int], centers: list[bytes] | None = None) -> None:
        """Hide from the centers the chunks `share_copies` linked hosts hold: ask the hosts.

        Centers then serve what few hosts have yet, and hosts fetch the rest from each other;
        a center left with nothing else gets hidden chunks back (`_unmask_for`), never idles.
        """
        if not self._sharing():
            return
        if centers is None:
            centers = [p for p, peer in self._peers.items() if peer.link.role is Role.STORAGE]
        # A chunk a reader waits on stays open to every source.
        chosen = [
            i
            for i in indices
            if self._picker.is_missing(i)
            and i not in self._urgent
            and self._host_copies(i) >= self.config.share_copies
        ]
        if not chosen:
            return
        for pid in centers:
            bits = self._peers[pid].link.their_bitfield
            busy = set(self._picker.outstanding(pid))
            masked = self._masked.setdefault(pid, set())
            for index in chosen:
                if index in bits and index not in masked and index not in busy:
                    self._picker.rejected(pid, index)
                    masked.add(index)

    def _unmask(self, indices: Iterable[int] | None = None) -> None:
        """Give the centers back hidden chunks (all of them, or these)."""
        only = None if indices is None else set(indices)
        for pid, masked in self._masked.items():
            back = set(masked) if only is None else masked & only
            for index in back:
                self._picker.peer_has(pid, index)
            masked -= back

    def _unmask_for(self, pid: bytes, count: int) -> None:
        """Give one center back `count` hidden chunks, those fewest linked hosts hold first."""
        masked = self._masked[pid]
        masked.intersection_update([i for i in masked if self._picker.is_missing(i)])
        missing = list(masked)  # chunks held since they were hidden need no giving back
        free = [i for i in missing if not self._picker.requesters(i)]
        free.sort(key=self._host_copies)
        # None free: all are on their way from hosts; the endgame may then ask the center too.
        for index in free[:count] if free else missing:
            self._picker.peer_has(pid, index)
            masked.discard(index)

    def _restore_centers(self) -> None:
        """Unhide what no linked host offers any more (all of it when too few hosts are left)."""
        if not self._masked:
            return
        if not self._sharing():
            self._unmask()
            return
        unavailable = self._picker.unavailable()
        if unavailable:
            self._unmask(unavailable)

    # -- pipelines -------------------------------------------------------------------------------

    def _fill(self, pid: bytes) -> None:
        peer = self._peers[pid]
        if peer.link.closing or self._unstored:
            return
        now = trio.current_time()
        depth = self._depth
        if peer.link.role is Role.STORAGE and self._host_links >= self.config.share_hosts:
            # With other hosts to trade with, centers are kept for what only they can give.
            depth = self.config.center_depth_when_sharing
        limit = depth + peer.verifying
        if (
            peer.link.role is Role.STORAGE
            and self._want_all
            and self._picker.held < self.config.start_chunks
        ):
            # Only centers holding something wanted count: one holding nothing would stall it.
            centers = sorted(
                p
                for p, c in self._peers.items()
                if c.link.role is Role.STORAGE and self._picker.has_wanted(p)
            )
            # Each host its own center (by chance), or all would queue at the first to link.
            if (
                self._center_requests()
                or pid not in centers
                or pid != centers[self._start_center % len(centers)]
            ):
                return
            limit = 1
        picked = self._picker.pick(pid, now, limit=limit)
        late = self._done_bytes >= self.config.center_help_after * self._total_bytes
        if late and not picked and not self._picker.outstanding(pid) and self._masked.get(pid):
            # Near the end a center with nothing unique left would idle: lend it chunks hosts
            # hold too (earlier the hosts trade them, which is what spares the centers).
            self._unmask_for(pid, depth)
            picked = self._picker.pick(pid, now, limit=limit)
        for index in picked:
            self._requested_at.setdefault(index, now)
            peer.link.post(Request(index))
        if self._fetch_began is None and self._requested_at:
            self._fetch_began = now

    def _center_requests(self) -> int:
        return sum(
            len(self._picker.outstanding(p))
            for p, peer in self._peers.items()
            if peer.link.role is Role.STORAGE
        )

    @property
    def _host_links(self) -> int:
        return sum(1 for p in self._peers.values() if p.link.role is Role.HOST)

    def _fill_all(self) -> None:
        if self._picker.complete:
            return
        # Hosts first, so chunks they hold go to them before a center is asked.
        ordered = sorted(self._peers.items(), key=lambda item: item[1].link.role is Role.STORAGE)
        for pid, _ in ordered:
            self._fill(pid)

    def _resume_storing(self) -> None:
        """After a failed store (e.g. a full disk) the operator retries: ask again for it all."""
        for pid, index in self._unstored:
            peer = self._peers.get(pid)
            if peer is not None and index in peer.link.their_bitfield:
                self._picker.peer_has(pid, index)
        self._unstored.clear()

    # -- peers: discovery and dialing ---------------------------------------------------------

    def _discover(self, now: float) -> None:
        if self._find_peers is None or self._nursery is None:
            return
        self._discovering = True
        self._next_discovery = now + self.config.discovery_interval
        self._nursery.start_soon(self._discover_task)

    async def _discover_task(self) -> None:
        found: list[PeerAddress] = []
        try:
            assert self._find_peers is not None
            found = await self._find_peers(self.template_id, self.data.have())
        except Exception as exc:  # noqa: BLE001 (a broken finder must not end the download)
            log.warning("peer discovery for %s failed: %s", self.manifest.name, exc)
        finally:
            self._discovering = False
        await self._send.send((None, _Found(tuple(found))))

    def _dial(self, address: PeerAddress, *, explicit: bool = False) -> None:
        if self._nursery is None:
            return
        if address.peer_id is not None and (
            address.peer_id == self.local.peer_id
            or address.peer_id in self.banned
            or address.peer_id in self._peers
        ):
            return
        key = (address.host, address.port)
        if key in self._dialing or key == self.local.listen:
            return
        if any(p.link.their.listen == key for p in self._peers.values()):
            return
        now = trio.current_time()
        failed_at = self._dial_failed.get(key)
        if not explicit and failed_at is not None and now - failed_at < self.config.redial_after:
            return
        if not explicit and len(self._peers) + len(self._dialing) >= self.config.max_links:
            return
        if self._want_all and self.satisfied and not explicit:
            return
        if self._node_ban(address.peer_id, address.host) is not None:
            return
        if self._budget is not None and not self._budget.try_acquire():
            return
        limits = self._address_limits
        if limits is not None and not limits.try_acquire(address.host):
            if self._budget is not None:
                self._budget.release()
            return
        self._dialing.add(key)
        self._nursery.start_soon(self._dial_task, address)

    async def _dial_task(self, address: PeerAddress) -> None:
        # Only sync bookkeeping of the dial sets happens here, never across an await.
        key = (address.host, address.port)
        try:
            try:
                with trio.fail_after(self.config.connect_timeout):
                    stream = await trio.open_tcp_stream(address.host, address.port)
                session, identity = await self._secure(stream)
                link = await peer_link.connect(
                    session,
                    self.local,
                    self.template_id,
                    self.data.have(),
                    max_chunk_size=self.manifest.chunk_size,
                    options=self.config.link,
                )
                refusal = None if identity is None else link_refusal(identity.role, link.role)
                if refusal is not None:
                    await trio.aclose_forcefully(session)
                    raise TlsError(f"{identity}: {refusal}")
            except (OSError, trio.TooSlowError, HandshakeError, TlsError) as exc:
                self._dial_failed[key] = trio.current_time()
                log.info("cannot link to %s:%d for %s: %s", *key, self.manifest.name, exc)
                return
            finally:
                self._dialing.discard(key)
            await self.run_link(link)
        finally:
            if self._budget is not None:
                self._budget.release()
            if self._address_limits is not None:
                self._address_limits.release(address.host)

    async def _secure(
        self, stream: trio.SocketStream
    ) -> tuple[trio.abc.Stream, PeerIdentity | None]:
        """The stream to speak on: under TLS, after a handshake with a peer we may link to."""
        if self._tls is None:
            return stream, None
        options = self.config.link or LinkOptions()
        return await tls_connect(
            stream,
            self._tls,
            allowed=dial_roles(self.local.role),
            handshake_seconds=options.handshake_timeout,
        )

    # -- background tasks -----------------------------------------------------------------------

    async def _ticker(self) -> None:
        while True:
            await self._send.send((None, _Tick()))
            await trio.sleep(self.config.tick_interval)

    async def _writer(self) -> None:
        async for job in self._write_receive:
            if isinstance(job, _VerifyJob):
                ok = await trio.to_thread.run_sync(self.data.verify_image)
                await self._send.send((None, _Verified(ok)))
                continue
            size = len(job.data)
            try:
                try:
                    began = trio.current_time()
                    newly = await trio.to_thread.run_sync(
                        self.data.write_chunk, job.index, job.data
                    )
                    self.write_seconds += trio.current_time() - began
                    result = _Written(job.link, job.index, size, newly=tuple(newly))
                except ChunkMismatch:
                    result = _Written(job.link, job.index, size, corrupt=True)
                except StoreError as exc:
                    result = _Written(job.link, job.index, size, error=str(exc))
            finally:
                # The worker thread is done with the bytes (even if cancelled: it ran to the end).
                self._buffers.give(job.data)
                self._tokens.release()
            await self._send.send((None, result))

    async def _hash_ahead(self, hash_ahead: Callable[[], int]) -> None:
        """Hash the image in order as its chunks arrive: the check at the end has less left."""
        count = self.manifest.chunk_count
        while self._hash_frontier < count:
            self._hash_frontier = await trio.to_thread.run_sync(hash_ahead)
            # It may have arrived while the thread hashed: then there is no nudge to wait for.
            if self._hash_frontier < count and not self.data.has(self._hash_frontier):
                await self._hash_due.wait()
            self._hash_due = trio.Event()

    # -- helpers -------------------------------------------------------------------------------

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _bytes_up(self) -> int:
        return self._retired_out + sum(link.bytes_out for link in self._all_links)

    def _new_picker(self) -> Picker:
        count = len(self._lengths)
        have = self.data.have()
        skip = None
        if not self._want_all:
            skip = Bitfield.from_indices(count, (i for i in range(count) if i not in self._wanted))
        return Picker(self._lengths, have, skip=skip, config=self.config.picker, rng=self._rng)

    def _count_bytes(self) -> tuple[int, int]:
        have = self.data.have()
        zero = self.manifest.zero_chunks
        total = done = 0
        for index, length in enumerate(self._lengths):
            if index in zero or not (self._want_all or index in self._wanted):
                continue
            total += length
            if index in have:
                done += length
        return total, done


def _percent(have: int, count: int) -> float:
    return 100.0 if count == 0 else round(100.0 * have / count, 2)


def _prefer(new: PeerLink, old: PeerLink) -> bool:
    """Of two links to one peer, keep the one opened by the lower peer id (both sides agree)."""

    def opener(link: PeerLink) -> bytes:
        return link.our.peer_id if link.outbound else link.peer_id

    return opener(new) < opener(old)
