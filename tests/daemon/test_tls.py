"""Mutual TLS: the lab CA, checked TLS files, and real TLS 1.3 handshakes over loopback."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from vmswarm.daemon import tls
from vmswarm.daemon.pki import (
    CA_CERT_NAME,
    CA_KEY_NAME,
    TlsError,
    TlsRole,
    init_ca,
    issue,
    load_certificate,
    role_of,
)

DAY = dt.timedelta(days=1)
# What a client sees when a trio server refuses its certificate (trio does not send the alert).


def _files(ca_dir: Path, name: str) -> tls.TlsFiles:
    return tls.TlsFiles(ca_dir / CA_CERT_NAME, ca_dir / f"{name}.crt", ca_dir / f"{name}.key")


@dataclass
class Lab:
    ca: Path
    other_ca: Path

    def material(self, name: str, ca: Path | None = None) -> tls.TlsMaterial:
        return tls.check_files(_files(ca or self.ca, name))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    root = tmp_path_factory.mktemp("pki")
    ca, other = root / "ca", root / "other"
    init_ca(ca, "test cluster CA")
    init_ca(other, "someone else's CA")
    for role in TlsRole:
        issue(ca, role, role.value, sans=san_list(role))
    issue(other, TlsRole.OPERATOR, "stranger")
    long_ago = dt.datetime.now(dt.UTC) - 30 * DAY
    issue(ca, TlsRole.OPERATOR, "expired", valid_for=DAY, now=long_ago)
    return Lab(ca, other)


def san_list(role: TlsRole) -> list[str]:
    return ["127.0.0.1", f"{role.value}.lab"]


def raw_client_context(
    ca: Path, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A client context built by hand, to act as a client that skips vmswarm's own checks."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(ca))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


@dataclass
class Outcome:
    server: tls.PeerIdentity | None = None
    client: tls.PeerIdentity | None = None
    server_error: str | None = None
    client_error: str | None = None
    reply: bytes = b""


async def exchange(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    *,
    server_allows: set[TlsRole] | None = None,
    client_allows: set[TlsRole] | None = None,
) -> Outcome:
    """One handshake over a real loopback TCP socket, then "ping" -> "PING" if both agree."""
    outcome = Outcome()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def serve() -> None:
        stream = await listeners[0].accept()
        try:
            server, outcome.server = await tls.accept(stream, server_context, allowed=server_allows)
        except tls.TlsError as exc:
            outcome.server_error = str(exc)
            return
        async with server:
            with contextlib.suppress(trio.BrokenResourceError):  # a client that refused us
                data = await server.receive_some(64)
                await server.send_all(data.upper())

    with trio.fail_after(20):  # a hang is a failure, never a pass
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                client, outcome.client = await tls.connect(
                    stream, client_context, allowed=client_allows
                )
                async with client:
                    await client.send_all(b"ping")
                    outcome.reply = bytes(await client.receive_some(64))
            except tls.TlsError as exc:
                outcome.client_error = str(exc)
            except trio.BrokenResourceError as exc:  # TLS 1.3: our cert refused after our Finished
                outcome.client_error = tls.describe_failure(exc)
    for listener in listeners:
        await listener.aclose()
    return outcome


async def test_mutual_authentication_and_roles_both_ways(lab: Lab) -> None:
    server = tls.server_context(lab.material("tracker"))
    client = tls.client_context(lab.material("operator"))
    outcome = await exchange(
        server, client, server_allows={TlsRole.OPERATOR}, client_allows={TlsRole.TRACKER}
    )
    assert outcome.server_error is None and outcome.client_error is None
    assert outcome.reply == b"PING"
    assert outcome.server is not None and outcome.client is not None
    assert (outcome.server.role, outcome.server.name) == (TlsRole.OPERATOR, "operator")
    assert (outcome.client.role, outcome.client.name) == (TlsRole.TRACKER, "tracker")


async def test_only_tls_1_3_is_offered(lab: Lab) -> None:
    server = tls.server_context(lab.material("tracker"))
    client = tls.client_context(lab.material("host"))
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server.verify_mode == client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname is False
    legacy = raw_client_context(lab.ca / CA_CERT_NAME, lab.ca / "host.crt", lab.ca / "host.key")
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    outcome = await exchange(server, legacy)
    assert outcome.server_error is not None and outcome.reply == b""


async def test_client_without_a_certificate_is_refused(lab: Lab) -> None:
    server = tls.server_context(lab.material("tracker"))
    outcome = await exchange(server, raw_client_context(lab.ca / CA_CERT_NAME))
    assert outcome.server_error == "the peer presented no certificate"
    # The refusing side sends its alert, so the client learns why.
    assert outcome.client_error == "the other side requires a client certificate"
    assert outcome.reply == b""


async def test_client_with_a_certificate_from_another_ca_is_refused(lab: Lab) -> None:
    server = tls.server_context(lab.material("tracker"))
    stranger = raw_client_context(
        lab.ca / CA_CERT_NAME, lab.other_ca / "stranger.crt", lab.other_ca / "stranger.key"
    )
    outcome = await exchange(server, stranger)
    assert outcome.server_error is not None
    assert outcome.server_error.startswith("the peer's certificate was refused:")
    assert outcome.server_error.endswith("issuer certificate (not signed by our cluster CA)")
    assert (
        outcome.client_error == "the other side does not trust the CA that signed our certificate"
    )
    assert outcome.reply == b""


async def test_server_with_a_certificate_from_another_ca_is_refused(lab: Lab) -> None:
    # A stranger tracker: its own context is fine by its CA, but our client trusts only ours.
    server = tls.server_context(lab.material("stranger", lab.other_ca))
    outcome = await exchange(server, tls.client_context(lab.material("operator")))
    assert outcome.client_error is not None
    assert outcome.client_error.startswith("the peer's certificate was refused:")
    assert outcome.reply == b""


async def test_expired_client_certificate_is_refused(lab: Lab) -> None:
    server = tls.server_context(lab.material("tracker"))
    expired = raw_client_context(
        lab.ca / CA_CERT_NAME, lab.ca / "expired.crt", lab.ca / "expired.key"
    )
    outcome = await exchange(server, expired)
    assert outcome.server_error == "the peer's certificate was refused: certificate has expired"
    assert outcome.client_error == "the other side refused our certificate as expired"


async def test_a_peer_with_the_wrong_role_is_refused(lab: Lab) -> None:
    # A host certificate cannot pose as the tracker, even though the cluster CA signed it.
    server = tls.server_context(lab.material("host"))
    client = tls.client_context(lab.material("operator"))
    outcome = await exchange(server, client, client_allows={TlsRole.TRACKER})
    assert (
        outcome.client_error
        == "peer host 'host' is not allowed here: expected a tracker certificate"
    )
    # And a server that admits only storage centers turns a host away.
    outcome = await exchange(
        tls.server_context(lab.material("storage")),
        tls.client_context(lab.material("host")),
        server_allows={TlsRole.STORAGE},
    )
    assert (
        outcome.server_error
        == "peer host 'host' is not allowed here: expected a storage certificate"
    )


async def test_plain_text_client_is_refused(lab: Lab) -> None:
    server = tls.server_context(lab.material("tracker"))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    errors: list[str] = []

    async def serve() -> None:
        stream = await listeners[0].accept()
        try:
            await tls.accept(stream, server, handshake_seconds=10)
        except tls.TlsError as exc:
            errors.append(str(exc))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            async with await trio.open_tcp_stream("127.0.0.1", port) as plain:
                await plain.send_all(b"\x00\x00\x00\x10not a TLS record at all")
                await plain.receive_some(64)  # the server hangs up
    for listener in listeners:
        await listener.aclose()
    assert errors and "TLS" in errors[0]


async def test_silent_client_times_out_the_handshake(lab: Lab) -> None:
    server = tls.server_context(lab.material("tracker"))
    left, right = trio.testing.memory_stream_pair()
    with pytest.raises(tls.TlsError, match="the TLS handshake timed out"):
        await tls.accept(left, server, handshake_seconds=0.05)
    await right.aclose()


def test_role_is_read_from_the_uri_san(lab: Lab) -> None:
    for role in TlsRole:
        assert role_of(load_certificate(lab.ca / f"{role.value}.crt"), "cert") == role
    assert lab.material("storage").role == TlsRole.STORAGE
    assert lab.material("storage").name == "storage"


def openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        pytest.fail("openssl is not installed (apt-get install openssl)")
    return found


def run_openssl(*args: str | Path) -> None:
    subprocess.run([openssl(), *map(str, args)], check=True, capture_output=True, timeout=60)


async def test_a_certificate_from_any_pki_works_by_its_uri_san(tmp_path: Path, lab: Lab) -> None:
    """Production brings its own PKI: an openssl-made CA and RSA leaf, role in a URI SAN."""
    ca_key, ca_crt = tmp_path / "ca.key", tmp_path / "ca.crt"
    run_openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out",
                ca_crt, "-days", "2", "-subj", "/CN=corporate CA")  # fmt: skip
    leaf_key, leaf_csr, leaf_crt = tmp_path / "n.key", tmp_path / "n.csr", tmp_path / "n.crt"
    run_openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", leaf_key, "-out", leaf_csr,
                "-subj", "/CN=node7")  # fmt: skip
    ext = tmp_path / "ext.cnf"
    ext.write_text(
        "subjectAltName=URI:vmswarm:role:storage,DNS:node7.corp\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    run_openssl("x509", "-req", "-in", leaf_csr, "-CA", ca_crt, "-CAkey", ca_key,
                "-CAcreateserial", "-out", leaf_crt, "-days", "1", "-extfile", ext)  # fmt: skip
    leaf_key.chmod(0o600)
    with pytest.raises(TlsError, match="is not an ECDSA key"):
        tls.check_files(tls.TlsFiles(ca_crt, leaf_crt, leaf_key))
    # RSA keys are fine for TLS itself: the handshake and role read do not care about the CA.
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.minimum_version = ssl.TLSVersion.TLSv1_3
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_verify_locations(cafile=str(lab.ca / CA_CERT_NAME))
    server_context.load_cert_chain(str(leaf_crt), str(leaf_key))
    client = raw_client_context(ca_crt, lab.ca / "host.crt", lab.ca / "host.key")
    client.load_verify_locations(cafile=str(ca_crt))
    outcome = await exchange(server_context, client)
    assert outcome.client is not None and outcome.client.role == TlsRole.STORAGE
    assert outcome.client.name == "node7"
    assert outcome.server is not None and outcome.server.role == TlsRole.HOST


def test_check_files_names_the_problem(tmp_path: Path, lab: Lab) -> None:
    good = _files(lab.ca, "host")
    with pytest.raises(TlsError, match=r"certificate .*nope\.crt does not exist"):
        tls.check_files(tls.TlsFiles(good.ca, tmp_path / "nope.crt", good.key))
    with pytest.raises(TlsError, match=r"CA certificate .* does not exist"):
        tls.check_files(tls.TlsFiles(tmp_path / "ca.crt", good.cert, good.key))
    with pytest.raises(TlsError, match="is not a PEM file"):
        (tmp_path / "junk.crt").write_bytes(b"junk")
        tls.check_files(tls.TlsFiles(good.ca, tmp_path / "junk.crt", good.key))
    with pytest.raises(TlsError, match="does not belong to certificate"):
        tls.check_files(tls.TlsFiles(good.ca, good.cert, lab.ca / "storage.key"))
    with pytest.raises(TlsError, match=r"expired on .* issue a new one"):
        tls.check_files(_files(lab.ca, "expired"))
    with pytest.raises(TlsError, match="was not issued by the CA"):
        stranger = _files(lab.other_ca, "stranger")
        tls.check_files(tls.TlsFiles(good.ca, stranger.cert, stranger.key))
    with pytest.raises(TlsError, match="not valid before"):
        tls.check_files(good, now=dt.datetime.now(dt.UTC) - 2 * DAY)
    open_key = tmp_path / "open.key"
    shutil.copy(good.key, open_key)
    open_key.chmod(0o644)
    with pytest.raises(TlsError, match=r"open to other users \(mode 0644\); chmod 600"):
        tls.check_files(tls.TlsFiles(good.ca, good.cert, open_key))
    if os.geteuid() != 0:  # root reads any file
        unreadable = tmp_path / "unreadable.crt"
        shutil.copy(good.cert, unreadable)
        unreadable.chmod(0)
        with pytest.raises(TlsError, match="cannot read certificate"):
            tls.check_files(tls.TlsFiles(good.ca, unreadable, good.key))


def test_issue_never_overwrites_and_caps_at_the_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    init_ca(ca)
    assert (ca / CA_KEY_NAME).stat().st_mode & 0o777 == 0o600
    with pytest.raises(TlsError, match="already exists"):
        init_ca(ca)
    made = issue(ca, TlsRole.HOST, "h1", valid_for=dt.timedelta(days=10**6))
    assert made.key.stat().st_mode & 0o777 == 0o600
    ca_end = load_certificate(ca / CA_CERT_NAME).not_valid_after_utc
    assert load_certificate(made.cert).not_valid_after_utc == ca_end
    before = made.cert.read_bytes()
    with pytest.raises(TlsError, match="already exists"):
        issue(ca, TlsRole.STORAGE, "h1")
    assert made.cert.read_bytes() == before
    with pytest.raises(TlsError, match="bad certificate name"):
        issue(ca, TlsRole.HOST, "../escape")
    (ca / CA_KEY_NAME).chmod(0o640)
    with pytest.raises(TlsError, match=r"CA key .* is open to other users"):
        issue(ca, TlsRole.HOST, "h2")


def vmswarm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "vmswarm"
    return subprocess.run(
        [str(script), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


async def test_ca_commands_make_files_that_handshake(tmp_path: Path) -> None:
    ca, certs = tmp_path / "ca", tmp_path / "certs"
    made = vmswarm("ca", "init", "--dir", ca, "--name", "lab CA")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == str(ca / CA_CERT_NAME)
    for role, name in ((TlsRole.TRACKER, "t1"), (TlsRole.OPERATOR, "alice")):
        made = vmswarm("ca", "issue", "--dir", ca, "--role", role.value, name, "--out", certs,
                       "--san", "127.0.0.1", "--valid-for", "30d")  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert (certs / f"{name}.key").stat().st_mode & 0o777 == 0o600
    tracker = tls.check_files(tls.TlsFiles(ca / CA_CERT_NAME, certs / "t1.crt", certs / "t1.key"))
    operator = tls.check_files(
        tls.TlsFiles(ca / CA_CERT_NAME, certs / "alice.crt", certs / "alice.key")
    )
    assert (tracker.role, operator.role) == (TlsRole.TRACKER, TlsRole.OPERATOR)
    assert 29 <= (operator.not_after - dt.datetime.now(dt.UTC)).days <= 30
    outcome = await exchange(
        tls.server_context(tracker),
        tls.client_context(operator),
        server_allows={TlsRole.OPERATOR},
        client_allows={TlsRole.TRACKER},
    )
    assert outcome.reply == b"PING"

    again = vmswarm("ca", "issue", "--dir", ca, "--role", "host", "alice", "--out", certs)
    assert again.returncode == 2
    assert again.stderr.strip() == f"vmswarm: error: {certs / 'alice.crt'} already exists; " \
        "refusing to overwrite it"  # fmt: skip
    bad_role = vmswarm("ca", "issue", "--dir", ca, "--role", "admin", "x")
    assert bad_role.returncode == 2 and "Traceback" not in bad_role.stderr
    no_ca = vmswarm("ca", "issue", "--dir", tmp_path / "none", "--role", "host", "x")
    assert no_ca.returncode == 2
    assert no_ca.stderr.strip().endswith("ca.crt does not exist")
    bad_duration = vmswarm("ca", "issue", "--dir", ca, "--role", "host", "x", "--valid-for", "soon")
    assert bad_duration.returncode == 2 and "--valid-for" in bad_duration.stderr
    assert not (ca / "x.crt").exists()


async def test_a_ca_bundle_lets_old_and_new_certificates_in_during_rotation(
    tmp_path: Path,
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    init_ca(old)  # both keep the default name, as two `vmswarm ca init` runs would
    init_ca(new)
    issue(old, TlsRole.TRACKER, "tracker")
    issue(new, TlsRole.HOST, "host")
    with pytest.raises(TlsError, match="was not signed by the CA in"):
        tls.check_files(tls.TlsFiles(old / CA_CERT_NAME, new / "host.crt", new / "host.key"))
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes((old / CA_CERT_NAME).read_bytes() + (new / CA_CERT_NAME).read_bytes())
    server = tls.server_context(
        tls.check_files(tls.TlsFiles(bundle, old / "tracker.crt", old / "tracker.key"))
    )
    client = tls.client_context(
        tls.check_files(tls.TlsFiles(bundle, new / "host.crt", new / "host.key"))
    )
    outcome = await exchange(server, client)
    assert outcome.reply == b"PING"
