"""The asymmetric flow: key-transport certificates, sealed DEK delivery, sealed envelopes.

Real parts throughout: the project's CA issues the certificates, a real
daemon over mutual TLS keeps the directory and seals, both clients open.
"""

from __future__ import annotations

import base64
import datetime
import filecmp
import io
import json
import os
import sqlite3
import stat
from pathlib import Path

import attrs
import cbor2
import pycddl
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kmipd.audit import AuditLog
from kmipd.client import (
    CertificateRejectedError,
    Client,
    EnvelopeError,
    NotAuthorizedError,
    NoTransportCertificateError,
    SealedDeliveryRequiredError,
    SealedKeyError,
    TransportCertificateError,
    TransportCertificateRejectedError,
    TransportKey,
    UnavailableError,
)
from kmipd.client._transport import KeyDelivery, verify_fetched
from kmipd.crypto import (
    SealedEnvelopeError,
    TransportTrust,
    certificate_fingerprint,
    open_sealed,
    open_stream,
    read_header,
    seal_stream,
)
from kmipd.crypto._hpke import hpke_private_key
from kmipd.hsm import SoftwareHsm
from kmipd.protocol import (
    CreateDek,
    GetDek,
    RegisterTransportCert,
    SealedDekResult,
    TransportCertInfo,
)
from kmipd.service import Caller, KeyService, ServiceError
from kmipd.store import KeyStore, TransportCertRecord
from kmipd.store._sqlite import MIGRATIONS
from pki import (
    HYBRID_X25519_OID,
    CertificateAuthority,
    IssuedCertificate,
    PkiError,
    TransportKem,
    load_certificate,
    load_transport_keys,
)
from tests.conftest import TRUST_DOMAIN, RunningServer, ServerFactory, make_policy
from tests.processes import Daemon, run_kmipd

STORAGE = f"spiffe://{TRUST_DOMAIN}/storage"
TENANT = f"spiffe://{TRUST_DOMAIN}/tenant"


def transport_key(issued: IssuedCertificate) -> TransportKey:
    return TransportKey.from_files(issued.cert_path, issued.key_path)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# -- the CA side -------------------------------------------------------------------------


