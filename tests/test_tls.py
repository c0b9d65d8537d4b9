"""Mutual TLS: every refusal, the alert that says why, and nobody else disturbed."""

from __future__ import annotations

import datetime
import select
import socket
import ssl
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kmipd.client import (
    CertificateRejectedError,
    Client,
    KmipdError,
    ServerCertificateError,
    UnavailableError,
    client_context,
)
from kmipd.client._tls import shared_client_context
from kmipd.net._trio_tls import TlsHandshakeError
from kmipd.protocol import NEED_DATA, ClientConnection, ConnectionFailed
from pki import CertificateAuthority
from tests.conftest import TRUST_DOMAIN, RawConnection, RunningServer, ServerFactory, credentials

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


async def status_with(kmipd: RunningServer, cert: Path, key: Path, **kwargs: object) -> None:
    def call() -> None:
        with Client(kmipd.address, ca=kmipd.ca.ca_cert_path, cert=cert, key=key, **kwargs) as kms:
            kms.status()

    await trio.to_thread.run_sync(call)


async def assert_server_still_serves(kmipd: RunningServer) -> None:
    async with kmipd.async_client() as kms:
        assert (await kms.status()).state == "serving"


async def test_client_from_another_ca_gets_unknown_ca(kmipd: RunningServer, tmp_path: Path) -> None:
    rogue = CertificateAuthority.init(tmp_path / "rogue", trust_domain=TRUST_DOMAIN)
    intruder = rogue.issue_client("storage")  # same name, same trust domain: still refused
    with pytest.raises(CertificateRejectedError, match="does not trust the CA"):
        await status_with(kmipd, intruder.cert_path, intruder.key_path)
    await assert_server_still_serves(kmipd)


async def test_expired_client_certificate_is_refused(kmipd: RunningServer) -> None:
    old = kmipd.ca.issue_client("old", not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    with pytest.raises(CertificateRejectedError, match="expired"):
        await status_with(kmipd, old.cert_path, old.key_path)
    await assert_server_still_serves(kmipd)


async def test_revoked_client_certificate_is_refused_without_a_reload(
    start_server: ServerFactory,
) -> None:
    kmipd = await start_server(crl_check_interval=0)
    kmipd.ca.issue_client("leaver")
    cert, key = kmipd.ca.directory / "leaver.pem", kmipd.ca.directory / "leaver-key.pem"
    await status_with(kmipd, cert, key)  # works before revocation
    kmipd.ca.revoke("leaver")
    # The server notices the new CRL file when the next client connects.
    with pytest.raises(CertificateRejectedError, match="revoked"):
        await status_with(kmipd, cert, key)
    await assert_server_still_serves(kmipd)


def _hello_over_tls(
    address: str, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[ssl.SSLSession | None, bool, str]:
    """One connection, one hello: (its session, whether it was resumed, what happened)."""
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host, session=session) as sock,
    ):
        protocol = ClientConnection()
        _, hello = protocol.start()
        try:
            sock.sendall(hello)
            while (event := protocol.next_event()) is NEED_DATA:
                data = sock.recv(65536)
                if not data:
                    return sock.session, sock.session_reused, "closed"
                protocol.receive_data(data)
        except ssl.SSLError as exc:
            return None, sock.session_reused, f"alert: {exc}"
        if isinstance(event, ConnectionFailed):
            return None, sock.session_reused, f"refused: {event.error.message}"
        return sock.session, sock.session_reused, "served"


async def test_a_resumed_tls_session_is_checked_for_revocation_too(
    start_server: ServerFactory,
) -> None:
    """DESIGN.md 4a: a resumed session is not verified again by OpenSSL.

    A new CRL is loaded with a new TLS context, and the ticket keys go with
    it: the revoked client's ticket no longer resumes, its next connection is
    a full handshake, refused with the revoked alert. (A session that does
    resume is checked after the handshake like any other: verify_peer.)
    """
    kmipd = await start_server(crl_check_interval=0, session_tickets=2)
    kmipd.ca.issue_client("leaver")
    context = client_context(**credentials(kmipd.ca, "leaver"))
    first, resumed, what = await trio.to_thread.run_sync(
        _hello_over_tls, kmipd.address, context, None
    )
    assert (resumed, what) == (False, "served") and first is not None
    again, resumed, what = await trio.to_thread.run_sync(
        _hello_over_tls, kmipd.address, context, first
    )
    assert (resumed, what) == (True, "served")  # tickets work: this one skipped the handshake
    kmipd.ca.revoke("leaver")
    _, resumed, what = await trio.to_thread.run_sync(_hello_over_tls, kmipd.address, context, again)
    assert not resumed and "revoked" in what and not what.startswith("served")
    await assert_server_still_serves(kmipd)


