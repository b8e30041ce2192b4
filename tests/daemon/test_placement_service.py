"""The tracker's launch: capacity from announces, locality from holdings, forwarding to the host."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from vmswarm.daemon import tracker
from vmswarm.daemon.catalog import Catalog, TemplateEntry
from vmswarm.daemon.rpc import Notifier, RpcError, serve_rpc
from vmswarm.daemon.tracker import Tracker
from vmswarm.daemon.tracker_client import TrackerClient
from vmswarm.swarm.flavors import GIB, MIB, Flavor
from vmswarm.swarm.messages import Role
from vmswarm.swarm.vm_placement import HostCapacity

from .test_catalog import make_manifest

MANIFEST = make_manifest()  # five chunks
TID = MANIFEST.template_id
FLAVORS = {
    "small": Flavor("small", vcpus=1, memory=512 * MIB, disk=GIB),
    "big": Flavor("big", vcpus=4, memory=4 * GIB, disk=GIB),
}
ROOMY = {"vcpus_total": 4, "vcpus_used": 0, "memory_total": 8 * GIB, "memory_used": 0}

Params = dict[str, Any]


def pid(n: int) -> bytes:
    return bytes([n]) * 16


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeHosts:
    """Stands in for the host daemons' TCP RPC: records calls, answers or fails as told."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, int], str, Params]] = []
        self.fail: dict[tuple[str, int], RpcError] = {}
        self.vms: dict[tuple[str, int], list[Params]] = {}
        self.during_launch: Callable[[], None] | None = None

    async def __call__(
        self, address: tuple[str, int], method: str, params: Params, time_limit: float
    ) -> Params:
        self.calls.append((address, method, params))
        await trio.lowlevel.checkpoint()
        if address in self.fail:
            raise self.fail[address]
        if method == "launch":
            if self.during_launch is not None:
                self.during_launch()
            return {
                "vm_id": f"vm-{len(self.calls)}",
                "domain": f"vmswarm-{len(self.calls)}",
                "template_id": params["template_id"],
                "seconds_fetch": 1.5,
                "seconds_boot": 0.5,
                "host": "hostname-from-daemon",
            }
        if method == "vms":
            return {"vms": self.vms.get(address, [])}
        raise RpcError("unknown_method", method)


@pytest.fixture
def hosts() -> FakeHosts:
    return FakeHosts()


@pytest.fixture
def clocked(tmp_path: Path, hosts: FakeHosts) -> tuple[Tracker, FakeClock]:
    clock = FakeClock()
    catalog = Catalog.open(tmp_path)
    catalog.register(MANIFEST.encode(), {pid(9).hex(): [0, 1, 2, 3, 4]}, now=clock.now)
    t = Tracker(catalog, announce_ttl=30.0, clock=clock, flavors=FLAVORS, host_caller=hosts)
    return t, clock


def announce(
    t: Tracker,
    peer: int,
    *,
    role: str = "host",
    bits: bytes | None = None,
    capacity: Params | None = ROOMY,
    rack: str | None = None,
) -> None:
    complete = bits == b"\xf8"
    templates = [] if bits is None else [{"template_id": TID, "bits": bits, "complete": complete}]
    params: Params = {
        "peer_id": pid(peer),
        "role": role,
        "listen": ["10.0.0.1", 7000 + peer],
        "rack": rack,
        "templates": templates,
    }
    if capacity is not None:
        params["capacity"] = capacity
    t.announce(params)


def debian_entry(t: Tracker) -> TemplateEntry:
    entry = t.catalog.find("debian", None)
    assert entry is not None
    return entry


def used(vcpus: int, memory: int = 0) -> Params:
    return {**ROOMY, "vcpus_used": vcpus, "memory_used": memory}


async def launch(t: Tracker, **params: Any) -> Params:
    return await t.placement.launch({"name": "debian", "flavor": "small", **params})


async def test_launch_goes_to_the_host_holding_most_of_the_template(
    clocked: tuple[Tracker, FakeClock], hosts: FakeHosts
) -> None:
    t, _ = clocked
    announce(t, 1)
    announce(t, 2, bits=b"\xe0", capacity=used(2))  # 3 of 5 chunks, busier
    announce(t, 3, bits=b"\x80")  # 1 of 5 chunks
    reply = await launch(t, vm_name="web1")
    assert reply["host"] == "10.0.0.1:7002"
    assert reply["host_peer_id"] == pid(2)
    assert reply["placement"] == "locality"
    assert reply["vm_id"] == "vm-1" and reply["seconds_fetch"] == 1.5
    [(address, method, forwarded)] = hosts.calls
    assert (address, method) == (("10.0.0.1", 7002), "launch")
    assert forwarded == {
        "name": "debian",
        "version": "12",
        "template_id": TID,
        "flavor": "small",
        "vm_name": "web1",
        "stream": False,
    }
    [record] = t.placement.decisions
    assert (record.host_peer_id, record.reason, record.vm_id, record.error) == (
        pid(2),
        "locality",
        "vm-1",
        None,
    )