@pytest.mark.parametrize("kem", list(TransportKem))
def test_transport_certificate_is_a_separate_key_that_cannot_sign(
    ca: CertificateAuthority, kem: TransportKem
) -> None:
    issued = ca.issue_transport("storage", kem=kem)
    assert issued.name == "storage-transport"
    assert issued.cert_path.name == "storage-transport.pem"
    assert stat.S_IMODE(issued.key_path.stat().st_mode) == 0o600
    cert = load_certificate(issued.cert_path)
    tls = load_certificate(ca.directory / "storage.pem")
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == (
        tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert not usage.value.digital_signature
    assert usage.value.key_agreement is (kem is not TransportKem.MLKEM768_X25519)
    assert usage.value.key_encipherment is (kem is TransportKem.MLKEM768_X25519)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    keys = load_transport_keys(issued.key_path.read_bytes(), "key")
    assert len(keys) == (2 if kem is TransportKem.MLKEM768_X25519 else 1)
    if kem is TransportKem.MLKEM768_X25519:
        assert cert.extensions.get_extension_for_oid(HYBRID_X25519_OID).critical
    # The key is not the TLS key, and the pair checks out.
    assert der(cert) != der(tls)
    assert transport_key(issued).identity == STORAGE
    # Revocable by its recorded name.
    ca.revoke("storage-transport")
    assert cert.serial_number in ca.revoked_serials()
    assert tls.serial_number not in ca.revoked_serials()


def test_transport_certificate_needs_the_client_certificate_first(
    ca: CertificateAuthority,
) -> None:
    with pytest.raises(PkiError, match="no client TLS certificate"):
        ca.issue_transport("nobody")
    assert not (ca.directory / "nobody-transport.pem").exists()
    with pytest.raises(PkiError, match="-transport"):
        ca.issue_client("storage-transport")
    ca.issue_transport("storage")
    with pytest.raises(PkiError, match="already exists"):
        ca.issue_transport("storage")


def test_transport_key_refuses_a_key_that_does_not_match(ca: CertificateAuthority) -> None:
    first = ca.issue_transport("storage")
    other = ca.issue_transport("tenant")
    cert = load_certificate(first.cert_path)
    wrong = load_transport_keys(other.key_path.read_bytes(), "key")
    with pytest.raises(ValueError, match="does not match"):
        TransportKey(cert, wrong)
    with pytest.raises(ValueError, match="does not match"):
        TransportKey(cert, opener=lambda sealed, info: b"\x00" * 32)
    assert "PRIVATE" not in repr(transport_key(first))


# -- the directory and sealed delivery through a real daemon --------------------------------


@pytest.mark.parametrize("kem", list(TransportKem))
async def test_sealed_delivery_round_trips_in_both_clients(
    kmipd: RunningServer, kem: TransportKem
) -> None:
    key = transport_key(kmipd.ca.issue_transport("storage", kem=kem))

    def blocking() -> tuple[bytes, str, bytes]:
        with kmipd.client(transport=key) as kms:
            info = kms.register_transport_certificate()
            assert info.fingerprint == key.fingerprint
            assert info.suite == kem.value
            with kms.create_dek("orders") as created:
                first = bytes(created.key)
            with kms.get_dek(created.dek_id) as again:
                assert bytes(again.key) == first
            (batch,) = kms.get_deks([created.dek_id])
            assert bytes(batch.key) == first
            with kms.generate_data_key("orders", {"table": "t"}) as data_key:
                data = bytes(data_key.key)
                blob = data_key.blob
            with kms.unwrap(blob, {"table": "t"}) as opened:
                assert bytes(opened.key) == data
            envelope = kms.encrypt(b"hello", "orders")
            assert kms.decrypt(envelope) == b"hello"
            return first, created.dek_id, blob

    first, dek_id, _ = await trio.to_thread.run_sync(blocking)

    # The clear key seen by a client without a transport key is the same key.
    def clear() -> bytes:
        with kmipd.client() as kms, kms.get_dek(dek_id) as dek:
            return bytes(dek.key)

    assert await trio.to_thread.run_sync(clear) == first
    async with kmipd.async_client(transport=key) as kms:
        with await kms.get_dek(dek_id) as dek:
            assert bytes(dek.key) == first
        created = await kms.create_dek("orders")
        with created:
            assert len(bytes(created.key)) == 32
        data_key = await kms.generate_data_key("orders")
        with data_key, await kms.unwrap(data_key.blob) as opened:
            assert bytes(opened.key) == bytes(data_key.key)


async def test_sealed_delivery_through_a_callable_opener(kmipd: RunningServer) -> None:
    """The private key can live elsewhere (a TPM, an HSM): the client only calls it."""
    issued = kmipd.ca.issue_transport("storage", kem=TransportKem.P256)
    (private,) = load_transport_keys(issued.key_path.read_bytes(), "key")
    calls: list[bytes] = []

    def opener(sealed: bytes, info: bytes) -> bytes:
        calls.append(info)
        return open_sealed(
            TransportKem.P256, hpke_private_key(TransportKem.P256, [private]), sealed, info
        )

    key = TransportKey(load_certificate(issued.cert_path), opener=opener)
    assert "opener" not in repr(key)

    def work() -> None:
        with kmipd.client(transport=key) as kms:
            kms.register_transport_certificate()
            with kms.create_dek("orders") as dek:
                assert len(bytes(dek.key)) == 32

    await trio.to_thread.run_sync(work)
    assert len(calls) == 2  # the pair check, then the delivery
    assert b"kmipd/sealed-key/v1" in calls[1]


async def _register(kmipd: RunningServer, name: str, key: TransportKey) -> None:
    def work() -> None:
        with kmipd.client(name) as kms:
            kms.register_transport_certificate(key.certificate)

    await trio.to_thread.run_sync(work)


async def test_a_sealed_dek_opens_only_for_its_own_request(kmipd: RunningServer) -> None:
    """Another request id, identity, key, operation, certificate or one flipped bit: refused."""
    key = transport_key(kmipd.ca.issue_transport("storage"))
    await _register(kmipd, "storage", key)

    def work() -> str:
        with kmipd.client() as kms, kms.create_dek("tenant-a") as dek:
            return dek.dek_id

    dek_id = await trio.to_thread.run_sync(work)
    request = GetDek(dek_id=dek_id, seal_to=key.fingerprint)
    result = await kmipd.service.handle(Caller(STORAGE, request_id=7), request)
    assert isinstance(result, SealedDekResult)
    assert "sealed_key=<" in repr(result)  # redacted
    delivery = KeyDelivery(key)
    opened = delivery.dek(result, "get-dek", server="s", request_id=7)
    assert len(opened.key) == 32

    def refused(result: SealedDekResult, *, operation: str = "get-dek", rid: int = 7) -> str:
        with pytest.raises(SealedKeyError, match="does not open") as raised:
            KeyDelivery(key).dek(result, operation, server="s", request_id=rid)
        return str(raised.value)

    assert "request 8" in refused(result, rid=8)  # replayed into another request
    refused(result, operation="create-dek")  # another operation
    refused(attrs.evolve(result, dek_id="dek_other"))  # another key's metadata
    refused(attrs.evolve(result, kek_version=result.kek_version + 1))
    flipped = bytearray(result.sealed_key)
    flipped[-1] ^= 1
    refused(attrs.evolve(result, sealed_key=bytes(flipped)))
    flipped = bytearray(result.sealed_key)
    flipped[0] ^= 1  # inside the KEM encapsulation
    refused(attrs.evolve(result, sealed_key=bytes(flipped)))
    # Another identity with another key cannot open it, nor can the same
    # identity's next certificate.
    other = transport_key(kmipd.ca.issue_transport("tenant"))
    with pytest.raises(SealedKeyError):
        KeyDelivery(other).dek(result, "get-dek", server="s", request_id=7)
    renewed = transport_key(kmipd.ca.issue_transport("storage", force=True))
    with pytest.raises(SealedKeyError):
        KeyDelivery(renewed).dek(result, "get-dek", server="s", request_id=7)
    # The daemon seals only to the caller's own registered certificate.
    with pytest.raises(ServiceError) as denied:
        await kmipd.service.handle(Caller(TENANT, request_id=9), request)
    assert denied.value.code.wire_name == "no-transport-certificate"


def _ca_key(ca: CertificateAuthority) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(ca.ca_key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _odd_certificate(
    ca: CertificateAuthority,
    *,
    name: str = "storage",
    usage: dict[str, bool] | None = None,
    eku: bool = False,
    not_after: datetime.datetime | None = None,
    signer: ec.EllipticCurvePrivateKey | None = None,
) -> x509.Certificate:
    """A transport-looking certificate with one thing wrong, signed by the CA's key."""
    now = datetime.datetime.now(datetime.UTC)
    flags = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    flags.update(usage or {"key_agreement": True})
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(x25519.X25519PrivateKey.generate().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(not_after or now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**flags), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/{name}")]
            ),
            critical=False,
        )
    )
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(signer or _ca_key(ca), hashes.SHA256())


