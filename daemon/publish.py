"""Publish a template: build its manifest, have the storage centers pull their stripes, register it.

The publisher seeds the image over the peer protocol for as long as it runs; each center pulls
the chunks that rendezvous hashing gives it, verifying every one, and skips the ones it holds.
The catalog entry is written last, so it never names chunks that no center stores.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..swarm.manifest import DEFAULT_CHUNK_SIZE, Manifest
from ..swarm.messages import Role
from ..swarm.placement import assign
from ..swarm.signature import MAX_NOT_AFTER, ManifestSignature, sign_template
from .imagefile import manifest_from_file
from .peer_link import LocalPeer
from .rpc import RpcClient, RpcError
from .serving import run_seeder
from .template_sources import ImageFileTemplate
from .tls import TlsError, TlsMaterial, TlsRole, client_context, server_context
from .tracker_client import CenterInfo, TrackerClient, TrackerUnreachable

log = logging.getLogger(__name__)

REPLICATE_TIMEOUT = 3600.0
# How long a publisher's signature holds unless told otherwise: a year, then re-sign.
DEFAULT_VALID_FOR = 365 * 86400.0


class PublishError(Exception):
    """Publishing cannot go on; the message says why."""


@dataclass(frozen=True)
class CenterResult:
    center_id: str
    address: str
    chunks: int
    stored: int
    already_had: int


@dataclass(frozen=True)
class PublishResult:
    manifest: Manifest
    created: bool
    replicas: int
    seconds: float
    centers: list[CenterResult] = field(default_factory=list)
    signature: ManifestSignature | None = None

    @property
    def chunks_moved(self) -> int:
        return sum(c.stored for c in self.centers)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "template_id": m.template_id.hex(),
            "name": m.name,
            "version": m.version,
            "size": m.size,
            "chunks": m.chunk_count,
            "zero_chunks": len(m.zero_chunks),
            "replicas": self.replicas,
            "created": self.created,
            "chunks_moved": self.chunks_moved,
            "seconds": round(self.seconds, 3),
            "signed_by": None if self.signature is None else self.signature.key_id.hex(),
            "signature_expires": None if self.signature is None else self.signature.expires,
            "centers": [
                {
                    "center_id": c.center_id,
                    "address": c.address,
                    "chunks": c.chunks,
                    "stored": c.stored,
                    "already_had": c.already_had,
                }
                for c in self.centers
            ],
        }


def placement_for(
    manifest: Manifest, centers: list[CenterInfo], replicas: int
) -> dict[str, list[int]]:
    """Center id (hex) -> the non-zero chunk indices rendezvous hashing gives it."""
    ids = [c.peer_id.hex() for c in centers]
    wanted = [i for i in range(manifest.chunk_count) if not manifest.is_zero(i)]
    by_center = assign([manifest.chunk_digests[i] for i in wanted], ids, replicas)
    return {cid: [wanted[j] for j in positions] for cid, positions in by_center.items()}


async def _replicate(
    center: CenterInfo,
    manifest: Manifest,
    indices: list[int],
    source: tuple[str, int],
    signature: bytes | None = None,
    tls: ssl.SSLContext | None = None,
) -> CenterResult:
    label = f"{center.host}:{center.port}"
    try:
        client = await RpcClient.connect_tcp(
            center.host, center.port, tls=tls, allowed={TlsRole.STORAGE}
        )
    except OSError as exc:
        raise PublishError(f"cannot reach storage center {label}: {exc}") from exc
    except TlsError as exc:
        raise PublishError(f"TLS to storage center {label} failed: {exc}") from exc
    try:
        with trio.fail_after(REPLICATE_TIMEOUT):
            result = await client.call(
                "replicate",
                {
                    "manifest": manifest.encode(),
                    "indices": indices,
                    "sources": [[source[0], source[1]]],
                    "signature": signature,
                },
            )
    except RpcError as exc:
        raise PublishError(f"storage center {label} refused the chunks: {exc}") from exc
    except trio.TooSlowError as exc:
        raise PublishError(f"storage center {label} did not finish in time") from exc
    finally:
        await client.aclose()
    return CenterResult(
        center_id=center.peer_id.hex(),
        address=label,
        chunks=len(indices),
        stored=int(result.get("stored", 0)),
        already_had=int(result.get("already_had", 0)),
    )


async def publish(
    image: Path,
    name: str,
    version: str,
    tracker: tuple[str, int],
    *,
    replicas: int = 2,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    source_host: str | None = None,
    on_step: Callable[[str], None] | None = None,
    signing_key: Ed25519PrivateKey | None = None,
    valid_for: float | None = DEFAULT_VALID_FOR,
    tls: TlsMaterial | None = None,
) -> PublishResult:
    """Publish `image` as NAME:VERSION; see the module docstring for the order of steps.

    With `signing_key` the template is signed, valid for `valid_for` seconds (None: no expiry);
    the centers and the tracker check that signature against the keys they trust. With `tls`
    (an operator certificate) every link is mutual TLS: tracker, centers and our seeder.
    """
    started = time.perf_counter()
    step = on_step or (lambda _text: None)
    if replicas < 1:
        raise PublishError(f"--replicas must be at least 1, got {replicas}")
    if valid_for is not None and valid_for <= 0:
        raise PublishError(f"--valid-for must be positive, got {valid_for:g} seconds")
    step(f"building the manifest of {image}")
    manifest = await trio.to_thread.run_sync(manifest_from_file, image, name, version, chunk_size)
    signature = None
    if signing_key is not None:
        not_after = MAX_NOT_AFTER if valid_for is None else int(time.time() + valid_for)
        signature = sign_template(signing_key, manifest.template_id, min(not_after, MAX_NOT_AFTER))
        step(f"signed with key {signature.key_id.hex()}, valid until {signature.expires}")
    envelope = None if signature is None else signature.encode()
    dialing = None if tls is None else client_context(tls)
    try:
        client = await TrackerClient.connect(*tracker, tls=dialing)
    except TrackerUnreachable as exc:
        raise PublishError(str(exc)) from exc
    async with client:
        centers = await client.centers()
        if not centers:
            raise PublishError(
                f"the tracker at {client.label} knows no live storage center; "
                "start one with `vmswarm daemon run --role storage`"
            )
        placement = placement_for(manifest, centers, replicas)
        # The centers reach us at the address we reach the tracker from, unless told otherwise.
        host = source_host or client.local_host or "127.0.0.1"
        data = ImageFileTemplate(image, manifest)
        results: list[CenterResult] = []
        try:
            async with trio.open_nursery() as nursery:
                source = await nursery.start(
                    functools.partial(
                        run_seeder,
                        data,
                        LocalPeer(secrets.token_bytes(16), Role.STORAGE),
                        host,
                        tls=None if tls is None else server_context(tls),
                    )
                )
                step(
                    f"seeding {manifest.chunk_count} chunks to {len(centers)} storage centers "
                    f"(r={min(replicas, len(centers))})"
                )

                async def one(center: CenterInfo) -> None:
                    indices = placement.get(center.peer_id.hex(), [])
                    if indices:
                        results.append(
                            await _replicate(
                                center,
                                manifest,
                                indices,
                                source,
                                envelope,
                                dialing,
                            )
                        )

                async with trio.open_nursery() as workers:
                    for center in centers:
                        workers.start_soon(one, center)
                nursery.cancel_scope.cancel()
        finally:
            data.close()
        registered = await client.register_template(manifest, placement, signature=envelope)
    log.info("published %s:%s as %s", name, version, manifest.template_id.hex())
    return PublishResult(
        manifest=manifest,
        created=registered.created,
        replicas=min(replicas, len(centers)),
        seconds=time.perf_counter() - started,
        centers=sorted(results, key=lambda c: c.address),
        signature=signature,
    )


def default_name(image: Path) -> str:
    return os.path.splitext(image.name)[0] or "template"
