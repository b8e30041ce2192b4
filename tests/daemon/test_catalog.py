"""The tracker's SQLite catalog: durable, idempotent, one content per name:version."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from vmswarm.daemon.catalog import (
    CATALOG_FILE,
    BadPlacementError,
    Catalog,
    CatalogError,
    VersionExistsError,
)
from vmswarm.swarm.bitfield import Bitfield
from vmswarm.swarm.errors import ManifestError
from vmswarm.swarm.manifest import MIN_CHUNK_SIZE, Manifest, build_manifest

CENTER_A = "aa" * 16
CENTER_B = "bb" * 16


def make_manifest(name: str = "debian", version: str = "12", seed: int = 0) -> Manifest:
    """Five chunks: three random, one zero, one short random tail."""
    rng = random.Random(seed)
    data = rng.randbytes(3 * MIN_CHUNK_SIZE) + bytes(MIN_CHUNK_SIZE) + rng.randbytes(1000)
    return build_manifest(data, name, version, chunk_size=MIN_CHUNK_SIZE)


def test_register_survives_reopen_with_manifest_and_placement(tmp_path: Path) -> None:
    manifest = make_manifest()
    catalog = Catalog.open(tmp_path)
    registration = catalog.register(
        manifest.encode(), {CENTER_A: [0, 2], CENTER_B: [1, 2, 4]}, now=1000.0
    )
    assert registration.template_id == manifest.template_id
    assert registration.created
    catalog.close()

    reopened = Catalog.open(tmp_path)
    entry = reopened.entry(manifest.template_id)
    assert entry is not None
    assert (entry.name, entry.version, entry.size, entry.chunks, entry.zero_chunks) == (
        "debian",
        "12",
        manifest.size,
        5,
        1,
    )
    assert (entry.format, entry.chunk_size, entry.created_at) == ("raw", MIN_CHUNK_SIZE, 1000.0)
    assert reopened.manifest_bytes(manifest.template_id) == manifest.encode()
    placement = reopened.placement(manifest.template_id)
    assert placement[CENTER_A] == Bitfield.from_string("10100")
    assert placement[CENTER_B] == Bitfield.from_string("01101")
    assert (tmp_path / CATALOG_FILE).exists()
    mode = sqlite3.connect(tmp_path / CATALOG_FILE).execute("PRAGMA journal_mode").fetchone()
    assert mode == ("wal",)
    reopened.close()


def test_same_content_again_is_idempotent_and_adds_placement(tmp_path: Path) -> None:
    manifest = make_manifest()
    catalog = Catalog.open(tmp_path)
    first = catalog.register(manifest.encode(), {CENTER_A: [0]})
    again = catalog.register(manifest.encode(), {CENTER_A: [3], CENTER_B: [1]})
    assert first.created and not again.created
    assert again.template_id == first.template_id
    assert len(catalog.entries()) == 1
    assert catalog.placement(manifest.template_id)[CENTER_A] == Bitfield.from_string("10010")
    assert catalog.placement(manifest.template_id)[CENTER_B] == Bitfield.from_string("01000")
    catalog.close()
    reopened = Catalog.open(tmp_path)
    assert reopened.placement(manifest.template_id)[CENTER_A] == Bitfield.from_string("10010")
    reopened.close()


def test_same_name_and_version_with_other_content_is_refused(tmp_path: Path) -> None:
    catalog = Catalog.open(tmp_path)
    original = make_manifest(seed=1)
    catalog.register(original.encode(), {})
    with pytest.raises(VersionExistsError, match=r"debian:12 already exists") as info:
        catalog.register(make_manifest(seed=2).encode(), {})
    assert info.value.code == "version_exists"
    assert [e.template_id for e in catalog.entries()] == [original.template_id]


def test_find_returns_the_newest_registration_of_a_name(tmp_path: Path) -> None:
    catalog = Catalog.open(tmp_path)
    # Registration order decides "newest", not the version string's order.
    later = make_manifest(version="2", seed=2)
    earlier = make_manifest(version="10", seed=10)
    catalog.register(later.encode(), {})
    catalog.register(earlier.encode(), {})
    catalog.register(make_manifest(name="alpine", version="3", seed=3).encode(), {})
    newest = catalog.find("debian", None)
    assert newest is not None and newest.template_id == earlier.template_id
    exact = catalog.find("debian", "2")
    assert exact is not None and exact.template_id == later.template_id
    assert catalog.find("debian", "11") is None
    assert catalog.find("ubuntu", None) is None
    assert [e.name + ":" + e.version for e in catalog.entries()] == [
        "debian:2",
        "debian:10",
        "alpine:3",
    ]
    catalog.close()
    reopened = Catalog.open(tmp_path)
    newest = reopened.find("debian", None)
    assert newest is not None and newest.template_id == earlier.template_id


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x93\x01\x02\x03", b"not msgpack at all \xc1", make_manifest().encode()[:-1]],
)
def test_a_bad_manifest_is_refused_and_nothing_is_stored(tmp_path: Path, blob: bytes) -> None:
    catalog = Catalog.open(tmp_path)
    with pytest.raises(ManifestError):
        catalog.register(blob, {})
    assert catalog.entries() == []


@pytest.mark.parametrize(
    ("placement", "problem"),
    [
        ({"abc": [0]}, "32 hex digits"),
        ({"zz" * 16: [0]}, "not hex"),
        ({CENTER_A: [5]}, "out of range"),
        ({CENTER_A: [-1]}, "out of range"),
        ({CENTER_A: ["0"]}, "out of range"),
        ({CENTER_A: [0], CENTER_A.upper(): [1]}, "listed twice"),
    ],
)
def test_a_bad_placement_is_refused(
    tmp_path: Path, placement: dict[str, list[object]], problem: str
) -> None:
    catalog = Catalog.open(tmp_path)
    with pytest.raises(BadPlacementError, match=problem):
        catalog.register(make_manifest().encode(), placement)  # type: ignore[arg-type]
    assert catalog.entries() == []


def test_a_catalog_from_a_newer_schema_is_not_opened(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / CATALOG_FILE)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(CatalogError, match="schema version 99"):
        Catalog.open(tmp_path)
