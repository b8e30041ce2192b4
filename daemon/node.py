"""A vmswarm daemon (host or storage center): one TCP port, a control socket, a swarm per template.

The first frame of an inbound TCP connection decides what it is: an RPC Call (a publisher asking a
storage center to `replicate`) or a peer Handshake, handed to that template's TemplateDownload.
A host keeps each template in an ImageStore under DATA_DIR/templates and resumes unfinished ones
on start; a storage center keeps chunks in a ChunkStore under DATA_DIR/chunks and serves every
template whose manifest it stored.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import secrets
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel

from ..swarm.address import format_address
from ..swarm.connection import Connection
from ..swarm.errors import ManifestError
from ..swarm.flavors import Flavor, default_flavors
from ..swarm.manifest import Manifest
from ..swarm.messages import PEER_ID_LENGTH, Role
from ..swarm.prefetch import ProfileError, decode_profile
from ..swarm.rpc import is_rpc_frame_type
from ..swarm.signature import SignatureError, TrustPolicy
from .bans import DEFAULT_BAN_SECONDS, BanList, handshake_offence
from .chunkstore import ChunkStore
from .control import DEFAULT_CONTROL_NAME, control_handlers, open_control_listener
from .download import (
    ConnectionBudget,
    DownloadConfig,
    DownloadFailed,
    PeerAddress,
    Progress,
    TemplateDownload,
)
from .imagestore import ImageStore
from .journal import atomic_write
from .keys import log_trust
from .limits import DEFAULT_PER_ADDRESS, AddressLimits, hung_up_silently, remote_host
from .metrics import node_registry
from .metrics_http import serve_metrics
from .node_access import INBOUND_LINK_ROLES, link_refusal, rpc_table
from .peer_link import (
    HandshakeError,
    LinkOptions,
    LinkRefused,
    LocalPeer,
    read_handshake,
    refuse,
)
from .ratelimit import limiter_for
from .rpc import Handler, Notifier, RpcError, serve_rpc
from .sd_notify import notify_service
from .storeerrors import StoreCorruptError, StoreError
from .streaming import DEFAULT_READ_TIMEOUT, NBD_DIR, TemplateStreams
from .template_sources import CenterTemplate, HostTemplate, TemplateData
from .tls import (
    INSECURE_WARNING,
    PeerIdentity,
    TlsError,
    TlsMaterial,
    client_context,
    server_context,
)
from .tls import accept as tls_accept
from .tracker_access import guarded
from .tracker_client import TemplateHave, TrackerUnreachable
from .tracker_link import TrackerLink
from .vm_launcher import VmLauncher
from .vm_service import NodeTemplates, VmService, libvirt_launcher

log = logging.getLogger(__name__)

PEER_ID_FILE = "peer_id"
TEMPLATES_DIR = "templates"
CHUNKS_DIR = "chunks"
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# Bans `status` lists (the list itself may hold thousands during an attack).
MAX_BANS_SHOWN = 100
DEFAULT_SCRUB_INTERVAL = 24 * 3600.0


@dataclass(frozen=True)
class NodeConfig:
    """Everything `vmswarm daemon run` configures."""

    role: Role
    data_dir: Path
    listen: tuple[str, int] = ("127.0.0.1", 0)
    tracker: tuple[str, int] | None = None
    control_path: Path | None = None
    rack: str | None = None
    max_peers: int = 64
    upload_slots: int = 8
    # Bytes per second all uploads of this node share; 0 is unlimited.
    upload_limit: float = 0.0
    download: DownloadConfig = field(default_factory=DownloadConfig)
    # A host runs VMs through libvirt at this URI (None: no VMs), sized by these flavors.
    libvirt_uri: str | None = None
    flavors: Mapping[str, Flavor] | None = None
    # False: a host trades only with storage centers (the centralized baselines of bench.cluster).
    peers: bool = True
    # Serve Prometheus metrics at http://HOST:PORT/metrics; None: no metrics endpoint.
    metrics_listen: tuple[str, int] | None = None
    # Raw Ed25519 public keys whose signatures this node accepts on templates it takes in.
    trusted_keys: tuple[bytes, ...] = ()
    # Take templates that carry no signature at all (a signature that is there is still checked).
    allow_unsigned: bool = False
    # TCP connections to and from one IP address at once (max_peers caps the total).
    max_connections_per_address: int = DEFAULT_PER_ADDRESS
    # Bytes per second to / from each single peer; 0 is unlimited.
    peer_upload_limit: float = 0.0
    peer_download_limit: float = 0.0
    # How long a peer that sent garbage, oversized frames or a flood stays banned.
    ban_seconds: float = DEFAULT_BAN_SECONDS
    # Seconds; None keeps download.link's (peer_link's defaults unless a test set them).
    handshake_timeout: float | None = None
    idle_timeout: float | None = None
    # A storage center re-hashes every stored chunk this often (seconds; 0: only on request).
    scrub_interval: float = DEFAULT_SCRUB_INTERVAL
    # A streamed VM's NBD read waits this long for a missing chunk, then gets EIO.
    nbd_read_timeout: float = DEFAULT_READ_TIMEOUT
    # Mutual TLS on every TCP link (tracker, peers, RPC); None: plain TCP (--insecure).
    tls: TlsMaterial | None = None

    @property
    def control(self) -> Path:
        return self.control_path or self.data_dir / DEFAULT_CONTROL_NAME


class NodeError(Exception):
    """The daemon cannot start; the message says why."""


# glibc mallopt parameters: keep freed chunk buffers in the heap instead of returning them.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc reuse freed multi-MiB buffers: each chunk is one, and fresh pages cost faults.

    Without this every received chunk lands in newly mapped memory, and page faults (expensive
    on virtual machines) rather than copying or hashing limit the transfer rate. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok)


def load_peer_id(data_dir: Path) -> bytes:
    """This node's 16-byte peer id, created once and kept in DATA_DIR/peer_id."""
    path = data_dir / PEER_ID_FILE
    try:
        value = path.read_bytes()
    except FileNotFoundError:
        value = secrets.token_bytes(PEER_ID_LENGTH)
        atomic_write(path, value, "peer id")
        return value
    if len(value) != PEER_ID_LENGTH:
        raise NodeError(f"{path} holds {len(value)} bytes, not a {PEER_ID_LENGTH}-byte peer id")
    return value


