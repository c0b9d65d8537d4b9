"""Certificates signed by a key that never leaves the HSM: build, sign outside, assemble.

``cryptography`` signs a certificate only with a private key object it
holds. An HSM-held key is not one, so the certificate is built as usual,
signed once with a throwaway key of the CA key's curve (which fixes the
signature algorithm inside the to-be-signed part), and its TBS bytes are
signed by the HSM; the DER is then reassembled from TBS, algorithm and the
HSM's signature (RFC 5280 4.1: Certificate ::= SEQUENCE { tbsCertificate,
signatureAlgorithm, signatureValue }; a CRL has the same shape, 5.1). The
result is verified against the CA's public key before anyone sees it.

Also the checks a CSR must pass before a CA looks at what it asks for
(``load_csr``) and the key types an issued certificate may have.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ObjectIdentifier

#: Key types an issued certificate may carry (what TLS 1.3 peers verify).
KEY_TYPES = ("p256", "p384", "rsa3072", "ed25519")
#: The smallest RSA modulus accepted (NIST SP 800-57: 128-bit security).
MIN_RSA_BITS = 3072
MAX_CSR_SIZE = 16384

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class CsrError(ValueError):
    """A CSR that cannot be used: the message says why, never repeating its bytes."""


class IssuingError(ValueError):
    """A signature from the CA's key that does not verify (wrong key, broken HSM)."""


def key_type_of(public_key: object) -> str | None:
    """``p256``, ``p384``, ``rsa3072`` (3072 bits or more), ``ed25519``; None otherwise."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "p256", "secp384r1": "p384"}.get(public_key.curve.name)
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa3072" if public_key.key_size >= MIN_RSA_BITS else None
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    return None


def generate_key(key_type: str = "p256") -> PrivateKey:
    """A new private key: ``p256``, ``p384``, ``rsa3072``, ``rsa4096`` or ``ed25519``."""
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa3072", "rsa4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r} ({', '.join(KEY_TYPES)})")


def describe_key(public_key: object) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    return type(public_key).__name__.removesuffix("PublicKey").removeprefix("_") or "unknown"


#: Issued certificates start this much before their issuance (as pki's do), so that a
#: peer whose clock runs a little behind still accepts them.
BACKDATE = 300


def renewal_due(cert: x509.Certificate, renew_at: float, now: float) -> bool:
    """Whether ``now`` is past ``renew_at`` (a fraction) of the certificate's lifetime.

    The lifetime is counted from the issuance, not from the backdated start:
    otherwise a certificate valid for less than about two backdates would be
    due at once and renewed before every request. As the issuance is not in
    the certificate, it is taken as ``BACKDATE`` after the start, but never
    past the middle of the validity: a certificate that was not backdated is
    then still renewed before it expires.
    """
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    issued = start + min(BACKDATE, (end - start) / 2)
    return now >= issued + (end - issued) * renew_at


def spki_der(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_csr(der: bytes) -> x509.CertificateSigningRequest:
    """Parse a DER CSR and check its self-signature (proof of possession of the key)."""
    if len(der) > MAX_CSR_SIZE:
        raise CsrError(f"the CSR is {len(der)} bytes; at most {MAX_CSR_SIZE}")
    try:
        csr = x509.load_der_x509_csr(der)
        # Touch what the CA reads, so a malformed field fails here and not later.
        csr.public_key()
        list(csr.extensions)
    except (ValueError, TypeError, x509.UnsupportedGeneralNameType) as exc:
        raise CsrError(
            f"the CSR is not a valid DER PKCS#10 request ({type(exc).__name__})"
        ) from None
    except Exception as exc:  # cryptography raises its own for unsupported key types
        raise CsrError(f"the CSR cannot be read ({type(exc).__name__})") from None
    if not csr.is_signature_valid:
        raise CsrError("the CSR's signature does not verify with its own public key")
    return csr


def requested_names(csr: x509.CertificateSigningRequest) -> tuple[list[str], list[str]]:
    """(URI SANs, DNS SANs) the CSR asks for; anything else in its SAN is refused."""
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    dns = sans.get_values_for_type(x509.DNSName)
    if len(uris) + len(dns) != len(sans):
        raise CsrError("the CSR's subjectAltName may hold only URI and DNS names")
    return uris, dns


def _key_usage(public_key: PublicKey) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        # RSA keys also get keyEncipherment, for verifiers that still expect it.
        key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def leaf_builder(
    issuer: x509.Certificate,
    public_key: PublicKey,
    *,
    common_name: str,
    sans: Sequence[x509.GeneralName],
    extended_key_usage: ObjectIdentifier,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    serial: int,
    subject: x509.Name | None = None,
) -> x509.CertificateBuilder:
    """An end-entity TLS certificate, every extension set on purpose (as pki does).

    ``subject``: the whole subject name; by default CN = ``common_name``.
    """
    issuer_key = issuer.public_key()
    if subject is None:
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name[:64])])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # An end entity: it may not sign certificates (X.509-SVID requires this).
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # TLS handshake signatures only.
        .add_extension(_key_usage(public_key), critical=True)
        # One TLS role per certificate (one purpose per key, SP 800-57).
        .add_extension(x509.ExtendedKeyUsage([extended_key_usage]), critical=False)
        # The names the peer verifies; not critical: the subject is not empty.
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        # Names the online CA's key, so verifiers pick the right issuer.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key),  # type: ignore[arg-type]
            critical=False,
        )
    )


@attrs.frozen
class Unsigned:
    """A certificate or CRL ready for the CA's signature: its TBS bytes and algorithm."""

    tbs: bytes = attrs.field(repr=False)
    algorithm: bytes = attrs.field(repr=False)


