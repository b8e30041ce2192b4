"""The tracker service over real loopback sockets, and its state with a fake clock."""

from __future__ import annotations

import functools
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
from vmswarm.daemon import tracker
from vmswarm.daemon.catalog import Catalog
from vmswarm.daemon.rpc import RpcClient, RpcError
from vmswarm.daemon.tracker import Tracker
from vmswarm.daemon.tracker_client import (
    TemplateHave,
    TrackerClient,
    TrackerUnreachable,
)
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.messages import Role

from .test_catalog import make_manifest

MANIFEST = make_manifest()  # five chunks
TID = MANIFEST.template_id


def pid(n: int) -> bytes:
    return bytes([n]) * 16


def have(bits: str, template_id: bytes = TID) -> TemplateHave:
    return TemplateHave.from_bitfield(template_id, Bitfield.from_string(bits))


async def start_tracker(nursery: trio.Nursery, state_dir: Path, **kwargs: Any) -> tuple[str, int]:
    kwargs.setdefault("allow_unsigned", True)  # signing: tests/daemon/test_signed_templates.py
    address: tuple[str, int] = await nursery.start(
        functools.partial(tracker.run, "127.0.0.1", 0, state_dir, rng=random.Random(7), **kwargs)
    )
    return address


@pytest.fixture
async def client(nursery: trio.Nursery, tmp_path: Path) -> TrackerClient:
    host, port = await start_tracker(nursery, tmp_path / "state")
    return await TrackerClient.connect(host, port)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- through the socket, with the typed client ---


async def test_register_list_and_lookup_round_trip(client: TrackerClient) -> None:
    registered = await client.register_template(MANIFEST, {"cc" * 16: [0, 1]})
    assert (registered.template_id, registered.created) == (TID, True)
    again = await client.register_template(MANIFEST.encode(), {})
    assert (again.template_id, again.created) == (TID, False)
    [info] = await client.list_templates()
    assert (info.template_id, info.name, info.version, info.chunks, info.zero_chunks) == (
        TID,
        "debian",
        "12",
        5,
        1,
    )
    found = await client.lookup("debian")
    assert found.template_id == TID and found.manifest == MANIFEST
    assert (await client.lookup("debian", "12")).manifest == MANIFEST


async def test_version_conflict_and_unknown_template_are_clear_failures(
    client: TrackerClient,
) -> None:
    await client.register_template(MANIFEST, {})
    with pytest.raises(RpcError) as conflict:
        await client.register_template(make_manifest(seed=99), {})
    assert conflict.value.code == "version_exists"
    assert "debian:12 already exists" in conflict.value.message
    with pytest.raises(RpcError) as unknown:
        await client.lookup("debian", "13")
    assert unknown.value.code == "unknown_template"
    assert "debian:13" in unknown.value.message
    with pytest.raises(RpcError) as bad:
        await client.register_template(b"\x90", {})
    assert bad.value.code == "bad_manifest"
    assert len(await client.list_templates()) == 1


async def test_handout_ranks_complete_hosts_then_centers_then_partial_hosts(
    client: TrackerClient,
) -> None:
    center_a, center_b = pid(0xA), pid(0xB)
    await client.register_template(MANIFEST, {center_a.hex(): [0, 1, 2], center_b.hex(): [2, 3, 4]})
    await client.announce(pid(1), Role.HOST, ("10.0.0.1", 7001), [have("11111")])
    await client.announce(pid(2), Role.HOST, ("10.0.0.2", 7002), [have("10000")])
    await client.announce(center_a, Role.STORAGE, ("10.0.1.1", 7101), [have("11100")])
    # Center B has not announced the template yet: the catalog's placement stands in.
    await client.announce(center_b, Role.STORAGE, ("10.0.1.2", 7102), [])
    asker = pid(9)
    await client.announce(asker, Role.HOST, ("10.0.0.9", 7009), [have("10000")])

    handout = await client.get_peers(TID, asker, bits=Bitfield.from_string("10000"))
    assert [p.peer_id for p in handout] == [pid(1), center_b, center_a, pid(2)]
    assert [p.role for p in handout] == [Role.HOST, Role.STORAGE, Role.STORAGE, Role.HOST]
    assert [p.percent for p in handout] == [100.0, 60.0, 60.0, 20.0]
    assert handout[0].complete and not handout[3].complete
    assert (handout[1].host, handout[1].port) == ("10.0.1.2", 7102)

    capped = await client.get_peers(TID, asker, bits=Bitfield.from_string("10000"), cap=2)
    assert [p.peer_id for p in capped] == [pid(1), center_b]

    centers = await client.centers()
    assert sorted(c.peer_id for c in centers) == [center_a, center_b]

    view = await client.swarm(TID)
    assert view.chunks == 5
    by_peer = {m.peer_id: m for m in view.members}
    assert set(by_peer) == {pid(1), pid(2), center_a, asker}  # center B did not announce it
    assert by_peer[center_a].percent == 60.0 and by_peer[center_a].role is Role.STORAGE
    assert by_peer[pid(1)].complete and by_peer[pid(1)].have == 5


