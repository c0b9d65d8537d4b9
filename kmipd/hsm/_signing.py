"""What both backends agree on about signing keys: the curves and their hashes.

One hash per curve (SHA-256 for P-256, SHA-384 for P-384, as TLS 1.3 pairs
them), so a handle alone says how to sign and certificates signed with it
name one signature algorithm.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmipd.hsm._interface import HsmError

#: curve name -> (cryptography curve, hash, PKCS#11 / asn1crypto curve name)
SIGNING_CURVES: dict[str, tuple[type[ec.EllipticCurve], type[hashes.HashAlgorithm], str]] = {
    "p256": (ec.SECP256R1, hashes.SHA256, "secp256r1"),
    "p384": (ec.SECP384R1, hashes.SHA384, "secp384r1"),
}


def check_curve(curve: str) -> None:
    if curve not in SIGNING_CURVES:
        raise HsmError(f"signing keys are EC {' or '.join(SIGNING_CURVES)}, not {curve!r}")


def curve_of(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    for name, (curve, _, _) in SIGNING_CURVES.items():
        if isinstance(key.curve, curve):
            return name
    raise HsmError(f"signing keys are EC {' or '.join(SIGNING_CURVES)}, not {key.curve.name}")


def signature_hash(curve: str) -> hashes.HashAlgorithm:
    return SIGNING_CURVES[curve][1]()


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
