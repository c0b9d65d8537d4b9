"""The rules a key-transport certificate must meet, shared by the daemon and the client.

The daemon applies them when a client registers a certificate, and again
(validity, CRL) on every fetch and every sealed delivery; the client applies
them to a certificate it fetched, against its own CA, before sealing to it.
"""

from __future__ import annotations

import datetime
import hashlib

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.hpke import MLKEM768X25519PublicKey
from cryptography.x509.oid import ExtensionOID

from pki import HYBRID_X25519_OID, TransportKem

#: A DER certificate larger than this is refused before parsing (an ML-KEM one is ~1.5 KiB).
MAX_CERTIFICATE_SIZE = 8192
#: Extensions a transport certificate may mark critical.
_KNOWN_CRITICAL = frozenset(
    {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, HYBRID_X25519_OID}
)
_SKEW = datetime.timedelta(minutes=5)


class TransportCertError(Exception):
    """The certificate is not an acceptable key-transport certificate; says why."""


@attrs.frozen
class TransportTrust:
    """What a transport certificate is checked against: the CA, and (daemon side) the CRL."""

    ca_cert: x509.Certificate = attrs.field(repr=False)
    #: None on the client side: it checks the identity it asked for instead.
    trust_domain: str | None = None
    revoked: frozenset[int] = frozenset()


def parse_certificate(der: bytes) -> x509.Certificate:
    if len(der) > MAX_CERTIFICATE_SIZE:
        raise TransportCertError(f"certificate of {len(der)} bytes; at most {MAX_CERTIFICATE_SIZE}")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise TransportCertError("not a DER X.509 certificate") from None


def certificate_fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the DER certificate: how requests name the key to seal to."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def certificate_identity(cert: x509.Certificate) -> str:
    """The single spiffe:// URI SAN (the X.509-SVID shape)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise TransportCertError("the certificate names no identity (no URI SAN)") from None
    except ValueError:
        raise TransportCertError("the certificate's extensions do not parse") from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or not uris[0].startswith("spiffe://") or len(sans) != 1:
        raise TransportCertError("the certificate must carry exactly one spiffe:// URI SAN")
    return uris[0]


def _hybrid_x25519(cert: x509.Certificate) -> x25519.X25519PublicKey | None:
    try:
        ext = cert.extensions.get_extension_for_oid(HYBRID_X25519_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    assert isinstance(value, x509.UnrecognizedExtension)
    raw = value.value
    if not ext.critical or len(raw) != 34 or raw[:2] != b"\x04\x20":
        raise TransportCertError("the hybrid X25519 extension is malformed or not critical")
    return x25519.X25519PublicKey.from_public_bytes(raw[2:])


def transport_kem(cert: x509.Certificate) -> TransportKem:
    """The certificate's key type, from its public key (and the hybrid extension)."""
    public = cert.public_key()
    hybrid = _hybrid_x25519(cert)
    if isinstance(public, mlkem.MLKEM768PublicKey) and hybrid is not None:
        return TransportKem.MLKEM768_X25519
    if hybrid is not None:
        raise TransportCertError("the hybrid X25519 extension is only allowed with ML-KEM-768")
    if isinstance(public, x25519.X25519PublicKey):
        return TransportKem.X25519
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        return TransportKem.P256
    raise TransportCertError(
        "the certificate's key is not X25519, P-256 or ML-KEM-768 + X25519 (hybrid)"
    )


def transport_public_key(
    cert: x509.Certificate,
) -> x25519.X25519PublicKey | ec.EllipticCurvePublicKey | MLKEM768X25519PublicKey:
    kem = transport_kem(cert)
    public = cert.public_key()
    if kem is TransportKem.MLKEM768_X25519:
        second = _hybrid_x25519(cert)
        assert isinstance(public, mlkem.MLKEM768PublicKey)
        assert second is not None
        return MLKEM768X25519PublicKey(public, second)
    assert isinstance(public, x25519.X25519PublicKey | ec.EllipticCurvePublicKey)
    return public


def check_transport_certificate(
    cert: x509.Certificate,
    trust: TransportTrust,
    *,
    identity: str | None,
    now: datetime.datetime | None = None,
) -> TransportKem:
    """Raise TransportCertError unless ``cert`` is a valid transport certificate.

    Issued (signed) by ``trust.ca_cert``, within validity, not on the CRL, for
    ``identity`` (or any identity in the trust domain when None), with a
    transport key type, keyUsage for receiving keys only and no extendedKeyUsage.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    _check_issuer(cert, trust.ca_cert)
    if not cert.not_valid_before_utc - _SKEW <= now <= cert.not_valid_after_utc:
        raise TransportCertError(
            f"the certificate is outside its validity period "
            f"({cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d})"
        )
    if cert.serial_number in trust.revoked:
        raise TransportCertError("the certificate is revoked (on the CA's CRL)")
    try:
        extensions = cert.extensions
    except ValueError:
        raise TransportCertError("the certificate's extensions do not parse") from None
    if any(ext.oid == ExtensionOID.EXTENDED_KEY_USAGE for ext in extensions):
        raise TransportCertError(
            "the certificate has an extendedKeyUsage: it is a TLS certificate, and a "
            "TLS key may not double as a key-transport key; register NAME-transport.pem"
        )
    unknown = [
        ext.oid.dotted_string
        for ext in extensions
        if ext.critical and ext.oid not in _KNOWN_CRITICAL
    ]
    if unknown:
        raise TransportCertError(f"the certificate has an unknown critical extension {unknown[0]}")
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise TransportCertError("the certificate is a CA certificate")
    kem = transport_kem(cert)
    _check_key_usage(cert, kem)
    found = certificate_identity(cert)
    if identity is not None and found != identity:
        raise TransportCertError(f"the certificate names {found}, not {identity}")
    if trust.trust_domain is not None:
        domain = found[len("spiffe://") :].split("/", 1)[0]
        if domain != trust.trust_domain:
            raise TransportCertError(f"the certificate's identity is not in {trust.trust_domain}")
    return kem


def check_still_valid(
    cert: x509.Certificate, trust: TransportTrust, now: datetime.datetime | None = None
) -> None:
    """What can change after registration: the validity period and the CRL."""
    now = now or datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc - _SKEW <= now <= cert.not_valid_after_utc:
        raise TransportCertError(
            "it is outside its validity period "
            f"(until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)"
        )
    if cert.serial_number in trust.revoked:
        raise TransportCertError("it is revoked (on the CA's CRL)")


def _check_issuer(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        # ValueError: another issuer name; InvalidSignature: another key with the same name.
        raise TransportCertError("the certificate is not issued by this CA") from None


def _check_key_usage(cert: x509.Certificate, kem: TransportKem) -> None:
    try:
        ext = cert.extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise TransportCertError("the certificate has no keyUsage") from None
    usage = ext.value
    wanted = "keyEncipherment" if kem is TransportKem.MLKEM768_X25519 else "keyAgreement"
    allowed = {
        "digitalSignature": usage.digital_signature,
        "contentCommitment": usage.content_commitment,
        "keyEncipherment": usage.key_encipherment,
        "dataEncipherment": usage.data_encipherment,
        "keyAgreement": usage.key_agreement,
        "keyCertSign": usage.key_cert_sign,
        "cRLSign": usage.crl_sign,
    }
    present = {name for name, on in allowed.items() if on}
    if present != {wanted} or not ext.critical:
        raise TransportCertError(
            f"the certificate's keyUsage must be exactly {wanted} (critical) for a "
            f"{kem.value} key; it has {', '.join(sorted(present)) or 'none'}"
        )
