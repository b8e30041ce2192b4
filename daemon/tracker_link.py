"""The daemon's side of the tracker: the announce loop, peer discovery and catalog lookups.

One `TrackerClient` connection is shared (calls run one at a time); when it breaks, the next
call reconnects. The announce loop backs off exponentially, capped and jittered, while the
tracker is away; links to peers already known keep trading meanwhile.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Callable, Iterable, Mapping

import trio

from ..swarm.address import format_address
from ..swarm.bitfield import Bitfield
from .download import PeerAddress
from .peer_link import LocalPeer
from .rpc import RpcError
from .tracker_client import (
    LookupResult,
    Registered,
    TemplateHave,
    TrackerClient,
    TrackerUnreachable,
)

log = logging.getLogger(__name__)

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 15.0
DEFAULT_INTERVAL = 30.0
PEERS_CAP = 30

Holdings = Callable[[], list[TemplateHave]]
# A host's {vcpus_total, vcpus_used, memory_total, memory_used}; None while it is unknown.
Capacity = Callable[[], Mapping[str, int] | None]


class TrackerLink:
    """Announces this node's templates and asks the tracker for peers and manifests."""

    def __init__(
        self,
        address: tuple[str, int] | None,
        local: LocalPeer,
        holdings: Holdings,
        *,
        rack: str | None = None,
        capacity: Capacity | None = None,
        on_connected: Callable[[], None] | None = None,
        connect_timeout: float = 5.0,
        call_timeout: float = 15.0,
        max_backoff: float = MAX_BACKOFF,
        rng: random.Random | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self._tls = tls  # mutual TLS to the tracker when set (daemon/tls.py client_context)
        self.local = local
        self.rack = rack
        self._holdings = holdings
        self._capacity = capacity
        # Called each time an announce succeeds after the tracker was away (or at the first one).
        self._on_connected = on_connected
        self._connect_timeout = connect_timeout
        self._call_timeout = call_timeout
        self._max_backoff = max_backoff
        self._rng = rng or random.Random()
        self._client: TrackerClient | None = None
        self._connect_lock = trio.Lock()
        self._wake = trio.Event()
        self.connected = False
        self.last_error: str | None = None
        self.announces = 0

    @property
    def label(self) -> str:
        return "none" if self.address is None else format_address(*self.address)

    async def _get_client(self) -> TrackerClient:
        if self.address is None:
            raise TrackerUnreachable("no tracker configured (--tracker HOST:PORT)")
        async with self._connect_lock:
            if self._client is None:
                self._client = await TrackerClient.connect(
                    *self.address,
                    connect_timeout=self._connect_timeout,
                    call_timeout=self._call_timeout,
                    tls=self._tls,
                )
            return self._client

    async def _broken(self, client: TrackerClient, why: str) -> None:
        self.connected = False
        self.last_error = why
        if self._client is client:
            self._client = None
        with trio.CancelScope(shield=True):
            await client.aclose()

    async def lookup(self, name: str, version: str | None) -> LookupResult:
        """The manifest of name[:version]; TrackerUnreachable or RpcError("unknown_template")."""
        client = await self._get_client()
        try:
            return await client.lookup(name, version)
        except TrackerUnreachable as exc:
            await self._broken(client, str(exc))
            raise

    async def register_template(
        self, manifest: bytes, placement: Mapping[str, Iterable[int]], signature: bytes | None
    ) -> Registered:
        """Add a held manifest to the catalog; TrackerUnreachable or RpcError."""
        client = await self._get_client()
        try:
            return await client.register_template(manifest, placement, signature=signature)
        except TrackerUnreachable as exc:
            await self._broken(client, str(exc))
            raise

    async def put_profile(self, template_id: bytes, data: bytes) -> int:
        """Store a template's encoded prefetch profile; TrackerUnreachable or RpcError."""
        client = await self._get_client()
        try:
            return await client.put_profile(template_id, data)
        except TrackerUnreachable as exc:
            await self._broken(client, str(exc))
            raise

    async def find_peers(self, template_id: bytes, bits: Bitfield) -> list[PeerAddress]:
        """Sources for a template, best first; [] while the tracker is away."""
        if self.address is None:
            return []
        try:
            client = await self._get_client()
        except TrackerUnreachable as exc:
            self.last_error = str(exc)
            return []
        try:
            peers = await client.get_peers(
                template_id, self.local.peer_id, bits=bits, rack=self.rack, cap=PEERS_CAP
            )
        except TrackerUnreachable as exc:
            await self._broken(client, str(exc))
            return []
        except RpcError as exc:
            log.warning("tracker %s refused get_peers: %s", self.label, exc)
            return []
        return [PeerAddress(p.host, p.port, p.peer_id, p.role) for p in peers]

    def announce_soon(self) -> None:
        """Announce now rather than at the next interval (a template was added or completed)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce every interval until cancelled; back off while the tracker is away."""
        task_status.started()
        if self.address is None:
            return
        backoff = FIRST_BACKOFF
        while True:
            wait: float | None = None
            try:
                client = await self._get_client()
            except TrackerUnreachable as exc:
                self._note_down(str(exc))
                client = None
            if client is not None:
                try:
                    wait = await client.announce(
                        self.local.peer_id,
                        self.local.role,
                        self.local.listen or ("0.0.0.0", 1),
                        self._holdings(),
                        rack=self.rack,
                        capacity=None if self._capacity is None else self._capacity(),
                    )
                    back = not self.connected
                    if back:
                        log.info("announced to tracker %s", self.label)
                    self.connected = True
                    if back and self._on_connected is not None:
                        self._on_connected()
                    self.last_error = None
                    self.announces += 1
                    backoff = FIRST_BACKOFF
                except TrackerUnreachable as exc:
                    self._note_down(str(exc))
                    await self._broken(client, str(exc))
                except RpcError as exc:
                    log.error("tracker %s refused our announce: %s", self.label, exc)
                    self.last_error = str(exc)
            if wait is None:
                wait = backoff * self._rng.uniform(0.5, 1.5)
                backoff = min(backoff * 2, self._max_backoff)
            with trio.move_on_after(wait):
                await self._wake.wait()
            self._wake = trio.Event()

    def _note_down(self, why: str) -> None:
        if self.connected or self.last_error is None:
            log.warning("tracker %s is away (%s); retrying with backoff", self.label, why)
        self.connected = False
        self.last_error = why

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
