"""RFC 9180 test vectors through kmipd's HPKE wrapper (kmipd.crypto).

cryptography's HPKE is single-shot: it takes no AAD and picks its own
ephemeral key, while the RFC's vectors fix the ephemeral key and encrypt
with AAD "Count-0". So the vectors cannot be replayed through it directly.
Instead an independent implementation (pyhpke), deterministic with the
vectors' ephemeral keys, first reproduces the RFC's A.1.1 and A.3.1 byte
for byte; then, with the same recipient and ephemeral keys, it seals in our
suites (same KEM, HKDF-SHA256, AES-256-GCM, the empty AAD of a single-shot
seal) and our wrapper must open that, and the reverse. The KEM output is the
vector's own ``enc``: our DHKEM decapsulation is checked against the RFC.

The hybrid ML-KEM-768 + X25519 suite has no RFC 9180 vectors; it is covered
by round trips (tests/test_transport.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyhpke
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from kmipd.crypto import HpkeError, open_sealed, seal
from pki import TransportKem

VECTORS = json.loads((Path(__file__).parent / "data" / "rfc9180_vectors.json").read_text())[
    "vectors"
]
_KEMS = {
    "x25519": (pyhpke.KEMId.DHKEM_X25519_HKDF_SHA256, TransportKem.X25519),
    "p256": (pyhpke.KEMId.DHKEM_P256_HKDF_SHA256, TransportKem.P256),
}


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def reference(vector: dict[str, Any], aead: pyhpke.AEADId) -> pyhpke.CipherSuite:
    return pyhpke.CipherSuite.new(_KEMS[vector["kem"]][0], pyhpke.KDFId.HKDF_SHA256, aead)


def ephemeral(suite: pyhpke.CipherSuite, vector: dict[str, Any]) -> pyhpke.KEMKeyPair:
    return pyhpke.KEMKeyPair(
        suite.kem.deserialize_private_key(h(vector["skEm"])),
        suite.kem.deserialize_public_key(h(vector["pkEm"])),
    )


def our_private_key(vector: dict[str, Any]) -> x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey:
    if vector["kem"] == "x25519":
        return x25519.X25519PrivateKey.from_private_bytes(h(vector["skRm"]))
    return ec.derive_private_key(int(vector["skRm"], 16), ec.SECP256R1())


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"][:5])
def test_the_reference_reproduces_the_rfc_vector(vector: dict[str, Any]) -> None:
    suite = reference(vector, pyhpke.AEADId.AES128_GCM)
    recipient = suite.kem.deserialize_public_key(h(vector["pkRm"]))
    enc, sender = suite.create_sender_context(
        recipient, info=h(vector["info"]), eks=ephemeral(suite, vector)
    )
    assert enc == h(vector["enc"])
    assert sender.seal(h(vector["pt"]), aad=h(vector["aad"])) == h(vector["ct"])
    opener = suite.create_recipient_context(
        enc, suite.kem.deserialize_private_key(h(vector["skRm"])), info=h(vector["info"])
    )
    assert opener.open(h(vector["ct"]), aad=h(vector["aad"])) == h(vector["pt"])


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"][:5])
def test_our_suite_opens_what_the_reference_seals_with_the_vector_keys(
    vector: dict[str, Any],
) -> None:
    suite = reference(vector, pyhpke.AEADId.AES256_GCM)
    kem = _KEMS[vector["kem"]][1]
    recipient = suite.kem.deserialize_public_key(h(vector["pkRm"]))
    info = h(vector["info"])
    enc, sender = suite.create_sender_context(recipient, info=info, eks=ephemeral(suite, vector))
    assert enc == h(vector["enc"])  # the RFC's KEM output, whatever the AEAD
    sealed = enc + sender.seal(h(vector["pt"]))
    key = our_private_key(vector)
    assert open_sealed(kem, key, sealed, info) == h(vector["pt"])
    with pytest.raises(HpkeError):
        open_sealed(kem, key, sealed, info + b"!")  # info is bound
    tampered = bytearray(sealed)
    tampered[len(enc)] ^= 1
    with pytest.raises(HpkeError):
        open_sealed(kem, key, bytes(tampered), info)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"][:5])
def test_the_reference_opens_what_our_suite_seals_to_the_vector_key(
    vector: dict[str, Any],
) -> None:
    suite = reference(vector, pyhpke.AEADId.AES256_GCM)
    kem = _KEMS[vector["kem"]][1]
    key = our_private_key(vector)
    info = h(vector["info"])
    sealed = seal(kem, key.public_key(), h(vector["pt"]), info)
    enc_size = len(h(vector["enc"]))
    enc, ciphertext = sealed[:enc_size], sealed[enc_size:]
    opener = suite.create_recipient_context(
        enc, suite.kem.deserialize_private_key(h(vector["skRm"])), info=info
    )
    assert opener.open(ciphertext) == h(vector["pt"])
