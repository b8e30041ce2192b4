"""Mutual TLS for vmswarm links: SSL contexts, handshakes and the peer's role.

Identity is the role in the peer's certificate plus the cluster CA that signed it, not a DNS
name: every context trusts only the configured CA (never the system store), requires a
certificate both ways, and speaks TLS 1.3 only. Host-name checking is off by default, also for
CLI -> tracker, because trackers and peers are reached by IP address and the role check pins
what the other side must be (a host certificate cannot pose as the tracker). A client may turn
it on (`check_hostname=True`) when one CA issues certificates for more than one cluster.
"""

from __future__ import annotations

import datetime as dt
import math
import ssl
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from .pki import (
    TlsError,
    TlsRole,
    common_name,
    load_certificate,
    load_key,
    read_pem,
    role_of,
)
from .tls_stream import TlsStream

INSECURE_WARNING = (
    "running WITHOUT mutual TLS (--insecure / tls.insecure): links are plain TCP, nobody is "
    "authenticated and anyone who can reach the ports can join the swarm; labs and demos only"
)

# A handshake that takes longer than this is a dead or hostile peer, not a slow one.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

# OpenSSL reason codes in handshake failures, and what they mean for the operator.
_REASONS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the other side requires a client certificate",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer presented no certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the other side does not trust the CA that signed our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the other side refused our certificate as expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the other side refused our certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the other side refused our certificate's usage",
    "WRONG_VERSION_NUMBER": "the other side does not speak TLS (TLS on one end only?)",
    "UNSUPPORTED_PROTOCOL": "the other side does not speak TLS 1.3",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the other side does not speak TLS 1.3",
    "HTTP_REQUEST": "the other side does not speak TLS (TLS on one end only?)",
    # A server that hangs up without an alert (e.g. trio's SSLStream) shows only as an EOF.
    "UNEXPECTED_EOF_WHILE_READING": "the other side hung up during the TLS handshake; it may "
    "have refused our certificate (see its log)",
}


@dataclass(frozen=True)
class TlsFiles:
    """Where a node's TLS material lives: the CA to trust, its certificate and its key."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class PeerIdentity:
    role: TlsRole
    name: str  # the certificate's common name, for logs
    fingerprint: str  # SHA-256 of the peer certificate, hex

    def __str__(self) -> str:
        return f"{self.role.value} {self.name!r}"


@dataclass(frozen=True)
class TlsMaterial:
    """Checked TLS files, and the role our own certificate gives us."""

    files: TlsFiles
    role: TlsRole
    name: str
    not_after: dt.datetime


def _validity(cert: x509.Certificate, path: Path, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise TlsError(
            f"certificate {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            "UTC (is this machine's clock right?)"
        )
    if now > cert.not_valid_after_utc:
        raise TlsError(
            f"certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "issue a new one (vmswarm ca issue)"
        )


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_files(files: TlsFiles, *, now: dt.datetime | None = None) -> TlsMaterial:
    """Read and check the CA, certificate and key before any socket opens; TlsError says what
    is wrong (missing, unreadable, key too open, not matching, expired, no role, wrong CA)."""
    when = now if now is not None else dt.datetime.now(dt.UTC)
    ca_data = read_pem(files.ca, "CA certificate")
    try:
        anchors = x509.load_pem_x509_certificates(ca_data)
    except ValueError as exc:
        raise TlsError(
            f"CA certificate {files.ca} is not a usable PEM certificate: {exc}"
        ) from None
    cert = load_certificate(files.cert)
    key = load_key(files.key)
    if key.public_key() != cert.public_key():
        raise TlsError(f"private key {files.key} does not belong to certificate {files.cert}")
    _validity(cert, files.cert, when)
    role = role_of(cert, f"certificate {files.cert}")
    chain = x509.load_pem_x509_certificates(read_pem(files.cert, "certificate"))
    issuers = [a for a in anchors if a.subject == cert.issuer]
    if issuers:
        # A bundle (old and new CA during a rotation) may hold several CAs of the same name.
        if not any(_signed_by(cert, issuer) for issuer in issuers):
            raise TlsError(f"certificate {files.cert} was not signed by the CA in {files.ca}")
    elif len(chain) == 1:  # no intermediate in the file to lead to the CA
        raise TlsError(f"certificate {files.cert} was not issued by the CA in {files.ca}")
    return TlsMaterial(files, role, common_name(cert), cert.not_valid_after_utc)


def _context(purpose: ssl._SSLMethod, material: TlsMaterial) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_verify_locations(cafile=str(material.files.ca))
        context.load_cert_chain(str(material.files.cert), str(material.files.key))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot load TLS files {material.files}: {exc}") from None
    context.verify_mode = ssl.CERT_REQUIRED  # mutual: the server demands a client certificate too
    return context


def server_context(material: TlsMaterial) -> ssl.SSLContext:
    """For a listener: TLS 1.3, a client certificate from the cluster CA required."""
    context = _context(ssl.PROTOCOL_TLS_SERVER, material)
    context.num_tickets = 0  # links are long-lived, nobody resumes: no post-handshake tickets
    return context


def client_context(material: TlsMaterial, *, check_hostname: bool = False) -> ssl.SSLContext:
    """For a dialer: TLS 1.3, presents our certificate, trusts only the cluster CA."""
    context = _context(ssl.PROTOCOL_TLS_CLIENT, material)
    context.check_hostname = check_hostname
    return context


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | TlsStream) -> PeerIdentity:
    """Who the other side is, read from its verified certificate (after the handshake)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise TlsError("the peer presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    return PeerIdentity(
        role_of(cert, f"peer certificate {common_name(cert)!r}"),
        common_name(cert),
        cert.fingerprint(hashes.SHA256()).hex(),
    )