async def test_a_pooled_client_resumes_its_session_when_it_reconnects(
    start_server: ServerFactory,
) -> None:
    """A client whose idle connection the daemon closed reconnects with its ticket.

    Not after a certificate change: a session resumed from before a renewal
    would present the old certificate again (and keep it, ticket after ticket).
    """
    kmipd = await start_server(session_tickets=2, idle_timeout=0.5)

    def wait_until_closed_by_the_daemon(kms: Client) -> None:
        (pool,) = kms._pools.values()
        (idle,) = pool._idle
        # Readable: the daemon's idle-timeout notice or its close, nothing else.
        readable, _, _ = select.select([idle.sock], [], [], 30)
        assert readable

    def run() -> list[bool]:
        resumed = []
        with Client(kmipd.address, **credentials(kmipd.ca, "storage"), pool_size=1) as kms:
            resumed.append(kms.connect().resumed)
            for _ in range(2):
                wait_until_closed_by_the_daemon(kms)
                resumed.append(kms.connect().resumed)
            kms._certificate_changed()  # what a renewal does once its files are written
            wait_until_closed_by_the_daemon(kms)
            resumed.append(kms.connect().resumed)
            assert kms.status().state == "serving"
        return resumed

    assert await trio.to_thread.run_sync(run) == [False, True, True, False]
    # Without tickets there is nothing to resume: every reconnection is a full handshake.
    plain = await start_server(idle_timeout=0.5)

    def run_plain() -> list[bool]:
        with Client(plain.address, **credentials(plain.ca, "storage"), pool_size=1) as kms:
            first = kms.connect().resumed
            wait_until_closed_by_the_daemon(kms)
            return [first, kms.connect().resumed]

    assert await trio.to_thread.run_sync(run_plain) == [False, False]


async def test_certificate_for_server_use_cannot_authenticate_a_client(
    kmipd: RunningServer,
) -> None:
    wrong = kmipd.ca.issue_client(
        "wrong-eku", extended_key_usages=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    with pytest.raises(CertificateRejectedError, match="clientAuth"):
        await status_with(kmipd, wrong.cert_path, wrong.key_path)
    # The server's own certificate (serverAuth only) is refused as a client too.
    with pytest.raises(CertificateRejectedError, match="clientAuth"):
        await status_with(kmipd, kmipd.ca.server_cert_path, kmipd.ca.server_key_path)


async def test_certificate_without_any_eku_is_refused_after_the_handshake(
    kmipd: RunningServer,
) -> None:
    bare = kmipd.ca.issue_client("bare", extended_key_usages=[])
    with pytest.raises(CertificateRejectedError, match="no extendedKeyUsage"):
        await status_with(kmipd, bare.cert_path, bare.key_path)
    await assert_server_still_serves(kmipd)


async def test_client_without_a_certificate_gets_certificate_required(
    kmipd: RunningServer,
) -> None:
    context = ssl.create_default_context(cafile=str(kmipd.ca.ca_cert_path))
    raw = await RawConnection.open(kmipd.address, kmipd.ca, "storage", context=context)
    # TLS 1.3: the client's handshake completes before the server verifies;
    # the alert arrives on the first read, and it says what went wrong
    # (trio's SSLStream would have dropped it and left a bare EOF).
    await raw.send({"id": 1, "op": "status"})
    with pytest.raises(ssl.SSLError) as caught:
        await raw.receive()
    await raw.aclose()
    assert caught.value.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    await assert_server_still_serves(kmipd)


async def test_server_name_mismatch_is_refused_by_the_client(kmipd: RunningServer) -> None:
    storage = credentials(kmipd.ca, "storage")
    with pytest.raises(ServerCertificateError, match=r"wrong\.example"):
        await status_with(kmipd, storage["cert"], storage["key"], server_hostname="wrong.example")


async def test_server_from_another_ca_is_refused_by_the_client(
    kmipd: RunningServer, tmp_path: Path
) -> None:
    other = CertificateAuthority.init(tmp_path / "other")
    storage = credentials(kmipd.ca, "storage")

    def call() -> None:
        with Client(
            kmipd.address, ca=other.ca_cert_path, cert=storage["cert"], key=storage["key"]
        ) as kms:
            kms.status()

    with pytest.raises(ServerCertificateError, match="did not verify"):
        await trio.to_thread.run_sync(call)


async def test_client_identity_must_be_one_spiffe_id_in_our_trust_domain(
    kmipd: RunningServer, ca: CertificateAuthority, tmp_path: Path
) -> None:
    # Signed by our CA, valid for clientAuth, but naming another trust domain.
    cert, key = sign_client_certificate(ca, tmp_path, "spiffe://elsewhere.test/stranger")
    with pytest.raises(CertificateRejectedError, match="trust domain"):
        await status_with(kmipd, cert, key)
    two_ids = sign_client_certificate(
        ca, tmp_path, "spiffe://kmipd.test/a", "spiffe://kmipd.test/b"
    )
    with pytest.raises(CertificateRejectedError, match="exactly one"):
        await status_with(kmipd, *two_ids)


def sign_client_certificate(ca: CertificateAuthority, tmp: Path, *uris: str) -> tuple[Path, Path]:
    """A certificate the pki package would never issue, signed with our CA's key."""
    ca_key = serialization.load_pem_private_key(ca.ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"odd{len(uris)}.pem", tmp / f"odd{len(uris)}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_2]
)
async def test_tls_below_1_3_is_refused_by_default(
    kmipd: RunningServer, version: ssl.TLSVersion
) -> None:
    context = client_context(**credentials(kmipd.ca, "storage"), allow_tls12=True)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer old versions
    context.minimum_version = version
    context.maximum_version = version
    with pytest.raises(TlsHandshakeError) as caught:
        await RawConnection.open(kmipd.address, kmipd.ca, "storage", context=context)
    assert caught.value.reason in {"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL"}
    await assert_server_still_serves(kmipd)


async def test_tls12_when_enabled_offers_only_ecdhe_aead(start_server: ServerFactory) -> None:
    kmipd = await start_server(allow_tls12=True)
    context = client_context(**credentials(kmipd.ca, "storage"), allow_tls12=True)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    raw = await RawConnection.open(kmipd.address, kmipd.ca, "storage", context=context)
    cipher, version, _ = raw.channel.ssl_object.cipher() or ("", "", 0)
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)
    await raw.aclose()
    cbc = client_context(**credentials(kmipd.ca, "storage"), allow_tls12=True)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA:AES128-GCM-SHA256")
    with pytest.raises(TlsHandshakeError) as caught:
        await RawConnection.open(kmipd.address, kmipd.ca, "storage", context=cbc)
    assert caught.value.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"


