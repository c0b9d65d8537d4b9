"""Key-transport certificates: what a client's sealed keys are encrypted to.

A client has two keys, for two purposes (SP 800-57: one purpose per key):
its TLS key signs handshakes, its key-transport key only decrypts what is
sealed to it (HPKE, RFC 9180). The transport certificate names the same
SPIFFE identity as the client's TLS certificate, but its keyUsage allows
only key agreement (X25519, P-256) or key encipherment (the ML-KEM-768 +
X25519 hybrid), and it has no extendedKeyUsage: TLS verifiers refuse it.

The hybrid key has two public halves. The ML-KEM-768 public key is the
certificate's subjectPublicKeyInfo; the X25519 half is carried, signed by
the CA with the rest, in a *critical* private extension (``HYBRID_X25519_OID``,
an OID under 2.25 minted from a UUID for kmipd), so that a verifier that
does not understand it must reject the certificate rather than use half of
the key. The private key file holds two PKCS#8 PEM blocks, ML-KEM first.
"""

from __future__ import annotations

import enum

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519

from pki._errors import PkiError

#: kmipd's X25519 half of an ML-KEM-768+X25519 transport key: the extension's
#: value is an OCTET STRING holding the 32-byte raw X25519 public key.
HYBRID_X25519_OID = x509.ObjectIdentifier("2.25.206367283595187122251048760290529594061")

#: The names a transport certificate is filed under: NAME-transport.pem.
TRANSPORT_SUFFIX = "-transport"

TransportPrivateKey = (
    x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey | mlkem.MLKEM768PrivateKey
)


class TransportKem(enum.Enum):
    """The key type of a transport certificate (one HPKE KEM each)."""

    X25519 = "x25519"
    P256 = "p256"
    MLKEM768_X25519 = "mlkem768-x25519"


def generate_transport_keys(kem: TransportKem) -> list[TransportPrivateKey]:
    """One private key, or two for the hybrid (ML-KEM-768 first, then X25519)."""
    if kem is TransportKem.X25519:
        return [x25519.X25519PrivateKey.generate()]
    if kem is TransportKem.P256:
        return [ec.generate_private_key(ec.SECP256R1())]
    return [mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()]


def transport_keys_pem(keys: list[TransportPrivateKey]) -> bytes:
    return b"".join(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for key in keys
    )


def load_transport_keys(data: bytes, what: str) -> list[TransportPrivateKey]:
    """Parse a transport key file (one or two PKCS#8 PEM blocks) or raise PkiError."""
    marker = b"-----END PRIVATE KEY-----"
    blocks = [block + marker for block in data.split(marker) if block.strip()]
    if not 1 <= len(blocks) <= 2:
        raise PkiError(f"{what} must hold one or two PKCS#8 PEM private keys")
    keys: list[TransportPrivateKey] = []
    for block in blocks:
        try:
            key = serialization.load_pem_private_key(block.strip() + b"\n", password=None)
        except (ValueError, TypeError):
            raise PkiError(f"{what} is not an unencrypted PKCS#8 PEM private key") from None
        if not isinstance(
            key, x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey | mlkem.MLKEM768PrivateKey
        ):
            raise PkiError(f"{what} holds a key that is not X25519, P-256 or ML-KEM-768")
        keys.append(key)
    return keys


def transport_kem_of_keys(keys: list[TransportPrivateKey], what: str) -> TransportKem:
    match keys:
        case [x25519.X25519PrivateKey()]:
            return TransportKem.X25519
        case [ec.EllipticCurvePrivateKey() as key] if isinstance(key.curve, ec.SECP256R1):
            return TransportKem.P256
        case [mlkem.MLKEM768PrivateKey(), x25519.X25519PrivateKey()]:
            return TransportKem.MLKEM768_X25519
    raise PkiError(f"{what}: not an X25519, P-256 or ML-KEM-768 + X25519 transport key")


def hybrid_extension(x25519_public: x25519.X25519PublicKey) -> x509.UnrecognizedExtension:
    raw = x25519_public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return x509.UnrecognizedExtension(HYBRID_X25519_OID, b"\x04\x20" + raw)
