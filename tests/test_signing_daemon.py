"""Signing keys end to end: a real daemon over mutual TLS, the CLI, both clients, SoftHSM2.

Every signature is checked by ``openssl dgst -verify`` on the public key the
CLI exported and by ``cryptography``; the private halves on the SoftHSM2
token are read back through PKCS#11 in a process of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from kmipd import client as km
from tests.kmip_dev import DevDaemon, dev
from tests.processes import kmipd_command
from tests.test_certs import ADMIN, start
from tests.test_pkcs11 import SOFTHSM_LIBRARY, TOKEN_LABEL, SoftToken, softhsm
from tests.test_secret_cli import env
from tests.test_signing import check_with_cryptography, check_with_openssl

__all__ = ["dev", "softhsm"]  # fixtures: the module's dev daemon, the SoftHSM2 token

pytestmark = pytest.mark.slow

DATA = b"release 1.2.3 tarball\n" * 100


def sign_key(
    dev: DevDaemon, *args: str | os.PathLike[str], identity: str = "admin"
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        kmipd_command("sign-key", *args),
        capture_output=True, env=env(dev, identity, "releases"), timeout=60, check=False,
    )  # fmt: skip


def ok(result: subprocess.CompletedProcess[bytes]) -> Any:
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout) if result.stdout.strip() else None


def client(dev: DevDaemon, identity: str = "admin") -> km.Client:
    ca, cert, key = dev.credentials(identity)
    return km.Client(dev.daemon.address, ca=ca, cert=cert, key=key)


@pytest.mark.parametrize(
    ("key_type", "algorithm"), [("p256", "ES256"), ("p384", "ES384"), ("rsa3072", "PS256"),
                                ("rsa3072", "RS384")],
)  # fmt: skip
def test_the_cli_signs_and_openssl_verifies(
    dev: DevDaemon, tmp_path: Path, key_type: str, algorithm: str
) -> None:
    name = f"{key_type}-{algorithm}".lower()
    created = ok(sign_key(dev, "create", name, "--type", key_type))
    assert (created["key_type"], created["version"], created["state"]) == (key_type, 1, "active")
    assert algorithm in created["algorithms"]
    (tmp_path / "data").write_bytes(DATA)
    pem = sign_key(dev, "public-key", name, "-o", tmp_path / "pub.pem")
    assert pem.returncode == 0, pem.stderr
    assert (tmp_path / "pub.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    signed = sign_key(
        dev, "sign", name, "--algorithm", algorithm, "--file", tmp_path / "data",
        "-o", tmp_path / "sig",
    )  # fmt: skip
    assert signed.returncode == 0 and b"version 1" in signed.stderr, signed.stderr
    signature = (tmp_path / "sig").read_bytes()
    with client(dev) as kms:
        spki = kms.get_signing_key("releases", name).public_key
    check_with_cryptography(spki, algorithm, DATA, signature)
    pem_file = (tmp_path / "pub.pem").read_bytes()
    check_with_openssl(tmp_path, spki, algorithm, DATA, signature)  # rewrites pub.pem from spki
    assert (tmp_path / "pub.pem").read_bytes() == pem_file  # the CLI's PEM is that key
    # The daemon verifies too; a changed file does not verify (exit 1, says so).
    args = ("verify", name, "--algorithm", algorithm, "--signature", tmp_path / "sig")
    assert ok(sign_key(dev, *args, "--file", tmp_path / "data")) == {"valid": True, "version": 1}
    (tmp_path / "other").write_bytes(DATA + b"!")
    bad = sign_key(dev, *args, "--file", tmp_path / "other")
    assert bad.returncode == 1 and b"does not verify" in bad.stderr
    assert json.loads(bad.stdout) == {"valid": False, "version": None}


def test_refusals_over_tls_each_with_its_error_and_nothing_lost(
    dev: DevDaemon, tmp_path: Path
) -> None:
    digest = hashlib.sha256(DATA).digest()
    with client(dev) as kms:
        key = kms.create_signing_key("releases", "refusals", "p256")
        dek = kms.create_dek("releases")
        refusals: list[tuple[Any, type[km.RemoteError], str]] = [
            (lambda: kms.get_dek(key.key_id), km.SigningKeyOnlyError, "only signs and verifies"),
            (lambda: kms.rewrap_dek(key.key_id), km.SigningKeyOnlyError, "never decrypts"),
            (lambda: kms.sign_digest("releases", dek.dek_id, digest), km.NotASigningKeyError,
             "data-encryption key (DEK): it encrypts and decrypts, never signs"),
            (lambda: kms.sign_digest("releases", "releases", digest), km.NotASigningKeyError,
             "key-encryption key (KEK): it wraps and unwraps, never signs"),
            (lambda: kms.sign_digest("releases", "refusals", digest[:20]),
             km.DigestLengthMismatchError, "ES256 signs a SHA256 digest of 32 bytes, not 20"),
            (lambda: kms.sign_digest("releases", "refusals", digest, "EdDSA"),
             km.UnsupportedAlgorithmError, "unknown signature algorithm 'EdDSA'"),
            (lambda: kms.sign_digest("releases", "refusals", digest, "PS256"),
             km.UnsupportedAlgorithmError, "a p256 key does not sign with PS256"),
            (lambda: kms.create_signing_key("releases", "refusals", "p384"),
             km.AlreadyExistsError, "rotate-signing-key makes a new version"),
        ]  # fmt: skip
        for call, error, message in refusals:
            with pytest.raises(error) as caught:
                call()
            assert message in str(caught.value)
        # Nothing lost: the key signs, the DEK decrypts.
        signed = kms.sign_digest("releases", "refusals", digest)
        check_with_cryptography(key.public_key, "ES256", DATA, signed.signature)
        with kms.get_dek(dek.dek_id) as again, dek:
            assert bytes(again.key) == bytes(dek.key)
    # Default deny: an identity without a signing grant.
    with client(dev, "stranger") as kms, pytest.raises(km.NotAuthorizedError):
        kms.sign_digest("releases", "refusals", digest)
    refused = sign_key(dev, "sign", "refusals", "--digest", digest.hex(), identity="stranger")
    assert refused.returncode == 1 and b"not allowed sign-digest" in refused.stderr
    assert b"Traceback" not in refused.stderr
    # No key material, digest or signature in the audit trail, the log or the database.
    on_disk = b"".join(
        p.read_bytes()
        for p in dev.data.iterdir()
        if p.name.startswith(("kmipd.db", "audit", "log"))
    )
    for value in (digest, signed.signature):
        assert value not in on_disk and value.hex().encode() not in on_disk
    records = [r for r in dev.audit_records() if r["operation"] == "sign-digest"]
    assert any("ES256 digest 32 bytes" in (r.get("detail") or "") for r in records)
    assert {r["result"] for r in records} >= {
        "ok", "not-a-signing-key", "digest-length-mismatch", "unsupported-algorithm",
        "not-authorized",
    }  # fmt: skip


async def test_the_async_client_rotates_signs_and_verifies(dev: DevDaemon) -> None:
    ca, cert, key = dev.credentials("admin")
    digest = hashlib.sha384(DATA).digest()
    async with km.AsyncClient(dev.daemon.address, ca=ca, cert=cert, key=key) as kms:
        first = await kms.create_signing_key("releases", "async", "rsa3072")
        old = await kms.sign_digest("releases", "async", digest, "PS384")
        rotated = await kms.rotate_signing_key("releases", "async")
        new, check = await _both(
            kms.sign_digest("releases", "async", digest, "PS384"),
            kms.verify_digest("releases", "async", digest, old.signature, "PS384"),
        )
        assert (old.version, new.version, rotated.versions) == (1, 2, 2)
        assert check == km.VerifyResult(valid=True, version=1)  # the old version still verifies
        check_with_cryptography(first.public_key, "PS384", DATA, old.signature)
        check_with_cryptography(rotated.public_key, "PS384", DATA, new.signature)
        listed = await kms.list_signing_keys("rel*")
        assert ("async", 2) in [(k.name, k.version) for k in listed]


async def _both(first: Any, second: Any) -> tuple[Any, Any]:
    results: list[Any] = [None, None]

    async def run(index: int, awaitable: Any) -> None:
        results[index] = await awaitable

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 0, first)
        nursery.start_soon(run, 1, second)
    return results[0], results[1]


# -- SoftHSM2 ----------------------------------------------------------------------------

READ_PRIVATE_KEYS = """
import json, sys
import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])
found = []
with token.open(user_pin=sys.argv[3]) as session:
    for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
        secret = Attribute.PRIVATE_EXPONENT if key.key_type == KeyType.RSA else Attribute.VALUE
        try:
            key[secret]
            value = "readable"
        except pkcs11.exceptions.PKCS11Error as exc:
            value = type(exc).__name__
        names = ["sensitive", "extractable", "never_extractable", "sign", "decrypt", "unwrap"]
        entry = {n: bool(key[getattr(Attribute, n.upper())]) for n in names}
        found.append({"label": key.label, "type": key.key_type.name, **entry, "value": value})
