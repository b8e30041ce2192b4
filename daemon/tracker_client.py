"""Typed calls to the tracker: one method per tracker RPC, answers as frozen dataclasses.

Errors: `TrackerUnreachable` when the tracker cannot be reached, stops answering or breaks the
link (the client is then unusable: open a new one); `RpcError` when the tracker answers with a
Fail (`code` e.g. "unknown_template", "version_exists", "bad_request", "bad_manifest"), or with
code "bad_reply" when its answer is malformed.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from ..swarm.address import format_address
from ..swarm.bitfield import Bitfield
from ..swarm.manifest import Manifest
from ..swarm.messages import Role
from ..swarm.vm_placement import CAPACITY_KEYS, HostCapacity
from .rpc import LINK_ERRORS, RpcClient, RpcError
from .tls import TlsError, TlsRole, connect, describe_failure

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_CALL_TIMEOUT = 30.0
# A launch may fetch a whole template and boot it before the tracker answers.
DEFAULT_LAUNCH_TIMEOUT = 900.0


class TrackerUnreachable(Exception):
    """The tracker could not be reached or the link to it broke; the message says which."""


@dataclass(frozen=True)
class TemplateHave:
    """What an announcing daemon holds of one template."""

    template_id: bytes
    bits: bytes
    complete: bool

    @classmethod
    def from_bitfield(cls, template_id: bytes, bitfield: Bitfield) -> TemplateHave:
        return cls(template_id, bitfield.to_bytes(), bitfield.complete)


@dataclass(frozen=True)
class PeerInfo:
    """One source in a get_peers handout, best first."""

    peer_id: bytes
    host: str
    port: int
    role: Role
    rack: str | None
    complete: bool
    percent: float


@dataclass(frozen=True)
class TemplateInfo:
    """A catalog entry, without its manifest."""

    template_id: bytes
    name: str
    version: str
    size: int
    chunk_size: int
    chunks: int
    zero_chunks: int
    format: str
    created_at: float


@dataclass(frozen=True)
class LookupResult:
    """A template found by name: its catalog entry and its decoded, id-checked manifest.

    `signature` is the publisher's signature envelope as the tracker stored it (None: unsigned);
    the caller verifies it against its own trusted keys. `profile` is the template's encoded
    prefetch profile (None: none stored); check it with swarm.prefetch.decode_profile.
    """

    info: TemplateInfo
    manifest: Manifest
    signature: bytes | None = None
    profile: bytes | None = None

    @property
    def template_id(self) -> bytes:
        return self.info.template_id


@dataclass(frozen=True)
class Registered:
    template_id: bytes
    created: bool  # False: the same content was registered before


@dataclass(frozen=True)
class CenterInfo:
    peer_id: bytes
    host: str
    port: int
    rack: str | None


@dataclass(frozen=True)
class SwarmMember:
    """One live announcer of a template, as the tracker sees it."""

    peer_id: bytes
    host: str
    port: int
    role: Role
    rack: str | None
    complete: bool
    have: int  # chunks held
    percent: float


@dataclass(frozen=True)
class SwarmView:
    template_id: bytes
    chunks: int | None  # None when the catalog does not know the template
    members: tuple[SwarmMember, ...]


@dataclass(frozen=True)
class LaunchResult:
    """A VM the tracker placed and the chosen host started."""

    vm_id: str
    host: str  # the host daemon's address, HOST:PORT
    host_peer_id: bytes
    template_id: bytes
    domain: str
    seconds_fetch: float
    seconds_boot: float
    placement: str  # why this host: "requested", "locality" or "least_loaded"
    serial_log: str | None = None  # the guest's serial console file on the host
    domain_type: str | None = None  # "kvm" or "qemu" (TCG)
    streaming: bool = False  # booted over the host's NBD export while the template arrives


@dataclass(frozen=True)
class VmInfo:
    """One VM as its host daemon reports it, with the host it runs on."""

    host: str
    host_peer_id: bytes
    vm_id: str
    domain: str
    name: str
    template_id: bytes
    flavor: str
    state: str
    vcpus: int
    memory: int
    stats: Mapping[str, float]  # cpu_seconds, cpu_utilisation, memory_bytes, net_*, disk_*


@dataclass(frozen=True)
class HostFailure:
    """A host daemon the tracker could not ask for its VMs, and why."""

    host: str
    host_peer_id: bytes
    error: str


@dataclass(frozen=True)
class ClusterVms:
    vms: tuple[VmInfo, ...]
    unreachable: tuple[HostFailure, ...]


VM_STATS = (
    "cpu_seconds",
    "cpu_utilisation",
    "memory_bytes",
    "net_rx_bytes",
    "net_tx_bytes",
    "disk_read_bytes",
    "disk_write_bytes",
)


def capacity_params(capacity: HostCapacity | Mapping[str, int] | None) -> dict[str, int] | None:
    """An announce's `capacity` field from a HostCapacity or a map of the same four keys."""
    if capacity is None:
        return None
    if isinstance(capacity, HostCapacity):
        return capacity.as_dict()
    return {key: capacity[key] for key in CAPACITY_KEYS}