async def test_a_client_stalled_in_the_handshake_does_not_hold_up_others(
    start_server: ServerFactory,
) -> None:
    kmipd = await start_server(handshake_timeout=0.5)
    host, _, port = kmipd.address.rpartition(":")
    stalled = await trio.open_tcp_stream(host, int(port))  # TCP only: no ClientHello
    await assert_server_still_serves(kmipd)  # served while the other is stuck
    with trio.fail_after(5):
        assert await stalled.receive_some(100) == b""  # then the stalled one is dropped
    await stalled.aclose()


async def test_ipv6_loopback_works(start_server: ServerFactory) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    kmipd = await start_server(host="::1")
    async with kmipd.async_client() as kms:
        assert (await kms.status()).state == "serving"


async def test_unreachable_server_is_unavailable(ca: CertificateAuthority) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connections are refused

        def call() -> None:
            with Client(f"127.0.0.1:{port}", **credentials(ca, "storage")) as kms:
                kms.status()

        with pytest.raises(UnavailableError, match="cannot connect"):
            await trio.to_thread.run_sync(call)


@pytest.mark.parametrize("group", ["X448", "secp521r1", "secp384r1", "X25519"])
async def test_key_exchange_is_p256_only(kmipd: RunningServer, group: str) -> None:
    # Mozilla's "modern" profile forbids X448 and secp521r1 (OpenSSL's defaults
    # offer them); Python 3.11 can set one group only, so the server offers P-256.
    context = client_context(**credentials(kmipd.ca, "storage"))
    context.set_ecdh_curve(group)
    with pytest.raises(TlsHandshakeError) as refused:
        await RawConnection.open(kmipd.address, kmipd.ca, "storage", context=context)
    assert refused.value.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"
    await assert_server_still_serves(kmipd)


async def test_a_client_leading_with_an_x25519_key_share_still_connects(
    kmipd: RunningServer,
) -> None:
    # OpenSSL clients send an X25519 key share first; the server asks again for P-256.
    raw = await RawConnection.open(kmipd.address, kmipd.ca, "storage")
    await raw.send({"id": 0, "op": "hello", "args": {"versions": [1]}})
    assert "result" in await raw.receive()
    await raw.aclose()


async def test_clients_from_the_same_files_share_a_context_until_a_file_is_replaced(
    kmipd: RunningServer, tmp_path: Path
) -> None:
    good = kmipd.ca.issue_client("sharer")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(good.cert_path.read_bytes())
    key.write_bytes(good.key_path.read_bytes())
    files = {"ca": kmipd.ca.ca_cert_path, "cert": cert, "key": key}
    first = shared_client_context(**files)
    assert shared_client_context(**files) is first  # loaded once
    await status_with(kmipd, cert, key)
    # The same paths, other contents (as a renewal writes them): loaded afresh,
    # so the next Client presents what is in the files now, here an expired one.
    old = kmipd.ca.issue_client("sharer-old", not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    cert.write_bytes(old.cert_path.read_bytes())
    key.write_bytes(old.key_path.read_bytes())
    assert shared_client_context(**files) is not first
    with pytest.raises(CertificateRejectedError, match="expired"):
        await status_with(kmipd, cert, key)
    # A file that cannot be loaded says so, and nothing is kept for it.
    key.write_bytes(b"not a key")
    with pytest.raises(KmipdError, match="cannot load client certificate"):
        shared_client_context(**files)
    with pytest.raises(KmipdError, match="cannot load client certificate"):
        shared_client_context(**files)
    await assert_server_still_serves(kmipd)
