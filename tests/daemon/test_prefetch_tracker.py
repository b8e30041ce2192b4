"""Prefetch profiles at the tracker: put_profile, lookup hands them out, kept in the catalog."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
from vmswarm.daemon.catalog import (
    CATALOG_FILE,
    SCHEMA_VERSION,
    BadProfileError,
    Catalog,
    UnknownTemplateError,
)
from vmswarm.daemon.rpc import RpcError
from vmswarm.daemon.tracker_client import TrackerClient
from vmswarm.swarm.prefetch import (
    PrefetchProfile,
    decode_profile,
    encode_profile,
)

from .test_catalog import make_manifest
from .test_tracker import start_tracker
from .test_tracker_tls import Pki, pki, start

__all__ = ["pki"]  # the module-scoped fixture, shared with the TLS tests

MANIFEST = make_manifest()  # five chunks, chunk 3 all-zero
TID = MANIFEST.template_id


def profile_bytes(*order: int, template_id: bytes = TID) -> bytes:
    return encode_profile(PrefetchProfile(template_id, order))


# --- catalog ---


def test_catalog_stores_validates_and_replaces_profiles(tmp_path: Path) -> None:
    catalog = Catalog.open(tmp_path)
    with pytest.raises(UnknownTemplateError, match=f"no template with id {TID.hex()}"):
        catalog.put_profile(TID, profile_bytes(0))
    catalog.register(MANIFEST.encode(), {})
    assert catalog.profile(TID) is None
    assert catalog.put_profile(TID, profile_bytes(4, 0)).order == (4, 0)
    assert catalog.put_profile(TID, profile_bytes(2, 1, 0)).order == (2, 1, 0)  # newest wins
    with pytest.raises(BadProfileError, match=r"debian:12 rejected: .*out of range"):
        catalog.put_profile(TID, profile_bytes(5))
    assert catalog.profile(TID) == profile_bytes(2, 1, 0)  # a refused put changes nothing
    catalog.close()
    reopened = Catalog.open(tmp_path)
    assert reopened.profile(TID) == profile_bytes(2, 1, 0)
    assert reopened.profile(bytes(32)) is None
    reopened.close()


def test_a_schema_2_catalog_is_migrated_without_profiles(tmp_path: Path) -> None:
    catalog = Catalog.open(tmp_path)
    catalog.register(MANIFEST.encode(), {})
    catalog.close()
    # Turn it back into what a schema-2 tracker wrote.
    db = sqlite3.connect(tmp_path / CATALOG_FILE)
    db.execute("ALTER TABLE templates DROP COLUMN profile")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    migrated = Catalog.open(tmp_path)
    assert migrated.entry(TID) is not None
    assert migrated.profile(TID) is None
    migrated.put_profile(TID, profile_bytes(1))
    migrated.close()
    db = sqlite3.connect(tmp_path / CATALOG_FILE)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.close()
    assert Catalog.open(tmp_path).profile(TID) == profile_bytes(1)


# --- tracker, through the socket ---


async def test_put_then_lookup_hands_the_profile_out(nursery: trio.Nursery, tmp_path: Path) -> None:
    address = await start_tracker(nursery, tmp_path / "state")
    async with await TrackerClient.connect(*address) as client:
        await client.register_template(MANIFEST, {})
        assert (await client.lookup("debian")).profile is None
        assert await client.put_profile(TID, profile_bytes(4, 0, 2)) == 3
        found = await client.lookup("debian", "12")
        assert found.profile == profile_bytes(4, 0, 2)
        assert decode_profile(found.profile, found.manifest).order == (4, 0, 2)
        # A newer boot's profile replaces the older one.
        await client.put_profile(TID, profile_bytes(1))
        assert (await client.lookup("debian")).profile == profile_bytes(1)


async def test_bad_profiles_and_unknown_templates_are_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    address = await start_tracker(nursery, tmp_path / "state")
    async with await TrackerClient.connect(*address) as client:
        with pytest.raises(RpcError) as unknown:
            await client.put_profile(TID, profile_bytes(0))
        assert unknown.value.code == "unknown_template"
        await client.register_template(MANIFEST, {})
        await client.put_profile(TID, profile_bytes(0, 1))
        good = bytearray(profile_bytes(2, 4))
        good[-1] ^= 0xFF  # the digest's last byte
        cases: list[tuple[bytes, str]] = [
            (bytes(good), "digest does not match"),
            (profile_bytes(1, template_id=bytes(32)), "is for template 00"),
            (profile_bytes(7), "out of range"),
            (b"\x90", "array of 5 fields"),
            (bytes((1 << 20) + 1), "larger than"),
        ]
        for data, why in cases:
            with pytest.raises(RpcError) as bad:
                await client.put_profile(TID, data)
            assert bad.value.code == "bad_profile", why
            assert why in bad.value.message
        with pytest.raises(RpcError) as short:
            await client.put_profile(b"short", profile_bytes(0))
        assert short.value.code == "bad_request"
        # None of the refusals touched the stored profile.
        assert (await client.lookup("debian")).profile == profile_bytes(0, 1)


async def test_profiles_survive_a_tracker_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"

    async def session(work: Any) -> None:
        async with trio.open_nursery() as nursery:
            address = await start_tracker(nursery, state)
            async with await TrackerClient.connect(*address) as client:
                await work(client)
            nursery.cancel_scope.cancel()

    async def store(client: TrackerClient) -> None:
        await client.register_template(MANIFEST, {})
        await client.put_profile(TID, profile_bytes(3, 2))

    async def check(client: TrackerClient) -> None:
        assert (await client.lookup("debian")).profile == profile_bytes(3, 2)

    await session(store)
    await session(check)
    assert (state / CATALOG_FILE).exists()


# --- certificate roles ---


async def test_only_host_certificates_may_put_profiles(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    host, port = await start(nursery, tmp_path / "state", pki.material("tracker"))
    async with await TrackerClient.connect(host, port, tls=pki.client("operator")) as operator:
        await operator.register_template(MANIFEST, {})
        with pytest.raises(RpcError, match="operator certificates may not call put_profile") as e:
            await operator.put_profile(TID, profile_bytes(0))
        assert e.value.code == "forbidden"
    async with await TrackerClient.connect(host, port, tls=pki.client("storage")) as center:
        with pytest.raises(RpcError, match="storage certificates may not call put_profile"):
            await center.put_profile(TID, profile_bytes(0))
    async with await TrackerClient.connect(host, port, tls=pki.client("host")) as node:
        assert await node.put_profile(TID, profile_bytes(4, 1)) == 2
        assert (await node.lookup("debian")).profile == profile_bytes(4, 1)
    async with await TrackerClient.connect(host, port, tls=pki.client("operator")) as operator:
        assert (await operator.lookup("debian")).profile == profile_bytes(4, 1)