@functools.cache
def _draft_signer(name: str) -> tuple[ec.EllipticCurvePrivateKey, hashes.SHA256 | hashes.SHA384]:
    """A throwaway key per curve: its signature is discarded, it only fixes the algorithm."""
    if name == "p384":
        return ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()
    return ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()


def unsigned_certificate(builder: x509.CertificateBuilder, ca_curve: str) -> Unsigned:
    key, digest = _draft_signer(ca_curve)
    draft = builder.sign(key, digest)
    return Unsigned(
        draft.tbs_certificate_bytes, _algorithm(draft.public_bytes(serialization.Encoding.DER))
    )


def unsigned_crl(builder: x509.CertificateRevocationListBuilder, ca_curve: str) -> Unsigned:
    key, digest = _draft_signer(ca_curve)
    draft = builder.sign(key, digest)
    return Unsigned(
        draft.tbs_certlist_bytes, _algorithm(draft.public_bytes(serialization.Encoding.DER))
    )


def assemble_certificate(
    unsigned: Unsigned, signature: bytes, ca_public_key: ec.EllipticCurvePublicKey
) -> x509.Certificate:
    cert = x509.load_der_x509_certificate(_assemble(unsigned, signature))
    try:
        ca_public_key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            ec.ECDSA(_hash_of(cert.signature_hash_algorithm)),
        )
    except InvalidSignature:
        raise IssuingError(
            "the CA key's signature does not verify with the CA certificate"
        ) from None
    return cert


def assemble_crl(
    unsigned: Unsigned, signature: bytes, ca_public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateRevocationList:
    crl = x509.load_der_x509_crl(_assemble(unsigned, signature))
    if not crl.is_signature_valid(ca_public_key):
        raise IssuingError("the CA key's CRL signature does not verify with the CA certificate")
    return crl


def _hash_of(algorithm: hashes.HashAlgorithm | None) -> hashes.HashAlgorithm:
    return algorithm if algorithm is not None else hashes.SHA256()


# -- DER, just enough for SEQUENCE { tbs, algorithm, BIT STRING } ------------------------


def _header(der: bytes, offset: int) -> tuple[int, int]:
    """(offset of the content, length of the content) of the element at ``offset``."""
    first = der[offset + 1]
    if first < 0x80:
        return offset + 2, first
    size = first & 0x7F
    return offset + 2 + size, int.from_bytes(der[offset + 2 : offset + 2 + size], "big")


def _algorithm(signed_der: bytes) -> bytes:
    """The signatureAlgorithm element of a signed certificate or CRL."""
    body, _ = _header(signed_der, 0)
    tbs_body, tbs_length = _header(signed_der, body)
    start = tbs_body + tbs_length
    alg_body, alg_length = _header(signed_der, start)
    return signed_der[start : alg_body + alg_length]


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _assemble(unsigned: Unsigned, signature: bytes) -> bytes:
    bit_string = b"\x03" + _length(len(signature) + 1) + b"\x00" + signature
    content = unsigned.tbs + unsigned.algorithm + bit_string
    return b"\x30" + _length(len(content)) + content