async def test_same_rack_peers_come_first_among_equals(client: TrackerClient) -> None:
    await client.register_template(MANIFEST, {})
    for n, rack in ((1, "r1"), (2, "r2"), (3, "r1"), (4, None)):
        await client.announce(pid(n), Role.HOST, ("10.0.0.1", 7000 + n), [have("11000")], rack=rack)
    handout = await client.get_peers(TID, pid(9), bits=Bitfield(5), rack="r2")
    assert handout[0].peer_id == pid(2)
    assert handout[0].rack == "r2"
    assert {p.peer_id for p in handout[1:]} == {pid(1), pid(3), pid(4)}


async def test_an_announce_on_a_wildcard_address_gets_the_address_seen(
    client: TrackerClient,
) -> None:
    await client.register_template(MANIFEST, {})
    interval = await client.announce(pid(1), Role.HOST, ("0.0.0.0", 7001), [have("11111")])
    assert interval == tracker.DEFAULT_ANNOUNCE_TTL / 3
    [peer] = await client.get_peers(TID, pid(2))
    assert (peer.host, peer.port) == ("127.0.0.1", 7001)


async def test_the_catalog_survives_a_tracker_restart_and_announces_do_not(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    async with trio.open_nursery() as nursery:
        host, port = await start_tracker(nursery, state)
        async with await TrackerClient.connect(host, port) as client:
            await client.register_template(MANIFEST, {"cc" * 16: [0]})
            await client.announce(pid(1), Role.HOST, ("10.0.0.1", 7001), [have("11111")])
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        host, port = await start_tracker(nursery, state)
        async with await TrackerClient.connect(host, port) as client:
            assert [t.template_id for t in await client.list_templates()] == [TID]
            assert (await client.lookup("debian")).manifest == MANIFEST
            assert await client.get_peers(TID, pid(2)) == []
        nursery.cancel_scope.cancel()


async def test_an_unreachable_tracker_is_a_clear_error(tmp_path: Path) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens on `port` any more
    with pytest.raises(TrackerUnreachable, match=rf"cannot reach tracker 127\.0\.0\.1:{port}"):
        await TrackerClient.connect("127.0.0.1", port)


async def test_a_tracker_that_goes_away_or_stalls_is_unreachable(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with trio.open_nursery() as inner:
        host, port = await start_tracker(inner, tmp_path / "state")
        client = await TrackerClient.connect(host, port)
        assert await client.list_templates() == []
        inner.cancel_scope.cancel()
    with pytest.raises(TrackerUnreachable, match="lost during list_templates"):
        await client.list_templates()
    with pytest.raises(TrackerUnreachable, match="connection broken"):
        await client.centers()

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, silent, 0)
    port = listeners[0].socket.getsockname()[1]
    stalled = await TrackerClient.connect("127.0.0.1", port, call_timeout=0.2)
    with pytest.raises(TrackerUnreachable, match="no answer to centers"):
        await stalled.centers()
    await stalled.aclose()


# --- hostile input through a raw RPC session ---

GOOD_ANNOUNCE: dict[str, Any] = {
    "peer_id": pid(1),
    "role": "host",
    "listen": ["10.0.0.1", 7001],
    "rack": None,
    "templates": [{"template_id": TID, "bits": b"\xf8", "complete": True}],
}


def announce_with(**changes: Any) -> dict[str, Any]:
    return {**GOOD_ANNOUNCE, **changes}


BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("announce", {k: v for k, v in GOOD_ANNOUNCE.items() if k != "peer_id"}, "missing param"),
    ("announce", announce_with(peer_id=b"short"), "16 bytes"),
    ("announce", announce_with(peer_id="01" * 16), "must be bytes"),
    ("announce", announce_with(role="king"), "role must be"),
    ("announce", announce_with(listen="10.0.0.1:7001"), "must be list"),
    ("announce", announce_with(listen=["10.0.0.1"]), "[host, port]"),
    ("announce", announce_with(listen=["10.0.0.1", 70000]), "bad listen address"),
    ("announce", announce_with(rack="r" * 65), "1..64 characters"),
    ("announce", announce_with(templates={}), "must be list"),
    ("announce", announce_with(templates=[5]), "must be a map"),
    (
        "announce",
        announce_with(templates=[{"template_id": b"x", "bits": b"", "complete": False}]),
        "32 bytes",
    ),
    (
        "announce",
        announce_with(templates=[{"template_id": TID, "bits": b"\xf8\x00", "complete": True}]),
        "needs 1 bytes",
    ),
    (
        "announce",
        announce_with(templates=[{"template_id": TID, "bits": b"\xff", "complete": True}]),
        "past its last chunk",
    ),
    (
        "announce",
        announce_with(templates=[{"template_id": TID, "bits": b"\xf0", "complete": True}]),
        "complete=True",
    ),
    (
        "announce",
        announce_with(templates=[{"template_id": TID, "bits": b"\xf8", "complete": 1}]),
        "must be bool",
    ),
    ("announce", announce_with(templates=[GOOD_ANNOUNCE["templates"][0]] * 2), "announced twice"),
    ("get_peers", {"template_id": TID, "peer_id": pid(2), "cap": 500}, "0..200"),
    ("get_peers", {"template_id": TID, "peer_id": pid(2), "cap": True}, "must be int"),
    ("get_peers", {"template_id": TID, "peer_id": pid(2), "bits": b"\xf8\x00"}, "'bits'"),
    ("get_peers", {"template_id": TID.hex(), "peer_id": pid(2)}, "must be bytes"),
    ("register_template", {"manifest": "text"}, "must be bytes"),
    ("register_template", {"manifest": MANIFEST.encode(), "placement": {"c": 1}}, "placement"),
    (
        "register_template",
        {"manifest": MANIFEST.encode(), "placement": {"ab": [0]}},
        "32 hex digits",
    ),
    ("lookup", {}, "missing param 'name'"),
    ("lookup", {"name": "n" * 300}, "1..255"),
    ("lookup", {"name": "debian", "version": 12}, "must be str"),
    ("swarm", {"template_id": None}, "must be bytes"),
]


