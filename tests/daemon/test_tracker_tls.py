"""The tracker under mutual TLS: real loopback handshakes, and certificate roles limit calls."""

from __future__ import annotations

import functools
import random
import ssl
from pathlib import Path

import pytest
import trio
from vmswarm.daemon import tls, tracker
from vmswarm.daemon.pki import CA_CERT_NAME, TlsRole, init_ca, issue
from vmswarm.daemon.rpc import RpcError
from vmswarm.daemon.tracker_client import TrackerClient, TrackerUnreachable
from vmswarm.swarm.messages import Role

from .test_catalog import make_manifest
from .test_tracker import have, pid

MANIFEST = make_manifest()


class Pki:
    def __init__(self, root: Path) -> None:
        self.ca = root / "ca"
        self.other = root / "other"
        init_ca(self.ca)
        init_ca(self.other)
        for role in TlsRole:
            issue(self.ca, role, role.value)
        issue(self.other, TlsRole.OPERATOR, "stranger")

    def material(self, name: str, ca: Path | None = None) -> tls.TlsMaterial:
        where = ca or self.ca
        return tls.check_files(
            tls.TlsFiles(self.ca / CA_CERT_NAME, where / f"{name}.crt", where / f"{name}.key")
        )

    def client(self, name: str, ca: Path | None = None) -> ssl.SSLContext:
        return tls.client_context(self.material(name, ca))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("tracker-pki"))


async def start(nursery: trio.Nursery, state: Path, material: tls.TlsMaterial) -> tuple[str, int]:
    address: tuple[str, int] = await nursery.start(
        functools.partial(
            tracker.run,
            "127.0.0.1",
            0,
            state,
            rng=random.Random(7),
            allow_unsigned=True,
            tls=material,
        )
    )
    return address


async def test_roles_limit_what_each_certificate_may_call(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    host, port = await start(nursery, tmp_path / "state", pki.material("tracker"))
    async with await TrackerClient.connect(host, port, tls=pki.client("operator")) as operator:
        registered = await operator.register_template(MANIFEST, {})
        assert registered.created
        with pytest.raises(RpcError, match="operator certificates may not call announce") as err:
            await operator.announce(pid(1), Role.HOST, ("127.0.0.1", 7000), [have("11111")])
        assert err.value.code == "forbidden"
    async with await TrackerClient.connect(host, port, tls=pki.client("host")) as node:
        with pytest.raises(RpcError, match="host certificates may not call register_template"):
            await node.register_template(MANIFEST, {})
        with pytest.raises(RpcError, match="may not announce as role 'storage'"):
            await node.announce(pid(2), Role.STORAGE, ("127.0.0.1", 7001), [have("11111")])
        await node.announce(pid(2), Role.HOST, ("127.0.0.1", 7001), [have("11100")])
        [info] = await node.list_templates()  # reads are open to every member
        assert info.template_id == MANIFEST.template_id
    async with await TrackerClient.connect(host, port, tls=pki.client("storage")) as center:
        # Centers re-register what they hold after the tracker lost its state.
        assert not (await center.register_template(MANIFEST, {})).created
        await center.announce(pid(3), Role.STORAGE, ("127.0.0.1", 7002), [have("11111")])
        peers = await center.get_peers(MANIFEST.template_id, pid(9))
        assert {p.peer_id for p in peers} == {pid(2), pid(3)}


async def test_untrusted_or_plain_clients_are_refused(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    host, port = await start(nursery, tmp_path / "state", pki.material("tracker"))
    stranger = tls.client_context(pki.material("operator"))
    stranger.load_cert_chain(str(pki.other / "stranger.crt"), str(pki.other / "stranger.key"))
    async with await TrackerClient.connect(host, port, tls=stranger) as client:
        with pytest.raises(TrackerUnreachable, match="does not trust the CA that signed our"):
            await client.list_templates()
    async with await TrackerClient.connect(host, port, connect_timeout=5) as plain:
        with pytest.raises(TrackerUnreachable, match="lost during list_templates"):
            await plain.list_templates()
    # The tracker keeps serving everyone else.
    async with await TrackerClient.connect(host, port, tls=pki.client("operator")) as operator:
        assert await operator.list_templates() == []


async def test_client_refuses_a_server_that_is_not_the_tracker(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # A cluster member with a host certificate cannot pose as the tracker.
    host, port = await start(nursery, tmp_path / "state", pki.material("host"))
    with pytest.raises(
        TrackerUnreachable, match="TLS: peer host 'host' is not allowed here: expected a tracker"
    ):
        await TrackerClient.connect(host, port, tls=pki.client("operator"))
    # And a TLS client cannot talk to a plain-text tracker by mistake.
    plain_host, plain_port = await nursery.start(
        functools.partial(tracker.run, "127.0.0.1", 0, tmp_path / "plain", allow_unsigned=True)
    )
    with pytest.raises(TrackerUnreachable, match="TLS"):
        await TrackerClient.connect(plain_host, plain_port, tls=pki.client("operator"))
