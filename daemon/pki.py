"""A lab cluster CA: `vmswarm ca init` makes it, `vmswarm ca issue` signs role certificates.

Keys are ECDSA P-256 (every TLS 1.3 stack and production PKI speaks it). A leaf certificate
carries its role as a URI SAN `vmswarm:role:ROLE` (see daemon/tls.py), so any other CA can
issue certificates vmswarm accepts. Private keys are written 0600 and never overwritten.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import secret_files

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
DEFAULT_CA_NAME = "vmswarm cluster CA"
CA_VALIDITY = dt.timedelta(days=3650)
DEFAULT_LEAF_VALIDITY = dt.timedelta(days=365)
ROLE_URI_PREFIX = "vmswarm:role:"
# Certificates are backdated a little so a node whose clock lags the CA's still accepts them.
_CLOCK_SKEW = dt.timedelta(minutes=5)
# PEM certificates and keys are a few KiB; refuse to read anything much larger.
MAX_PEM_FILE = 256 << 10


class TlsRole(enum.Enum):
    """What a certificate's holder may be: it limits what the holder may do."""

    HOST = "host"
    STORAGE = "storage"
    TRACKER = "tracker"
    OPERATOR = "operator"

    @property
    def uri(self) -> str:
        return f"{ROLE_URI_PREFIX}{self.value}"


class TlsError(Exception):
    """A CA, certificate or key file is missing, unusable, too open or expired; or a peer's
    certificate is refused. The message says which and what to do."""


@dataclass(frozen=True)
class IssuedFiles:
    cert: Path
    key: Path
    fingerprint: str  # SHA-256 of the certificate, hex


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a small PEM file, or a TlsError that names the file and the problem."""
    try:
        with path.open("rb") as src:
            data = src.read(MAX_PEM_FILE + 1)
    except FileNotFoundError:
        raise TlsError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise TlsError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise TlsError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_FILE:
        raise TlsError(f"{what} {path} is too large to be a PEM file")
    if b"-----BEGIN" not in data:
        raise TlsError(f"{what} {path} is not a PEM file")
    return data


def check_private_mode(path: Path, what: str) -> None:
    """Refuse a private key that other users can read or write."""
    secret_files.check_private_mode(path, what, TlsError)


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    data = read_pem(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise TlsError(f"{what} {path} is not a usable PEM certificate: {exc}") from None


def load_key(path: Path, what: str = "private key") -> ec.EllipticCurvePrivateKey:
    data = read_pem(path, what)
    check_private_mode(path, what)
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError(f"{what} {path} is not a usable unencrypted PEM key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{what} {path} is not an ECDSA key")
    return key


def _write_new(path: Path, data: bytes, mode: int) -> None:
    secret_files.write_new(path, data, mode, TlsError)


def _write_pair(cert_path: Path, cert: x509.Certificate, key_path: Path, key: object) -> None:
    """Write key (0600) then certificate (0644); neither or both exist afterwards."""
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    for path in (cert_path, key_path):
        if path.exists():
            raise TlsError(f"{path} already exists; refusing to overwrite it")
    try:
        cert_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TlsError(f"cannot create {cert_path.parent}: {exc.strerror or exc}") from None
    _write_new(
        key_path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), 0o600
    )
    try:
        _write_new(cert_path, cert.public_bytes(Encoding.PEM), 0o644)
    except TlsError:
        key_path.unlink(missing_ok=True)  # a key without its certificate is of no use
        raise


def _plain_name(name: str, what: str) -> str:
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise TlsError(f"bad {what} {name!r}: use a plain file name")
    return name


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _utcnow(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def init_ca(ca_dir: Path, name: str = DEFAULT_CA_NAME, *, now: dt.datetime | None = None) -> Path:
    """Write CA_DIR/ca.crt and CA_DIR/ca.key (0600) for a new self-signed cluster CA."""
    if not name.strip():
        raise TlsError("the CA name must not be empty")
    start = _utcnow(now)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _CLOCK_SKEW)
        .not_valid_after(start + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = ca_dir / CA_CERT_NAME
    _write_pair(cert_path, cert, ca_dir / CA_KEY_NAME, key)
    return cert_path


def parse_san(text: str) -> x509.GeneralName:
    """An IP address SAN for "10.0.0.1" / "::1", else a DNS name SAN."""
    value = text.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not value or any(c.isspace() or c in "/:@" for c in value):
        raise TlsError(f"bad --san {text!r}: give a DNS name or an IP address")
    return x509.DNSName(value)


def issue(
    ca_dir: Path,
    role: TlsRole,
    name: str,
    out_dir: Path | None = None,
    *,
    sans: Iterable[str] = (),
    valid_for: dt.timedelta = DEFAULT_LEAF_VALIDITY,
    now: dt.datetime | None = None,
) -> IssuedFiles:
    """Sign a new leaf certificate for NAME with ROLE; writes OUT_DIR/NAME.crt and NAME.key."""
    _plain_name(name, "certificate name")
    if valid_for <= dt.timedelta(0):
        raise TlsError("a certificate's validity must be positive")
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(role.uri)]
    names += [parse_san(san) for san in sans]
    ca_cert = load_certificate(ca_dir / CA_CERT_NAME, "CA certificate")
    ca_key = load_key(ca_dir / CA_KEY_NAME, "CA key")
    if ca_cert.public_key() != ca_key.public_key():
        raise TlsError(f"CA key {ca_dir / CA_KEY_NAME} does not belong to {ca_dir / CA_CERT_NAME}")
    start = _utcnow(now)
    try:
        end = min(start + valid_for, ca_cert.not_valid_after_utc)  # never outlive the CA
    except OverflowError:
        end = ca_cert.not_valid_after_utc
    if end <= start:
        raise TlsError(f"CA certificate {ca_dir / CA_CERT_NAME} has expired; make a new CA")
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _CLOCK_SKEW)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    target = ca_dir if out_dir is None else out_dir
    cert_path, key_path = target / f"{name}.crt", target / f"{name}.key"
    _write_pair(cert_path, cert, key_path, key)
    return IssuedFiles(cert_path, key_path, _fingerprint(cert))


def roles_of(cert: x509.Certificate) -> list[TlsRole]:
    """The vmswarm roles named by the certificate's URI SANs (unknown role names are ignored)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    known = {role.uri: role for role in TlsRole}
    return [
        known[uri]
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri in known
    ]


def role_of(cert: x509.Certificate, what: str) -> TlsRole:
    """The one role a certificate carries; a TlsError when it has none or several."""
    roles = set(roles_of(cert))
    if not roles:
        raise TlsError(f"{what} names no vmswarm role (a URI SAN like {TlsRole.HOST.uri})")
    if len(roles) > 1:
        shown = ", ".join(sorted(r.value for r in roles))
        raise TlsError(f"{what} names several vmswarm roles ({shown}); issue one role per cert")
    return roles.pop()


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
