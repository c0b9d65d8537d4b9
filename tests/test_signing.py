"""Managed signing keys: the HSM backends' key pairs, the store's rows, the daemon's operations.

Every signature is checked by an independent verifier: ``cryptography`` on the
exported public key, and ``openssl dgst -verify`` in a subprocess.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from kmipd.hsm import HsmError, HsmKeyNotFoundError, SoftwareHsm
from kmipd.hsm._signing import DigestLengthError, SignatureAlgorithmError, verify_digest
from kmipd.lifecycle import SIGNING_USAGES, Lifecycle, State
from kmipd.store import SigningKeyVersion
from tests.conftest import StoreOpener
from tests.test_pkcs11 import SoftToken, softhsm

__all__ = ["softhsm"]  # the SoftHSM2 token fixture (fails under CI=true without SoftHSM2)

#: key type -> the algorithms it signs with.
ALGORITHMS = {
    "p256": ("ES256",),
    "p384": ("ES384",),
    "rsa3072": ("PS256", "PS384", "RS256", "RS384"),
}


def digest_of(algorithm: str, data: bytes) -> bytes:
    return hashlib.new(f"sha{algorithm[2:]}", data).digest()


def check_with_cryptography(spki: bytes, algorithm: str, data: bytes, signature: bytes) -> None:
    """Verify over the whole message (not the digest) with cryptography's own API."""
    key = serialization.load_der_public_key(spki)
    hash_ = hashes.SHA256() if algorithm.endswith("256") else hashes.SHA384()
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, data, ec.ECDSA(hash_))
    else:
        assert isinstance(key, rsa.RSAPublicKey)
        pad: padding.AsymmetricPadding = (
            padding.PSS(padding.MGF1(hash_), hash_.digest_size)
            if algorithm.startswith("PS")
            else padding.PKCS1v15()
        )
        key.verify(signature, data, pad, hash_)