async def test_registration_refusals_keep_the_registered_certificate(
    kmipd: RunningServer, tmp_path: Path
) -> None:
    ca = kmipd.ca
    good = transport_key(ca.issue_transport("storage"))
    other_ca = CertificateAuthority.init(tmp_path / "other", trust_domain=TRUST_DOMAIN)
    other_ca.issue_client("storage")
    foreign = load_certificate(other_ca.issue_transport("storage").cert_path)
    tenant = load_certificate(ca.issue_transport("tenant").cert_path)
    revoked = ca.issue_transport("storage", force=True)
    ca.revoke("storage-transport")
    kmipd.server.tls = type(kmipd.server.tls).load(kmipd.server.tls.settings)  # as a new CRL
    expired_at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    cases: dict[str, tuple[x509.Certificate, str]] = {
        "wrong usage": (
            _odd_certificate(ca, usage={"key_agreement": True, "digital_signature": True}),
            "keyUsage must be exactly keyAgreement",
        ),
        "another identity": (tenant, f"names {TENANT}, not {STORAGE}"),
        "another CA": (foreign, "not issued by this CA"),
        "the TLS certificate": (
            load_certificate(ca.directory / "storage.pem"),
            "extendedKeyUsage: it is a TLS certificate",
        ),
        "a TLS EKU": (_odd_certificate(ca, eku=True), "extendedKeyUsage"),
        "expired": (_odd_certificate(ca, not_after=expired_at), "outside its validity period"),
        "revoked": (load_certificate(revoked.cert_path), "revoked"),
    }

    def work() -> dict[str, str]:
        messages = {}
        with kmipd.client() as kms:
            kms.register_transport_certificate(good.certificate)
            for what, (cert, _) in cases.items():
                with pytest.raises(TransportCertificateRejectedError) as refused:
                    kms.register_transport_certificate(cert)
                messages[what] = str(refused.value)
                # Nothing lost: the good certificate is still the registered one.
                fetched = kms.get_transport_certificate(STORAGE)
                assert certificate_fingerprint(fetched) == good.fingerprint, what
        return messages

    messages = await trio.to_thread.run_sync(work)
    for what, (_, expected) in cases.items():
        assert expected in messages[what], (what, messages[what])
        assert "the registered one (if any) stays" in messages[what]


