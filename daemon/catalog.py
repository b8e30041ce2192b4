"""The tracker's template catalog: manifests and chunk placement, durable in SQLite.

The whole catalog except manifest bytes is mirrored in memory, so the hot paths (announce,
get_peers) never touch the database; only `register` and `manifest_bytes` do.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ..swarm.bitfield import Bitfield
from ..swarm.manifest import Manifest
from ..swarm.prefetch import PrefetchProfile, ProfileError, decode_profile

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite3"
# 2 added templates.signature (the publisher's signature envelope, NULL: unsigned).
# 3 added templates.profile (the encoded prefetch profile a host's boot recorded, NULL: none).
SCHEMA_VERSION = 3
CENTER_ID_LENGTH = 32  # hex of a 16-byte peer id

_SCHEMA = """
CREATE TABLE IF NOT EXISTS templates (
    template_id BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    manifest BLOB NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    zero_chunks INTEGER NOT NULL,
    format TEXT NOT NULL,
    created_at REAL NOT NULL,
    signature BLOB,
    profile BLOB,
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS placement (
    template_id BLOB NOT NULL REFERENCES templates (template_id),
    center_id TEXT NOT NULL,
    bits BLOB NOT NULL,
    PRIMARY KEY (template_id, center_id)
);
"""


class CatalogError(Exception):
    """A registration the catalog refuses; `code` is the tracker's Fail code."""

    code = "catalog_error"


class VersionExistsError(CatalogError):
    code = "version_exists"


class BadPlacementError(CatalogError):
    code = "bad_request"


class UnknownTemplateError(CatalogError):
    code = "unknown_template"


class BadProfileError(CatalogError):
    code = "bad_profile"


@dataclass(frozen=True)
class TemplateEntry:
    """One catalogued template, without its manifest bytes."""

    template_id: bytes
    name: str
    version: str
    size: int
    chunk_size: int
    chunks: int
    zero_chunks: int
    format: str
    created_at: float
    seq: int  # registration order: the newest version of a name has the highest


@dataclass(frozen=True)
class Registration:
    template_id: bytes
    created: bool


def check_center_id(center_id: object) -> str:
    """A center id is its peer id in lowercase hex; returns it normalised."""
    if type(center_id) is not str or len(center_id) != CENTER_ID_LENGTH:
        raise BadPlacementError(
            f"center id must be {CENTER_ID_LENGTH} hex digits (a peer id), got {center_id!r:.80}"
        )
    try:
        bytes.fromhex(center_id)
    except ValueError:
        raise BadPlacementError(f"center id {center_id!r} is not hex") from None
    return center_id.lower()


def placement_bitfields(placement: Mapping[str, Iterable[int]], chunks: int) -> dict[str, Bitfield]:
    """Validate a {center id hex: [chunk index]} map against a chunk count."""
    result: dict[str, Bitfield] = {}
    for raw_id, indices in placement.items():
        center_id = check_center_id(raw_id)
        if center_id in result:
            raise BadPlacementError(f"center {center_id} listed twice")
        bits = Bitfield(chunks)
        for index in indices:
            if type(index) is not int or not 0 <= index < chunks:
                raise BadPlacementError(
                    f"center {center_id}: chunk index {index!r:.40} out of range 0..{chunks - 1}"
                )
            bits.add(index)
        result[center_id] = bits
    return result


class Catalog:
    """SQLite-backed catalog; safe to call from worker threads (one lock serialises it)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self._lock = threading.Lock()
        # Replaced wholesale on change, so readers on the trio thread never see a half update.
        self._entries: Mapping[bytes, TemplateEntry] = MappingProxyType({})
        self._placement: Mapping[bytes, Mapping[str, Bitfield]] = MappingProxyType({})
        self._load()

    @classmethod
    def open(cls, state_dir: Path) -> Catalog:
        """Open (creating if needed) STATE_DIR/catalog.sqlite3."""
        state_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            state_dir / CATALOG_FILE, check_same_thread=False, isolation_level=None
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a registration the tracker acknowledged survives a power cut too.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CatalogError(
                    f"{state_dir / CATALOG_FILE} has schema version {version}, "
                    f"this tracker knows {SCHEMA_VERSION}"
                )
            db.executescript(_SCHEMA)
            _migrate(db)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            return cls(db)
        except BaseException:
            db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _load(self) -> None:
        entries: dict[bytes, TemplateEntry] = {}
        rows = self._db.execute(
            "SELECT template_id, name, version, size, chunk_size, chunks, zero_chunks, format,"
            " created_at, rowid FROM templates ORDER BY rowid"
        )
        for row in rows:
            entry = TemplateEntry(*row)
            entries[entry.template_id] = entry
        placement: dict[bytes, dict[str, Bitfield]] = {}
        for template_id, center_id, bits in self._db.execute(
            "SELECT template_id, center_id, bits FROM placement"
        ):
            entry = entries[template_id]
            placement.setdefault(template_id, {})[center_id] = Bitfield(entry.chunks, bits)
        self._entries = MappingProxyType(entries)
        self._placement = MappingProxyType(
            {tid: MappingProxyType(centers) for tid, centers in placement.items()}
        )

    # --- reads (memory only) ---

    def entry(self, template_id: bytes) -> TemplateEntry | None:
        return self._entries.get(template_id)

    def entries(self) -> list[TemplateEntry]:
        """Every template, in registration order."""
        return sorted(self._entries.values(), key=lambda e: e.seq)

    def find(self, name: str, version: str | None) -> TemplateEntry | None:
        """The template called name:version, or the newest registration of `name`."""
        matches = [
            e
            for e in self._entries.values()
            if e.name == name and (version is None or e.version == version)
        ]
        return max(matches, key=lambda e: e.seq, default=None)

    def placement(self, template_id: bytes) -> Mapping[str, Bitfield]:
        """{center id hex: chunks it holds} as published; treat the bitfields as read-only."""
        return self._placement.get(template_id, MappingProxyType({}))

    # --- database access (may block; call from a worker thread) ---

    def manifest_bytes(self, template_id: bytes) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT manifest FROM templates WHERE template_id = ?", (template_id,)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def signed_manifest(self, template_id: bytes) -> tuple[bytes, bytes | None] | None:
        """(manifest bytes, signature envelope or None if unsigned), or None if not catalogued."""
        with self._lock:
            row = self._db.execute(
                "SELECT manifest, signature FROM templates WHERE template_id = ?", (template_id,)
            ).fetchone()
        if row is None:
            return None
        return bytes(row[0]), None if row[1] is None else bytes(row[1])

    def profile(self, template_id: bytes) -> bytes | None:
        """The stored prefetch profile's encoded bytes, or None (none stored, or no template)."""
        with self._lock:
            row = self._db.execute(
                "SELECT profile FROM templates WHERE template_id = ?", (template_id,)
            ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def put_profile(self, template_id: bytes, data: bytes) -> PrefetchProfile:
        """Store an encoded prefetch profile for a catalogued template, replacing any older one.

        Raises UnknownTemplateError, or BadProfileError when `data` does not decode as a profile
        of this template (swarm/prefetch.py decode_profile: digest, template id, indices).
        """
        entry = self._entries.get(template_id)
        if entry is None:
            raise UnknownTemplateError(f"no template with id {template_id.hex()} in the catalog")
        try:
            profile = decode_profile(data, (template_id, entry.chunks))
        except ProfileError as exc:
            raise BadProfileError(
                f"prefetch profile for {entry.name}:{entry.version} rejected: {exc}"
            ) from None
        with self._lock:
            self._db.execute(
                "UPDATE templates SET profile = ? WHERE template_id = ?",
                (bytes(data), template_id),
            )
        return profile

    def register(
        self,
        manifest_bytes: bytes,
        placement: Mapping[str, Iterable[int]],
        *,
        signature: bytes | None = None,
        now: float | None = None,
    ) -> Registration:
        """Store a manifest and where its chunks are; the same content again only adds placement.

        `signature` (an envelope the caller has verified) is stored with the manifest; a later
        registration of the same content with a signature replaces it (re-signing, key rotation),
        one without keeps it.

        Raises ManifestError for a bad manifest, VersionExistsError when name:version already
        names other content, BadPlacementError for a bad placement map.
        """
        manifest = Manifest.decode(manifest_bytes)
        template_id = manifest.template_id
        new_bits = placement_bitfields(placement, manifest.chunk_count)
        created_at = time.time() if now is None else now
        with self._lock:
            existing = self._entries.get(template_id)
            if existing is None:
                other = self.find(manifest.name, manifest.version)
                if other is not None:
                    raise VersionExistsError(
                        f"template {manifest.name}:{manifest.version} already exists with other "
                        f"content (template id {other.template_id.hex()}); publish a new version"
                    )
            merged = dict(self.placement(template_id))
            for center_id, bits in new_bits.items():
                old = merged.get(center_id)
                if old is not None:
                    bits = Bitfield(bits.size, _or_bytes(bits.to_bytes(), old.to_bytes()))
                merged[center_id] = bits
            entry = existing or TemplateEntry(
                template_id=template_id,
                name=manifest.name,
                version=manifest.version,
                size=manifest.size,
                chunk_size=manifest.chunk_size,
                chunks=manifest.chunk_count,
                zero_chunks=len(manifest.zero_chunks),
                format=manifest.format.value,
                created_at=created_at,
                seq=0,
            )
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if existing is None:
                    cursor = self._db.execute(
                        "INSERT INTO templates (template_id, name, version, manifest, size,"
                        " chunk_size, chunks, zero_chunks, format, created_at, signature)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            template_id,
                            entry.name,
                            entry.version,
                            bytes(manifest_bytes),
                            entry.size,
                            entry.chunk_size,
                            entry.chunks,
                            entry.zero_chunks,
                            entry.format,
                            entry.created_at,
                            None if signature is None else bytes(signature),
                        ),
                    )
                    assert cursor.lastrowid is not None
                    entry = dataclasses.replace(entry, seq=cursor.lastrowid)
                elif signature is not None:
                    self._db.execute(
                        "UPDATE templates SET signature = ? WHERE template_id = ?",
                        (bytes(signature), template_id),
                    )
                self._db.executemany(
                    "INSERT OR REPLACE INTO placement (template_id, center_id, bits)"
                    " VALUES (?, ?, ?)",
                    [(template_id, cid, merged[cid].to_bytes()) for cid in new_bits],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._entries = MappingProxyType({**self._entries, template_id: entry})
            self._placement = MappingProxyType(
                {**self._placement, template_id: MappingProxyType(merged)}
            )
        return Registration(template_id, created=existing is None)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a catalog written by an older tracker up to SCHEMA_VERSION (idempotent)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(templates)")}
    if "signature" not in columns:  # schema 1: templates registered then count as unsigned
        db.execute("ALTER TABLE templates ADD COLUMN signature BLOB")
        log.info("catalog migrated: templates now carry signatures")
    if "profile" not in columns:  # schema 2: no template has a prefetch profile yet
        db.execute("ALTER TABLE templates ADD COLUMN profile BLOB")
        log.info("catalog migrated: templates now carry prefetch profiles")


def _or_bytes(a: bytes, b: bytes) -> bytes:
    return bytes(x | y for x, y in zip(a, b, strict=True))