async def test_a_streaming_launch_is_forwarded_as_one(
    clocked: tuple[Tracker, FakeClock], hosts: FakeHosts
) -> None:
    t, _ = clocked
    announce(t, 1)
    await launch(t, stream=True)
    [(_, method, forwarded)] = hosts.calls
    assert method == "launch" and forwarded["stream"] is True


async def test_without_a_majority_holder_the_least_loaded_host_wins(
    clocked: tuple[Tracker, FakeClock],
) -> None:
    t, _ = clocked
    announce(t, 1, capacity=used(1))
    announce(t, 2, bits=b"\xc0", capacity=used(2))  # 2 of 5: not most
    announce(t, 3, capacity=used(0, 4 * GIB))  # memory half used
    announce(t, 4, capacity=used(0, 1 * GIB))
    reply = await launch(t)
    assert (reply["host"], reply["placement"]) == ("10.0.0.1:7004", "least_loaded")


async def test_centers_and_hosts_without_capacity_are_never_chosen(
    clocked: tuple[Tracker, FakeClock],
) -> None:
    t, _ = clocked
    announce(t, 1, role="storage", bits=b"\xf8")
    announce(t, 2, bits=b"\xf8", capacity=None)
    with pytest.raises(RpcError) as caught:
        await launch(t)
    assert caught.value.code == "no_capacity"
    assert "10.0.0.1:7002 reported no capacity" in caught.value.message


async def test_no_capacity_changes_nothing_and_names_the_flavor(
    clocked: tuple[Tracker, FakeClock], hosts: FakeHosts
) -> None:
    t, _ = clocked
    announce(t, 1, capacity=used(2))
    with pytest.raises(RpcError) as caught:
        await launch(t, flavor="big")
    assert caught.value.code == "no_capacity"
    assert "'big' (4 vCPUs, 4096 MiB)" in caught.value.message
    assert "2 free vCPUs" in caught.value.message
    assert hosts.calls == [] and t.placement.decisions == []


@pytest.mark.parametrize(
    ("params", "code", "text"),
    [
        ({"name": "nosuch"}, "unknown_template", "'nosuch'"),
        ({"version": "11"}, "unknown_template", "'debian:11'"),
        ({"flavor": "huge"}, "unknown_flavor", "big, small"),
        ({"host": "10.0.0.1:9999"}, "unknown_host", "live hosts: 10.0.0.1:7001"),
        ({"host": "zz"}, "unknown_host", "HOST:PORT or a peer id"),
        ({"flavor": 3}, "bad_request", "'flavor'"),
        ({"vm_name": ""}, "bad_request", "'vm_name'"),
        ({"stream": "yes"}, "bad_request", "'stream'"),
    ],
)
async def test_bad_launches_are_refused_before_any_host_is_asked(
    clocked: tuple[Tracker, FakeClock],
    hosts: FakeHosts,
    params: Params,
    code: str,
    text: str,
) -> None:
    t, _ = clocked
    announce(t, 1)
    with pytest.raises(RpcError) as caught:
        await launch(t, **params)
    assert caught.value.code == code
    assert text in caught.value.message
    assert hosts.calls == []


async def test_explicit_host_by_address_or_id_prefix_and_it_needs_capacity(
    clocked: tuple[Tracker, FakeClock],
) -> None:
    t, _ = clocked
    announce(t, 1, bits=b"\xf8")
    announce(t, 2)
    announce(t, 3, capacity=used(4))
    reply = await launch(t, host="10.0.0.1:7002")
    assert (reply["host"], reply["placement"]) == ("10.0.0.1:7002", "requested")
    reply = await launch(t, host=pid(2).hex()[:6].upper())
    assert reply["host"] == "10.0.0.1:7002"
    with pytest.raises(RpcError) as caught:
        await launch(t, host="10.0.0.1:7003")
    assert caught.value.code == "no_capacity"


async def test_reservations_spread_back_to_back_launches_until_the_host_reports(
    clocked: tuple[Tracker, FakeClock],
) -> None:
    t, clock = clocked
    two_vcpus = {**ROOMY, "vcpus_total": 2}
    announce(t, 1, capacity=two_vcpus)
    announce(t, 2, capacity=two_vcpus)
    placed = [(await launch(t))["host"] for _ in range(4)]
    # Each launch reserves a vCPU, so the two hosts alternate and then both are full.
    assert sorted(placed) == ["10.0.0.1:7001"] * 2 + ["10.0.0.1:7002"] * 2
    with pytest.raises(RpcError, match="no host with capacity"):
        await launch(t)
    # The hosts re-announce later: their own reports now rule, and they say one VM each stopped.
    clock.now += 5
    announce(t, 1, capacity={**two_vcpus, "vcpus_used": 1})
    announce(t, 2, capacity={**two_vcpus, "vcpus_used": 2})
    assert (await launch(t))["host"] == "10.0.0.1:7001"


