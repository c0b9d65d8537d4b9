"""``kmipd demo``: the DEK delivery flow, step by step, on a fresh temporary CA.

A daemon (trio, in this process) and a storage system (the blocking client,
on a worker thread, as most storage systems would call it) walk the nine
steps of the flow. Each step prints what happened and what was verified,
and the demo fails loudly if any check does not hold. Then the other
families: sealed delivery, secrets, a client certificate from the daemon's
online CA (issued, used, renewed) and a signing key held in the HSM. Nothing
but Python: the software HSM and SQLite, under a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmipd import client as km
from kmipd.cli._ca import _ca_init
from kmipd.cli._common import Commands
from kmipd.client._certs import identity_of, write_key_and_certificate
from kmipd.daemon import RunningDaemon, run_daemon
from kmipd.daemon._dev import DEV_TRUST_DOMAIN, prepare_dev
from kmipd.daemon.config import load_config
from pki import CertificateAuthority, load_certificate


class DemoFailedError(Exception):
    pass


def register(commands: Commands) -> None:
    demo = commands.add_parser("demo", help="walk the DEK delivery flow step by step")
    demo.set_defaults(handler=lambda args: run_demo())


def run_demo(out: Callable[[str], None] = print) -> int:
    with tempfile.TemporaryDirectory(prefix="kmipd-demo-") as tmp:
        try:
            config = _prepare(Path(tmp) / "kmipd")
            trio.run(_demo, Path(tmp), config, out)
        except DemoFailedError as exc:
            out(f"\nDEMO FAILED: {exc}")
            return 1
    out("\nAll steps verified.")
    return 0


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise DemoFailedError(what)


def _prepare(data: Path) -> Path:
    """The dev setup, with a root that may sign the online CA, and that CA made by the
    real ``kmipd ca init`` (its key in the software HSM); storage may ask it for a
    client certificate. Returns the config file."""
    CertificateAuthority.init(
        data / "pki",
        trust_domain=DEV_TRUST_DOMAIN,
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1", "::1"),
        path_length=1,
    )
    config = prepare_dev(data, "127.0.0.1:0")  # reuses that CA
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _ca_init(
            argparse.Namespace(config=config, root=data / "pki", curve="p256", days=30, out=None)
        )
    snippet = printed.getvalue()[printed.getvalue().index("[online_ca]") :]
    storage = CertificateAuthority.load(data / "pki").identity_for("storage")
    with config.open("a", encoding="utf-8") as f:
        f.write(
            f'\n{snippet}\n[[certificate_grant]]\nidentity = "{storage}"\n'
            'max_validity_days = 1\nkey_types = ["p256"]\n'
        )
    return config


async def _demo(tmp: Path, config_path: Path, out: Callable[[str], None]) -> None:
    data = tmp / "kmipd"
    out(f"Setting up a fresh test CA and daemon under {tmp}")
    config = load_config(config_path)
    ready: list[RunningDaemon] = []
    started = trio.Event()

    def on_ready(daemon: RunningDaemon) -> None:
        ready.append(daemon)
        started.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_daemon(config, on_ready, handle_signals=False))
        await started.wait()
        daemon = ready[0]
        out(f"  daemon listening on {daemon.addresses[0]} (software HSM, SQLite store)\n")
        try:
            await trio.to_thread.run_sync(_storage_system, data, daemon.addresses[0], tmp, out)
        finally:
            daemon.stop()


def _storage_system(data: Path, address: str, tmp: Path, out: Callable[[str], None]) -> None:
    pki_dir = data / "pki"
    plaintext = b"row 42: card ending 4242, expires 09/29"

    out("1. A user asks the storage system for encrypted data.")
    out("2. The storage system calls the kmipd client library (KM API).")
    with km.Client(
        address,
        ca=pki_dir / "ca.pem",
        cert=pki_dir / "storage.pem",
        key=pki_dir / "storage-key.pem",
    ) as kms:
        info = kms.connect()
        out("3. Mutual TLS: both sides verified each other against the kmipd CA.")
        out(f"   {info.tls_version}, cipher {info.cipher}")
        out(f"   server certificate verified for {address}: {info.server_subject}")
        out(f"   the daemon authenticated us as {info.identity}")
        _check(info.tls_version == "TLSv1.3", "TLS 1.3 was negotiated")

        out(
            "4. The TLS session carries binary CBOR requests (protocol version "
            f"{info.protocol_version}, frames up to {info.max_frame_size} bytes)."
        )
        dek = kms.create_dek("orders")
        out(
            f"   create-dek -> {dek.dek_id} in namespace {dek.namespace}, "
            f"wrapped under KEK version {dek.kek_version}"
        )
        cipher = AESGCM(dek.key)
        nonce = b"\x00" * 11 + b"\x01"
        stored = cipher.encrypt(nonce, plaintext, dek.dek_id.encode())
        out(f"   the storage system encrypted a record ({len(stored)} bytes) and dropped the key")

        db = sqlite3.connect(data / "kmipd.db")
        (wrapped,) = db.execute("SELECT wrapped FROM deks WHERE id = ?", (dek.dek_id,)).fetchone()
        db.close()
        on_disk = (data / "kmipd.db").read_bytes() + (data / "kmipd.db-wal").read_bytes()
        _check(bytes(dek.key) not in on_disk, "the plaintext DEK never reaches the store")
        out(
            f"   the store holds only the wrapped DEK ({len(wrapped)} bytes); "
            "the plaintext key is nowhere in the database files"
        )

        out("5. Later, to serve a read, the daemon has its HSM unwrap the DEK with the KEK.")
        again = kms.get_dek(dek.dek_id)
        out("6. The daemon returns the DEK over the TLS session.")
        _check(again.key == dek.key, "the unwrapped DEK equals the one created")
        out(f"   get-dek {again.dek_id} -> {again!r}")
        out("7. The client library hands the DEK to the storage system.")
        out("8. The storage system may cache it briefly in protected memory.")
        out("9. The storage system decrypts and serves the plaintext:")
        served = AESGCM(again.key).decrypt(nonce, stored, dek.dek_id.encode())
        _check(served == plaintext, "decryption returns the original record")
        out(f"   {served.decode()!r}\n")

    out("Refusal: a client whose certificate comes from another CA.")
    rogue = CertificateAuthority.init(tmp / "rogue-ca", trust_domain="rogue.test")
    intruder = rogue.issue_client("storage")
    try:
        with km.Client(
            address, ca=pki_dir / "ca.pem", cert=intruder.cert_path, key=intruder.key_path
        ) as kms:
            kms.status()
    except km.CertificateRejectedError as exc:
        out(f"   refused by the daemon: {exc}")
    else:
        raise DemoFailedError("a certificate from another CA was accepted")

    _asymmetric_flow(data, address, dek.dek_id, plaintext, out)
    _secrets(data, address, out)
    _certificates(data, address, tmp, out)
    _signing_keys(data, address, dek.dek_id, out)


def _asymmetric_flow(
    data: Path, address: str, dek_id: str, plaintext: bytes, out: Callable[[str], None]
) -> None:
    pki_dir = data / "pki"
    out("\nThe asymmetric flow: keys and files sealed to certified recipient keys (HPKE).")
    ca = CertificateAuthority.load(pki_dir)
    ca.issue_transport("storage", force=True)
    out("   the CA issued storage a key-transport certificate (X25519, keyAgreement only,")
    out("   no TLS usage): a second key for the same identity, for receiving keys only")

    def client(name: str, transport: km.TransportKey | None = None) -> km.Client:
        return km.Client(
            address,
            ca=pki_dir / "ca.pem",
            cert=pki_dir / f"{name}.pem",
            key=pki_dir / f"{name}-key.pem",
            transport=transport,
        )

    storage_key = km.TransportKey.from_files(
        pki_dir / "storage-transport.pem", pki_dir / "storage-transport-key.pem"
    )
    with client("storage", storage_key) as kms:
        kms.register_transport_certificate()
        out("   storage registered its certificate; the daemon checked CA, CRL, identity, usage")
        try:
            kms.register_transport_certificate(load_certificate(pki_dir / "storage.pem"))
        except km.TransportCertificateRejectedError as exc:
            reason = exc.detail.split("refused: ", 1)[-1].split(";")[0]
            out(f"   its TLS certificate is refused as a transport key: {reason}")
        else:
            raise DemoFailedError("a TLS certificate was registered as a transport key")
        with kms.get_dek(dek_id) as sealed, client("storage") as clear:
            out(
                "   get-dek sealed: the daemon sealed the DEK to storage's transport key, "
                "bound to this request"
            )
            out("   (id, operation, identity, key); the client opened it into protected memory")
            with clear.get_dek(dek_id) as dek:
                _check(bytes(sealed.key) == bytes(dek.key), "sealed and clear DEKs agree")
    with client("admin") as sender:
        envelope = sender.seal(plaintext, storage_key.identity)
    out(
        f"   admin sealed a record for {storage_key.identity}: fetched and verified its "
        f"certificate, {len(envelope)}-byte envelope"
    )
    with client("storage", storage_key) as receiver:
        opened = receiver.open(envelope)
    _check(opened == plaintext, "the recipient opens the sealed record")
    out(f"   storage opened it with its transport key: {opened.decode()!r}")


def _secrets(data: Path, address: str, out: Callable[[str], None]) -> None:
    pki_dir = data / "pki"
    value = b"replication-password: 7f3c-kmipd-demo"
    out("\nSecrets: named, versioned values beside the keys, wrapped under the namespace's KEK.")

    def client(name: str) -> km.Client:
        return km.Client(
            address,
            ca=pki_dir / "ca.pem",
            cert=pki_dir / f"{name}.pem",
            key=pki_dir / f"{name}-key.pem",
        )

    with client("admin") as kms:
        info = kms.set_secret("orders", "db/replication", value, content_type="text/plain")
        out(
            f"   set-secret orders/{info.name} -> version {info.version} ({info.size} bytes), "
            f"wrapped under KEK version {info.kek_version}"
        )
        with kms.get_secret("orders", "db/replication") as secret:
            _check(secret.value == value, "get-secret returns the value that was set")
            _check(value.decode() not in repr(secret), "the secret's repr hides its value")
            out(f"   get-secret -> {secret!r}")
            out("   (the value sits in locked, non-dumpable memory, zeroed when the block ends)")
        files = ("kmipd.db", "kmipd.db-wal", "audit.log")
        on_disk = b"".join((data / name).read_bytes() for name in files)
        _check(value not in on_disk, "the secret value never reaches the disk in the clear")
        out("   the value is nowhere in the database files or the audit trail")
    with client("storage") as kms:
        try:
            kms.get_secret("orders", "db/replication")
        except km.NotAuthorizedError:
            out("   storage, granted keys but not secrets, is refused: reading secrets is a grant")
        else:
            raise DemoFailedError("a client without a secrets grant read a secret")


def _client(data: Path, address: str, name: str) -> km.Client:
    pki_dir = data / "pki"
    return km.Client(
        address,
        ca=pki_dir / "ca.pem",
        cert=pki_dir / f"{name}.pem",
        key=pki_dir / f"{name}-key.pem",
    )


def _certificates(data: Path, address: str, tmp: Path, out: Callable[[str], None]) -> None:
    out("\nCertificates: the daemon's online CA (its key in the HSM) issues and renews them.")
    with _client(data, address, "storage") as kms:
        identity = kms.connect().identity
        key = km.generate_key("p256")
        issued = kms.issue_certificate(km.make_csr(key, identity=identity), validity=3600)
    ca_name = issued.chain[0].subject.rfc4514_string()
    out(f"   issue-certificate: serial {issued.serial[:16]}..., clientAuth for {identity}")
    out(f"   signed by {ca_name}, valid {issued.not_after - issued.not_before} s")
    _check(identity_of(issued.certificate) == identity, "the certificate names our own identity")
    current = tmp / "issued"
    write_key_and_certificate(current, key, issued)
    with km.Client(
        address, ca=data / "pki" / "ca.pem", cert=current / "cert.pem", key=current / "key.pem"
    ) as kms:
        _check(kms.connect().identity == identity, "the issued certificate passes mutual TLS")
        out("   a client connected with it: the daemon trusts its own online CA's certificates")
        new_key = km.generate_key("p256")
        renewed = kms.renew_certificate(km.make_csr(new_key))
    _check(renewed.serial != issued.serial, "renewal makes a new certificate")
    _check(
        renewed.certificate.public_key() != issued.certificate.public_key(),
        "the renewed certificate is for the new key",
    )
    _check(identity_of(renewed.certificate) == identity, "the renewed certificate keeps the ID")
    out(
        f"   renew-certificate (proof: the current certificate on the connection, and a new "
        f"key): serial {renewed.serial[:16]}..."
    )


def _signing_keys(data: Path, address: str, dek_id: str, out: Callable[[str], None]) -> None:
    out("\nSigning keys: key pairs whose private half signs inside the HSM, never exported.")
    release = b"release 1.0 tarball"
    digest = hashlib.sha256(release).digest()
    with _client(data, address, "admin") as kms:
        info = kms.create_signing_key("orders", "release-signing", "p256")
        out(f"   create-signing-key orders/{info.name} ({info.key_type}) -> {info.key_id}")
        signed = kms.sign_digest("orders", "release-signing", digest, "ES256")
        public = serialization.load_der_public_key(info.public_key)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signed.signature, release, ec.ECDSA(hashes.SHA256()))
        out(
            f"   sign-digest: the client sent only the SHA-256 digest; the {len(signed.signature)}"
            "-byte ES256 signature verifies with the exported public key"
        )
        check = kms.verify_digest("orders", "release-signing", digest, signed.signature)
        _check(check.valid, "the daemon verifies its own signature")
        out(f"   verify-digest on the daemon: valid (version {check.version})")
        try:
            kms.get_dek(info.key_id)
        except km.SigningKeyOnlyError:
            out("   one purpose per key: get-dek of the signing key is refused (signing-key-only)")
        else:
            raise DemoFailedError("a signing key was read as a DEK")
        try:
            kms.sign_digest("orders", dek_id, digest)
        except km.NotASigningKeyError:
            out("   and a DEK asked to sign is refused (not-a-signing-key)")
        else:
            raise DemoFailedError("a DEK signed")


if __name__ == "__main__":
    sys.exit(run_demo())