async def test_a_transport_certificate_cannot_authenticate_tls(kmipd: RunningServer) -> None:
    issued = kmipd.ca.issue_transport("storage", kem=TransportKem.P256)

    def work() -> None:
        with (
            pytest.raises((CertificateRejectedError, UnavailableError)) as refused,
            Client(
                kmipd.address, ca=kmipd.ca.ca_cert_path, cert=issued.cert_path, key=issued.key_path
            ) as kms,
        ):
            kms.status()
        assert "extendedKeyUsage" in str(refused.value)

    await trio.to_thread.run_sync(work)
    assert kmipd.server.metrics.handshake_failures == {"no-client-auth": 1}


def test_client_side_verification_refuses_another_cas_certificate(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    other = CertificateAuthority.init(tmp_path / "other", trust_domain=TRUST_DOMAIN)
    other.issue_client("storage")
    foreign = load_certificate(other.issue_transport("storage").cert_path)
    info = TransportCertInfo(
        identity=STORAGE,
        certificate=der(foreign),
        fingerprint=certificate_fingerprint(foreign),
        suite="x25519",
        registered=0,
        not_after=0,
    )
    with pytest.raises(TransportCertificateError, match="does not verify against this client's CA"):
        verify_fetched(info, STORAGE, [ca.certificate], server="s")
    mine = load_certificate(ca.issue_transport("storage").cert_path)
    good = attrs.evolve(info, certificate=der(mine), fingerprint=certificate_fingerprint(mine))
    assert verify_fetched(good, STORAGE, [ca.certificate], server="s") == mine
    with pytest.raises(TransportCertificateError, match="names"):
        verify_fetched(good, TENANT, [ca.certificate], server="s")
    with pytest.raises(TransportCertificateError, match="fingerprint"):
        verify_fetched(
            attrs.evolve(good, fingerprint=b"\x00" * 32), STORAGE, [ca.certificate], server="s"
        )


async def test_namespace_policy_requires_sealed_delivery(kmipd: RunningServer) -> None:
    kmipd.service.require_sealed = ("secret", "secret/*")
    key = transport_key(kmipd.ca.issue_transport("storage"))
    await _register(kmipd, "storage", key)

    def work() -> None:
        with kmipd.client(transport=key) as sealed, kmipd.client() as clear:
            with pytest.raises(SealedDeliveryRequiredError, match="only sealed"):
                clear.create_dek("secret")
            with pytest.raises(SealedDeliveryRequiredError):
                clear.generate_data_key("secret/x")
            with sealed.create_dek("secret") as dek:
                dek_id = dek.dek_id
            with sealed.generate_data_key("secret/x") as data_key:
                blob = data_key.blob
            for _ in range(2):  # the second get is answered inline (handle_now)
                with pytest.raises(SealedDeliveryRequiredError):
                    clear.get_dek(dek_id)
                with sealed.get_dek(dek_id) as dek:
                    assert len(bytes(dek.key)) == 32
            with pytest.raises(SealedDeliveryRequiredError):
                clear.unwrap(blob)
            with sealed.unwrap(blob) as opened:
                assert len(bytes(opened.key)) == 32
            # Other namespaces are unaffected.
            with clear.create_dek("orders") as dek:
                assert len(bytes(dek.key)) == 32

    await trio.to_thread.run_sync(work)
    # The refused creates made nothing: one DEK in "secret", one in "orders".
    assert await kmipd.store.count_deks() == 2


async def test_no_transport_certificate_is_a_clear_error(kmipd: RunningServer) -> None:
    key = transport_key(kmipd.ca.issue_transport("storage"))

    def work() -> None:
        with kmipd.client(transport=key) as kms:
            with pytest.raises(NoTransportCertificateError, match="register one first"):
                kms.create_dek("orders")
            with pytest.raises(NoTransportCertificateError, match="has no registered"):
                kms.get_transport_certificate(TENANT)
            kms.register_transport_certificate()
            # Replaced by a newer certificate: the old fingerprint is refused.
            kms.register_transport_certificate(
                load_certificate(kmipd.ca.issue_transport("storage", force=True).cert_path)
            )
            with pytest.raises(NoTransportCertificateError, match="replaced meanwhile"):
                kms.create_dek("orders")

    await trio.to_thread.run_sync(work)
    assert await kmipd.store.count_deks() == 0


async def test_the_directory_answers_only_clients_with_a_grant(kmipd: RunningServer) -> None:
    """Registering one's own certificate is open to all; looking others up needs a grant
    of get-transport-cert, or any client of the CA could list which identities exist."""
    kmipd.ca.issue_client("outsider")  # a valid certificate, and no grant at all
    await _register(kmipd, "storage", transport_key(kmipd.ca.issue_transport("storage")))
    outsider_key = transport_key(kmipd.ca.issue_transport("outsider"))

    def work() -> None:
        with kmipd.client("outsider") as kms:
            kms.register_transport_certificate(outsider_key.certificate)
            with pytest.raises(NotAuthorizedError, match="not allowed get-transport-cert"):
                kms.get_transport_certificate(STORAGE)
        with kmipd.client("tenant") as kms:  # data in its own namespace only: enough
            assert kms.get_transport_certificate(STORAGE) is not None
            kms.get_transport_certificate(STORAGE.replace("storage", "outsider"))

    await trio.to_thread.run_sync(work)


async def test_revocation_stops_fetches_and_seals(start_server: ServerFactory) -> None:
    """The CRL the daemon picks up for TLS (or on reload) is the one transport checks use."""
    kmipd = await start_server(crl_check_interval=0)
    key = transport_key(kmipd.ca.issue_transport("storage"))
    await _register(kmipd, "storage", key)
    kmipd.ca.revoke("storage-transport")  # no reload: the next connection brings the new CRL

    def work() -> None:
        with kmipd.client(transport=key) as kms:
            with pytest.raises(TransportCertificateRejectedError, match="revoked"):
                kms.create_dek("orders")
            with pytest.raises(TransportCertificateRejectedError, match="revoked"):
                kms.get_transport_certificate(STORAGE)

    await trio.to_thread.run_sync(work)


# -- the store ------------------------------------------------------------------------------


def test_migration_4_adds_the_directory_and_keeps_the_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("".join(MIGRATIONS[:3]) + "PRAGMA user_version = 3;")
    db.execute("INSERT INTO keks (name, created_at, created_by) VALUES ('orders', 1, 'me')")
    db.commit()
    db.close()
    store = KeyStore.open(path)
    try:
        assert store.get_kek("orders") is not None
        assert store.get_transport_cert(STORAGE) is None
    finally:
        store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
    db.close()


async def test_shared_stores_see_each_others_registrations(tmp_path: Path) -> None:
    first = KeyStore.open(tmp_path / "s.db", shared=True)
    second = KeyStore.open(tmp_path / "s.db", shared=True)
    try:
        record = TransportCertRecord(STORAGE, b"cert", b"\x01" * 32, 5)
        await first.put_transport_cert(record)
        assert second.get_transport_cert(STORAGE) is None
        await second.refresh_if_changed()
        assert second.get_transport_cert(STORAGE) == record
        await first.put_transport_cert(attrs.evolve(record, fingerprint=b"\x02" * 32))
        await second.refresh_if_changed()
        found = second.get_transport_cert(STORAGE)
        assert found is not None
        assert found.fingerprint == b"\x02" * 32
    finally:
        first.close()
        second.close()


# -- the command line -----------------------------------------------------------------------


@pytest.mark.slow
def test_cli_seal_open_a_large_file_and_refuse_damage(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    daemon = Daemon("--dev", "--data", data_dir, "--listen", "127.0.0.1:0", log=tmp_path / "d.log")
    try:
        pki = data_dir / "pki"
        for name, kem in (("storage", "mlkem768-x25519"), ("admin", "p256")):
            issued = run_kmipd("pki", "issue-transport", pki, name, "--kem", kem)
            assert issued.returncode == 0, issued.stderr
            assert f"{name}-transport-key.pem" in issued.stdout

        def connection(name: str) -> list[str | Path]:
            return [
                "--server",
                daemon.address,
                "--ca",
                pki / "ca.pem",
                "--cert",
                pki / f"{name}.pem",
                "--key",
                pki / f"{name}-key.pem",
            ]

        storage_key = ["--transport-cert", pki / "storage-transport.pem"]
        storage_key += ["--transport-key", pki / "storage-transport-key.pem"]
        registered = run_kmipd("transport", "register", *connection("storage"), *storage_key)
        assert registered.returncode == 0, registered.stderr
        assert '"suite": "mlkem768-x25519"' in registered.stdout
        # The TLS certificate is refused as a transport certificate, with the reason.
        wrong = run_kmipd("transport", "register", pki / "admin.pem", *connection("admin"))
        assert wrong.returncode == 1
        assert "TLS certificate" in wrong.stderr
        fetched = run_kmipd("transport", "get", "storage", *connection("admin"))
        assert fetched.returncode == 0, fetched.stderr
        assert '"verified": "against this client' in fetched.stdout

        # Sealed delivery from the dek command: the same key as in the clear.
        created = run_kmipd(
            "dek",
            "create",
            "--namespace",
            "orders",
            "--reveal",
            *connection("storage"),
            *storage_key,
        )
        assert created.returncode == 0, created.stderr
        dek = json.loads(created.stdout)
        clear = run_kmipd("dek", "get", dek["dek_id"], "--reveal", *connection("storage"))
        assert json.loads(clear.stdout)["key"] == dek["key"]

        plain = tmp_path / "big.bin"
        with plain.open("wb") as out:
            for _ in range(24):
                out.write(os.urandom(1 << 20))
        sealed = tmp_path / "big.sealed"
        made = run_kmipd("seal", "--to", "storage", plain, "-o", sealed, *connection("admin"))
        assert made.returncode == 0, made.stderr
        assert stat.S_IMODE(sealed.stat().st_mode) == 0o600
        back = tmp_path / "back.bin"
        opened = run_kmipd("open", sealed, "-o", back, *storage_key)
        assert opened.returncode == 0, opened.stderr
        assert stat.S_IMODE(back.stat().st_mode) == 0o600
        assert filecmp.cmp(back, plain, shallow=False)

        # Cut short, or one bit changed: a clear error, and no output file at all.
        cut = tmp_path / "cut.sealed"
        cut.write_bytes(sealed.read_bytes()[: sealed.stat().st_size // 2])
        refused = run_kmipd("open", cut, "-o", tmp_path / "out.bin", *storage_key)
        assert refused.returncode == 1
        assert "truncated" in refused.stderr
        assert "out.bin was not written" in refused.stderr
        damaged = bytearray(sealed.read_bytes())
        damaged[len(damaged) // 2] ^= 1
        (tmp_path / "damaged.sealed").write_bytes(bytes(damaged))
        refused = run_kmipd(
            "open", tmp_path / "damaged.sealed", "-o", tmp_path / "out.bin", *storage_key
        )
        assert refused.returncode == 1
        assert "does not authenticate" in refused.stderr
        assert not (tmp_path / "out.bin").exists()
        assert not list(tmp_path.glob(".out.bin*"))
        # Another client's key cannot open it.
        admin_key = ["--transport-cert", pki / "admin-transport.pem"]
        admin_key += ["--transport-key", pki / "admin-transport-key.pem"]
        other = run_kmipd("open", sealed, "-o", tmp_path / "out.bin", *admin_key)
        assert other.returncode == 1
        assert "not to this key" in other.stderr
        assert not (tmp_path / "out.bin").exists()
        # Nothing lost: the original envelope still opens.
        again = run_kmipd("open", sealed, "-o", back, *storage_key)
        assert again.returncode == 0, again.stderr
    finally:
        assert daemon.stop() == 0


# -- the sealed envelope --------------------------------------------------------------------


@pytest.fixture
def recipient(ca: CertificateAuthority) -> TransportKey:
    return transport_key(ca.issue_transport("storage"))


def _sealed(recipient: TransportKey, data: bytes, chunk_size: int = 1024) -> bytes:
    sink = io.BytesIO()
    assert seal_stream(recipient.certificate, io.BytesIO(data), sink, chunk_size=chunk_size) == len(
        data
    )
    return sink.getvalue()


def _open(recipient: TransportKey, envelope: bytes) -> bytes:
    sink = io.BytesIO()
    open_stream(recipient, io.BytesIO(envelope), sink)
    return sink.getvalue()


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 5000])
def test_envelope_round_trips_at_chunk_boundaries(recipient: TransportKey, size: int) -> None:
    data = os.urandom(size)
    envelope = _sealed(recipient, data)
    assert _open(recipient, envelope) == data
    # One self-described CBOR item: the tag, then the header and the chunks.
    decoded = cbor2.loads(envelope)
    assert set(decoded) == {"header", "chunks"}
    assert envelope[:3] == b"\xd9\xd9\xf7"
    header, encoded = read_header(io.BytesIO(envelope))
    assert cbor2.loads(decoded["header"]) == cbor2.loads(encoded)
    assert header.recipient == STORAGE
    assert header.recipient_fingerprint == recipient.fingerprint
    assert len(decoded["chunks"]) == max(1, -(-size // 1024))


def test_envelope_refuses_every_damage_with_a_clear_message(recipient: TransportKey) -> None:
    data = os.urandom(3000)
    envelope = _sealed(recipient, data)
    _, encoded = read_header(io.BytesIO(envelope))
    start = envelope.index(encoded)
    cases = {
        "not an envelope": (b"hello world, this is not sealed", "not a kmipd sealed envelope"),
        "cut in the header": (envelope[: start + 10], "truncated inside the header"),
        "cut in a chunk": (envelope[:-40], "truncated inside a chunk"),
        "last chunk dropped": (
            # the last chunk (952 + 16 bytes, a 3-byte bstr head) and the break, cut
            envelope[: -(3 + 952 + 16 + 1)] + b"\xff",
            "does not authenticate",
        ),
        "data after the end": (envelope + b"\x00", "data after its end"),
        "header bit flipped": (
            envelope[: start + len(encoded) - 1]
            + bytes([envelope[start + len(encoded) - 1] ^ 1])
            + envelope[start + len(encoded) :],
            "",
        ),
        "body bit flipped": (
            envelope[:-100] + bytes([envelope[-100] ^ 1]) + envelope[-99:],
            "does not authenticate",
        ),
    }
    for what, (damaged, expected) in cases.items():
        with pytest.raises(SealedEnvelopeError) as refused:
            _open(recipient, damaged)
        assert expected in str(refused.value), (what, str(refused.value))
    # Nothing lost: the intact envelope still opens.
    assert _open(recipient, envelope) == data


def test_envelope_checks_a_chunk_length_before_reading_it(recipient: TransportKey) -> None:
    """A forged length (4 GiB) is refused at once, never allocated or read."""
    envelope = _sealed(recipient, b"")
    _, encoded = read_header(io.BytesIO(envelope))
    head = envelope[: envelope.index(encoded) + len(encoded) + len(b"\x66chunks\x9f")]
    forged = head + b"\x5a\xff\xff\xff\xff"
    with pytest.raises(SealedEnvelopeError, match="a chunk of 4294967295 bytes"):
        _open(recipient, forged)


def test_envelope_chunk_size_is_bounded(recipient: TransportKey) -> None:
    for size in (1023, 1024 * 1024 + 1):
        with pytest.raises(SealedEnvelopeError, match="chunk_size"):
            _sealed(recipient, b"x", chunk_size=size)


async def test_async_client_seals_and_opens(kmipd: RunningServer) -> None:
    storage = transport_key(kmipd.ca.issue_transport("storage"))
    await _register(kmipd, "storage", storage)
    async with kmipd.async_client("admin") as sender:
        envelope = await sender.seal(b"for storage only", STORAGE)
        with pytest.raises(NoTransportCertificateError):
            await sender.seal(b"x", TENANT)
    async with kmipd.async_client(transport=storage) as receiver:
        assert await receiver.open(envelope) == b"for storage only"
    tenant = transport_key(kmipd.ca.issue_transport("tenant"))
    async with kmipd.async_client("tenant", transport=tenant) as other:
        with pytest.raises(EnvelopeError, match="not to this key"):
            await other.open(envelope)


# -- the schema -----------------------------------------------------------------------------

SCHEMA_TEXT = (Path(__file__).parent.parent / "conformance" / "protocol.cddl").read_text()


async def test_real_transport_messages_and_envelopes_match_the_cddl(kmipd: RunningServer) -> None:
    messages = pycddl.Schema(SCHEMA_TEXT)
    key = transport_key(kmipd.ca.issue_transport("storage", kem=TransportKem.MLKEM768_X25519))
    raw = await kmipd.raw("storage")
    requests = [
        {"id": 1, "op": "register-transport-cert", "args": {"certificate": der(key.certificate)}},
        {"id": 2, "op": "get-transport-cert", "args": {"identity": STORAGE}},
        {"id": 3, "op": "create-dek", "args": {"namespace": "orders", "seal-to": key.fingerprint}},
        {"id": 4, "op": "generate-data-key", "args": {"kek": "orders", "seal-to": key.fingerprint}},
        {"id": 5, "op": "get-transport-cert", "args": {"identity": TENANT}},
        {"id": 6, "op": "register-transport-cert", "args": {"certificate": b"not a cert"}},
    ]
    responses = {}
    for request in requests:
        messages.validate_cbor(cbor2.dumps(request))
        await raw.send(request)
        response = await raw.receive()
        messages.validate_cbor(cbor2.dumps(response))
        responses[response["id"]] = response
    assert set(responses[3]["result"]) == {"dek-id", "namespace", "kek-version", "sealed-key"}
    blob = responses[4]["result"]["blob"]
    for request in (
        {
            "id": 7,
            "op": "get-dek",
            "args": {"dek-id": responses[3]["result"]["dek-id"], "seal-to": key.fingerprint},
        },
        {"id": 8, "op": "unwrap", "args": {"blob": blob, "seal-to": key.fingerprint}},
    ):
        messages.validate_cbor(cbor2.dumps(request))
        await raw.send(request)
        response = await raw.receive()
        messages.validate_cbor(cbor2.dumps(response))
        assert "sealed-key" in response["result"]
    assert responses[5]["error"]["name"] == "no-transport-certificate"
    assert responses[6]["error"]["name"] == "transport-certificate-rejected"
    await raw.aclose()
    envelope = _sealed(key, os.urandom(5000))
    pycddl.Schema("root = sealed-envelope\n" + SCHEMA_TEXT).validate_cbor(envelope)
    _, encoded = read_header(io.BytesIO(envelope))
    pycddl.Schema("root = sealed-envelope-header\n" + SCHEMA_TEXT).validate_cbor(encoded)


# -- the audit trail ------------------------------------------------------------------------


async def test_registrations_and_sealed_deliveries_are_audited_without_keys(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    service = KeyService(
        store=KeyStore.open(tmp_path / "kmipd.db"),
        hsm=SoftwareHsm.open(tmp_path / "master.key", tmp_path / "keyring.cbor", create=True),
        policy=make_policy(),
        create_kek_on_demand=True,
        audit=AuditLog.open(tmp_path / "audit.log", tmp_path / "audit.key"),
        transport_trust=TransportTrust(ca.certificate, TRUST_DOMAIN),
    )
    key = transport_key(ca.issue_transport("storage"))
    try:
        await service.handle(Caller(STORAGE, 1), RegisterTransportCert(der(key.certificate)))
        tls = load_certificate(ca.directory / "storage.pem")
        with pytest.raises(ServiceError):
            await service.handle(Caller(STORAGE, 2), RegisterTransportCert(der(tls)))
        sealed = await service.handle(
            Caller(STORAGE, 3), CreateDek(namespace="orders", seal_to=key.fingerprint)
        )
        opened = KeyDelivery(key).dek(sealed, "create-dek", server="s", request_id=3)
    finally:
        service.store.close()
        service.hsm.close()
        assert service.audit is not None
        service.audit.close()
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(r["operation"], r["result"], r["request_id"]) for r in records] == [
        ("register-transport-cert", "ok", 1),
        ("register-transport-cert", "transport-certificate-rejected", 2),
        ("create-dek", "ok", 3),
    ]
    assert "sealed" in records[2]["detail"]
    text = (tmp_path / "audit.log").read_bytes()
    for secret in (opened.key, sealed.sealed_key):
        assert secret.hex().encode() not in text
        assert base64.b64encode(secret) not in text
