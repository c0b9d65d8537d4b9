"""Managed signing keys: the HSM backends' key pairs, the store's rows, the daemon's operations.

Every signature is checked by an independent verifier: ``cryptography`` on the
exported public key, and ``openssl dgst -verify`` in a subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import attrs
import cbor2
import pycddl
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from kmipd.audit import AuditLog
from kmipd.daemon.config import ConfigError
from kmipd.hsm import HsmError, HsmKeyNotFoundError, SoftwareHsm
from kmipd.hsm._signing import DigestLengthError, SignatureAlgorithmError, verify_digest
from kmipd.lifecycle import SIGNING_USAGES, CryptoPeriod, Lifecycle, LifecyclePolicy, State
from kmipd.protocol import (
    CreateDek,
    CreateSigningKey,
    DestroySigningKey,
    ErrorCode,
    GetDek,
    GetSigningKey,
    ListSigningKeys,
    RecoverSigningKey,
    RevokeSigningKey,
    RotateSigningKey,
    SignDigest,
    VerifyDigest,
    VerifyResult,
    error_to_wire,
    request_to_wire,
    result_to_wire,
)
from kmipd.service import Caller, Grant, KeyService, Policy, ServiceError
from kmipd.service._policy import expand_operations
from kmipd.store import KeyStore, SigningKeyVersion
from tests.conftest import StoreOpener
from tests.test_check_config import MINIMAL, parse
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
        "key_id": "sig_abc",
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


# -- the service: lifecycle, one purpose per key, policy, audit --------------------------

ADMIN = Caller("spiffe://kmipd.test/admin", 1)
SIGNER = Caller("spiffe://kmipd.test/signer", 2)
STRANGER = Caller("spiffe://kmipd.test/stranger", 3)
DAY = 86_400.0


def open_service(data: Path, clock: list[float], open_store: StoreOpener) -> KeyService:
    policy = Policy(
        (
            Grant(ADMIN.identity, ("*",), expand_operations(["*"])),
            Grant(SIGNER.identity, ("billing",), expand_operations(["signing", "data"])),
            Grant(STRANGER.identity, ("*",), expand_operations(["data"])),
        )
    )
    periods = (CryptoPeriod(("billing",), protect_days=1, process_days=30),)
    return KeyService(
        store=open_store(data, clock=lambda: clock[0]),
        hsm=SoftwareHsm.open(data / "master.key", data / "keyring.cbor", create=True),
        policy=policy,
        create_kek_on_demand=True,
        audit=AuditLog.open(data / "audit.log", data / "audit.key"),
        clock=lambda: clock[0],
        lifecycle=LifecyclePolicy(signing_periods=periods),
    )


async def refused(service: KeyService, caller: Caller, request: object) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await service.handle(caller, request)
    return caught.value


def sign(digest: bytes, name: str = "invoices", algorithm: str = "ES256") -> SignDigest:
    return SignDigest(namespace="billing", name=name, algorithm=algorithm, digest=digest)


async def test_signing_period_then_verify_only_then_rotation(
    tmp_path: Path, open_store: StoreOpener
) -> None:
    clock = [1_800_000_000.0]
    service = open_service(tmp_path, clock, open_store)
    try:
        created = await service.handle(
            ADMIN, CreateSigningKey(namespace="billing", name="invoices", key_type="p256")
        )
        assert created.key_id.startswith("sig_") and created.version == 1
        assert created.sign_until == int(clock[0] + DAY)
        assert created.verify_until == int(clock[0] + 30 * DAY)
        digest = hashlib.sha256(b"invoice 1").digest()
        first = await service.handle(SIGNER, sign(digest))
        check_with_cryptography(created.public_key, "ES256", b"invoice 1", first.signature)

        clock[0] += 2 * DAY  # past the signing period, within the verify period
        error = await refused(service, SIGNER, sign(digest))
        assert error.code is ErrorCode.SIGNING_PERIOD_ENDED
        assert "signing period ended" in error.message and "rotate-signing-key" in error.message
        verify = VerifyDigest(
            namespace="billing", name="invoices", algorithm="ES256", digest=digest,
            signature=first.signature,
        )  # fmt: skip
        assert await service.handle(SIGNER, verify) == VerifyResult(valid=True, version=1)

        rotated = await service.handle(
            ADMIN, RotateSigningKey(namespace="billing", name="invoices")
        )
        assert (rotated.version, rotated.versions, rotated.key_id) == (2, 2, created.key_id)
        assert rotated.public_key != created.public_key
        second = await service.handle(SIGNER, sign(digest))
        assert second.version == 2
        check_with_cryptography(rotated.public_key, "ES256", b"invoice 1", second.signature)
        # Both versions' signatures verify while the old one is not deactivated.
        assert (await service.handle(SIGNER, verify)).version == 1
        again = attrs.evolve(verify, signature=second.signature)
        assert (await service.handle(SIGNER, again)).version == 2
        forged = attrs.evolve(verify, digest=hashlib.sha256(b"forged").digest())
        assert await service.handle(SIGNER, forged) == VerifyResult(valid=False)

        clock[0] += 30 * DAY  # version 1 deactivated: its signatures no longer verify
        pinned = attrs.evolve(verify, version=1)
        error = await refused(service, SIGNER, pinned)
        assert error.code is ErrorCode.KEY_DEACTIVATED
        assert "version 1 is deactivated" in error.message
    finally:
        service.store.close()
        service.hsm.close()


async def test_one_purpose_per_key_and_every_bad_input_refused(
    tmp_path: Path, open_store: StoreOpener
) -> None:
    clock = [1_800_000_000.0]
    service = open_service(tmp_path, clock, open_store)
    try:
        key = await service.handle(
            ADMIN, CreateSigningKey(namespace="billing", name="invoices", key_type="rsa3072")
        )
        dek = await service.handle(SIGNER, CreateDek(namespace="billing"))
        digest = hashlib.sha256(b"x").digest()
        cases: list[tuple[object, ErrorCode, str]] = [
            # A signing key is never a DEK: get-dek (decrypt, encrypt) and rewrap refuse it.
            (GetDek(dek_id=key.key_id), ErrorCode.SIGNING_KEY_ONLY, "only signs and verifies"),
            (
                GetDek(dek_id=key.key_id, purpose="encrypt"),
                ErrorCode.SIGNING_KEY_ONLY,
                "never decrypts, unwraps or is read as a DEK",
            ),
            # A DEK and a KEK never sign.
            (sign(digest, name=dek.dek_id, algorithm="PS256"), ErrorCode.NOT_A_SIGNING_KEY,
             "data-encryption key (DEK): it encrypts and decrypts, never signs"),
            (sign(digest, name="billing", algorithm="PS256"), ErrorCode.NOT_A_SIGNING_KEY,
             "key-encryption key (KEK): it wraps and unwraps, never signs"),
            (sign(b"\x00" * 20, algorithm="PS256"), ErrorCode.DIGEST_LENGTH_MISMATCH,
             "PS256 signs a SHA256 digest of 32 bytes, not 20 bytes"),
            (sign(digest, algorithm="PS512"), ErrorCode.UNSUPPORTED_ALGORITHM,
             "unknown signature algorithm 'PS512' (a rsa3072 key signs with PS256, PS384"),
            (sign(digest, algorithm="ES256"), ErrorCode.UNSUPPORTED_ALGORITHM,
             "a rsa3072 key does not sign with ES256"),
            (sign(digest, name="nothing"), ErrorCode.NOT_FOUND, "no signing key 'nothing'"),
        ]  # fmt: skip
        for request, code, message in cases:
            error = await refused(service, SIGNER, request)
            assert (error.code, message in error.message) == (code, True), error.message
        # Nothing lost: the key signs, the DEK still decrypts.
        signed = await service.handle(SIGNER, sign(digest, algorithm="PS256"))
        check_with_cryptography(key.public_key, "PS256", b"x", signed.signature)
        assert (await service.handle(SIGNER, GetDek(dek_id=dek.dek_id))).key == dek.key

        # Default deny: no grant, no operation (and a grant for billing only).
        for request in (
            sign(digest, algorithm="PS256"),
            GetSigningKey(namespace="billing", name="invoices"),
            CreateSigningKey(namespace="billing", name="other", key_type="p256"),
            RotateSigningKey(namespace="billing", name="invoices"),
        ):
            error = await refused(service, STRANGER, request)
            assert error.code is ErrorCode.NOT_AUTHORIZED, request
        error = await refused(
            service, SIGNER, RotateSigningKey(namespace="billing", name="invoices")
        )
        assert error.code is ErrorCode.NOT_AUTHORIZED
        error = await refused(service, STRANGER, ListSigningKeys())
        assert error.message.endswith("is not allowed list-signing-keys")
        [listed] = (await service.handle(SIGNER, ListSigningKeys())).keys
        assert (listed.name, listed.algorithms) == (
            "invoices",
            ("PS256", "PS384", "RS256", "RS384"),
        )

        # Audit: every operation recorded with the algorithm and digest length, never the
        # digest, the signature or key material.
        assert service.audit is not None
        service.audit.close()
        trail = (tmp_path / "audit.log").read_text()
        assert '"sign-digest"' in trail and "PS256 digest 32 bytes" in trail
        assert '"not-a-signing-key"' in trail and '"signing-key-only"' in trail
        for secret in (digest, signed.signature, key.public_key):
            for form in (secret.hex(), base64.b64encode(secret).decode()[:24]):
                assert form not in trail
        assert repr(signed.signature[:8])[2:-1] not in repr(signed)  # shown as its length
    finally:
        service.store.close()
        service.hsm.close()


async def test_revoke_destroy_recover_and_purge(tmp_path: Path, open_store: StoreOpener) -> None:
    clock = [1_800_000_000.0]
    service = open_service(tmp_path, clock, open_store)
    try:
        await service.handle(
            ADMIN, CreateSigningKey(namespace="billing", name="invoices", key_type="p384")
        )
        digest = hashlib.sha384(b"y").digest()
        signed = await service.handle(SIGNER, sign(digest, algorithm="ES384"))
        ref = {"namespace": "billing", "name": "invoices"}
        error = await refused(service, ADMIN, DestroySigningKey(**ref))
        assert (error.code, error.message) == (
            ErrorCode.WRONG_STATE, "cannot destroy a key that is active",
        )  # fmt: skip
        revoked = await service.handle(ADMIN, RevokeSigningKey(**ref, reason="superseded"))
        assert (revoked.state, revoked.revocation_reason) == ("deactivated", "superseded")
        assert (await refused(service, SIGNER, sign(digest, algorithm="ES384"))).code is (
            ErrorCode.KEY_DEACTIVATED
        )
        scheduled = await service.handle(ADMIN, DestroySigningKey(**ref))
        assert scheduled.purge_at == int(clock[0]) + service.lifecycle.soft_delete_seconds
        recovered = await service.handle(ADMIN, RecoverSigningKey(**ref))
        assert recovered.purge_at is None
        [version] = await service.store.signing_key_versions("billing", "invoices")
        assert version.handle in service.hsm._signers  # type: ignore[attr-defined]
        await service.handle(ADMIN, DestroySigningKey(**ref))
        clock[0] += service.lifecycle.soft_delete_seconds
        assert await service.purge_due() == 1
        info = await service.handle(ADMIN, GetSigningKey(**ref))
        assert info.state == "destroyed"
        assert version.handle not in service.hsm._signers  # type: ignore[attr-defined]
        verify = VerifyDigest(**ref, algorithm="ES384", digest=digest, signature=signed.signature)
        error = await refused(service, SIGNER, verify)
        assert (error.code, "is destroyed" in error.message) == (ErrorCode.KEY_DESTROYED, True)
    finally:
        service.store.close()
        service.hsm.close()


async def test_real_signing_messages_match_the_cddl(tmp_path: Path) -> None:
    schema = pycddl.Schema(
        (Path(__file__).parent.parent / "conformance" / "protocol.cddl").read_text()
    )
    clock = [1_800_000_000.0]
    service = open_service(
        tmp_path, clock, lambda data, **options: KeyStore.open(data / "k.db", **options)
    )
    digest = hashlib.sha256(b"m").digest()
    ref = {"namespace": "billing", "name": "invoices"}
    try:
        requests: list[object] = [
            CreateSigningKey(**ref, key_type="p256", activation=int(clock[0])),
            GetSigningKey(**ref),
            ListSigningKeys(namespace="b*"),
            RotateSigningKey(**ref),
            SignDigest(**ref, algorithm="ES256", digest=digest),
            GetSigningKey(**ref, version=1),
            VerifyDigest(**ref, algorithm="ES256", digest=digest, signature=b"\x30\x00", version=2),
            RevokeSigningKey(**ref, reason="superseded", version=1, message="rotated"),
            DestroySigningKey(**ref, version=1),
            RecoverSigningKey(**ref, version=1),
            DestroySigningKey(**ref, version=1, purge_now=True),
        ]
        for number, request in enumerate(requests):
            schema.validate_cbor(cbor2.dumps(request_to_wire(number, request)))
            result = await service.handle(ADMIN, request)
            schema.validate_cbor(cbor2.dumps(result_to_wire(number, result)))
        for code in (ErrorCode.SIGNING_KEY_ONLY, ErrorCode.SIGNING_PERIOD_ENDED):
            schema.validate_cbor(cbor2.dumps(error_to_wire(1, code, "x")))
    finally:
        service.store.close()
        service.hsm.close()


def test_the_config_gives_signing_keys_their_own_crypto_period() -> None:
    text = MINIMAL + (
        '[[crypto_period]]\napplies_to = "signing-key"\nnamespaces = ["releases"]\n'
        "protect_days = 365\nprocess_days = 1825\n"
        '[[crypto_period]]\napplies_to = "dek"\nprotect_days = 30\n'
    )
    config = parse(text, {"CREDENTIALS_DIRECTORY": "/c"})
    lifecycle = config.lifecycle  # type: ignore[attr-defined]
    assert lifecycle.signing_periods == (CryptoPeriod(("releases",), 365, 1825),)
    assert [p.protect_days for p in lifecycle.dek_periods] == [30]
    made = lifecycle.new_lifecycle("signing-key", "releases", 0, SIGNING_USAGES, None)
    assert (made.protect_stop, made.deactivation) == (365 * 86_400, 1825 * 86_400)
    with pytest.raises(ConfigError, match=r"applies_to: must be kek, dek or signing-key"):
        parse(
            MINIMAL + '[[crypto_period]]\napplies_to = "signing"\n', {"CREDENTIALS_DIRECTORY": "/c"}
        )
