"""Publisher key files: an Ed25519 private key (PEM, mode 0600) and its public key (PEM).

`vmswarm key generate` writes NAME.key and NAME.pub; `publish --sign-key` reads the first, and
trackers and daemons read the second (`--trusted-key`). Raw 32-byte key files are read too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from ..swarm.signature import PUBLIC_KEY_LENGTH, TrustPolicy, key_id_of, public_key_bytes
from . import secret_files

log = logging.getLogger(__name__)

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
DEFAULT_KEY_NAME = "publisher"
# Key files are a few hundred bytes; refuse to read anything much larger.
_MAX_KEY_FILE = 16 << 10
_RAW_KEY_LENGTH = 32


class KeyFileError(Exception):
    """A key file is missing, unreadable, of the wrong kind or too open; the message says which."""


@dataclass(frozen=True)
class GeneratedKey:
    private_path: Path
    public_path: Path
    key_id: str  # hex


def _write_new(path: Path, data: bytes, mode: int) -> None:
    secret_files.write_new(path, data, mode, KeyFileError)


def generate_keypair(out_dir: Path, name: str = DEFAULT_KEY_NAME) -> GeneratedKey:
    """Write OUT_DIR/NAME.key (0600) and OUT_DIR/NAME.pub (0644) for a new Ed25519 key."""
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"bad key name {name!r}: use a plain file name")
    private_path = out_dir / f"{name}{PRIVATE_SUFFIX}"
    public_path = out_dir / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    _write_new(
        private_path,
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        0o600,
    )
    try:
        _write_new(
            public_path, public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo), 0o644
        )
    except KeyFileError:
        private_path.unlink(missing_ok=True)  # half a key pair is of no use
        raise
    return GeneratedKey(private_path, public_path, key_id_of(public_key_bytes(public)).hex())


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as src:
            data = src.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"{what} {path} is a directory, not a key file") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{what} {path} is too large to be a key file")
    return data


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS#8, unencrypted) or 32 raw bytes; refuses 0644 files."""
    data = _read(path, "signing key")
    secret_files.check_private_mode(path, "signing key", KeyFileError)
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(
                f"signing key {path} is not a usable PEM private key: {exc}"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"signing key {path} is not an Ed25519 key")
        return key
    if len(data) == _RAW_KEY_LENGTH:
        return Ed25519PrivateKey.from_private_bytes(data)
    raise KeyFileError(
        f"signing key {path} is neither a PEM private key nor {_RAW_KEY_LENGTH} raw bytes"
    )


def load_public_key(path: Path) -> bytes:
    """The 32 raw bytes of an Ed25519 public key file (PEM SubjectPublicKeyInfo, or raw)."""
    data = _read(path, "trusted key")
    if data.lstrip().startswith(b"-----BEGIN PRIVATE"):
        raise KeyFileError(f"trusted key {path} is a private key; give its .pub file instead")
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(
                f"trusted key {path} is not a usable PEM public key: {exc}"
            ) from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"trusted key {path} is not an Ed25519 key")
        return public_key_bytes(key)
    if len(data) == PUBLIC_KEY_LENGTH:
        return data
    raise KeyFileError(
        f"trusted key {path} is neither a PEM public key nor {PUBLIC_KEY_LENGTH} raw bytes"
    )


def load_trusted_keys(paths: Iterable[Path]) -> tuple[bytes, ...]:
    """Raw public keys from each file, in order, without duplicates."""
    keys: list[bytes] = []
    for path in paths:
        key = load_public_key(Path(path))
        if key not in keys:
            keys.append(key)
    return tuple(keys)


def describe_keys(keys: Iterable[bytes]) -> str:
    """Key ids for a log line: "a1b2c3d4e5f60718, ..." or "none"."""
    return ", ".join(key_id_of(k).hex() for k in keys) or "none"


def log_trust(trust: TrustPolicy, who: str) -> None:
    """Say at start-up which keys a node trusts, and warn when unsigned templates pass."""
    keys = describe_keys(public_key_bytes(k) for k in trust.keys.values())
    if trust.allow_unsigned:
        log.warning(
            "%s accepts UNSIGNED templates (--allow-unsigned): whoever can publish can "
            "distribute any image; trusted keys: %s",
            who,
            keys,
        )
    elif not trust.keys:
        log.warning("%s trusts no signing key: it will refuse every template (--trusted-key)", who)
    else:
        log.info("%s accepts templates signed by: %s", who, keys)