def describe_failure(exc: BaseException) -> str:
    """One line on why a TLS handshake or link failed, from the ssl error inside `exc`."""
    if isinstance(exc, trio.TooSlowError):
        return "the TLS handshake timed out"
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        # ..._UNABLE_TO_GET_ISSUER_CERT(_LOCALLY), (DEPTH_ZERO_)SELF_SIGNED_CERT(_IN_CHAIN)
        hint = " (not signed by our cluster CA)" if cause.verify_code in (2, 18, 19, 20) else ""
        return f"the peer's certificate was refused: {cause.verify_message}{hint}"
    if isinstance(cause, ssl.SSLError):
        reason = str(cause.reason or "")
        if reason in _REASONS:
            return _REASONS[reason]
        return f"TLS failed: {reason.lower().replace('_', ' ') or cause}"
    return f"the TLS link broke: {exc or type(exc).__name__}"


def _check_role(identity: PeerIdentity, allowed: Collection[TlsRole] | None) -> None:
    if allowed is not None and identity.role not in allowed:
        wanted = " or ".join(sorted(role.value for role in allowed))
        raise TlsError(f"peer {identity} is not allowed here: expected a {wanted} certificate")


async def _handshake(tls: TlsStream, seconds: float) -> None:
    try:
        with trio.fail_after(seconds if seconds > 0 else math.inf):
            await tls.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(tls)
        raise TlsError(describe_failure(exc)) from exc


async def accept(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    *,
    allowed: Collection[TlsRole] | None = None,
    handshake_seconds: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> tuple[TlsStream, PeerIdentity]:
    """Server side of a handshake on an accepted stream; TlsError if the client is refused."""
    tls = TlsStream(stream, context, server_side=True)
    await _handshake(tls, handshake_seconds)
    return tls, await _identity(tls, allowed)


async def connect(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    allowed: Collection[TlsRole] | None = None,
    handshake_seconds: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> tuple[TlsStream, PeerIdentity]:
    """Client side of a handshake; TlsError if the server is refused or refuses us.

    Under TLS 1.3 the server checks our certificate after our side of the handshake is done,
    so a refusal of *our* certificate shows on the first receive (see describe_failure).
    """
    tls = TlsStream(stream, context, server_side=False, server_hostname=server_hostname)
    await _handshake(tls, handshake_seconds)
    return tls, await _identity(tls, allowed)


async def _identity(tls: TlsStream, allowed: Collection[TlsRole] | None) -> PeerIdentity:
    try:
        identity = peer_identity(tls)
        _check_role(identity, allowed)
    except TlsError:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(tls)
        raise
    return identity


__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "INSECURE_WARNING",
    "PeerIdentity",
    "TlsError",
    "TlsFiles",
    "TlsMaterial",
    "TlsRole",
    "accept",
    "check_files",
    "client_context",
    "connect",
    "describe_failure",
    "peer_identity",
    "server_context",
]