print(json.dumps(sorted(found, key=lambda e: e["label"])))
"""


def test_signing_keys_on_softhsm_sign_and_are_not_extractable(
    softhsm: SoftToken, tmp_path: Path
) -> None:
    hsm = (
        f'backend = "pkcs11"\nlibrary = "{SOFTHSM_LIBRARY}"\ntoken_label = "{TOKEN_LABEL}"\n'
        f'pin_file = "{softhsm.pin_file}"'
    )
    grant = (
        f'[[grant]]\nidentity = "{ADMIN}"\nnamespaces = ["*"]\n'
        'operations = ["signing", "signing-manage"]\n'
    )
    running = start(tmp_path, hsm, grant)
    try:
        with running.client("admin") as kms:
            for key_type, algorithm in (
                ("p256", "ES256"),
                ("rsa3072", "PS256"),
                ("rsa3072", "RS256"),
            ):
                name = f"hsm-{key_type}-{algorithm}".lower()
                info = kms.create_signing_key("releases", name, key_type)
                digest = hashlib.new(f"sha{algorithm[2:]}", DATA).digest()
                signed = kms.sign_digest("releases", name, digest, algorithm)
                check_with_cryptography(info.public_key, algorithm, DATA, signed.signature)
                check_with_openssl(tmp_path, info.public_key, algorithm, DATA, signed.signature)
                assert kms.verify_digest(
                    "releases", name, digest, signed.signature, algorithm
                ).valid
    finally:
        running.daemon.stop()
    attributes = subprocess.run(
        [sys.executable, "-c", READ_PRIVATE_KEYS, str(SOFTHSM_LIBRARY), TOKEN_LABEL,
         softhsm.pin_file.read_text().strip()],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    keys = [k for k in json.loads(attributes.stdout) if "/releases/" in k["label"]]
    assert [(k["label"], k["type"]) for k in keys] == [
        ("kmipd/releases/hsm-p256-es256/v1", "EC"),
        ("kmipd/releases/hsm-rsa3072-ps256/v1", "RSA"),
        ("kmipd/releases/hsm-rsa3072-rs256/v1", "RSA"),
    ]
    for key in keys:
        assert {n: key[n] for n in ("sensitive", "extractable", "never_extractable", "sign",
                                    "decrypt", "unwrap", "value")} == {
            "sensitive": True, "extractable": False, "never_extractable": True, "sign": True,
            "decrypt": False, "unwrap": False, "value": "AttributeSensitive",
        }, key  # fmt: skip
