"""Signed templates in the daemons: key files, the catalog, the tracker, centers and hosts."""

from __future__ import annotations

import functools
import os
import sqlite3
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from vmswarm.daemon import tracker as tracker_service
from vmswarm.daemon.catalog import CATALOG_FILE, SCHEMA_VERSION, Catalog
from vmswarm.daemon.control import call_control
from vmswarm.daemon.keys import (
    KeyFileError,
    generate_keypair,
    load_private_key,
    load_public_key,
    load_trusted_keys,
)
from vmswarm.daemon.node import Node, NodeConfig
from vmswarm.daemon.peer_link import LocalPeer
from vmswarm.daemon.rpc import RpcClient, RpcError
from vmswarm.daemon.serving import run_seeder
from vmswarm.daemon.template_sources import ImageFileTemplate
from vmswarm.daemon.tracker_client import TrackerClient
from vmswarm.swarm.manifest import Manifest
from vmswarm.swarm.messages import Role
from vmswarm.swarm.signature import TrustPolicy, key_id_of, public_key_bytes, sign_template

from .test_catalog import CENTER_A, make_manifest
from .test_download import FAST, make_image

MANIFEST = make_manifest()
PUBLISHER = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
STRANGER = Ed25519PrivateKey.from_private_bytes(b"\x02" * 32)
PUBLISHER_RAW = public_key_bytes(PUBLISHER.public_key())
FAR_FUTURE = 4_000_000_000  # 2096: valid whatever the clock says today
LONG_AGO = 1_000_000_000  # 2001: expired whatever the clock says today


def envelope(key: Ed25519PrivateKey, manifest: Manifest, not_after: int = FAR_FUTURE) -> bytes:
    return sign_template(key, manifest.template_id, not_after).encode()


# --- key files ---


def test_generated_keys_have_safe_modes_and_load_back(tmp_path: Path) -> None:
    made = generate_keypair(tmp_path / "keys", "pub1")
    assert made.private_path == tmp_path / "keys" / "pub1.key"
    assert stat.S_IMODE(made.private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.public_path.stat().st_mode) & 0o077 == 0o044
    private = load_private_key(made.private_path)
    public = load_public_key(made.public_path)
    assert public_key_bytes(private.public_key()) == public
    assert key_id_of(public).hex() == made.key_id


def test_generate_never_overwrites_a_key(tmp_path: Path) -> None:
    made = generate_keypair(tmp_path)
    before = made.private_path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path)
    assert made.private_path.read_bytes() == before


def test_a_private_key_open_to_others_is_refused(tmp_path: Path) -> None:
    made = generate_keypair(tmp_path)
    made.private_path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(made.private_path)


def test_raw_key_files_load_too(tmp_path: Path) -> None:
    raw_private = tmp_path / "raw.key"
    raw_private.write_bytes(b"\x01" * 32)
    raw_private.chmod(0o600)
    raw_public = tmp_path / "raw.pub"
    raw_public.write_bytes(PUBLISHER_RAW)
    assert public_key_bytes(load_private_key(raw_private).public_key()) == PUBLISHER_RAW
    assert load_trusted_keys([raw_public, raw_public]) == (PUBLISHER_RAW,)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        (b"hello", "neither a PEM public key"),
        (b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", "not a usable PEM"),
        ("private", "is a private key"),
    ],
)
def test_bad_trusted_key_files_are_one_clear_error(
    tmp_path: Path, content: bytes | str | None, match: str
) -> None:
    path = tmp_path / "trusted.pub"
    if content == "private":
        path = generate_keypair(tmp_path).private_path
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(KeyFileError, match=match) as info:
        load_public_key(path)
    assert "\n" not in str(info.value).strip()


# --- catalog ---


def test_the_catalog_keeps_the_signature_and_replaces_it_on_re_signing(tmp_path: Path) -> None:
    first, second = envelope(PUBLISHER, MANIFEST), envelope(STRANGER, MANIFEST)
    catalog = Catalog.open(tmp_path)
    catalog.register(MANIFEST.encode(), {CENTER_A: [0]}, signature=first)
    assert catalog.signed_manifest(MANIFEST.template_id) == (MANIFEST.encode(), first)
    catalog.register(MANIFEST.encode(), {CENTER_A: [1]})  # no signature: keeps the one it has
    assert catalog.signed_manifest(MANIFEST.template_id) == (MANIFEST.encode(), first)
    catalog.register(MANIFEST.encode(), {}, signature=second)
    catalog.close()
    reopened = Catalog.open(tmp_path)
    assert reopened.signed_manifest(MANIFEST.template_id) == (MANIFEST.encode(), second)
    assert reopened.signed_manifest(b"\x00" * 32) is None
    reopened.close()