async def test_bad_params_get_a_fail_and_the_session_goes_on(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    host, port = await start_tracker(nursery, tmp_path / "state")
    async with await RpcClient.connect_tcp(host, port) as rpc:
        await rpc.call("register_template", {"manifest": MANIFEST.encode(), "placement": {}})
        for method, params, problem in BAD_CALLS:
            with pytest.raises(RpcError) as info:
                await rpc.call(method, params)
            assert info.value.code == "bad_request", (method, params, info.value.message)
            assert problem in info.value.message, (method, params, info.value.message)
        with pytest.raises(RpcError) as unknown:
            await rpc.call("steal_chunks", {})
        assert unknown.value.code == "unknown_method"
        assert await rpc.call("announce", GOOD_ANNOUNCE) == {"interval": 30.0}
        reply = await rpc.call("get_peers", {"template_id": TID, "peer_id": pid(2)})
        assert [p["peer_id"] for p in reply["peers"]] == [pid(1)]


def raw_frame(type_code: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, type_code) + body


async def receive_until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(5):
        while data := await stream.receive_some(4096):
            received += data
    return received


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">IB", 0xFFFFFFF0, 0x20),  # a frame larger than any RPC frame may be
        raw_frame(0x20, b"\xc1\xc1\xc1"),  # a Call whose body is not msgpack
        raw_frame(0x20, b"\x93\x01\xa4nope\x05"),  # a Call whose params are not a map
        raw_frame(0x21, b"\x92\x01\x80"),  # a client may not send a Reply
        raw_frame(0x7E, b"\x90"),  # no such message type
    ],
)
async def test_a_malformed_frame_drops_only_that_client(
    nursery: trio.Nursery, tmp_path: Path, garbage: bytes
) -> None:
    host, port = await start_tracker(nursery, tmp_path / "state")
    async with await TrackerClient.connect(host, port) as bystander:
        await bystander.register_template(MANIFEST, {})
        rogue = await trio.open_tcp_stream(host, port)
        await rogue.send_all(garbage)
        assert await receive_until_closed(rogue) == b""
        await rogue.aclose()
        # The bystander's session and a brand-new one both still work.
        assert [t.name for t in await bystander.list_templates()] == ["debian"]
        async with await TrackerClient.connect(host, port) as newcomer:
            assert (await newcomer.lookup("debian")).template_id == TID


