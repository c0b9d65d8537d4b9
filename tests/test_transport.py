"""The asymmetric flow: key-transport certificates, sealed DEK delivery, sealed envelopes.

Real parts throughout: the project's CA issues the certificates, a real
daemon over mutual TLS keeps the directory and seals, both clients open.
"""

from __future__ import annotations

import datetime
import io
import ssl
import stat
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kmipd.client import (
    CertificateRejectedError,
    EnvelopeError,
    KmipdError,
    NotFoundError,
    NoTransportCertificateError,
    SealedDeliveryRequiredError,
    SealedKeyError,
    TransportCertificateError,
    TransportCertificateRejectedError,
    TransportKey,
    UnavailableError,
)
from kmipd.client._transport import SealedDelivery, verify_fetched
from kmipd.crypto import (
    HpkeError,
    SealedEnvelopeError,
    TransportTrust,
    certificate_fingerprint,
    check_transport_certificate,
    open_sealed,
    open_stream,
    read_header,
    seal_stream,
)
from kmipd.crypto._hpke import hpke_private_key
from kmipd.protocol import GetDek, SealedDekResult, TransportCertInfo
from kmipd.service import Caller, ServiceError
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
from tests.conftest import TRUST_DOMAIN, RunningServer, ServerFactory, credentials

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

    first, dek_id, blob = await trio.to_thread.run_sync(blocking)

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
        with await kms.generate_data_key("orders") as data_key:
            with await kms.unwrap(data_key.blob) as opened:
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