async def test_a_launch_in_flight_holds_its_capacity(
    clocked: tuple[Tracker, FakeClock], hosts: FakeHosts
) -> None:
    t, clock = clocked
    announce(t, 1, capacity={**ROOMY, "vcpus_total": 1})
    seen: list[str] = []

    def nested_attempt() -> None:
        # While host 1 boots the first VM, it has no room for another: the re-announce says 0 used.
        announce(t, 1, capacity={**ROOMY, "vcpus_total": 1})
        hosts_now = t.placement.candidates(debian_entry(t), clock.now)
        capacity = hosts_now[0][1].capacity
        assert capacity is not None
        seen.append(f"{capacity.vcpus_free}")

    hosts.during_launch = nested_attempt
    await launch(t)
    assert seen == ["0"]


async def test_a_host_failure_passes_its_code_and_releases_the_reservation(
    clocked: tuple[Tracker, FakeClock], hosts: FakeHosts
) -> None:
    t, _ = clocked
    announce(t, 1, capacity={**ROOMY, "vcpus_total": 1})
    hosts.fail[("10.0.0.1", 7001)] = RpcError("not_bootable", "no boot sector")
    with pytest.raises(RpcError) as caught:
        await launch(t)
    assert caught.value.code == "not_bootable"
    assert caught.value.message == "host 10.0.0.1:7001: no boot sector"
    assert t.placement.decisions[-1].error == "not_bootable: no boot sector"
    del hosts.fail[("10.0.0.1", 7001)]
    assert (await launch(t))["host"] == "10.0.0.1:7001"


async def test_expired_hosts_are_not_placed_on(clocked: tuple[Tracker, FakeClock]) -> None:
    t, clock = clocked
    announce(t, 1, bits=b"\xf8")
    clock.now += 20
    announce(t, 2)
    clock.now += 15  # host 1 is past its 30 s TTL
    assert (await launch(t))["host"] == "10.0.0.1:7002"


async def test_rack_holdings_break_a_load_tie(clocked: tuple[Tracker, FakeClock]) -> None:
    t, clock = clocked
    announce(t, 1, rack="r1")
    announce(t, 2, rack="r2")
    announce(t, 3, rack="r2", bits=b"\x80", capacity=used(4))  # full, but holds a chunk in r2
    announce(t, 9, role="storage", rack="r2", capacity=None)  # the catalog's center: 5 chunks
    hosts_now = t.placement.candidates(debian_entry(t), clock.now)
    assert {c.label: c.rack_chunks for _, c in hosts_now} == {
        "10.0.0.1:7001": 0,
        "10.0.0.1:7002": 5,
        "10.0.0.1:7003": 5,
    }
    assert (await launch(t))["host"] == "10.0.0.1:7002"


@pytest.mark.parametrize(
    ("capacity", "text"),
    [
        ({"vcpus_total": 4}, "exactly the keys"),
        ({**ROOMY, "vcpus_used": -1}, "vcpus_used"),
        ({**ROOMY, "memory_total": 1.5}, "must be integers"),
        ({**ROOMY, "memory_total": True}, "must be integers"),
        ({**ROOMY, "extra": 1}, "exactly the keys"),
    ],
)
def test_bad_capacity_in_an_announce_is_refused(
    clocked: tuple[Tracker, FakeClock], capacity: Params, text: str
) -> None:
    t, _ = clocked
    with pytest.raises(RpcError) as caught:
        announce(t, 1, capacity=capacity)
    assert caught.value.code == "bad_request" and text in caught.value.message
    assert len(t.announces) == 0


async def test_cluster_vms_lists_every_host_and_the_ones_that_failed(
    clocked: tuple[Tracker, FakeClock], hosts: FakeHosts
) -> None:
    t, _ = clocked
    announce(t, 1)
    announce(t, 2)
    announce(t, 3)
    announce(t, 4, role="storage", capacity=None)
    hosts.vms[("10.0.0.1", 7001)] = [{"vm_id": "b", "state": "running"}]
    hosts.vms[("10.0.0.1", 7002)] = [{"vm_id": "a", "state": "shutoff"}]
    hosts.fail[("10.0.0.1", 7003)] = RpcError("host_unreachable", "connection refused")
    reply = await t.placement.vms({})
    assert [(v["host"], v["vm_id"], v["host_peer_id"]) for v in reply["vms"]] == [
        ("10.0.0.1:7001", "b", pid(1)),
        ("10.0.0.1:7002", "a", pid(2)),
    ]
    assert reply["unreachable"] == [
        {
            "host": "10.0.0.1:7003",
            "host_peer_id": pid(3),
            "error": "host_unreachable: connection refused",
        }
    ]
    assert {address for address, _, _ in hosts.calls} == {
        ("10.0.0.1", 7001),
        ("10.0.0.1", 7002),
        ("10.0.0.1", 7003),
    }


