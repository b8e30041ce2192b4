"""The tracker: template catalog, peer handout and VM placement over RPC; never chunk data."""

from __future__ import annotations

import functools
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from ..swarm.address import format_address
from ..swarm.bitfield import Bitfield
from ..swarm.errors import ManifestError
from ..swarm.flavors import Flavor, default_flavors
from ..swarm.handout import PeerRecord, rank_peers
from ..swarm.manifest import Manifest
from ..swarm.messages import Role
from ..swarm.prefetch import MAX_PROFILE_BYTES
from ..swarm.rpc import MAX_RPC_FRAME
from ..swarm.signature import MAX_ENVELOPE_BYTES, SignatureError, TrustPolicy
from ..swarm.vm_placement import CAPACITY_KEYS, HostCapacity
from .announces import AnnounceTable, Holding, PeerAnnounce
from .catalog import Catalog, CatalogError, TemplateEntry
from .keys import log_trust
from .limits import hung_up_silently
from .metrics import TrackerCollector, TrackerMetrics, new_registry
from .metrics_http import serve_metrics
from .placement_service import HostCaller, PlacementService, call_host
from .rpc import Handler, Notifier, RpcError, serve_rpc
from .sd_notify import notify_service
from .tls import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    INSECURE_WARNING,
    TlsError,
    TlsMaterial,
    TlsRole,
    accept,
    client_context,
    server_context,
)
from .tracker_access import guarded

log = logging.getLogger(__name__)

DEFAULT_ANNOUNCE_TTL = 90.0
DEFAULT_CAP = 30
MAX_CAP = 200
PEER_ID_LENGTH = 16
TEMPLATE_ID_LENGTH = 32
MAX_HOST_LENGTH = 255
MAX_RACK_LENGTH = 64
MAX_LABEL_LENGTH = 255
MAX_TEMPLATES_PER_ANNOUNCE = 4096
# Bounds the announce table's memory against a client inventing peer ids.
MAX_PEERS = 100_000
# Room in a lookup reply for everything but the manifest and the profile.
_REPLY_SLACK = 64 * 1024
# Announcing hosts that listen on a wildcard get the address the tracker saw them connect from.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})

Params = dict[str, Any]


def _bad(message: str) -> RpcError:
    return RpcError("bad_request", message)


def _param(params: Params, key: str, kinds: tuple[type, ...], *, optional: bool = False) -> Any:
    """params[key] checked against exact types; None is allowed (and the default) if optional."""
    if key not in params:
        if optional:
            return None
        raise _bad(f"missing param {key!r}")
    value = params[key]
    if value is None and optional:
        return None
    if type(value) not in kinds:
        names = " or ".join(k.__name__ for k in kinds)
        raise _bad(f"param {key!r} must be {names}, got {type(value).__name__}")
    return value


def _id(params: Params, key: str, length: int) -> bytes:
    value: bytes = _param(params, key, (bytes,))
    if len(value) != length:
        raise _bad(f"param {key!r} must be {length} bytes, got {len(value)}")
    return value


def _text(params: Params, key: str, limit: int, *, optional: bool = False) -> str | None:
    value: str | None = _param(params, key, (str,), optional=optional)
    if value is not None and not 0 < len(value) <= limit:
        raise _bad(f"param {key!r} must be 1..{limit} characters")
    return value


def _percent(have: int, chunks: int | None, complete: bool) -> float:
    if chunks is None:
        return 100.0 if complete else 0.0
    return 100.0 if chunks == 0 else round(100.0 * have / chunks, 2)


def _popcount(bits: bytes) -> int:
    return int.from_bytes(bits, "big").bit_count()


def _capacity(data: dict[str, Any] | None) -> HostCapacity | None:
    """An announce's optional `capacity` map: four non-negative integers, vCPUs and bytes."""
    if data is None:
        return None
    if set(data) != set(CAPACITY_KEYS):
        raise _bad(f"param 'capacity' must have exactly the keys {', '.join(CAPACITY_KEYS)}")
    values = [data[key] for key in CAPACITY_KEYS]
    if any(type(v) is not int for v in values):
        raise _bad("param 'capacity' values must be integers")
    try:
        return HostCapacity(*values)
    except ValueError as exc:
        raise _bad(f"param 'capacity': {exc}") from None


def _sync_handler(method: Callable[[Params], Params]) -> Handler:
    async def handler(params: Params, _: Notifier) -> Params:
        return method(params)

    return handler


def _async_handler(method: Callable[[Params], Awaitable[Params]]) -> Handler:
    async def handler(params: Params, _: Notifier) -> Params:
        return await method(params)

    return handler


