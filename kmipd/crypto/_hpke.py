"""HPKE (RFC 9180) for kmipd: one suite per transport key type, base mode.

Every suite is KEM / HKDF-SHA256 / AES-256-GCM in base mode, single-shot, from
``cryptography.hazmat.primitives.hpke``: its ciphertext is ``enc || ct`` and it
takes an ``info`` but no AAD, so everything a sealed value is bound to goes
into ``info`` (see _delivery). Nothing here is hand-rolled.

A ``TransportKey`` is the private side: built from the private key (checked
against its certificate by a seal/open round trip, so a mismatched pair is
refused up front) or from a callable ``opener(sealed, info) -> bytes`` that
does the decapsulation elsewhere (a TPM, an HSM), so the key never enters
this process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519

from kmipd.crypto._transport_cert import (
    TransportCertError,
    certificate_fingerprint,
    certificate_identity,
    transport_kem,
    transport_public_key,
)
from pki import PkiError, TransportKem, TransportPrivateKey, load_transport_keys
from pki import transport_kem_of_keys as _kem_of_keys

#: The IANA HPKE identifiers of each suite (KEM, KDF, AEAD); the hybrid's KEM id is
#: the one draft-ietf-hpke-pq assigns to MLKEM768-X25519 (X-Wing).
SUITE_IDS: dict[TransportKem, tuple[int, int, int]] = {
    TransportKem.X25519: (0x0020, 0x0001, 0x0002),
    TransportKem.P256: (0x0010, 0x0001, 0x0002),
    TransportKem.MLKEM768_X25519: (0x647A, 0x0001, 0x0002),
}
SUITE_NAMES: dict[TransportKem, str] = {
    TransportKem.X25519: "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM",
    TransportKem.P256: "DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM",
    TransportKem.MLKEM768_X25519: "MLKEM768-X25519, HKDF-SHA256, AES-256-GCM",
}
_KEMS = {
    TransportKem.X25519: hpke.KEM.X25519,
    TransportKem.P256: hpke.KEM.P256,
    TransportKem.MLKEM768_X25519: hpke.KEM.MLKEM768_X25519,
}

HpkePublicKey = x25519.X25519PublicKey | ec.EllipticCurvePublicKey | hpke.MLKEM768X25519PublicKey
HpkePrivateKey = (
    x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey | hpke.MLKEM768X25519PrivateKey
)
#: Opens ``enc || ct`` sealed with ``info``; raises on failure.
Opener = Callable[[bytes, bytes], bytes]


class HpkeError(Exception):
    """A sealed value did not open: wrong key, wrong binding (info), or altered."""


def suite(kem: TransportKem) -> hpke.Suite:
    return hpke.Suite(_KEMS[kem], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def enc_length(kem: TransportKem) -> int:
    return int(_KEMS[kem].enc_length())


def seal(kem: TransportKem, public_key: HpkePublicKey, plaintext: bytes, info: bytes) -> bytes:
    """HPKE base-mode single-shot seal: ``enc || ct``."""
    return bytes(suite(kem).encrypt(plaintext, public_key, info=info))


def seal_to_certificate(cert: x509.Certificate, plaintext: bytes, info: bytes) -> bytes:
    return seal(transport_kem(cert), transport_public_key(cert), plaintext, info)


def open_sealed(
    kem: TransportKem, private_key: HpkePrivateKey, sealed: bytes, info: bytes
) -> bytes:
    if len(sealed) < enc_length(kem) + 16:
        raise HpkeError("sealed value is too short")
    try:
        return bytes(suite(kem).decrypt(sealed, private_key, info=info))
    except (InvalidTag, ValueError):
        raise HpkeError(
            "sealed value does not open: another recipient key, another binding, or altered"
        ) from None


def hpke_private_key(kem: TransportKem, keys: list[TransportPrivateKey]) -> HpkePrivateKey:
    if kem is TransportKem.MLKEM768_X25519:
        first, second = keys
        assert isinstance(first, mlkem.MLKEM768PrivateKey)
        assert isinstance(second, x25519.X25519PrivateKey)
        return hpke.MLKEM768X25519PrivateKey(first, second)
    (key,) = keys
    assert isinstance(key, x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey)
    return key


class TransportKey:
    """This client's key-transport key: its certificate and what opens values sealed to it.

    The private key stays out of ``repr`` and every message.
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        private_key: TransportPrivateKey | list[TransportPrivateKey] | None = None,
        *,
        opener: Opener | None = None,
    ) -> None:
        if (private_key is None) == (opener is None):
            raise ValueError("give the private key or an opener, not both")
        self.certificate = certificate
        try:
            self.kem = transport_kem(certificate)
            self.identity = certificate_identity(certificate)
        except TransportCertError as exc:
            raise ValueError(str(exc)) from None
        self.fingerprint = certificate_fingerprint(certificate)
        self._public = transport_public_key(certificate)
        if private_key is not None:
            keys = private_key if isinstance(private_key, list) else [private_key]
            try:
                kem = _kem_of_keys(keys, "private key")
            except PkiError as exc:
                raise ValueError(str(exc)) from None
            if kem is not self.kem:
                raise ValueError(
                    f"the private key is {kem.value}, the certificate {self.kem.value}"
                )
            hpke_key = hpke_private_key(kem, keys)
            self._opener: Opener = lambda sealed, info: open_sealed(kem, hpke_key, sealed, info)
        else:
            assert opener is not None
            self._opener = opener
        self._check_pair()

    @classmethod
    def from_files(
        cls, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
    ) -> TransportKey:
        """Load NAME-transport.pem and NAME-transport-key.pem (as ``kmipd pki`` writes them)."""
        cert_path, key_path = Path(cert_path), Path(key_path)
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except OSError as exc:
            raise ValueError(
                f"cannot read transport certificate {cert_path}: {exc.strerror}"
            ) from None
        except ValueError:
            raise ValueError(
                f"transport certificate {cert_path} is not a PEM certificate"
            ) from None
        try:
            data = key_path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read transport key {key_path}: {exc.strerror}") from None
        try:
            keys = load_transport_keys(data, f"transport key {key_path}")
        except PkiError as exc:
            raise ValueError(str(exc)) from None
        try:
            return cls(certificate, keys)
        except ValueError as exc:
            raise ValueError(f"{cert_path} and {key_path}: {exc}") from None

    def _check_pair(self) -> None:
        probe = os.urandom(32)
        info = b"kmipd/transport-key-check/v1"
        try:
            opened = self._opener(seal(self.kem, self._public, probe, info), info)
        except Exception:
            opened = None
        if opened != probe:
            raise ValueError("the private key (or opener) does not match the certificate")

    def open(self, sealed: bytes, info: bytes) -> bytes:
        """Open a value sealed to this key with this ``info``; HpkeError otherwise."""
        try:
            return self._opener(sealed, info)
        except HpkeError:
            raise
        except Exception:
            raise HpkeError(
                "sealed value does not open: another recipient key, another binding, or altered"
            ) from None

    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    def __repr__(self) -> str:
        short = self.fingerprint.hex()[:16]
        return f"TransportKey({self.identity!r}, {self.kem.value}, fingerprint={short}...)"
