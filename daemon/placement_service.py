"""The tracker's VM placement: pick a host (swarm.vm_placement), forward `launch` to it, keep score.

The tracker reserves the flavor's vCPUs and memory on the chosen host while its launch runs and
until the host's next announce (which then counts the VM itself), so launches in quick
succession do not all land on the host that looked emptiest.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from ..swarm.address import format_address
from ..swarm.bitfield import Bitfield
from ..swarm.flavors import Flavor, flavor_list
from ..swarm.messages import Role
from ..swarm.vm_placement import HostCandidate, HostCapacity, PlacementError, choose_host
from .announces import AnnounceTable, PeerAnnounce
from .catalog import Catalog, TemplateEntry
from .rpc import LINK_ERRORS, RpcClient, RpcError
from .tls import TlsError, TlsRole

log = logging.getLogger(__name__)

Params = dict[str, Any]
DEFAULT_LAUNCH_TIMEOUT = 900.0
DEFAULT_QUERY_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
MAX_DECISIONS = 1000
MAX_VM_NAME_LENGTH = 64
# A peer id prefix shorter than this is too likely to be a typo that matches by accident.
MIN_ID_PREFIX = 4


class HostCaller(Protocol):
    """Calls one RPC method on a host daemon's TCP port; RpcError on any failure."""

    def __call__(
        self, address: tuple[str, int], method: str, params: Params, time_limit: float
    ) -> Awaitable[Params]: ...


async def call_host(
    address: tuple[str, int],
    method: str,
    params: Params,
    time_limit: float,
    *,
    tls: ssl.SSLContext | None = None,
) -> Params:
    """One call on a fresh connection (mutual TLS to a host certificate with `tls`); a broken
    link, a refused certificate or silence is RpcError("host_unreachable")."""
    label = format_address(*address)
    try:
        with trio.fail_after(DEFAULT_CONNECT_TIMEOUT):
            client = await RpcClient.connect_tcp(*address, tls=tls, allowed={TlsRole.HOST})
    except (OSError, trio.TooSlowError, TlsError) as exc:
        raise RpcError(
            "host_unreachable", f"cannot reach host daemon {label}: {exc or 'timed out'}"
        ) from None
    async with client:
        try:
            with trio.fail_after(time_limit):
                return await client.call(method, params)
        except trio.TooSlowError:
            raise RpcError(
                "host_unreachable",
                f"host daemon {label} did not answer {method} in {time_limit:g}s",
            ) from None
        except LINK_ERRORS as exc:
            raise RpcError(
                "host_unreachable", f"host daemon {label} broke the link during {method}: {exc}"
            ) from None


@dataclass
class Reservation:
    """Capacity held for a launch: while in flight, then until the host announces after it."""

    vcpus: int
    memory: int
    settled_at: float | None = None


@dataclass(frozen=True)
class LaunchRecord:
    """One placement decision and how it ended."""

    at: float
    template_id: bytes
    flavor: str
    host_peer_id: bytes
    host: str
    reason: str
    vm_id: str | None = None
    error: str | None = None


@dataclass
class _State:
    reservations: dict[bytes, list[Reservation]] = field(default_factory=dict)
    decisions: deque[LaunchRecord] = field(default_factory=lambda: deque(maxlen=MAX_DECISIONS))


def _text(params: Params, key: str, limit: int, *, optional: bool = False) -> str | None:
    value = params.get(key)
    if value is None:
        if optional:
            return None
        raise RpcError("bad_request", f"missing param {key!r}")
    if type(value) is not str or not 0 < len(value) <= limit:
        raise RpcError("bad_request", f"param {key!r} must be text of 1..{limit} characters")
    return value