SCHEMA_1 = """
CREATE TABLE templates (
    template_id BLOB PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL,
    manifest BLOB NOT NULL, size INTEGER NOT NULL, chunk_size INTEGER NOT NULL,
    chunks INTEGER NOT NULL, zero_chunks INTEGER NOT NULL, format TEXT NOT NULL,
    created_at REAL NOT NULL, UNIQUE (name, version)
);
CREATE TABLE placement (
    template_id BLOB NOT NULL REFERENCES templates (template_id), center_id TEXT NOT NULL,
    bits BLOB NOT NULL, PRIMARY KEY (template_id, center_id)
);
PRAGMA user_version=1;
"""


def test_a_schema_1_catalog_is_migrated_and_its_templates_are_unsigned(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / CATALOG_FILE)
    old.executescript(SCHEMA_1)
    m = MANIFEST
    row: tuple[Any, ...] = (m.template_id, m.name, m.version, m.encode(), m.size, m.chunk_size)
    row += (m.chunk_count, len(m.zero_chunks), m.format.value, 1000.0)
    old.execute("INSERT INTO templates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
    old.commit()
    old.close()
    catalog = Catalog.open(tmp_path)
    assert catalog.entry(m.template_id) is not None
    assert catalog.signed_manifest(m.template_id) == (m.encode(), None)
    signature = envelope(PUBLISHER, m)
    catalog.register(m.encode(), {}, signature=signature)  # re-signing an old template
    catalog.close()
    db = sqlite3.connect(tmp_path / CATALOG_FILE)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.close()
    assert Catalog.open(tmp_path).signed_manifest(m.template_id) == (m.encode(), signature)


# --- tracker ---


async def start_tracker(nursery: trio.Nursery, state: Path, **trust: Any) -> tuple[str, int]:
    run = functools.partial(tracker_service.run, "127.0.0.1", 0, state, **trust)
    address: tuple[str, int] = await nursery.start(run)
    return address


async def test_tracker_accepts_a_trusted_signature_and_hands_it_out(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    address = await start_tracker(nursery, tmp_path / "t", trusted_keys=(PUBLISHER_RAW,))
    signature = envelope(PUBLISHER, MANIFEST)
    async with await TrackerClient.connect(*address) as client:
        registered = await client.register_template(MANIFEST, {}, signature=signature)
        assert registered.created
        found = await client.lookup("debian", "12")
    assert found.manifest == MANIFEST and found.signature == signature


@pytest.mark.parametrize(
    ("signature", "why"),
    [
        (None, "is unsigned"),
        (envelope(STRANGER, MANIFEST), "signed by an untrusted key"),
        (envelope(PUBLISHER, make_manifest(version="13")), "signature does not verify"),
        (envelope(PUBLISHER, MANIFEST, LONG_AGO), "expired at 2001-09-09T01:46:40Z"),
        (b"\x93\x01\x02\x03", "malformed signature"),
    ],
)
async def test_tracker_refuses_bad_signatures_with_one_clear_line(
    nursery: trio.Nursery, tmp_path: Path, signature: bytes | None, why: str
) -> None:
    address = await start_tracker(nursery, tmp_path / "t", trusted_keys=(PUBLISHER_RAW,))
    async with await TrackerClient.connect(*address) as client:
        with pytest.raises(RpcError) as info:
            await client.register_template(MANIFEST, {}, signature=signature)
        assert info.value.code == "untrusted_manifest"
        assert why in info.value.message and "debian:12" in info.value.message
        assert "\n" not in info.value.message
        assert await client.list_templates() == []  # nothing was catalogued


async def test_allow_unsigned_takes_unsigned_but_still_checks_signatures(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    address = await start_tracker(nursery, tmp_path / "t", allow_unsigned=True)
    async with await TrackerClient.connect(*address) as client:
        assert (await client.register_template(MANIFEST, {})).created
        assert (await client.lookup("debian")).signature is None
        other = make_manifest(version="2")
        with pytest.raises(RpcError, match="untrusted key"):
            await client.register_template(other, {}, signature=envelope(PUBLISHER, other))


def test_the_tracker_refuses_by_default(tmp_path: Path) -> None:
    catalog = Catalog.open(tmp_path)
    strict = tracker_service.Tracker(catalog)
    assert not strict.trust.allow_unsigned and not strict.trust.keys
    catalog.close()


# --- storage centers and hosts ---


@asynccontextmanager
async def swarm(tmp: Path, *, tracker_trust: dict[str, Any]) -> AsyncIterator[Any]:
    async with trio.open_nursery() as nursery:
        address = await start_tracker(nursery, tmp / "tracker", **tracker_trust)

        async def node(name: str, role: Role, **trust: Any) -> tuple[Node, tuple[str, int]]:
            config = NodeConfig(
                role=role,
                data_dir=tmp / name,
                tracker=address,
                control_path=tmp / f"{name}.sock",
                download=FAST,
                **trust,
            )
            made = Node(config)
            return made, await nursery.start(made.run)

        yield nursery, address, node
        nursery.cancel_scope.cancel()


async def replicate(
    tmp: Path,
    nursery: trio.Nursery,
    data: bytes,
    manifest: Manifest,
    center: tuple[str, int],
    signature: bytes | None,
) -> dict[str, Any]:
    """What a publisher asks of a center: store the manifest, pull every chunk from a seeder."""
    image = tmp / f"{manifest.version}.img"
    image.write_bytes(data)
    source = ImageFileTemplate(image, manifest)
    seeder = await nursery.start(run_seeder, source, LocalPeer(os.urandom(16), Role.HOST, None))
    async with RpcClient(await trio.open_tcp_stream(*center)) as rpc:
        reply: dict[str, Any] = await rpc.call(
            "replicate",
            {
                "manifest": manifest.encode(),
                "indices": list(range(manifest.chunk_count)),
                "sources": [list(seeder)],
                "signature": signature,
            },
        )
    return reply


async def test_a_center_refuses_to_replicate_an_unsigned_or_foreign_template(
    tmp_path: Path,
) -> None:
    data, manifest = make_image("DDD", seed=3)
    async with swarm(tmp_path, tracker_trust={"allow_unsigned": True}) as (nursery, _, node):
        center, address = await node("center", Role.STORAGE, trusted_keys=(PUBLISHER_RAW,))
        for signature, why in [(None, "unsigned"), (envelope(STRANGER, manifest), "untrusted")]:
            with pytest.raises(RpcError, match=why) as info:
                await replicate(tmp_path, nursery, data, manifest, address, signature)
            assert info.value.code == "untrusted_manifest"
        assert center.templates == {}
        assert center.chunk_store is not None and center.chunk_store.manifests() == []
        reply = await replicate(
            tmp_path, nursery, data, manifest, address, envelope(PUBLISHER, manifest)
        )
        assert reply["stored"] == 3


async def test_a_host_verifies_the_tracker_handout_before_fetching(tmp_path: Path) -> None:
    data, manifest = make_image("DDDD", seed=4)
    stranger_raw = public_key_bytes(STRANGER.public_key())
    trust_both = {"trusted_keys": (PUBLISHER_RAW, stranger_raw)}
    async with swarm(tmp_path, tracker_trust=trust_both) as (nursery, tracker, node):
        _, center = await node("center", Role.STORAGE, **trust_both)
        wary, _ = await node("wary", Role.HOST, trusted_keys=(stranger_raw,))
        trusting, _ = await node("trusting", Role.HOST, trusted_keys=(PUBLISHER_RAW,))
        signature = envelope(PUBLISHER, manifest)
        await replicate(tmp_path, nursery, data, manifest, center, signature)
        async with await TrackerClient.connect(*tracker) as client:
            placement = {"ab" * 16: list(range(manifest.chunk_count))}
            await client.register_template(manifest, placement, signature=signature)
        with pytest.raises(RpcError) as info:
            await call_control(tmp_path / "wary.sock", "fetch", {"name": "tmpl"})
        assert info.value.code == "untrusted_manifest"
        assert "signed by an untrusted key" in info.value.message
        assert wary.templates == {}  # refused before any store was made or chunk fetched
        stores = trio.Path(tmp_path / "wary" / "templates")
        assert not await stores.exists() or await stores.iterdir() == []
        with trio.fail_after(20):
            result = await call_control(tmp_path / "trusting.sock", "fetch", {"name": "tmpl"})
        assert await trio.Path(result["path"]).read_bytes() == data
        assert trusting.templates


async def test_expiry_is_judged_on_the_wall_clock_the_tracker_is_given(tmp_path: Path) -> None:
    now = [FAR_FUTURE - 1.0]
    catalog = Catalog.open(tmp_path)
    trust = TrustPolicy.of([PUBLISHER_RAW])
    t = tracker_service.Tracker(catalog, trust=trust, wall_clock=lambda: now[0])
    params = {"manifest": MANIFEST.encode(), "signature": envelope(PUBLISHER, MANIFEST)}
    assert (await t.register_template(params))["created"]
    now[0] = FAR_FUTURE
    with pytest.raises(RpcError, match="expired at 2096-"):
        await t.register_template(params)
    catalog.close()