def _template_id(data: Mapping[str, Any]) -> bytes:
    """A template id sent as bytes or as hex text."""
    value = data["template_id"]
    if isinstance(value, str):
        return bytes.fromhex(value)
    if not isinstance(value, bytes):
        raise TypeError(f"field 'template_id' has type {type(value).__name__}")
    return value


def _number(data: Mapping[str, Any], key: str) -> float:
    value = data.get(key)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"field {key!r} has type {type(value).__name__}")
    return float(value)


def _launch_result(data: Mapping[str, Any]) -> LaunchResult:
    return LaunchResult(
        vm_id=str(_get(data, "vm_id", (str, int))),
        host=_get(data, "host", str),
        host_peer_id=_get(data, "host_peer_id", bytes),
        template_id=_template_id(data),
        domain=_get(data, "domain", str),
        seconds_fetch=_number(data, "seconds_fetch"),
        seconds_boot=_number(data, "seconds_boot"),
        placement=_get(data, "placement", str),
        serial_log=_optional_text(data, "serial_log"),
        domain_type=_optional_text(data, "domain_type"),
        streaming=data.get("streaming") is True,
    )


def _optional_text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"field {key!r} is not a string")
    return value


def _vm_info(data: Mapping[str, Any]) -> VmInfo:
    return VmInfo(
        host=_get(data, "host", str),
        host_peer_id=_get(data, "host_peer_id", bytes),
        vm_id=str(_get(data, "vm_id", (str, int))),
        domain=_get(data, "domain", str),
        name=_get(data, "name", str),
        template_id=_template_id(data),
        flavor=_get(data, "flavor", str),
        state=_get(data, "state", str),
        vcpus=_get(data, "vcpus", int),
        memory=_get(data, "memory", int),
        stats={key: _number(data, key) for key in VM_STATS},
    )


def _host_failure(data: Mapping[str, Any]) -> HostFailure:
    return HostFailure(
        host=_get(data, "host", str),
        host_peer_id=_get(data, "host_peer_id", bytes),
        error=_get(data, "error", str),
    )


def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TypeError(f"field {key!r} has type {type(value).__name__}")
    return value


def _rack(data: Mapping[str, Any]) -> str | None:
    rack = data.get("rack")
    if rack is not None and not isinstance(rack, str):
        raise TypeError("field 'rack' is not a string")
    return rack


def _template_info(data: Mapping[str, Any]) -> TemplateInfo:
    return TemplateInfo(
        template_id=_get(data, "template_id", bytes),
        name=_get(data, "name", str),
        version=_get(data, "version", str),
        size=_get(data, "size", int),
        chunk_size=_get(data, "chunk_size", int),
        chunks=_get(data, "chunks", int),
        zero_chunks=_get(data, "zero_chunks", int),
        format=_get(data, "format", str),
        created_at=float(_get(data, "created_at", (int, float))),
    )


def _peer_info(data: Mapping[str, Any]) -> PeerInfo:
    return PeerInfo(
        peer_id=_get(data, "peer_id", bytes),
        host=_get(data, "host", str),
        port=_get(data, "port", int),
        role=Role(_get(data, "role", str)),
        rack=_rack(data),
        complete=_get(data, "complete", bool),
        percent=float(_get(data, "percent", (int, float))),
    )


def _swarm_member(data: Mapping[str, Any]) -> SwarmMember:
    return SwarmMember(
        peer_id=_get(data, "peer_id", bytes),
        host=_get(data, "host", str),
        port=_get(data, "port", int),
        role=Role(_get(data, "role", str)),
        rack=_rack(data),
        complete=_get(data, "complete", bool),
        have=_get(data, "have", int),
        percent=float(_get(data, "percent", (int, float))),
    )


def _center_info(data: Mapping[str, Any]) -> CenterInfo:
    return CenterInfo(
        peer_id=_get(data, "peer_id", bytes),
        host=_get(data, "host", str),
        port=_get(data, "port", int),
        rack=_rack(data),
    )


def _link_failure(exc: Exception, tls: bool, first: bool) -> str:
    # Under TLS 1.3 a tracker that refuses our certificate shows only as a broken first call.
    if isinstance(exc.__cause__, ssl.SSLError):
        return describe_failure(exc)
    text = str(exc) or type(exc).__name__
    if tls and first:
        text += " (the tracker may have refused our certificate; its log says why)"
    return text