def check_with_openssl(
    tmp: Path, spki: bytes, algorithm: str, data: bytes, signature: bytes
) -> None:
    pem = serialization.load_der_public_key(spki).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp / "pub.pem").write_bytes(pem)
    (tmp / "data").write_bytes(data)
    (tmp / "sig").write_bytes(signature)
    options = ["-sigopt", "rsa_padding_mode:pss"] if algorithm.startswith("PS") else []
    result = subprocess.run(
        ["openssl", "dgst", f"-sha{algorithm[2:]}", *options, "-verify", tmp / "pub.pem",
         "-signature", tmp / "sig", tmp / "data"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and "Verified OK" in result.stdout, result.stdout + result.stderr


# -- both HSM backends -------------------------------------------------------------------


async def _check_digest_signing(hsm: Any, tmp: Path) -> list[str]:
    handles = []
    data = b"the quick brown fox"
    for key_type, algorithms in ALGORITHMS.items():
        handle = await hsm.generate_signing_key("managed", key_type)
        handles.append(handle)
        spki = await hsm.signing_public_key(handle)
        for algorithm in algorithms:
            digest = digest_of(algorithm, data)
            signature = await hsm.sign_digest(handle, digest, algorithm)
            check_with_cryptography(spki, algorithm, data, signature)
            check_with_openssl(tmp, spki, algorithm, data, signature)
            assert verify_digest(spki, algorithm, digest, signature)
            assert not verify_digest(spki, algorithm, digest_of(algorithm, b"other"), signature)
        # Refusals, each saying why; the key still signs afterwards.
        with pytest.raises(DigestLengthError, match=rf"{algorithms[0]} signs a SHA\d+ digest"):
            await hsm.sign_digest(handle, b"\x00" * 20, algorithms[0])
        with pytest.raises(SignatureAlgorithmError, match=r"unknown signature algorithm 'ES512'"):
            await hsm.sign_digest(handle, b"\x00" * 64, "ES512")
        other = "PS256" if key_type.startswith("p") else "ES256"
        with pytest.raises(SignatureAlgorithmError, match=rf"does not sign with {other}"):
            await hsm.sign_digest(handle, b"\x00" * 32, other)
        await hsm.sign_digest(handle, digest_of(algorithms[0], data), algorithms[0])
        # One purpose per key: a signing key is no KEK.
        with pytest.raises(HsmKeyNotFoundError):
            await hsm.unwrap(handle, b"\x00" * 60, b"ad")
    kek = await hsm.generate_kek("kek")
    with pytest.raises(HsmKeyNotFoundError):
        await hsm.sign_digest(kek, b"\x00" * 32, "ES256")
    with pytest.raises(HsmError, match=r"p256, p384, rsa3072 or rsa4096, not 'rsa2048'"):
        await hsm.generate_signing_key("weak", "rsa2048")
    await hsm.destroy_signing_key(handles[0])
    with pytest.raises(HsmKeyNotFoundError):
        await hsm.sign_digest(handles[0], b"\x00" * 32, "ES256")
    return handles


async def test_software_keyring_signs_digests_with_ec_and_rsa(tmp_path: Path) -> None:
    hsm = SoftwareHsm.open(tmp_path / "master", tmp_path / "keyring", create=True)
    handles = await _check_digest_signing(hsm, tmp_path)
    reopened = SoftwareHsm.open(tmp_path / "master", tmp_path / "keyring")
    assert sorted(reopened._signers) == sorted(handles[1:])  # the destroyed one is gone
    keyring = (tmp_path / "keyring").read_bytes()
    assert b"PRIVATE" not in keyring  # sealed under the master key, not PEM
    rsa_key = reopened._signers[handles[2]]
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    exponent = rsa_key.private_numbers().d.to_bytes(384, "big")
    assert exponent[:32] not in keyring  # nor its private exponent in clear
    assert "managed" not in repr(reopened) and str(exponent[:4]) not in repr(reopened)


async def test_pkcs11_signs_digests_with_ec_and_rsa(softhsm: SoftToken, tmp_path: Path) -> None:
    hsm = await softhsm.open()
    try:
        await _check_digest_signing(hsm, tmp_path)
    finally:
        hsm.close()


def test_the_hash_of_each_algorithm_is_the_digest_signed() -> None:
    # PS384 on a P-384 key's digest length but an RSA algorithm, and prehashed checks.
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(b"m").digest()
    signature = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert verify_digest(spki, "ES256", digest, signature)
    with pytest.raises(SignatureAlgorithmError, match="a p256 key does not sign with ES384"):
        verify_digest(spki, "ES384", hashlib.sha384(b"m").digest(), signature)


# -- the store, both backends ------------------------------------------------------------


def _version(number: int, **changes: Any) -> SigningKeyVersion:
    lifecycle = Lifecycle(State.ACTIVE, SIGNING_USAGES, activation=100, protect_stop=200)
    fields: dict[str, Any] = {
        "namespace": "billing",
        "name": "invoices",
        "version": number,
        "key_type": "p256",
        "handle": f"soft-sign-{number}",
        "public_key": b"spki" * 8,
        "lifecycle": lifecycle,
        "created_at": 100 + number,
        "created_by": "spiffe://test/admin",
    }
    fields.update(changes)
    return SigningKeyVersion(**fields)


async def test_store_keeps_signing_key_versions(tmp_path: Path, open_store: StoreOpener) -> None:
    store = open_store(tmp_path)
    try:
        assert await store.signing_key_versions("billing", "invoices") == []
        assert await store.add_signing_key_version(_version(1))
        assert await store.add_signing_key_version(_version(2, key_type="rsa3072"))
        # A second version 2 is refused and changes nothing.
        assert not await store.add_signing_key_version(_version(2, handle="other"))
        assert await store.add_signing_key_version(_version(1, namespace="hr", name="letters"))
        versions = await store.signing_key_versions("billing", "invoices")
        assert [(v.version, v.handle, v.key_type) for v in versions] == [
            (1, "soft-sign-1", "p256"),
            (2, "soft-sign-2", "rsa3072"),
        ]
        assert versions[0] == _version(1)
        listed = await store.list_signing_keys()
        assert [(v.namespace, v.name, v.version) for v in listed] == [
            ("billing", "invoices", 2),
            ("hr", "letters", 1),
        ]
        pending = attrs.evolve(versions[0].lifecycle, state=State.DEACTIVATED, purge_at=160)
        assert await store.update_signing_key_version(attrs.evolve(versions[0], lifecycle=pending))
        assert await store.signing_keys_due_for_destruction(159) == []
        [due] = await store.signing_keys_due_for_destruction(160)
        assert (due.version, due.lifecycle.purge_at) == (1, 160)
        assert not await store.update_signing_key_version(_version(7))
    finally:
        store.close()
    reopened = open_store(tmp_path)
    try:
        assert len(await reopened.signing_key_versions("billing", "invoices")) == 2
        assert "spki" not in repr(await reopened.list_signing_keys())
    finally:
        reopened.close()