class Tracker:
    """The tracker's state and its RPC methods; `serve_connection` runs one client session."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        announce_ttl: float = DEFAULT_ANNOUNCE_TTL,
        clock: Callable[[], float] = trio.current_time,
        rng: random.Random | None = None,
        flavors: Mapping[str, Flavor] | None = None,
        host_caller: HostCaller = call_host,
        trust: TrustPolicy | None = None,
        wall_clock: Callable[[], float] = time.time,
        on_announce: Callable[[Role], None] = lambda role: None,
        on_placement: Callable[[str], None] = lambda reason: None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.catalog = catalog
        # Mutual TLS on every session when set; each client's certificate role limits its calls.
        self._tls_context = tls_context
        # Metrics hooks: an accepted announce (by role), a placement decision (by reason).
        self._on_announce = on_announce
        # Secure by default: without a policy, only templates signed by a trusted key (none).
        self.trust = trust if trust is not None else TrustPolicy.of(())
        self._wall_clock = wall_clock  # signature expiry is wall-clock time, not trio's clock
        self.announces = AnnounceTable(announce_ttl)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._register_lock = trio.Lock()
        self.placement = PlacementService(
            catalog,
            self.announces,
            default_flavors() if flavors is None else flavors,
            self._now,
            host_caller=host_caller,
            rng=self._rng,
            on_decision=on_placement,
        )

    @property
    def interval(self) -> float:
        """How often daemons should announce: three tries before their entry expires."""
        return self.announces.ttl / 3

    def handlers(
        self, remote_host: str | None = None, role: TlsRole | None = None
    ) -> dict[str, Handler]:
        """The RPC methods for one client connected from `remote_host` (with a TLS `role`)."""
        table: dict[str, Handler] = {
            "announce": _sync_handler(lambda params: self.announce(params, remote_host)),
            "get_peers": _sync_handler(self.get_peers),
            "register_template": _async_handler(self.register_template),
            "list_templates": _sync_handler(self.list_templates),
            "lookup": _async_handler(self.lookup),
            "put_profile": _async_handler(self.put_profile),
            "centers": _sync_handler(self.centers),
            "swarm": _sync_handler(self.swarm),
            "launch": _async_handler(self.placement.launch),
            "vms": _async_handler(self.placement.vms),
            "flavors": _sync_handler(self.placement.flavors_rpc),
        }
        return table if role is None else guarded(table, role)

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """Answer one client until it leaves; whatever goes wrong ends only this session."""
        try:
            remote_host: str | None = stream.socket.getpeername()[0]
        except OSError:
            remote_host = None
        try:
            session: trio.abc.Stream = stream
            role: TlsRole | None = None
            if self._tls_context is not None:
                with trio.move_on_after(DEFAULT_HANDSHAKE_TIMEOUT) as waiting:
                    silent = await hung_up_silently(stream)
                if silent or waiting.cancelled_caught:
                    return  # a port probe, or a client that never starts: nothing to refuse
                try:
                    session, identity = await accept(stream, self._tls_context)
                except TlsError as exc:
                    log.warning("refused TLS client %s: %s", remote_host, exc)
                    return
                role = identity.role
                log.debug("TLS client %s is %s", remote_host, identity)
            # Daemons call at least every TTL/3; a client silent for two TTLs is gone or hostile.
            await serve_rpc(
                session, self.handlers(remote_host, role), idle_timeout=2 * self.announces.ttl
            )
        except Exception:  # one client's failure must never stop the tracker
            log.exception(
                "tracker session with %s failed", remote_host, extra={"remote": remote_host}
            )

    def _now(self) -> float:
        now = self._clock()
        for gone in self.announces.expire(now):
            log.info(
                "peer %s (%s) expired",
                gone.peer_id.hex(),
                gone.role.value,
                extra={"peer": gone.peer_id.hex(), "role": gone.role.value},
            )
        return now

    # --- announces ---

    def announce(self, params: Params, remote_host: str | None = None) -> Params:
        now = self._now()
        peer_id = _id(params, "peer_id", PEER_ID_LENGTH)
        role_text = _param(params, "role", (str,))
        try:
            role = Role(role_text)
        except ValueError:
            raise _bad(f"role must be 'host' or 'storage', got {role_text!r:.40}") from None
        listen = _param(params, "listen", (list, tuple))
        if len(listen) != 2 or type(listen[0]) is not str or type(listen[1]) is not int:
            raise _bad("param 'listen' must be [host, port]")
        host, port = listen
        if len(host) > MAX_HOST_LENGTH or not 0 < port < 65536:
            raise _bad(f"bad listen address {host!r:.80}:{port}")
        if host in WILDCARD_HOSTS:
            if remote_host is None:
                raise _bad(f"listen host {host!r} is a wildcard; announce a reachable address")
            host = remote_host
        rack = _text(params, "rack", MAX_RACK_LENGTH, optional=True)
        holdings = self._holdings(_param(params, "templates", (list,)))
        capacity = _capacity(_param(params, "capacity", (dict,), optional=True))
        if len(self.announces) >= MAX_PEERS and self.announces.get(peer_id, now) is None:
            raise RpcError("tracker_full", f"the tracker already tracks {MAX_PEERS} peers")
        fresh = self.announces.update(
            PeerAnnounce(peer_id, role, (host, port), rack, holdings, now, capacity)
        )
        self._on_announce(role)
        if fresh:
            log.info(
                "new peer %s: %s at %s rack %s, %d templates",
                peer_id.hex(),
                role.value,
                format_address(host, port),
                rack or "-",
                len(holdings),
                extra={
                    "peer": peer_id.hex(),
                    "role": role.value,
                    "address": format_address(host, port),
                },
            )
        return {"interval": self.interval}

    def _holdings(self, templates: list[Any]) -> dict[bytes, Holding]:
        if len(templates) > MAX_TEMPLATES_PER_ANNOUNCE:
            raise _bad(f"at most {MAX_TEMPLATES_PER_ANNOUNCE} templates per announce")
        holdings: dict[bytes, Holding] = {}
        for item in templates:
            if type(item) is not dict:
                raise _bad("each announced template must be a map")
            template_id = _id(item, "template_id", TEMPLATE_ID_LENGTH)
            bits: bytes = _param(item, "bits", (bytes,))
            complete: bool = _param(item, "complete", (bool,))
            if template_id in holdings:
                raise _bad(f"template {template_id.hex()} announced twice")
            entry = self.catalog.entry(template_id)
            bitfield = None
            if entry is not None:
                try:
                    bitfield = Bitfield(entry.chunks, bits)
                except ValueError as exc:
                    raise _bad(f"template {entry.name}:{entry.version}: {exc}") from None
                if bitfield.complete != complete:
                    raise _bad(
                        f"template {entry.name}:{entry.version}: complete={complete} but the "
                        f"bits hold {len(bitfield)} of {entry.chunks} chunks"
                    )
            holdings[template_id] = Holding(bits, complete, bitfield)
        return holdings

    def get_peers(self, params: Params) -> Params:
        now = self._now()
        template_id = _id(params, "template_id", TEMPLATE_ID_LENGTH)
        asker_id = _id(params, "peer_id", PEER_ID_LENGTH)
        bits: bytes | None = _param(params, "bits", (bytes,), optional=True)
        rack = _text(params, "rack", MAX_RACK_LENGTH, optional=True)
        cap: int | None = _param(params, "cap", (int,), optional=True)
        cap = DEFAULT_CAP if cap is None else cap
        if not 0 <= cap <= MAX_CAP:
            raise _bad(f"param 'cap' must be in 0..{MAX_CAP}, got {cap}")
        entry = self.catalog.entry(template_id)
        chunks = None if entry is None else entry.chunks
        asker_bitfield = None
        if bits is not None and chunks is not None:
            try:
                asker_bitfield = Bitfield(chunks, bits)
            except ValueError as exc:
                raise _bad(f"param 'bits': {exc}") from None
        records = self._candidates(template_id, chunks, now)
        ranked = rank_peers(
            asker_id,
            records,
            asker_bitfield=asker_bitfield,
            asker_rack=rack,
            cap=cap,
            rng=self._rng,
        )
        return {"peers": [self._peer_info(record, chunks) for record in ranked]}

    def _candidates(self, template_id: bytes, chunks: int | None, now: float) -> list[PeerRecord]:
        records: dict[bytes, PeerRecord] = {}
        for announce, holding in self.announces.holders(template_id, now):
            if chunks is None:
                # The catalog does not know the template: rank on the announced counts alone.
                records[announce.peer_id] = PeerRecord(
                    announce.peer_id,
                    announce.address,
                    announce.role,
                    announce.rack,
                    have_count=_popcount(holding.bits),
                    complete=holding.complete,
                )
                continue
            bitfield = holding.resolved(chunks)
            if bitfield is not None:  # else bits from before registration that do not fit it
                records[announce.peer_id] = PeerRecord(
                    announce.peer_id, announce.address, announce.role, announce.rack, bitfield
                )
        if chunks is None:
            return list(records.values())
        # A center that has not announced this template yet is still a source per the catalog.
        placement = self.catalog.placement(template_id)
        for announce in self.announces.live(now):
            if announce.role is not Role.STORAGE or announce.peer_id in records:
                continue
            placed = placement.get(announce.peer_id.hex())
            if placed is not None and len(placed):
                records[announce.peer_id] = PeerRecord(
                    announce.peer_id,
                    announce.address,
                    announce.role,
                    announce.rack,
                    bitfield=placed,
                )
        return list(records.values())

    @staticmethod
    def _peer_info(record: PeerRecord, chunks: int | None) -> Params:
        host, port = record.address
        return {
            "peer_id": record.peer_id,
            "host": host,
            "port": port,
            "role": record.role.value,
            "rack": record.rack,
            "complete": record.complete,
            "percent": _percent(record.have_count, chunks, record.complete),
        }

    def centers(self, params: Params) -> Params:
        now = self._now()
        return {
            "centers": [
                {"peer_id": a.peer_id, "host": a.address[0], "port": a.address[1], "rack": a.rack}
                for a in self.announces.live(now)
                if a.role is Role.STORAGE
            ]
        }

    def swarm(self, params: Params) -> Params:
        now = self._now()
        template_id = _id(params, "template_id", TEMPLATE_ID_LENGTH)
        entry = self.catalog.entry(template_id)
        holders = self.announces.holders(template_id, now)
        if entry is None and not holders:
            raise RpcError("unknown_template", f"no template with id {template_id.hex()}")
        chunks = None if entry is None else entry.chunks
        members: list[Params] = []
        for announce, holding in holders:
            bitfield = None if chunks is None else holding.resolved(chunks)
            have = _popcount(holding.bits) if bitfield is None else len(bitfield)
            complete = holding.complete if bitfield is None else bitfield.complete
            members.append(
                {
                    "peer_id": announce.peer_id,
                    "host": announce.address[0],
                    "port": announce.address[1],
                    "role": announce.role.value,
                    "rack": announce.rack,
                    "complete": complete,
                    "have": have,
                    "percent": _percent(have, chunks, complete),
                }
            )
        members.sort(key=lambda m: (m["role"], -m["percent"], m["peer_id"]))
        return {"template_id": template_id, "chunks": chunks, "peers": members}

    # --- catalog ---

    async def register_template(self, params: Params) -> Params:
        manifest: bytes = _param(params, "manifest", (bytes,))
        if len(manifest) > MAX_RPC_FRAME:
            raise _bad("manifest too large")
        placement: dict[str, Any] = _param(params, "placement", (dict,), optional=True) or {}
        for center_id, indices in placement.items():
            if type(center_id) is not str or type(indices) is not list:
                raise _bad("param 'placement' must map center id hex to a list of chunk indices")
        signature: bytes | None = _param(params, "signature", (bytes,), optional=True)
        if signature is not None and len(signature) > MAX_ENVELOPE_BYTES:
            raise _bad("signature too large")
        async with self._register_lock:
            try:
                decoded = await trio.to_thread.run_sync(Manifest.decode, manifest)
                self.trust.verify(decoded, signature, self._wall_clock())
                registration = await trio.to_thread.run_sync(
                    functools.partial(
                        self.catalog.register, manifest, placement, signature=signature
                    )
                )
            except ManifestError as exc:
                raise RpcError("bad_manifest", f"manifest rejected: {exc}") from None
            except SignatureError as exc:
                log.warning("refused to register: %s", exc)
                raise RpcError("untrusted_manifest", str(exc)) from None
            except CatalogError as exc:
                raise RpcError(exc.code, str(exc)) from None
        entry = self.catalog.entry(registration.template_id)
        assert entry is not None
        log.info(
            "%s template %s:%s id %s (%d chunks, %s), placement on %d centers",
            "registered" if registration.created else "re-registered",
            entry.name,
            entry.version,
            entry.template_id.hex(),
            entry.chunks,
            entry.format,
            len(placement),
            extra={
                "template": f"{entry.name}:{entry.version}",
                "template_id": entry.template_id.hex(),
            },
        )
        return {"template_id": registration.template_id, "created": registration.created}

    def list_templates(self, params: Params) -> Params:
        return {"templates": [_entry_info(e) for e in self.catalog.entries()]}

    async def lookup(self, params: Params) -> Params:
        name = _text(params, "name", MAX_LABEL_LENGTH)
        assert name is not None
        version = _text(params, "version", MAX_LABEL_LENGTH, optional=True)
        entry = self.catalog.find(name, version)
        if entry is None:
            label = name if version is None else f"{name}:{version}"
            raise RpcError("unknown_template", f"no template {label!r} in the catalog")
        stored = await trio.to_thread.run_sync(self.catalog.signed_manifest, entry.template_id)
        assert stored is not None  # catalog entries are never removed
        manifest, signature = stored
        profile = await trio.to_thread.run_sync(self.catalog.profile, entry.template_id)
        if profile is not None and len(manifest) + len(profile) > MAX_RPC_FRAME - _REPLY_SLACK:
            profile = None  # only a speed-up: never let it push the manifest past a frame
        # Hosts check the signature (and the profile's digest) themselves.
        return {
            **_entry_info(entry),
            "manifest": manifest,
            "signature": signature,
            "profile": profile,
        }

    async def put_profile(self, params: Params) -> Params:
        """Store the prefetch profile a host recorded while booting a template; newest wins."""
        template_id = _id(params, "template_id", TEMPLATE_ID_LENGTH)
        data: bytes = _param(params, "profile", (bytes,))
        if len(data) > MAX_PROFILE_BYTES:
            raise RpcError(
                "bad_profile", f"profile is {len(data)} bytes, larger than {MAX_PROFILE_BYTES}"
            )
        try:
            profile = await trio.to_thread.run_sync(self.catalog.put_profile, template_id, data)
        except CatalogError as exc:
            raise RpcError(exc.code, str(exc)) from None
        entry = self.catalog.entry(template_id)
        assert entry is not None
        log.info(
            "stored prefetch profile of template %s:%s: %d of %d chunks",
            entry.name,
            entry.version,
            len(profile.order),
            entry.chunks,
            extra={
                "template": f"{entry.name}:{entry.version}",
                "template_id": template_id.hex(),
            },
        )
        return {"chunks": len(profile.order)}


def _entry_info(entry: TemplateEntry) -> Params:
    return {
        "template_id": entry.template_id,
        "name": entry.name,
        "version": entry.version,
        "size": entry.size,
        "chunk_size": entry.chunk_size,
        "chunks": entry.chunks,
        "zero_chunks": entry.zero_chunks,
        "format": entry.format,
        "created_at": entry.created_at,
    }


async def run(
    listen_host: str,
    listen_port: int,
    state_dir: Path | str,
    *,
    announce_ttl: float = DEFAULT_ANNOUNCE_TTL,
    rng: random.Random | None = None,
    flavors: Mapping[str, Flavor] | None = None,
    metrics_listen: tuple[str, int] | None = None,
    trusted_keys: tuple[bytes, ...] = (),
    allow_unsigned: bool = False,
    tls: TlsMaterial | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the tracker until cancelled; `task_status.started` gets the bound (host, port).

    Templates must be signed by one of `trusted_keys` (raw Ed25519 public keys), or unsigned
    with `allow_unsigned`. With `tls`, every client must present a cluster certificate.
    """
    trust = TrustPolicy.of(trusted_keys, allow_unsigned=allow_unsigned)
    log_trust(trust, "tracker")
    catalog = await trio.to_thread.run_sync(Catalog.open, Path(state_dir))
    try:
        registry = new_registry()
        counters = TrackerMetrics(registry)
        tracker = Tracker(
            catalog,
            announce_ttl=announce_ttl,
            rng=rng,
            flavors=flavors,
            trust=trust,
            on_announce=counters.announced,
            on_placement=counters.placed,
            tls_context=None if tls is None else server_context(tls),
            host_caller=call_host
            if tls is None
            else functools.partial(call_host, tls=client_context(tls)),
        )
        if tls is not None:
            log.info("tracker requires mutual TLS (CA %s, certificate %s)", tls.files.ca, tls.name)
        else:
            log.warning("tracker is %s", INSECURE_WARNING)
        registry.register(TrackerCollector(tracker.announces, catalog))
        listeners = await trio.open_tcp_listeners(listen_port, host=listen_host or None)
        sockname = listeners[0].socket.getsockname()
        bound = (str(sockname[0]), int(sockname[1]))
        log.info(
            "tracker listening on %s; catalog %s holds %d templates; announce TTL %gs",
            format_address(*bound),
            Path(state_dir),
            len(catalog.entries()),
            announce_ttl,
            extra={"listen": format_address(*bound)},
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, tracker.serve_connection, listeners)
            if metrics_listen is not None:
                await nursery.start(serve_metrics, *metrics_listen, registry)
            nursery.start_soon(notify_service, f"tracker listening on {format_address(*bound)}")
            task_status.started(bound)
    finally:
        catalog.close()