# --- through real sockets: the typed client, the tracker and a host daemon's RPC port ---


VM_ROW: Params = {
    "vm_id": "vm-7",
    "domain": "vmswarm-vm-7",
    "name": "web",
    "template_id": TID,
    "flavor": "small",
    "state": "running",
    "vcpus": 1,
    "memory": 512 * MIB,
    "cpu_seconds": 1.25,
    "cpu_utilisation": 0.5,
    "memory_bytes": 100 * MIB,
    "net_rx_bytes": 10,
    "net_tx_bytes": 20,
    "disk_read_bytes": 30,
    "disk_write_bytes": 40,
}


async def fake_host_daemon(nursery: trio.Nursery, launches: list[Params]) -> int:
    async def launch_handler(params: Params, _: Notifier) -> Params:
        launches.append(params)
        if params["vm_name"] == "taken":
            raise RpcError("name_taken", "a VM named 'taken' already exists")
        return {
            "vm_id": "vm-7",
            "domain": "vmswarm-vm-7",
            "template_id": params["template_id"],
            "seconds_fetch": 2.0,
            "seconds_boot": 3.0,
            "host": "ignored",
        }

    async def vms_handler(params: Params, _: Notifier) -> Params:
        return {"vms": [VM_ROW]}

    handlers = {"launch": launch_handler, "vms": vms_handler}
    listeners = await nursery.start(
        trio.serve_tcp, functools.partial(serve_rpc, handlers=handlers), 0
    )
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_launch_and_vms_over_the_wire(nursery: trio.Nursery, tmp_path: Path) -> None:
    launches: list[Params] = []
    host_port = await fake_host_daemon(nursery, launches)
    address = await nursery.start(
        functools.partial(
            tracker.run, "127.0.0.1", 0, tmp_path / "state", flavors=FLAVORS, allow_unsigned=True
        )
    )
    client = await TrackerClient.connect(*address)
    async with client:
        await client.register_template(MANIFEST, {})
        capacity = HostCapacity(2, 0, 4 * GIB, 0)
        await client.announce(pid(1), Role.HOST, ("127.0.0.1", host_port), [], capacity=capacity)
        flavors = await client.flavors()
        assert [f["name"] for f in flavors] == ["small", "big"]
        launched = await client.launch("debian", "12", "small", vm_name="web")
        assert launched.host == f"127.0.0.1:{host_port}"
        assert (launched.vm_id, launched.domain, launched.template_id) == (
            "vm-7",
            "vmswarm-vm-7",
            TID,
        )
        assert (launched.seconds_fetch, launched.seconds_boot) == (2.0, 3.0)
        assert (launched.host_peer_id, launched.placement) == (pid(1), "least_loaded")
        assert launches[0]["flavor"] == "small" and launches[0]["template_id"] == TID
        with pytest.raises(RpcError) as caught:
            await client.launch("debian", None, "small", vm_name="taken")
        assert caught.value.code == "name_taken"
        cluster = await client.vms()
        [vm] = cluster.vms
        assert (vm.host, vm.vm_id, vm.state, vm.vcpus, vm.template_id) == (
            f"127.0.0.1:{host_port}",
            "vm-7",
            "running",
            1,
            TID,
        )
        assert vm.stats["cpu_utilisation"] == 0.5 and vm.stats["disk_write_bytes"] == 40
        assert cluster.unreachable == ()


async def test_a_host_that_is_gone_is_host_unreachable(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    address = await nursery.start(
        functools.partial(
            tracker.run, "127.0.0.1", 0, tmp_path / "state", flavors=FLAVORS, allow_unsigned=True
        )
    )
    # A port nobody listens on: bind one, then close it.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    client = await TrackerClient.connect(*address)
    async with client:
        await client.register_template(MANIFEST, {})
        await client.announce(pid(1), Role.HOST, ("127.0.0.1", dead_port), [], capacity=ROOMY)
        with pytest.raises(RpcError) as caught:
            await client.launch("debian", None, "small")
        assert caught.value.code == "host_unreachable"
        assert f"127.0.0.1:{dead_port}" in caught.value.message
        cluster = await client.vms()
        assert cluster.vms == ()
        [failure] = cluster.unreachable
        assert failure.host == f"127.0.0.1:{dead_port}"
        assert failure.error.startswith("host_unreachable")
