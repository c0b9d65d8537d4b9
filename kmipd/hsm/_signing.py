"""What both backends agree on about signing keys: key types, algorithms, digests.

A signing key is EC P-256, EC P-384, RSA-3072 or RSA-4096. The online CA
signs whole messages with ``sign`` (one hash per curve, SHA-256 for P-256
and SHA-384 for P-384, as TLS 1.3 pairs them). Managed signing keys sign a
digest the client computed with ``sign_digest``, under an algorithm named as
JOSE (RFC 7518) and Key Vault name them: ES256/ES384 for the EC curves
(one each), PS256/PS384 (RSASSA-PSS, MGF1 with the same hash, salt as long
as the hash) and RS256/RS384 (PKCS#1 v1.5) for RSA. The digest's length must
be its hash's: a digest of another hash is refused, never signed.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from kmipd.hsm._interface import HsmError

#: curve name -> (cryptography curve, hash, PKCS#11 / asn1crypto curve name)
SIGNING_CURVES: dict[str, tuple[type[ec.EllipticCurve], type[hashes.HashAlgorithm], str]] = {
    "p256": (ec.SECP256R1, hashes.SHA256, "secp256r1"),
    "p384": (ec.SECP384R1, hashes.SHA384, "secp384r1"),
}
#: RSA key types and their modulus sizes (RSA under 3072 bits is not offered: SP 800-57's
#: 128-bit security from 2031 on).
RSA_KEY_TYPES: dict[str, int] = {"rsa3072": 3072, "rsa4096": 4096}
SIGNING_KEY_TYPES: tuple[str, ...] = (*SIGNING_CURVES, *RSA_KEY_TYPES)

#: algorithm -> (hash, scheme): "ecdsa", "pss" or "pkcs1".
SIGNATURE_ALGORITHMS: dict[str, tuple[type[hashes.HashAlgorithm], str]] = {
    "ES256": (hashes.SHA256, "ecdsa"),
    "ES384": (hashes.SHA384, "ecdsa"),
    "PS256": (hashes.SHA256, "pss"),
    "PS384": (hashes.SHA384, "pss"),
    "RS256": (hashes.SHA256, "pkcs1"),
    "RS384": (hashes.SHA384, "pkcs1"),
}
_ALGORITHMS_OF = {"p256": ("ES256",), "p384": ("ES384",)}
_RSA_ALGORITHMS = ("PS256", "PS384", "RS256", "RS384")

#: DER DigestInfo prefixes (RFC 8017 §9.2 note 1): PKCS#1 v1.5 signs prefix || digest.
DIGEST_INFO_PREFIX = {
    "SHA256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "SHA384": bytes.fromhex("3041300d060960864801650304020205000430"),
}

SigningPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
SigningPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class SignatureAlgorithmError(HsmError):
    """The algorithm is unknown, or not one this key type signs with."""


class DigestLengthError(HsmError):
    """The digest is not as long as its algorithm's hash."""


def check_curve(curve: str) -> None:
    if curve not in SIGNING_CURVES:
        raise HsmError(f"signing keys are EC {' or '.join(SIGNING_CURVES)}, not {curve!r}")


def check_key_type(key_type: str) -> None:
    if key_type not in SIGNING_KEY_TYPES:
        known = f"{', '.join(SIGNING_KEY_TYPES[:-1])} or {SIGNING_KEY_TYPES[-1]}"
        raise HsmError(f"signing keys are {known}, not {key_type[:16]!r}")


def curve_of(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    for name, (curve, _, _) in SIGNING_CURVES.items():
        if isinstance(key.curve, curve):
            return name
    raise HsmError(f"signing keys are EC {' or '.join(SIGNING_CURVES)}, not {key.curve.name}")


def key_type_of(key: SigningPrivateKey | SigningPublicKey) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return curve_of(key)
    key_type = f"rsa{key.key_size}"
    if key_type not in RSA_KEY_TYPES:
        raise HsmError(f"RSA signing keys are 3072 or 4096 bits, not {key.key_size}")
    return key_type


def signature_hash(curve: str) -> hashes.HashAlgorithm:
    return SIGNING_CURVES[curve][1]()


def algorithms_for(key_type: str) -> tuple[str, ...]:
    return _ALGORITHMS_OF.get(key_type, _RSA_ALGORITHMS)


def check_signature_request(key_type: str, algorithm: str, digest: bytes) -> hashes.HashAlgorithm:
    """The hash ``algorithm`` names, once it suits ``key_type`` and ``digest`` is its length."""
    allowed = algorithms_for(key_type)
    if algorithm not in SIGNATURE_ALGORITHMS:
        raise SignatureAlgorithmError(
            f"unknown signature algorithm {algorithm[:16]!r} (a {key_type} key signs with "
            f"{', '.join(allowed)})"
        )
    if algorithm not in allowed:
        raise SignatureAlgorithmError(
            f"a {key_type} key does not sign with {algorithm} (it signs with {', '.join(allowed)})"
        )
    hash_ = SIGNATURE_ALGORITHMS[algorithm][0]()
    if len(digest) != hash_.digest_size:
        raise DigestLengthError(
            f"{algorithm} signs a {hash_.name.upper()} digest of {hash_.digest_size} bytes, "
            f"not {len(digest)} bytes"
        )
    return hash_


def _padding(algorithm: str, hash_: hashes.HashAlgorithm) -> padding.AsymmetricPadding:
    if SIGNATURE_ALGORITHMS[algorithm][1] == "pss":
        return padding.PSS(mgf=padding.MGF1(hash_), salt_length=hash_.digest_size)
    return padding.PKCS1v15()


def sign_digest_with(key: SigningPrivateKey, algorithm: str, digest: bytes) -> bytes:
    """The software signature of a checked digest (DER ECDSA, or the RSA signature)."""
    hash_ = check_signature_request(key_type_of(key), algorithm, digest)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(digest, ec.ECDSA(Prehashed(hash_)))
    return key.sign(digest, _padding(algorithm, hash_), Prehashed(hash_))


def verify_digest(public_key_der: bytes, algorithm: str, digest: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the key's signature of ``digest`` under ``algorithm``."""
    key = serialization.load_der_public_key(public_key_der)
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise HsmError("a signing key's public half is EC or RSA")
    hash_ = check_signature_request(key_type_of(key), algorithm, digest)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, digest, ec.ECDSA(Prehashed(hash_)))
        else:
            key.verify(signature, digest, _padding(algorithm, hash_), Prehashed(hash_))
    except InvalidSignature:
        return False
    return True


def generate_private_key(key_type: str) -> SigningPrivateKey:
    check_key_type(key_type)
    if key_type in SIGNING_CURVES:
        return ec.generate_private_key(SIGNING_CURVES[key_type][0]())
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_TYPES[key_type])


def public_key_der(key: SigningPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_signing_key(private_key_der: bytes) -> ec.EllipticCurvePrivateKey:
    """An imported signing key (PKCS#8 DER), checked: EC, on a curve we sign with."""
    try:
        key = serialization.load_der_private_key(private_key_der, password=None)
    except (ValueError, TypeError):
        raise HsmError("the signing key is not an unencrypted PKCS#8 DER private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise HsmError("a signing key must be an EC key (P-256 or P-384)")
    curve_of(key)
    return key