# --- tracker state with a fake clock (no sockets) ---


@pytest.fixture
def clocked(tmp_path: Path) -> tuple[Tracker, FakeClock]:
    clock = FakeClock()
    catalog = Catalog.open(tmp_path)
    return Tracker(catalog, announce_ttl=30.0, clock=clock, rng=random.Random(3)), clock


def call_announce(t: Tracker, peer: int, role: str = "host", **changes: Any) -> dict[str, Any]:
    return t.announce(
        announce_with(peer_id=pid(peer), role=role, listen=["10.0.0.1", 7000 + peer], **changes)
    )


def test_expired_peers_vanish_from_handouts_and_centers(
    clocked: tuple[Tracker, FakeClock],
) -> None:
    t, clock = clocked
    t.catalog.register(MANIFEST.encode(), {pid(5).hex(): [0, 1]})
    assert call_announce(t, 1) == {"interval": 10.0}
    call_announce(t, 5, role="storage", templates=[])
    clock.now += 20
    call_announce(t, 2, templates=[{"template_id": TID, "bits": b"\x80", "complete": False}])

    def handout() -> list[bytes]:
        reply = t.get_peers({"template_id": TID, "peer_id": pid(9)})
        return [p["peer_id"] for p in reply["peers"]]

    assert handout() == [pid(1), pid(5), pid(2)]
    clock.now += 9.9
    assert handout() == [pid(1), pid(5), pid(2)]
    clock.now += 0.1  # 30 s after the first two announces
    assert handout() == [pid(2)]
    assert t.centers({}) == {"centers": []}
    call_announce(t, 1)  # comes back as a new peer
    assert handout() == [pid(1), pid(2)]
    clock.now += 30
    assert handout() == []
    assert t.swarm({"template_id": TID})["peers"] == []
    with pytest.raises(RpcError, match="no template"):
        t.swarm({"template_id": b"u" * 32})


def test_an_announce_for_an_unknown_template_is_kept_and_checked_later(
    clocked: tuple[Tracker, FakeClock],
) -> None:
    t, _ = clocked
    early = [{"template_id": TID, "bits": b"\xf8", "complete": True}]
    call_announce(t, 1, templates=early)
    # Bits unchecked: this one cannot fit the five-chunk template once it is known.
    call_announce(t, 2, templates=[{"template_id": TID, "bits": b"\xff\xff", "complete": False}])
    before = t.get_peers({"template_id": TID, "peer_id": pid(9), "bits": b"\x00"})
    assert [(p["peer_id"], p["percent"]) for p in before["peers"]] == [
        (pid(1), 100.0),
        (pid(2), 0.0),
    ]
    assert len(t.swarm({"template_id": TID})["peers"]) == 2
    t.catalog.register(MANIFEST.encode(), {})
    after = t.get_peers({"template_id": TID, "peer_id": pid(9), "bits": b"\x00"})
    assert [(p["peer_id"], p["complete"]) for p in after["peers"]] == [(pid(1), True)]


def test_handout_never_lists_the_asker_and_respects_the_cap(
    clocked: tuple[Tracker, FakeClock],
) -> None:
    t, _ = clocked
    t.catalog.register(MANIFEST.encode(), {})
    for peer in range(1, 41):
        call_announce(t, peer)
    default = t.get_peers({"template_id": TID, "peer_id": pid(1)})["peers"]
    assert len(default) == tracker.DEFAULT_CAP
    assert pid(1) not in [p["peer_id"] for p in default]
    everyone = t.get_peers({"template_id": TID, "peer_id": pid(1), "cap": 200})["peers"]
    assert len(everyone) == 39
    assert t.get_peers({"template_id": TID, "peer_id": pid(1), "cap": 0}) == {"peers": []}


def test_a_full_announce_table_refuses_new_peers_but_not_known_ones(
    clocked: tuple[Tracker, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    t, clock = clocked
    monkeypatch.setattr(tracker, "MAX_PEERS", 2)
    call_announce(t, 1)
    call_announce(t, 2)
    with pytest.raises(RpcError) as full:
        call_announce(t, 3)
    assert full.value.code == "tracker_full"
    assert call_announce(t, 2) == {"interval": 10.0}  # a known peer refreshes
    clock.now += 31  # both expire, making room
    assert call_announce(t, 3) == {"interval": 10.0}