class TrackerClient:
    """One connection to the tracker; calls run one at a time, each with a timeout."""

    def __init__(
        self,
        rpc: RpcClient,
        address: tuple[str, int],
        *,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        local_host: str | None = None,
        tls: bool = False,
    ) -> None:
        self._rpc = rpc
        self.address = address
        # Our end of the link: the address other nodes can most likely reach us at.
        self.local_host = local_host
        self._call_timeout = call_timeout
        self._broken: str | None = None
        self._tls = tls
        self._calls = 0

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        tls: ssl.SSLContext | None = None,
    ) -> TrackerClient:
        """Open a connection; TrackerUnreachable if none is made within `connect_timeout`.

        With `tls` (daemon/tls.py client_context) the link is mutual TLS, and the other side
        must hold a tracker certificate.
        """
        label = format_address(host, port)
        try:
            with trio.fail_after(connect_timeout):
                stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise TrackerUnreachable(
                f"cannot reach tracker {label}: no connection within {connect_timeout:g}s"
            ) from None
        except OSError as exc:
            raise TrackerUnreachable(f"cannot reach tracker {label}: {exc}") from exc
        local = stream.socket.getsockname()
        session: trio.abc.Stream = stream
        if tls is not None:
            try:
                session, _ = await connect(
                    stream,
                    tls,
                    server_hostname=host,
                    allowed={TlsRole.TRACKER},
                    handshake_seconds=connect_timeout,
                )
            except TlsError as exc:
                raise TrackerUnreachable(f"tracker {label}: TLS: {exc}") from None
        return cls(
            RpcClient(session),
            (host, port),
            call_timeout=call_timeout,
            local_host=str(local[0]),
            tls=tls is not None,
        )

    @property
    def label(self) -> str:
        return format_address(*self.address)

    async def aclose(self) -> None:
        await self._rpc.aclose()

    async def __aenter__(self) -> TrackerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(
        self, method: str, params: dict[str, Any], time_limit: float | None = None
    ) -> dict[str, Any]:
        if self._broken is not None:
            raise TrackerUnreachable(f"tracker {self.label}: connection broken: {self._broken}")
        limit = self._call_timeout if time_limit is None else time_limit
        self._calls += 1
        try:
            with trio.fail_after(limit):
                return await self._rpc.call(method, params)
        except trio.TooSlowError:
            self._broken = f"no answer to {method} within {limit:g}s"
        except LINK_ERRORS as exc:
            failure = _link_failure(exc, self._tls, first=self._calls == 1)
            self._broken = f"lost during {method}: {failure}"
        raise TrackerUnreachable(f"tracker {self.label}: {self._broken}")

    async def _parsed(
        self, method: str, params: dict[str, Any], parse: Any, time_limit: float | None = None
    ) -> Any:
        result = await self._call(method, params, time_limit)
        try:
            return parse(result)
        except (KeyError, TypeError, ValueError) as exc:
            raise RpcError(
                "bad_reply", f"tracker {self.label} sent a malformed {method} reply: {exc!r}"
            ) from None

    async def announce(
        self,
        peer_id: bytes,
        role: Role,
        listen: tuple[str, int],
        templates: Iterable[TemplateHave],
        *,
        rack: str | None = None,
        capacity: HostCapacity | Mapping[str, int] | None = None,
    ) -> float:
        """Tell the tracker what this daemon holds; returns seconds until the next announce.

        A host daemon passes its `capacity` (vCPUs and memory, total and used) for placement.
        """
        params: dict[str, Any] = {
            "peer_id": peer_id,
            "role": role.value,
            "listen": [listen[0], listen[1]],
            "rack": rack,
            "templates": [
                {"template_id": t.template_id, "bits": t.bits, "complete": t.complete}
                for t in templates
            ],
        }
        if capacity is not None:
            params["capacity"] = capacity_params(capacity)
        interval: float = await self._parsed(
            "announce", params, lambda r: float(_get(r, "interval", (int, float)))
        )
        return interval

    async def get_peers(
        self,
        template_id: bytes,
        peer_id: bytes,
        *,
        bits: Bitfield | bytes | None = None,
        rack: str | None = None,
        cap: int | None = None,
    ) -> list[PeerInfo]:
        """Sources for `template_id`, best first, never the asker itself."""
        params = {
            "template_id": template_id,
            "peer_id": peer_id,
            "bits": bits.to_bytes() if isinstance(bits, Bitfield) else bits,
            "rack": rack,
            "cap": cap,
        }
        peers: list[PeerInfo] = await self._parsed(
            "get_peers", params, lambda r: [_peer_info(p) for p in _get(r, "peers", list)]
        )
        return peers

    async def register_template(
        self,
        manifest: Manifest | bytes,
        placement: Mapping[str, Iterable[int]],
        *,
        signature: bytes | None = None,
    ) -> Registered:
        """Add a manifest, its placement ({center id hex: [index]}) and signature to the catalog.

        RpcError "untrusted_manifest" when the tracker refuses the signature (or its absence).
        """
        params = {
            "manifest": manifest.encode() if isinstance(manifest, Manifest) else manifest,
            "placement": {center: list(indices) for center, indices in placement.items()},
            "signature": signature,
        }
        registered: Registered = await self._parsed(
            "register_template",
            params,
            lambda r: Registered(_get(r, "template_id", bytes), _get(r, "created", bool)),
        )
        return registered

    async def list_templates(self) -> list[TemplateInfo]:
        templates: list[TemplateInfo] = await self._parsed(
            "list_templates", {}, lambda r: [_template_info(t) for t in _get(r, "templates", list)]
        )
        return templates

    async def lookup(self, name: str, version: str | None = None) -> LookupResult:
        """name:version, or the newest version of `name`; RpcError "unknown_template" if none."""

        def parse(result: dict[str, Any]) -> LookupResult:
            info = _template_info(result)
            manifest = Manifest.decode(_get(result, "manifest", bytes))
            if manifest.template_id != info.template_id:
                raise ValueError("manifest does not match its template id")
            signature = result.get("signature")
            if signature is not None and not isinstance(signature, bytes):
                raise TypeError("field 'signature' is not bytes")
            profile = result.get("profile")
            if profile is not None and not isinstance(profile, bytes):
                raise TypeError("field 'profile' is not bytes")
            return LookupResult(info, manifest, signature, profile)

        found: LookupResult = await self._parsed(
            "lookup", {"name": name, "version": version}, parse
        )
        return found

    async def put_profile(self, template_id: bytes, data: bytes) -> int:
        """Store an encoded prefetch profile for a template; returns how many chunks it lists.

        RpcError codes: unknown_template, bad_profile, forbidden (only host certificates).
        """
        params = {"template_id": template_id, "profile": data}
        chunks: int = await self._parsed("put_profile", params, lambda r: _get(r, "chunks", int))
        return chunks

    async def centers(self) -> list[CenterInfo]:
        """The live storage centers."""
        centers: list[CenterInfo] = await self._parsed(
            "centers", {}, lambda r: [_center_info(c) for c in _get(r, "centers", list)]
        )
        return centers

    async def swarm(self, template_id: bytes) -> SwarmView:
        """Every live announcer of `template_id` with its role and percent complete."""

        def parse(result: dict[str, Any]) -> SwarmView:
            chunks = result.get("chunks")
            if chunks is not None and type(chunks) is not int:
                raise TypeError("field 'chunks' is not an int")
            members = tuple(_swarm_member(m) for m in _get(result, "peers", list))
            return SwarmView(_get(result, "template_id", bytes), chunks, members)

        view: SwarmView = await self._parsed("swarm", {"template_id": template_id}, parse)
        return view

    async def launch(
        self,
        name: str,
        version: str | None,
        flavor: str,
        *,
        host: str | None = None,
        vm_name: str | None = None,
        stream: bool = False,
        time_limit: float = DEFAULT_LAUNCH_TIMEOUT,
    ) -> LaunchResult:
        """Place and start a VM; returns once it runs. `host`: HOST:PORT or a peer id (prefix).

        RpcError codes: unknown_template, unknown_flavor, no_capacity, unknown_host,
        host_unreachable, and whatever the chosen host refuses with (libvirt_unreachable,
        not_bootable, name_taken, ...).
        """
        params = {
            "name": name,
            "version": version,
            "flavor": flavor,
            "host": host,
            "vm_name": vm_name,
            "stream": stream,
        }
        launched: LaunchResult = await self._parsed("launch", params, _launch_result, time_limit)
        return launched

    async def vms(self) -> ClusterVms:
        """Every VM on every live host; hosts that did not answer are listed apart."""

        def parse(result: dict[str, Any]) -> ClusterVms:
            return ClusterVms(
                tuple(_vm_info(v) for v in _get(result, "vms", list)),
                tuple(_host_failure(f) for f in _get(result, "unreachable", list)),
            )

        found: ClusterVms = await self._parsed("vms", {}, parse)
        return found

    async def flavors(self) -> list[dict[str, Any]]:
        """The tracker's flavors, smallest first, as plain maps (see swarm.flavors)."""
        flavors: list[dict[str, Any]] = await self._parsed(
            "flavors", {}, lambda r: [dict(f) for f in _get(r, "flavors", list)]
        )
        return flavors