class PlacementService:
    """The tracker's `launch`, `vms` and `flavors` methods."""

    def __init__(
        self,
        catalog: Catalog,
        announces: AnnounceTable,
        flavors: Mapping[str, Flavor],
        now: Callable[[], float],
        *,
        host_caller: HostCaller = call_host,
        rng: random.Random | None = None,
        launch_timeout: float = DEFAULT_LAUNCH_TIMEOUT,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
        on_decision: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.catalog = catalog
        self.announces = announces
        self.flavors = dict(flavors)
        self._now = now
        self._call = host_caller
        self._rng = rng
        self.launch_timeout = launch_timeout
        self.query_timeout = query_timeout
        self._state = _State()
        # Told each decision's reason, or the PlacementError code when no host fits (metrics).
        self._on_decision = on_decision

    @property
    def decisions(self) -> list[LaunchRecord]:
        """The latest placement decisions, oldest first."""
        return list(self._state.decisions)

    # --- capacity as placement sees it ---

    def _capacity(self, announce: PeerAnnounce) -> HostCapacity | None:
        """The host's reported capacity plus what the tracker reserved on it since."""
        held = self._state.reservations.get(announce.peer_id, [])
        # A settled launch is in the host's own report once it announced after it.
        held[:] = [r for r in held if r.settled_at is None or r.settled_at >= announce.last_seen]
        if not held:
            self._state.reservations.pop(announce.peer_id, None)
        capacity = announce.capacity
        if capacity is None:
            return None
        for reservation in held:
            capacity = capacity.plus(reservation.vcpus, reservation.memory)
        return capacity

    def candidates(
        self, entry: TemplateEntry, now: float
    ) -> list[tuple[PeerAnnounce, HostCandidate]]:
        """Every live host with its capacity, its share of the template and its rack's share."""
        live = self.announces.live(now)
        held: dict[bytes, Bitfield] = {}
        for announce in live:
            holding = announce.holdings.get(entry.template_id)
            bitfield = None if holding is None else holding.resolved(entry.chunks)
            if bitfield is not None:
                held[announce.peer_id] = bitfield
        # A center's stripe counts for its rack even before it announces the template.
        placement = self.catalog.placement(entry.template_id)
        racks: dict[str, int] = {}  # rack -> the union of its members' bits, as one integer
        for announce in live:
            if announce.rack is None:
                continue
            bits = held.get(announce.peer_id)
            if bits is None and announce.role is Role.STORAGE:
                bits = placement.get(announce.peer_id.hex())
            if bits is None or bits.size != entry.chunks:
                continue
            racks[announce.rack] = racks.get(announce.rack, 0) | int.from_bytes(bits.to_bytes())
        found = []
        for announce in live:
            if announce.role is not Role.HOST:
                continue
            own = held.get(announce.peer_id)
            chunks_held = 0 if own is None else len(own)
            rack_union = None if announce.rack is None else racks.get(announce.rack)
            candidate = HostCandidate(
                host_id=announce.peer_id.hex(),
                capacity=self._capacity(announce),
                chunks_held=chunks_held,
                rack=announce.rack,
                rack_chunks=chunks_held if rack_union is None else rack_union.bit_count(),
                label=format_address(*announce.address),
            )
            found.append((announce, candidate))
        return found

    @staticmethod
    def resolve_host(text: str, hosts: list[tuple[PeerAnnounce, HostCandidate]]) -> str:
        """The host id meant by `text`: its HOST:PORT address, or its peer id hex (or prefix)."""
        by_address = [c.host_id for a, c in hosts if format_address(*a.address) == text]
        if by_address:
            return by_address[0]
        wanted = text.lower()
        if len(wanted) >= MIN_ID_PREFIX and all(ch in "0123456789abcdef" for ch in wanted):
            matches = [c.host_id for _, c in hosts if c.host_id.startswith(wanted)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise RpcError(
                    "bad_request", f"host id prefix {text!r} matches {len(matches)} hosts"
                )
        known = ", ".join(c.label for _, c in hosts) or "none"
        raise RpcError(
            "unknown_host",
            f"no live host daemon {text!r} (give HOST:PORT or a peer id); live hosts: {known}",
        )

    # --- RPC methods ---

    def flavors_rpc(self, params: Params) -> Params:
        return {"flavors": flavor_list(self.flavors)}

    def _flavor(self, name: str) -> Flavor:
        flavor = self.flavors.get(name)
        if flavor is None:
            known = ", ".join(sorted(self.flavors)) or "none"
            raise RpcError("unknown_flavor", f"no flavor {name!r}; the tracker knows: {known}")
        return flavor

    async def launch(self, params: Params) -> Params:
        """Choose a host for the VM, have it fetch and boot, return its reply plus `host`."""
        name = _text(params, "name", 255)
        assert name is not None
        version = _text(params, "version", 255, optional=True)
        flavor = self._flavor(str(_text(params, "flavor", 63)))
        requested = _text(params, "host", 300, optional=True)
        vm_name = _text(params, "vm_name", MAX_VM_NAME_LENGTH, optional=True)
        stream = params.get("stream", False)
        if type(stream) is not bool:
            raise RpcError("bad_request", "param 'stream' must be true or false")
        entry = self.catalog.find(name, version)
        if entry is None:
            label = name if version is None else f"{name}:{version}"
            raise RpcError("unknown_template", f"no template {label!r} in the catalog")
        now = self._now()
        hosts = self.candidates(entry, now)
        requested_id = None if requested is None else self.resolve_host(requested, hosts)
        try:
            decision = choose_host(
                entry.chunks,
                [c for _, c in hosts],
                flavor,
                requested=requested_id,
                rng=self._rng,
            )
        except PlacementError as exc:
            self._on_decision(exc.code)
            raise RpcError(exc.code, exc.message) from None
        self._on_decision(decision.reason)
        announce = next(a for a, c in hosts if c.host_id == decision.host.host_id)
        label = decision.host.label
        log.info(
            "placing %s:%s (%s) on %s: %s, holds %d/%d chunks, %d hosts had room",
            entry.name,
            entry.version,
            flavor.name,
            label,
            decision.reason,
            decision.host.chunks_held,
            entry.chunks,
            decision.eligible,
        )
        reservation = Reservation(flavor.vcpus, flavor.memory)
        self._state.reservations.setdefault(announce.peer_id, []).append(reservation)
        forwarded = {
            "name": entry.name,
            "version": entry.version,
            "template_id": entry.template_id,
            "flavor": flavor.name,
            "vm_name": vm_name,
            "stream": stream,
        }
        record = LaunchRecord(
            now, entry.template_id, flavor.name, announce.peer_id, label, decision.reason
        )
        try:
            reply = await self._call(announce.address, "launch", forwarded, self.launch_timeout)
        except RpcError as exc:
            self._release(announce.peer_id, reservation)
            self._state.decisions.append(
                dataclasses.replace(record, error=f"{exc.code}: {exc.message}")
            )
            raise RpcError(exc.code, f"host {label}: {exc.message}") from None
        except BaseException:
            self._release(announce.peer_id, reservation)
            raise
        reservation.settled_at = self._now()
        vm_id = reply.get("vm_id")
        self._state.decisions.append(
            dataclasses.replace(record, vm_id=None if vm_id is None else str(vm_id))
        )
        return {
            **reply,
            "host": label,
            "host_peer_id": announce.peer_id,
            "placement": decision.reason,
        }

    def _release(self, peer_id: bytes, reservation: Reservation) -> None:
        held = self._state.reservations.get(peer_id, [])
        if reservation in held:
            held.remove(reservation)

    async def vms(self, params: Params) -> Params:
        """Every live host's VMs, asked concurrently; hosts that fail are listed apart."""
        hosts = [a for a in self.announces.live(self._now()) if a.role is Role.HOST]
        vms: list[Params] = []
        unreachable: list[Params] = []

        async def ask(announce: PeerAnnounce) -> None:
            label = format_address(*announce.address)
            where = {"host": label, "host_peer_id": announce.peer_id}
            try:
                reply = await self._call(announce.address, "vms", {}, self.query_timeout)
                listed = reply["vms"]
                if type(listed) is not list or not all(type(v) is dict for v in listed):
                    raise TypeError("'vms' is not a list of maps")
            except RpcError as exc:
                unreachable.append({**where, "error": f"{exc.code}: {exc.message}"})
                return
            except (KeyError, TypeError) as exc:
                unreachable.append({**where, "error": f"bad_reply: {exc}"})
                return
            vms.extend({**vm, **where} for vm in listed)

        async with trio.open_nursery() as nursery:
            for announce in hosts:
                nursery.start_soon(ask, announce)
        vms.sort(key=lambda v: (v["host"], str(v.get("vm_id"))))
        unreachable.sort(key=lambda u: u["host"])
        return {"vms": vms, "unreachable": unreachable}