class Node:
    """One daemon's state: its stores, its templates' swarms, its tracker link."""

    def __init__(self, config: NodeConfig, *, vm_launcher: VmLauncher | None = None) -> None:
        self.config = config
        self._vm_launcher = vm_launcher
        self.vms: VmService | None = None
        self.role = config.role
        self.data_dir = Path(config.data_dir)
        self.peer_id = b""
        self.local = LocalPeer(b"\0" * PEER_ID_LENGTH, config.role, None)
        self.templates: dict[bytes, TemplateDownload] = {}
        self.budget = ConnectionBudget(config.max_peers)
        self.address_limits = AddressLimits(config.max_connections_per_address)
        self.bans = BanList(
            config.ban_seconds,
            on_ban=lambda reason, role: self.metrics_events.peer_banned("", role, reason),
        )
        self.download_config = _download_config(config)
        self.link_options = self.download_config.link or LinkOptions()
        # Inbound connections that have not yet said what they are (capped at max_peers too).
        self._unidentified = 0
        self.upload_slots = trio.Semaphore(config.upload_slots)
        self.upload_limit = limiter_for(config.upload_limit)
        self.chunk_store: ChunkStore | None = None
        self.tracker: TrackerLink | None = None
        self.bound: tuple[str, int] | None = None
        self._nursery: trio.Nursery | None = None
        self._adding: dict[bytes, trio.Event] = {}
        # A host's NBD exports of templates still arriving, and the boot profiles the tracker had.
        self.streams: TemplateStreams | None = None
        self._profiles: dict[bytes, bytes] = {}
        self._scrub_lock = trio.Lock()
        self.trust = TrustPolicy.of(config.trusted_keys, allow_unsigned=config.allow_unsigned)
        # This node's own registry (never the global one); served when config.metrics_listen is set.
        self.metrics_registry, self.metrics_events = node_registry(self)
        self.metrics_bound: tuple[str, int] | None = None
        # One context each way for every link: loading the certificate files once.
        self._tls_server = None if config.tls is None else server_context(config.tls)
        self._tls_client = None if config.tls is None else client_context(config.tls)

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; `started` gets the bound TCP (host, port)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_trust(self.trust, f"{self.role.value} daemon")
        if self.config.tls is None:
            log.warning("%s daemon is %s", self.role.value, INSECURE_WARNING)
        else:
            log.info(
                "mutual TLS on every link (CA %s, %s certificate %r)",
                self.config.tls.files.ca,
                self.config.tls.role.value,
                self.config.tls.name,
            )
        control = await open_control_listener(self.config.control)
        try:
            self.peer_id = load_peer_id(self.data_dir)
            listeners = await trio.open_tcp_listeners(
                self.config.listen[1], host=self.config.listen[0] or None
            )
            sockname = listeners[0].socket.getsockname()
            host = self.config.listen[0] or str(sockname[0])
            self.bound = (str(sockname[0]), int(sockname[1]))
            self.local = LocalPeer(self.peer_id, self.role, (host, self.bound[1]))
            self.tracker = TrackerLink(
                self.config.tracker,
                self.local,
                self._holdings,
                rack=self.config.rack,
                capacity=lambda: None if self.vms is None else self.vms.capacity(),
                on_connected=self._on_tracker_connected,
                tls=self._tls_client,
            )
            self.vms = self._vm_service()
            sources = await self._open_stores()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for data in sources:
                    await self._start_template(data)
                await nursery.start(self.tracker.run)
                await nursery.start(trio.serve_listeners, self._inbound, listeners)
                await nursery.start(trio.serve_listeners, self._control_session, [control])
                if self.config.metrics_listen is not None:
                    self.metrics_bound = await nursery.start(
                        serve_metrics, *self.config.metrics_listen, self.metrics_registry
                    )
                if self.role is Role.HOST:
                    self.streams = TemplateStreams(
                        self.data_dir / NBD_DIR,
                        nursery,
                        read_timeout=self.config.nbd_read_timeout,
                        upload_profile=self._put_profile,
                    )
                if self.vms is not None:
                    await nursery.start(self.vms.run)
                if self.role is Role.STORAGE and self.config.scrub_interval > 0:
                    nursery.start_soon(self._scrub_periodically, self.config.scrub_interval)
                log.info(
                    "%s daemon %s listening on %s, control %s, tracker %s, %d templates",
                    self.role.value,
                    self.peer_id.hex(),
                    format_address(*self.bound),
                    self.config.control,
                    self.tracker.label,
                    len(self.templates),
                    extra={"peer": self.peer_id.hex(), "listen": format_address(*self.bound)},
                )
                nursery.start_soon(notify_service, self._ready_status())
                task_status.started(self.bound)
        finally:
            with trio.CancelScope(shield=True):
                await control.aclose()
                with contextlib.suppress(FileNotFoundError):
                    self.config.control.unlink()
                if self.tracker is not None:
                    with contextlib.suppress(*_STREAM_ERRORS):
                        await self.tracker.aclose()
                for download in self.templates.values():
                    with contextlib.suppress(StoreError, OSError):
                        download.data.close()
                if self.vms is not None:
                    self.vms.launcher.close()

    def _vm_service(self) -> VmService | None:
        """A host's VM service, over the injected launcher or libvirt at config.libvirt_uri."""
        if self.role is not Role.HOST:
            return None
        launcher = self._vm_launcher
        if launcher is None:
            if self.config.libvirt_uri is None:
                return None
            launcher = libvirt_launcher(self.config.libvirt_uri)
        tracker = self.tracker
        return VmService(
            launcher,
            self.data_dir,
            NodeTemplates(self),
            self.config.flavors or default_flavors(),
            host_label=self._host_label,
            on_change=(lambda: None) if tracker is None else tracker.announce_soon,
        )

    def _ready_status(self) -> str:
        """What `systemctl status` shows once this daemon serves."""
        assert self.bound is not None
        return (
            f"{self.role.value} daemon listening on {format_address(*self.bound)}, "
            f"control {self.config.control}"
        )

    def _host_label(self) -> str:
        """HOST:PORT this daemon listens on: how the tracker and `vmswarm vms` name it."""
        listen = self.local.listen
        return "" if listen is None else format_address(*listen)

    async def _open_stores(self) -> list[TemplateData]:
        if self.role is Role.STORAGE:
            return await trio.to_thread.run_sync(self._open_center_stores)
        return await trio.to_thread.run_sync(self._open_host_stores)

    def _open_center_stores(self) -> list[TemplateData]:
        store = ChunkStore(self.data_dir / CHUNKS_DIR)
        self.chunk_store = store
        return [CenterTemplate(store, manifest) for manifest in store.manifests()]

    def _open_host_stores(self) -> list[TemplateData]:
        directory = self.data_dir / TEMPLATES_DIR
        found: list[TemplateData] = []
        for manifest in ImageStore.list_templates(directory):
            try:
                found.append(HostTemplate(ImageStore(directory, manifest)))
            except StoreError as exc:
                log.error(
                    "cannot open template %s %s: %s",
                    manifest.name,
                    manifest.version,
                    exc,
                    extra={"template": f"{manifest.name}:{manifest.version}"},
                )
                continue
            store = found[-1]
            assert isinstance(store, HostTemplate)
            if store.store.dropped_on_open:
                log.warning(
                    "template %s: %d chunks did not survive the last stop; fetching them again",
                    manifest.name,
                    len(store.store.dropped_on_open),
                    extra={"template": f"{manifest.name}:{manifest.version}"},
                )
        return found

    async def _start_template(self, data: TemplateData) -> TemplateDownload:
        assert self._nursery is not None
        want_all = self.role is Role.HOST
        download = TemplateDownload(
            data,
            self.local,
            upload_slots=self.upload_slots,
            upload_limit=self.upload_limit,
            want=None if want_all else (),
            want_all=want_all,
            find_peers=self._find_peers,
            budget=self.budget,
            config=self.download_config,
            events=self.metrics_events,
            bans=self.bans,
            address_limits=self.address_limits,
            tls=self._tls_client,
        )
        self.templates[download.template_id] = download
        await self._nursery.start(download.run)
        if self.tracker is not None:
            self.tracker.announce_soon()
        return download

    def _holdings(self) -> list[TemplateHave]:
        return [
            TemplateHave.from_bitfield(tid, download.data.have())
            for tid, download in self.templates.items()
        ]

    async def _find_peers(self, template_id: bytes, bits: Any) -> list[PeerAddress]:
        if self.tracker is None:
            return []
        found = await self.tracker.find_peers(template_id, bits)
        if not self._trades_with_hosts:
            return [peer for peer in found if peer.role is Role.STORAGE]
        return found

    @property
    def _trades_with_hosts(self) -> bool:
        return self.config.peers or self.role is Role.STORAGE

    # -- inbound TCP ---------------------------------------------------------------------------

    async def _inbound(self, stream: trio.SocketStream) -> None:
        host = remote_host(stream)
        if host is not None and self.bans.banned(trio.current_time(), host=host) is not None:
            self._drop("banned")
            await trio.aclose_forcefully(stream)
            return
        if host is not None and not self.address_limits.try_acquire(host):
            self._drop("per_address_limit")
            log.info(
                "refusing a connection from %s: at most %d per address",
                host,
                self.address_limits.per_address,
            )
            await trio.aclose_forcefully(stream)
            return
        try:
            await self._inbound_session(stream, host)
        finally:
            if host is not None:
                self.address_limits.release(host)

    async def _inbound_session(self, stream: trio.SocketStream, host: str | None) -> None:
        timeout = self.link_options.handshake_timeout
        if self._unidentified >= self.budget.limit:
            self._drop("total_limit")
            await trio.aclose_forcefully(stream)
            return
        self._unidentified += 1
        session: trio.abc.Stream = stream
        identity: PeerIdentity | None = None
        try:
            with trio.fail_after(timeout):
                if self._tls_server is not None:
                    if await hung_up_silently(stream):
                        raise trio.BrokenResourceError("closed before the TLS handshake")
                    session, identity = await tls_accept(
                        stream, self._tls_server, handshake_seconds=timeout
                    )
                first = await _read_prefix(session, 5)
        except TlsError as exc:
            log.info("refused TLS from %s: %s", host, exc)
            self._drop("tls_refused")
            first = None
        except trio.TooSlowError:
            self._drop("handshake_timeout")
            first = None
        except _STREAM_ERRORS:
            first = None
        finally:
            self._unidentified -= 1
        if first is None:
            await trio.aclose_forcefully(session)
            return
        if is_rpc_frame_type(first[4]):
            handlers = self._tcp_handlers()
            if identity is not None:
                handlers = guarded(handlers, identity.role, rpc_table(self.role, handlers))
            await serve_rpc(
                session, handlers, first_bytes=first, idle_timeout=self.link_options.idle_timeout
            )
            return
        conn = Connection(self.role)
        if not self.budget.try_acquire():
            self._drop("total_limit")
            await refuse(session, conn, f"too many connections (at most {self.budget.limit})")
            return
        try:
            try:
                with trio.fail_after(timeout):
                    their = await read_handshake(session, conn, first)
            except (HandshakeError, trio.TooSlowError, *_STREAM_ERRORS) as exc:
                log.info("inbound handshake from %s failed: %s", host, exc or "timed out")
                self._handshake_failed(exc, host)
                await trio.aclose_forcefully(session)
                return
            if identity is not None:
                refusal = _inbound_link_refusal(identity, their.role)
                if refusal is not None:
                    log.warning("refusing a link from %s (%s): %s", host, identity, refusal)
                    self._drop("tls_refused")
                    await refuse(session, conn, refusal)
                    return
            ban = self.bans.banned(trio.current_time(), peer_id=their.peer_id)
            if ban is not None:
                self._drop("banned")
                await refuse(session, conn, f"banned for a while: {ban.reason}")
                return
            download = self.templates.get(their.template_id)
            if download is None:
                await refuse(session, conn, f"unknown template {their.template_id.hex()}")
                return
            if their.role is Role.HOST and not self._trades_with_hosts:
                await refuse(
                    session, conn, "this host does not trade with other hosts (--no-peers)"
                )
                return
            await download.accept(session, conn, their)
        finally:
            self.budget.release()

    def _handshake_failed(self, exc: BaseException, host: str | None) -> None:
        """Count a failed inbound handshake; ban the address if it sent garbage."""
        if isinstance(exc, trio.TooSlowError):
            self._drop("handshake_timeout")
            return
        if not isinstance(exc, HandshakeError) or isinstance(exc, LinkRefused):
            return  # the connection broke, or the peer said Goodbye: no offence
        message = str(exc)
        offence = handshake_offence(message)
        if offence is not None and host is not None:
            log.warning("banning %s for %gs: %s", host, self.bans.duration, message)
            self.bans.ban(offence, trio.current_time(), host=host, detail=message)

    def _drop(self, reason: str) -> None:
        self.metrics_events.connection_dropped(reason)

    def _tcp_handlers(self) -> dict[str, Handler]:
        if self.role is Role.STORAGE:
            return {"replicate": self._replicate}
        return {} if self.vms is None else self.vms.handlers()

    async def _control_session(self, stream: trio.SocketStream) -> None:
        handlers = control_handlers(self)
        if self.vms is not None:
            handlers = {**self.vms.handlers(), **handlers}
        handlers["scrub"] = self._scrub_handler
        await serve_rpc(stream, handlers)

    # -- storage: replicate ----------------------------------------------------------------------

    async def _replicate(self, params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
        """Store a manifest and pull the listed chunks this center lacks from the sources."""
        raw = params["manifest"]
        indices = params.get("indices", [])
        sources = params.get("sources")
        if sources is None and params.get("source") is not None:
            sources = [params["source"]]
        if type(raw) is not bytes:
            raise ValueError("manifest must be bytes")
        if type(indices) is not list or not all(type(i) is int for i in indices):
            raise ValueError("indices must be a list of chunk indices")
        signature = params.get("signature")
        if signature is not None and type(signature) is not bytes:
            raise ValueError("signature must be bytes")
        addresses = [_source_address(s) for s in sources or []]
        assert self.chunk_store is not None
        await self._check_replicated(raw, signature)
        try:
            manifest = await trio.to_thread.run_sync(self.chunk_store.put_manifest, raw)
            if signature is not None:
                # Kept so this center can re-register the template with a tracker that lost it.
                await trio.to_thread.run_sync(
                    self.chunk_store.put_signature, manifest.template_id, signature
                )
        except StoreCorruptError as exc:
            raise RpcError("bad_manifest", str(exc)) from None
        bad = [i for i in indices if not 0 <= i < manifest.chunk_count]
        if bad:
            raise ValueError(f"chunk indices out of range 0..{manifest.chunk_count - 1}: {bad[:5]}")
        download = await self._center_template(manifest)
        wanted = sorted({i for i in indices if i not in manifest.zero_chunks})
        already = [i for i in wanted if download.data.has(i)]
        missing = [i for i in wanted if not download.data.has(i)]
        if missing:
            if not addresses:
                raise RpcError(
                    "no_source", f"{len(missing)} chunks are missing and no source given"
                )
            await download.want(missing)
            await download.add_sources(addresses)
            try:
                await download.wait_done()
            except DownloadFailed as exc:
                raise RpcError("replicate_failed", str(exc)) from None
            await trio.to_thread.run_sync(self._refresh_centers, download.template_id)
        if self.tracker is not None:
            self.tracker.announce_soon()
        stored = sum(1 for i in missing if download.data.has(i))
        log.info(
            "replicated %s %s: %d chunks stored, %d already held",
            manifest.name,
            manifest.version,
            stored,
            len(already),
            extra={"template": f"{manifest.name}:{manifest.version}"},
        )
        return {
            "template_id": manifest.template_id,
            "stored": stored,
            "already_had": len(already),
        }

    async def _check_replicated(self, raw: bytes, signature: bytes | None) -> None:
        """A center takes in a new template only if the trust policy accepts its signature."""
        try:
            manifest = await trio.to_thread.run_sync(Manifest.decode, raw)
        except ManifestError as exc:
            raise RpcError("bad_manifest", f"manifest rejected: {exc}") from None
        if manifest.template_id not in self.templates:  # else checked when it first came in
            self._verify(manifest, signature)

    def _verify(self, manifest: Manifest, signature: bytes | None) -> None:
        """RpcError "untrusted_manifest" (one line naming the template and why) unless trusted."""
        try:
            self.trust.verify(manifest, signature, time.time())
        except SignatureError as exc:
            log.warning("refused: %s", exc)
            raise RpcError("untrusted_manifest", str(exc)) from None

    async def _center_template(self, manifest: Manifest) -> TemplateDownload:
        existing = self.templates.get(manifest.template_id)
        if existing is not None:
            return existing
        assert self.chunk_store is not None
        store = self.chunk_store
        return await self._add_template(
            manifest.template_id,
            lambda: CenterTemplate(store, manifest),
        )

    def _refresh_centers(self, skip: bytes) -> None:
        # Chunks are shared by digest, so another template may just have gained some.
        for tid, download in list(self.templates.items()):
            if tid != skip and isinstance(download.data, CenterTemplate):
                download.data.refresh()

    async def _add_template(self, template_id: bytes, opener: Any) -> TemplateDownload:
        """Open a template's store in a thread and start its swarm, once even if asked twice."""
        while template_id in self._adding:
            await self._adding[template_id].wait()
        existing = self.templates.get(template_id)
        if existing is not None:
            return existing
        done = self._adding[template_id] = trio.Event()
        try:
            data = await trio.to_thread.run_sync(opener)
            return await self._start_template(data)
        finally:
            del self._adding[template_id]
            done.set()

    # -- storage: scrub and re-registration ------------------------------------------------------

    async def _scrub_periodically(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            await self.scrub()

    async def _scrub_handler(self, params: dict[str, Any], notifier: Notifier) -> dict[str, Any]:
        return await self.scrub()

    async def scrub(self) -> dict[str, Any]:
        """Re-hash every stored chunk; drop the corrupt ones and fetch them back from replicas."""
        if self.chunk_store is None:
            raise RpcError("wrong_role", "scrub runs on storage centers; this daemon is a host")
        store = self.chunk_store
        async with self._scrub_lock:
            bad = await trio.to_thread.run_sync(store.scrub)
            repairing: list[dict[str, Any]] = []
            for download in list(self.templates.values()):
                if not isinstance(download.data, CenterTemplate):
                    continue
                lost = download.data.forget(bad)
                if lost:
                    download.lost(lost)
                    manifest = download.manifest
                    repairing.append(
                        {"name": manifest.name, "version": manifest.version, "chunks": sorted(lost)}
                    )
            held = await trio.to_thread.run_sync(len, store)
        if bad:
            log.warning(
                "scrub of %s: %d corrupt chunks deleted, fetching them again: %s",
                store.directory,
                len(bad),
                ", ".join(digest.hex()[:16] for digest in bad),
            )
        else:
            log.info("scrub of %s: %d chunks, all intact", store.directory, held)
        return {
            "directory": str(store.directory),
            "chunks": held + len(bad),
            "corrupt": [digest.hex() for digest in bad],
            "repairing": repairing,
        }

    def _on_tracker_connected(self) -> None:
        """The tracker is (back) up: a center makes sure the catalog lists what it holds."""
        if self.role is Role.STORAGE and self._nursery is not None and self.templates:
            self._nursery.start_soon(self._register_held)

    async def _register_held(self) -> None:
        # A tracker restarted without its state knows no templates; the centers still hold them.
        assert self.tracker is not None and self.chunk_store is not None
        store = self.chunk_store
        for download in list(self.templates.values()):
            manifest = download.manifest
            signature = await trio.to_thread.run_sync(store.get_signature, manifest.template_id)
            placement = {self.peer_id.hex(): list(download.data.have())}
            try:
                registered = await self.tracker.register_template(
                    manifest.encode(), placement, signature
                )
            except (TrackerUnreachable, RpcError) as exc:
                log.warning(
                    "cannot register %s:%s with the tracker: %s",
                    manifest.name,
                    manifest.version,
                    exc,
                    extra={"template": f"{manifest.name}:{manifest.version}"},
                )
                continue
            if registered.created:
                log.info(
                    "re-registered %s:%s with the tracker, which had lost it",
                    manifest.name,
                    manifest.version,
                    extra={"template": f"{manifest.name}:{manifest.version}"},
                )

    # -- host: fetch -----------------------------------------------------------------------------

    async def fetch(self, name: str, version: str | None, notifier: Notifier) -> dict[str, Any]:
        """Get name[:version] onto this host, streaming progress; the fetch result."""
        if self.role is not Role.HOST:
            raise RpcError("wrong_role", "fetch runs on host daemons; this one is a storage center")
        label = name if version is None else f"{name}:{version}"
        started = trio.current_time()
        download = self._local_template(name, version)
        if download is None:
            download = await self._open_by_name(name, version, label)
        # Bytes are counted per download; a template already here moved nothing for this call.
        already_here = download.satisfied
        if download.error is not None:
            await download.retry()
            await trio.lowlevel.checkpoint()

        async def progress(p: Progress) -> None:
            await notifier.notify("progress", _progress_notice(p))

        try:
            final = await download.wait_done(progress)
        except DownloadFailed as exc:
            code = "no_source" if str(exc).startswith("no source") else "fetch_failed"
            raise RpcError(code, f"cannot fetch {label}: {exc}") from None
        if not already_here and self.tracker is not None:
            # Placement prefers hosts holding the template: tell the tracker now, not next interval.
            self.tracker.announce_soon()
        manifest = download.manifest
        return {
            "template_id": manifest.template_id.hex(),
            "name": manifest.name,
            "version": manifest.version,
            "path": str(download.data.path),
            "size": manifest.size,
            "seconds": round(trio.current_time() - started, 3),
            # Until the last chunk was verified and written; the rest is the whole-image check.
            "chunks_seconds": round(max((download.chunks_done_at or started) - started, 0.0), 3),
            "bytes_from_centers": 0 if already_here else final.bytes_from_centers,
            "bytes_from_peers": 0 if already_here else final.bytes_from_peers,
            "sources": 0 if already_here else final.sources,
            # Chunks that arrived twice (endgame, cancelled too late) or unasked: link bytes lost.
            "wasted_bytes": 0 if already_here else download.wasted_bytes,
        }

    async def _open_by_name(self, name: str, version: str | None, label: str) -> TemplateDownload:
        """Look the template up at the tracker and open (or create) its store here."""
        assert self.tracker is not None
        try:
            found = await self.tracker.lookup(name, version)
        except TrackerUnreachable as exc:
            # Without the tracker, "the latest version" can still mean the only one held here.
            held = [d for d in self.templates.values() if d.manifest.name == name]
            if len(held) == 1:
                return held[0]
            raise RpcError("tracker_unreachable", f"cannot look up {label}: {exc}") from None
        manifest = found.manifest
        if found.profile is not None:
            self._profiles[manifest.template_id] = found.profile
        if manifest.template_id not in self.templates:  # else checked when it first came in
            self._verify(manifest, found.signature)  # before a single chunk is fetched
        directory = self.data_dir / TEMPLATES_DIR
        try:
            return await self._add_template(
                manifest.template_id,
                lambda: HostTemplate(ImageStore(directory, manifest)),
            )
        except StoreError as exc:
            raise RpcError("store_error", f"cannot store {label}: {exc}") from None

    async def open_stream(
        self, name: str, version: str | None
    ) -> tuple[TemplateDownload, Path | None]:
        """Start fetching name[:version] and serve it over NBD; the socket (None: complete here).

        A boot profile from the tracker puts the chunks an earlier boot read first in line.
        """
        if self.role is not Role.HOST or self.streams is None:
            raise RpcError("wrong_role", "streaming runs on host daemons")
        label = name if version is None else f"{name}:{version}"
        download = self._local_template(name, version)
        if download is None:
            download = await self._open_by_name(name, version, label)
        if download.complete:
            return download, None
        if download.error is not None:
            await download.retry()
        raw = self._profiles.get(download.template_id)
        known = 0
        if raw is not None:
            try:
                profile = decode_profile(raw, download.manifest)
            except ProfileError as exc:
                log.warning("ignoring the prefetch profile of %s: %s", label, exc)
            else:
                known = len(profile.order)
                await download.prefer(profile.order)
        return download, await self.streams.export(download, known_chunks=known)

    async def _put_profile(self, template_id: bytes, data: bytes) -> None:
        if self.tracker is None:
            return
        await self.tracker.put_profile(template_id, data)

    def _local_template(self, name: str, version: str | None) -> TemplateDownload | None:
        """A template held here by name and version (a version is needed: "latest" asks)."""
        if version is None:
            return None
        for download in self.templates.values():
            if download.manifest.name == name and download.manifest.version == version:
                return download
        return None

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        tracker = self.tracker
        return {
            "peer_id": self.peer_id.hex(),
            "role": self.role.value,
            "listen": None if self.local.listen is None else list(self.local.listen),
            "rack": self.config.rack,
            "connections": self.budget.in_use,
            "max_peers": self.budget.limit,
            "banned": [
                {
                    "peer_id": None if ban.peer_id is None else ban.peer_id.hex(),
                    "host": ban.host,
                    "reason": ban.reason,
                    "seconds_left": round(ban.until - trio.current_time(), 1),
                }
                for ban in self.bans.entries(trio.current_time())[:MAX_BANS_SHOWN]
            ],
            "tracker": {
                "address": None if tracker is None else tracker.label,
                "connected": tracker is not None and tracker.connected,
                "last_error": None if tracker is None else tracker.last_error,
            },
            "templates": [d.status() for d in self.templates.values()],
            "vm_service": None if self.vms is None else self.vms.status(),
            "streams": [] if self.streams is None else self.streams.status(),
        }


def _download_config(config: NodeConfig) -> DownloadConfig:
    """The swarm tunables with the node's per-peer limits and timeouts put into its links."""
    link = config.download.link or LinkOptions()
    new = replace(
        link,
        upload_limit=config.peer_upload_limit or link.upload_limit,
        download_limit=config.peer_download_limit or link.download_limit,
        handshake_timeout=config.handshake_timeout or link.handshake_timeout,
        idle_timeout=config.idle_timeout or link.idle_timeout,
    )
    return config.download if new == link else replace(config.download, link=new)


def _progress_notice(p: Progress) -> dict[str, Any]:
    return {
        "done_bytes": p.done_bytes,
        "total_bytes": p.total_bytes,
        "rate": p.rate,
        "sources": p.sources,
        "links": p.links,
        "bytes_from_centers": p.bytes_from_centers,
        "bytes_from_peers": p.bytes_from_peers,
        "eta": p.eta,
    }


def _inbound_link_refusal(identity: PeerIdentity, claimed: Role) -> str | None:
    """Why a peer with this certificate may not open a link claiming `claimed`; None if ok."""
    if identity.role not in INBOUND_LINK_ROLES:
        return f"{identity.role.value} certificates may not open peer links"
    return link_refusal(identity.role, claimed)


def _source_address(value: object) -> PeerAddress:
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and type(value[0]) is str
        and type(value[1]) is int
    ):
        return PeerAddress(value[0], value[1])
    raise ValueError(f"a source must be [host, port], got {value!r:.60}")


async def _read_prefix(stream: trio.abc.ReceiveStream, count: int) -> bytes | None:
    """At least `count` bytes from the stream (maybe more), or None if it ends first."""
    data = b""
    while len(data) < count:
        more = await stream.receive_some(1 << 16)
        if not more:
            return None
        data += more
    return data


async def run(
    config: NodeConfig,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a daemon until cancelled; `started` gets the bound TCP address."""
    await Node(config).run(task_status=task_status)


async def run_until_signalled(config: NodeConfig) -> None:
    """Run a daemon until SIGTERM or SIGINT, then stop cleanly (stores checkpointed)."""
    tune_malloc()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(run, config)
            async for signum in signals:
                log.info("got %s; stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


__all__ = ["Node", "NodeConfig", "NodeError", "load_peer_id", "run", "run_until_signalled"]
