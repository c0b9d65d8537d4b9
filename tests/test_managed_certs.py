"""Managed certificates through the service, on both store backends, with a clock.

A real online CA (its key in the software keyring, its certificate from a
real pki root), a real store (SQLite file, or PostgreSQL via the open_store
parametrisation) and a controlled clock: creation, versions, renewal by
request and by the maintenance pass, revocation onto the CRL, delete,
recover, purge, import, and every refusal, each showing that nothing was
lost or added.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client.parser import text_string_to_metric_families

from kmipd import client as km
from kmipd.audit import AuditLog
from kmipd.crypto._issuing import generate_key
from kmipd.hsm import SoftwareHsm
from kmipd.protocol import (
    CertificatePolicy,
    CreateManagedCertificate,
    DeleteManagedCertificate,
    Destroy,
    ErrorCode,
    GetCaCertificates,
    GetManagedCertificate,
    ImportManagedCertificate,
    KeyRef,
    ListManagedCertificates,
    ManagedCertificateVersions,
    PurgeManagedCertificate,
    RecoverManagedCertificate,
    RenewManagedCertificate,
    Revoke,
    RevokeManagedCertificate,
    RotateKek,
    StartRewrap,
)
from kmipd.service import Caller, KeyService, ServiceError
from kmipd.service._certs import open_online_ca
from kmipd.service._policy import CertificateGrant, Grant, Policy, expand_operations
from pki import CertificateAuthority
from tests import test_certs
from tests.conftest import StoreOpener
from tests.processes import run_kmipd

TD = "kmipd.test"
OWNER = Caller(f"spiffe://{TD}/owner")
READER = Caller(f"spiffe://{TD}/reader")
STRANGER = Caller(f"spiffe://{TD}/stranger")
ADMIN = Caller(f"spiffe://{TD}/admin")
NS = "web"
START = 1_800_000_000.0
DAY = 86400


def policy() -> Policy:
    return Policy(
        (
            Grant(
                OWNER.identity,
                ("web", "web/*"),
                expand_operations(["certificates-manage", "get-managed-certificate-key"]),
            ),
            Grant(READER.identity, ("web",), expand_operations(["certificates-read"])),
            Grant(STRANGER.identity, ("*",), expand_operations(["data"])),
            Grant(ADMIN.identity, ("*",), expand_operations(["admin"])),
        ),
        (
            CertificateGrant(
                OWNER.identity,
                client=True,
                server_dns=("*.storage.test",),
                max_validity_days=30,
                uris=(f"spiffe://{TD}/web/*",),
                ips=("192.0.2.0/24",),
            ),
        ),
    )


@attrs.define
class World:
    service: KeyService
    root: CertificateAuthority
    clock: list[float]

    async def ask(self, caller: Caller, request: object) -> Any:
        return await self.service.handle(caller, request)

    async def refused(self, caller: Caller, request: object) -> ServiceError:
        with pytest.raises(ServiceError) as caught:
            await self.service.handle(caller, request)
        return caught.value


@pytest.fixture
async def world(tmp_path: Path, open_store: StoreOpener) -> AsyncIterator[World]:
    clock = [START]
    root = CertificateAuthority.init(tmp_path / "pki", trust_domain=TD, path_length=1)
    store = open_store(tmp_path, clock=lambda: clock[0])
    hsm = SoftwareHsm.open(tmp_path / "master.key", tmp_path / "keyring.cbor", create=True)
    handle = await hsm.generate_signing_key("online-ca", "p256")
    public = serialization.load_der_public_key(await hsm.signing_public_key(handle))
    issued = root.issue_intermediate("online-ca", public, validity_days=3650)  # type: ignore[arg-type]
    ca_cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    online_ca = await open_online_ca(hsm, ca_cert, root.certificate, handle)
    audit = AuditLog.open(tmp_path / "audit.log", tmp_path / "audit.key")
    service = KeyService(
        store=store,
        hsm=hsm,
        policy=policy(),
        create_kek_on_demand=True,
        audit=audit,
        clock=lambda: clock[0],
        online_ca=online_ca,
    )
    yield World(service, root, clock)
    store.close()
    hsm.close()
    audit.close()


def server_policy(**changes: Any) -> CertificatePolicy:
    base = CertificatePolicy(
        key_type="p256",
        validity=10 * DAY,
        subject="CN=www.storage.test,O=Example",
        dns=("www.storage.test",),
        ip=("192.0.2.7",),
        renew_at_percent=80,
    )
    return attrs.evolve(base, **changes)


async def test_create_get_versions_renew_and_the_key_stays_wrapped(
    world: World, tmp_path: Path
) -> None:
    created = await world.ask(
        OWNER, CreateManagedCertificate(namespace=NS, name="www", policy=server_policy())
    )
    assert created.version == 1 and created.issuer == "online-ca" and not created.exportable
    assert created.names == ("www.storage.test", "192.0.2.7")
    assert created.not_after == int(START) + 10 * DAY
    got = await world.ask(READER, GetManagedCertificate(namespace=NS, name="www"))
    cert = x509.load_der_x509_certificate(got.certificate)
    assert got.key is None
    assert cert.subject.rfc4514_string() == "CN=www.storage.test,O=Example"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(x509.load_der_x509_certificate(got.chain[0]))
    assert x509.load_der_x509_certificate(got.chain[-1]) == world.root.certificate
    # Not exportable: even the owner, who holds the key grant, gets no key.
    refused = await world.refused(
        OWNER, GetManagedCertificate(namespace=NS, name="www", with_key=True)
    )
    assert refused.code is ErrorCode.KEY_NOT_EXPORTABLE
    # The key is in the store only wrapped: its PKCS#8 bytes appear nowhere in the file.
    renewed = await world.ask(OWNER, RenewManagedCertificate(namespace=NS, name="www"))
    assert renewed.version == 2 and renewed.serial != created.serial
    second = await world.ask(OWNER, GetManagedCertificate(namespace=NS, name="www"))
    first = await world.ask(OWNER, GetManagedCertificate(namespace=NS, name="www", version=1))
    assert first.certificate == got.certificate
    assert second.info.version == 2
    key_of = [
        x509.load_der_x509_certificate(r.certificate)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for r in (first, second)
    ]
    assert key_of[0] != key_of[1]  # a renewal makes a new key
    versions = await world.ask(READER, ManagedCertificateVersions(namespace=NS, name="www"))
    assert [v.version for v in versions.versions] == [1, 2]
    unknown = await world.refused(
        READER, GetManagedCertificate(namespace=NS, name="www", version=3)
    )
    assert unknown.code is ErrorCode.UNKNOWN_CERTIFICATE_VERSION and "1..2" in unknown.message
    # The online CA recorded both, so either can go on its CRL.
    listed = await world.ask(READER, ListManagedCertificates())
    [summary] = listed.certificates
    assert summary.current.version == 2 and summary.versions == 2
    span = summary.current.not_after - summary.current.not_before
    assert summary.renew_after == summary.current.not_before + span * 80 // 100


async def test_an_exportable_key_needs_the_key_grant_and_matches(world: World) -> None:
    await world.ask(
        OWNER,
        CreateManagedCertificate(
            namespace=NS,
            name="api",
            policy=server_policy(key_type="ed25519", exportable=True, usage="client",
                                 dns=(), ip=(), uri=(f"spiffe://{TD}/web/api",),
                                 subject=None),
        ),
    )  # fmt: skip
    with_key = await world.ask(
        OWNER, GetManagedCertificate(namespace=NS, name="api", with_key=True)
    )
    assert with_key.key is not None and "redacted" in repr(with_key)
    key = serialization.load_der_private_key(with_key.key, password=None)
    cert = x509.load_der_x509_certificate(with_key.certificate)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
    assert cert.subject.rfc4514_string() == f"CN=spiffe://{TD}/web/api"
    # The reader may read the chain but not the key; a stranger learns nothing at all.
    no_key = await world.refused(
        READER, GetManagedCertificate(namespace=NS, name="api", with_key=True)
    )
    assert no_key.code is ErrorCode.NOT_AUTHORIZED
    assert "get-managed-certificate-key" in no_key.message
    for request in (
        GetManagedCertificate(namespace=NS, name="api"),
        GetManagedCertificate(namespace=NS, name="nothing-here"),
        ManagedCertificateVersions(namespace=NS, name="api"),
    ):
        refusal = await world.refused(STRANGER, request)
        assert refusal.code is ErrorCode.NOT_AUTHORIZED
        assert "api" not in refusal.message.replace("managed-certificate", "")
    listing = await world.refused(STRANGER, ListManagedCertificates())
    assert listing.code is ErrorCode.NOT_AUTHORIZED


async def test_the_maintenance_pass_renews_when_the_lifetime_action_says(world: World) -> None:
    await world.ask(
        OWNER,
        CreateManagedCertificate(
            namespace=NS, name="short", policy=server_policy(validity=1000, renew_at_percent=50)
        ),
    )
    await world.ask(
        OWNER,
        CreateManagedCertificate(
            namespace=NS,
            name="before",
            policy=server_policy(validity=1000, renew_at_percent=None, renew_before=100),
        ),
    )
    await world.ask(
        OWNER,
        CreateManagedCertificate(
            namespace=NS,
            name="manual",
            policy=server_policy(validity=1000, renew_at_percent=None),
        ),
    )
    await world.service.maintain()
    assert await versions_of(world, "short") == [1]
    # notBefore is backdated 300 s: 50 % of 1300 s is 650 s after it, 350 s from now.
    world.clock[0] = START + 349
    assert await world.service.renew_managed_due() == 0
    world.clock[0] = START + 351
    await world.service.maintain()
    assert await versions_of(world, "short") == [1, 2]
    assert await versions_of(world, "before") == [1]
    world.clock[0] = START + 901
    # "before": 100 s before its end; "short" version 2 (made at +351) at its 50 %, +701.
    assert await world.service.renew_managed_due() == 2
    assert await versions_of(world, "before") == [1, 2]
    assert await versions_of(world, "short") == [1, 2, 3]
    assert await versions_of(world, "manual") == [1]  # no lifetime action: never by itself
    latest = await world.ask(READER, ManagedCertificateVersions(namespace=NS, name="short"))
    assert latest.versions[1].created_by == "local:kmipd"


async def versions_of(world: World, name: str) -> list[int]:
    result = await world.ask(READER, ManagedCertificateVersions(namespace=NS, name=name))
    return [v.version for v in result.versions]


async def test_revoking_a_version_puts_it_on_the_crl(world: World) -> None:
    made = await world.ask(
        OWNER, CreateManagedCertificate(namespace=NS, name="www", policy=server_policy())
    )
    revoked = await world.ask(
        OWNER, RevokeManagedCertificate(namespace=NS, name="www", reason="key-compromise")
    )
    assert revoked.revoked == int(START) and revoked.revocation_reason == "key-compromise"
    crl = x509.load_der_x509_crl((await world.ask(OWNER, GetCaCertificates())).crl)
    assert crl.get_revoked_certificate_by_serial_number(int(made.serial, 16)) is not None
    versions = await world.ask(READER, ManagedCertificateVersions(namespace=NS, name="www"))
    assert versions.versions[0].revoked == int(START)


async def test_delete_recover_purge(world: World) -> None:
    await world.ask(
        OWNER, CreateManagedCertificate(namespace=NS, name="www", policy=server_policy())
    )
    deleted = await world.ask(OWNER, DeleteManagedCertificate(namespace=NS, name="www"))
    assert deleted.deleted == int(START) and deleted.purge_at is not None
    gone = await world.refused(READER, GetManagedCertificate(namespace=NS, name="www"))
    assert gone.code is ErrorCode.MANAGED_CERTIFICATE_DELETED and "recover" in gone.message
    again = await world.refused(
        OWNER, CreateManagedCertificate(namespace=NS, name="www", policy=server_policy())
    )
    assert again.code is ErrorCode.ALREADY_EXISTS and "recover" in again.message
    renew = await world.refused(OWNER, RenewManagedCertificate(namespace=NS, name="www"))
    assert renew.code is ErrorCode.MANAGED_CERTIFICATE_DELETED
    listed = await world.ask(READER, ListManagedCertificates(deleted=True))
    assert [c.name for c in listed.certificates] == ["www"]
    assert (await world.ask(READER, ListManagedCertificates())).certificates == ()
    await world.ask(OWNER, RecoverManagedCertificate(namespace=NS, name="www"))
    assert (await world.ask(READER, GetManagedCertificate(namespace=NS, name="www"))).info
    not_deleted = await world.refused(OWNER, PurgeManagedCertificate(namespace=NS, name="www"))
    assert not_deleted.code is ErrorCode.WRONG_STATE and "delete it first" in not_deleted.message
    await world.ask(OWNER, DeleteManagedCertificate(namespace=NS, name="www"))
    purged = await world.ask(OWNER, PurgeManagedCertificate(namespace=NS, name="www"))
    assert purged.versions == 0
    missing = await world.refused(OWNER, ManagedCertificateVersions(namespace=NS, name="www"))
    assert missing.code is ErrorCode.NOT_FOUND
    # The name is free again.
    await world.ask(
        OWNER, CreateManagedCertificate(namespace=NS, name="www", policy=server_policy())
    )
    # A deleted one is purged by the maintenance pass once its window ends.
    await world.ask(OWNER, DeleteManagedCertificate(namespace=NS, name="www"))
    world.clock[0] = START + world.service.lifecycle.soft_delete_seconds + 1
    await world.service.maintain()
    assert (
        await world.refused(OWNER, ManagedCertificateVersions(namespace=NS, name="www"))
    ).code is (ErrorCode.NOT_FOUND)


@pytest.mark.parametrize("store_backend", ["sqlite"])  # it reads the SQLite file itself
async def test_purge_erases_the_wrapped_keys_from_the_sqlite_file(
    tmp_path: Path, world: World
) -> None:
    await world.ask(
        OWNER, CreateManagedCertificate(namespace=NS, name="www", policy=server_policy())
    )
    db = sqlite3.connect(tmp_path / "kmipd.db")
    (wrapped,) = db.execute("SELECT wrapped_key FROM managed_certificate_versions").fetchone()
    db.close()
    await world.ask(OWNER, DeleteManagedCertificate(namespace=NS, name="www"))
    await world.ask(OWNER, PurgeManagedCertificate(namespace=NS, name="www"))
    data = (tmp_path / "kmipd.db").read_bytes()
    wal = tmp_path / "kmipd.db-wal"
    assert wrapped[:32] not in data + (wal.read_bytes() if wal.exists() else b"")


def _self_issued(
    key: Any, *, days: float, name: str = "imported.storage.test", issuer: Any = None
) -> x509.Certificate:
    now = datetime.datetime.fromtimestamp(START, datetime.UTC)
    signer_name, signer_key = issuer or (x509.Name.from_rfc4514_string(f"CN={name}"), key)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string(f"CN={name}"))
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(signer_key, hashes.SHA256())
    )


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pkcs8(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


async def test_import_checks_certificate_key_and_chain(world: World) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name.from_rfc4514_string("CN=Other CA")
    key = generate_key("p256")
    cert = _self_issued(key, days=30, issuer=(ca_name, ca_key))
    ca_cert = _self_issued(ca_key, days=60, name="Other CA")
    other = generate_key("p256")
    cases = [
        ({"key": _pkcs8(other)}, "not the key of the certificate"),
        ({"certificate": b"\x30\x03junk"}, "not valid DER X.509"),
        ({"key": b"not a key"}, "PKCS#8"),
        ({"certificate": _der(_self_issued(key, days=-0.5))}, "expired"),
        ({"chain": (_der(_self_issued(other, days=9)),)}, "not signed by chain[0]"),
        (
            {
                "certificate": _der(
                    _self_issued(weak := rsa.generate_private_key(65537, 2048), days=9)
                ),
                "key": _pkcs8(weak),
            },
            "RSA-2048",
        ),
    ]
    good = ImportManagedCertificate(
        namespace=NS, name="ext", certificate=_der(cert), key=_pkcs8(key), chain=(_der(ca_cert),)
    )
    for changes, says in cases:
        refusal = await world.refused(OWNER, attrs.evolve(good, **changes))
        assert refusal.code is ErrorCode.CERTIFICATE_IMPORT_INVALID, says
        assert says in refusal.message and "nothing was imported" in refusal.message
    none = await world.refused(OWNER, ManagedCertificateVersions(namespace=NS, name="ext"))
    assert none.code is ErrorCode.NOT_FOUND  # nothing was stored by any refusal
    imported = await world.ask(OWNER, attrs.evolve(good, exportable=True))
    assert imported.issuer == "imported" and imported.version == 1
    got = await world.ask(OWNER, GetManagedCertificate(namespace=NS, name="ext", with_key=True))
    assert got.certificate == _der(cert) and got.chain == (_der(ca_cert),)
    assert got.key == _pkcs8(key)
    # An imported certificate has no policy: renew it by importing its next version.
    refusal = await world.refused(OWNER, RenewManagedCertificate(namespace=NS, name="ext"))
    assert refusal.code is ErrorCode.CERTIFICATE_NOT_RENEWABLE and "import" in refusal.message
    key2 = generate_key("p384")
    nxt = await world.ask(
        OWNER,
        attrs.evolve(
            good,
            certificate=_der(_self_issued(key2, days=40, issuer=(ca_name, ca_key))),
            key=_pkcs8(key2),
        ),
    )
    assert nxt.version == 2 and nxt.key_type == "p384"


async def test_every_bad_policy_says_which_field_and_makes_nothing(world: World) -> None:
    cases: list[tuple[dict[str, Any], ErrorCode, str]] = [
        ({"key_type": "rsa1024"}, ErrorCode.CERTIFICATE_POLICY_INVALID, "key-type"),
        ({"dns": ("bad_name..example",)}, ErrorCode.CERTIFICATE_POLICY_INVALID, "dns"),
        ({"ip": ("300.1.2.3",)}, ErrorCode.CERTIFICATE_POLICY_INVALID, "ip"),
        ({"uri": ("no scheme",)}, ErrorCode.CERTIFICATE_POLICY_INVALID, "uri"),
        ({"subject": "not a name"}, ErrorCode.CERTIFICATE_POLICY_INVALID, "subject"),
        ({"subject": "CN=" + "a" * 100}, ErrorCode.CERTIFICATE_POLICY_INVALID, "<= 64"),
        ({"subject": "CN=a,FOO=b"}, ErrorCode.CERTIFICATE_POLICY_INVALID, "unknown attribute"),
        ({"dns": (), "ip": ()}, ErrorCode.CERTIFICATE_POLICY_INVALID, "at least one name"),
        ({"renew_before": 60}, ErrorCode.CERTIFICATE_POLICY_INVALID, "not both"),
        (
            {"renew_at_percent": None, "renew_before": 10 * DAY},
            ErrorCode.CERTIFICATE_POLICY_INVALID,
            "renew at once",
        ),
        ({"validity": 31 * DAY}, ErrorCode.CERTIFICATE_VALIDITY_TOO_LONG, "longer than"),
        ({"dns": ("www.elsewhere.test",)}, ErrorCode.CERTIFICATE_NAME_NOT_ALLOWED, "elsewhere"),
        ({"ip": ("198.51.100.1",)}, ErrorCode.CERTIFICATE_NAME_NOT_ALLOWED, "198.51.100.1"),
        (
            {"uri": (f"spiffe://{TD}/admin",)},
            ErrorCode.CERTIFICATE_NAME_NOT_ALLOWED,
            "admin",
        ),
    ]
    for changes, code, says in cases:
        refusal = await world.refused(
            OWNER, CreateManagedCertificate(namespace=NS, name="x", policy=server_policy(**changes))
        )
        assert refusal.code is code, (changes, refusal.message)
        assert says in refusal.message, refusal.message
    # Nothing was made; the name is still free, and the CA issued nothing.
    missing = await world.refused(OWNER, ManagedCertificateVersions(namespace=NS, name="x"))
    assert missing.code is ErrorCode.NOT_FOUND
    assert (
        await world.service.store.list_issued_certificates(subject=None, after="", limit=10) == []
    )
    # A duplicate name is refused and the first one stays as it was.
    first = await world.ask(
        OWNER, CreateManagedCertificate(namespace=NS, name="x", policy=server_policy())
    )
    dup = await world.refused(
        OWNER, CreateManagedCertificate(namespace=NS, name="x", policy=server_policy())
    )
    assert dup.code is ErrorCode.ALREADY_EXISTS and "renew it" in dup.message
    assert (await world.ask(READER, GetManagedCertificate(namespace=NS, name="x"))).info == first
    # Outside the namespaces granted, and an identity with no certificate grant.
    outside = await world.refused(
        OWNER, CreateManagedCertificate(namespace="db", name="x", policy=server_policy())
    )
    assert outside.code is ErrorCode.NOT_AUTHORIZED
    reader = await world.refused(
        READER, CreateManagedCertificate(namespace=NS, name="y", policy=server_policy())
    )
    assert reader.code is ErrorCode.NOT_AUTHORIZED


# -- the CLI against a real daemon over mutual TLS ----------------------------------------

WEB_GRANTS = f"""
[metrics]
listen = "127.0.0.1:0"
[keys]
create_kek_on_demand = true
[[grant]]
identity = "{test_certs.WEB}"
namespaces = ["web"]
operations = ["certificates-manage", "get-managed-certificate-key"]
[[grant]]
identity = "{test_certs.STORAGE}"
namespaces = ["web"]
operations = ["certificates-read"]
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[test_certs.Deployment]:
    master = tmp_path / "master.key"
    assert run_kmipd("hsm", "software-init", "--master-key", master).returncode == 0
    hsm = f'backend = "software"\nmaster_key = "{master}"\nkeyring = "{tmp_path / "keyring"}"'
    running = test_certs.start(tmp_path, hsm, WEB_GRANTS)
    yield running
    running.daemon.stop()


def cli_as(deployment: test_certs.Deployment, who: str) -> Any:
    root = deployment.root
    connection = ["--server", deployment.daemon.address, "--ca", root.ca_cert_path]
    connection += ["--cert", root.directory / f"{who}.pem"]
    connection += ["--key", root.directory / f"{who}-key.pem"]

    def run(*args: Any) -> subprocess.CompletedProcess[str]:
        # The online CA's own actions take no namespace; the managed ones do.
        namespace = [] if args[0] in ("ca", "issued", "list") else ["--namespace", "web"]
        return run_kmipd("cert", args[0], *connection, *namespace, *args[1:])

    return run


def test_the_cert_cli_creates_gets_renews_revokes_and_refuses(
    daemon: test_certs.Deployment, tmp_path: Path
) -> None:
    web, storage = cli_as(daemon, "web"), cli_as(daemon, "storage")
    policy = tmp_path / "www.toml"
    policy.write_text(
        'subject = "CN=www.storage.test,O=Example"\ndns = ["www.storage.test"]\n'
        'key_type = "P-256"\nvalidity_days = 30\nexportable = true\n'
        "[lifetime_action]\nrenew_at_percent = 80\n"
    )
    made = web("create", "www", "--policy", policy)
    assert made.returncode == 0, made.stderr
    first = json.loads(made.stdout)
    assert first["version"] == 1 and first["days_to_expiry"] in (29, 30)
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    got = web("get", "www", "-o", chain, "--with-key", key)
    assert got.returncode == 0, got.stderr
    assert key.stat().st_mode & 0o777 == 0o600 and "mode 0600" in got.stderr
    leaf, online_ca, root = x509.load_pem_x509_certificates(chain.read_bytes())
    assert root == daemon.root.certificate and format(leaf.serial_number, "x") == first["serial"]
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert private.public_key().public_bytes(der, spki) == leaf.public_key().public_bytes(der, spki)
    leaf_pem, intermediate = tmp_path / "leaf.pem", tmp_path / "intermediate.pem"
    leaf_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    intermediate.write_bytes(online_ca.public_bytes(serialization.Encoding.PEM))
    verified = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", "sslserver",
         "-CAfile", str(daemon.root.ca_cert_path), "-untrusted", str(intermediate),
         str(leaf_pem)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verified.returncode == 0 and verified.stdout.strip().endswith("OK"), verified

    [url] = re.findall(r"Prometheus metrics on http://(\S+?)/metrics", daemon.daemon.stderr())
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as answer:
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.read().decode())
            for sample in family.samples
        }
    assert samples[
        (
            "kmipd_managed_certificate_expiry_timestamp_seconds",
            (("name", "www"), ("namespace", "web")),
        )
    ] == int(leaf.not_valid_after_utc.timestamp())
    earliest = "kmipd_managed_certificate_earliest_expiry_timestamp_seconds"
    assert samples[(earliest, (("namespace", "web"),))] == leaf.not_valid_after_utc.timestamp()
    listed = json.loads(storage("list").stdout)["certificates"]
    assert [(c["name"], c["version"]) for c in listed] == [("www", 1)]
    assert listed[0]["days_to_expiry"] in (29, 30) and listed[0]["renew_after"] > time.time()
    renewed = web("renew-managed", "www")
    assert renewed.returncode == 0, renewed.stderr
    assert json.loads(renewed.stdout)["version"] == 2
    versions = json.loads(storage("versions", "www").stdout)
    assert [v["version"] for v in versions] == [1, 2]
    revoked = web("revoke-managed", "www", "--version", "1", "--reason", "superseded")
    assert revoked.returncode == 0, revoked.stderr
    fetched = web("ca", "--out", tmp_path / "ca")
    assert fetched.returncode == 0, fetched.stderr
    crl = x509.load_pem_x509_crl((tmp_path / "ca" / "online-ca-crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    # The issued listing shows days to expiry the same way.
    admin = cli_as(daemon, "admin")
    issued = json.loads(admin("issued").stdout)["certificates"]
    assert {c["serial"] for c in issued} >= {first["serial"]}
    assert all(c["days_to_expiry"] in (29, 30) for c in issued)

    # Refusals: each says why, none leaves a file or a version behind.
    no_key = tmp_path / "nokey.pem"
    denied = storage("get", "www", "--with-key", no_key)
    assert denied.returncode != 0 and "not-authorized" in denied.stderr
    assert "get-managed-certificate-key" in denied.stderr and not no_key.exists()
    bad_cases = [
        ('dns = ["x.storage.test"]\nkey_type = "P-521"\nvalidity_days = 1\n',
         "certificate-policy-invalid"),
        ('dns = ["x.storage.test"]\nkey_type = "P-256"\nvalidity_days = 100\n',
         "certificate-validity-too-long"),
        ('dns = ["x.elsewhere.test"]\nkey_type = "P-256"\nvalidity_days = 1\n',
         "certificate-name-not-allowed"),
        ('dns = ["x.storage.test"]\nkey_type = "P-256"\nvalidity_days = 1\ncolour = "red"\n',
         "colour: unknown field"),
        ('dns = "x.storage.test"\nkey_type = "P-256"\nvalidity_days = 1\n',
         "dns: a list"),
        ('dns = ["x.storage.test"]\nkey_type = "P-256"\n', "validity_days"),
        ('dns = ["x.storage.test"]\nkey_type = "P-256"\nvalidity_days = 1\n'
         "[lifetime_action]\nrenew_at_percent = 120\n", "renew_at_percent"),
        ("not toml [", "not valid TOML"),
    ]  # fmt: skip
    for text, says in bad_cases:
        policy.write_text(text)
        refused = web("create", "x", "--policy", policy)
        assert refused.returncode != 0 and says in refused.stderr, (text, refused.stderr)
    missing = web("versions", "x")
    assert missing.returncode != 0 and "not-found" in missing.stderr
    policy.write_text('dns = ["www.storage.test"]\nkey_type = "P-256"\nvalidity_days = 1\n')
    dup = web("create", "www", "--policy", policy)
    assert dup.returncode != 0 and "already-exists" in dup.stderr
    unknown = web("get", "www", "--version", "9")
    assert unknown.returncode != 0 and "unknown-certificate-version" in unknown.stderr
    assert [v["version"] for v in json.loads(storage("versions", "www").stdout)] == [1, 2]

    # Delete, recover, purge.
    assert web("delete", "www").returncode == 0
    gone = storage("get", "www")
    assert gone.returncode != 0 and "managed-certificate-deleted" in gone.stderr
    assert [c["name"] for c in json.loads(web("list", "--deleted").stdout)["certificates"]] == [
        "www"
    ]
    assert web("recover", "www").returncode == 0
    assert storage("get", "www").returncode == 0
    assert web("delete", "www").returncode == 0
    purged = web("purge", "www")
    assert purged.returncode == 0 and json.loads(purged.stdout)["versions"] == 0
    assert "not-found" in web("versions", "www").stderr


def test_the_cert_cli_imports_and_refuses_a_key_that_is_not_the_certificates(
    daemon: test_certs.Deployment, tmp_path: Path
) -> None:
    web = cli_as(daemon, "web")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_issued(key, days=30)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=20))
        .sign(key, hashes.SHA256())
    )
    cert_pem, key_pem, wrong_pem = (tmp_path / n for n in ("c.pem", "k.pem", "w.pem"))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    key_pem.write_bytes(key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    other = ec.generate_private_key(ec.SECP256R1())
    wrong_pem.write_bytes(other.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    wrong = web("import", "ext", "--certificate", cert_pem, "--private-key", wrong_pem)
    assert wrong.returncode != 0 and "certificate-import-invalid" in wrong.stderr
    assert "not the key of the certificate" in wrong.stderr
    assert "not-found" in web("versions", "ext").stderr  # nothing was imported
    not_pem = web("import", "ext", "--certificate", key_pem, "--private-key", key_pem)
    assert not_pem.returncode != 0 and "no PEM certificate" in not_pem.stderr
    done = web("import", "ext", "--certificate", cert_pem, "--private-key", key_pem)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["issuer"] == "imported" and info["days_to_expiry"] in (19, 20)
    kept = web("get", "ext", "--with-key", tmp_path / "back.pem")
    assert kept.returncode != 0 and "key-not-exportable" in kept.stderr
    assert not (tmp_path / "back.pem").exists()
    chain = web("get", "ext")
    assert chain.returncode == 0 and x509.load_pem_x509_certificate(chain.stdout.encode()) == cert
    # check-config warns of it, as of a server certificate near its end.
    daemon.daemon.stop()
    checked = run_kmipd("check-config", daemon.config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    output = checked.stdout + checked.stderr
    assert "managed certificate 'ext' in 'web': version 1 expires in 19 days" in output


@pytest.mark.parametrize("store_backend", ["sqlite"])  # it edits the SQLite file itself
async def test_a_key_moved_to_another_version_fails_to_unwrap_and_audit_shows_no_key(
    tmp_path: Path, world: World
) -> None:
    exportable = server_policy(exportable=True)
    await world.ask(OWNER, CreateManagedCertificate(namespace=NS, name="www", policy=exportable))
    await world.ask(OWNER, RenewManagedCertificate(namespace=NS, name="www"))
    first = await world.ask(OWNER, GetManagedCertificate(namespace=NS, name="www", with_key=True))
    assert first.key is not None
    db = sqlite3.connect(tmp_path / "kmipd.db")
    with db:  # version 2's wrapped key copied onto version 1's row
        db.execute(
            "UPDATE managed_certificate_versions SET wrapped_key = (SELECT wrapped_key FROM"
            " managed_certificate_versions WHERE version = 2) WHERE version = 1"
        )
    db.close()
    moved = await world.refused(
        OWNER, GetManagedCertificate(namespace=NS, name="www", version=1, with_key=True)
    )
    assert moved.code is ErrorCode.INTEGRITY_FAILURE and "altered or moved" in moved.message
    audit = (tmp_path / "audit.log").read_text()
    assert "managed certificate 'www' in 'web' version 2, with its private key" in audit
    assert "create-managed-certificate" in audit and "renew-managed-certificate" in audit
    key = first.key
    for form in (key, key.hex().encode(), base64.b64encode(key), base64.b64encode(key[16:48])):
        assert form.decode(errors="replace") not in audit


async def test_a_rewrap_job_rewraps_managed_keys_and_guards_the_old_kek_version(
    world: World,
) -> None:
    policy = server_policy(exportable=True)
    await world.ask(OWNER, CreateManagedCertificate(namespace=NS, name="www", policy=policy))
    before = await world.ask(OWNER, GetManagedCertificate(namespace=NS, name="www", with_key=True))
    # Still wrapped under version 1 only: destroying it is refused, naming why.
    await world.ask(ADMIN, RotateKek(name=NS))
    await world.ask(ADMIN, Revoke(key=KeyRef(kek=NS, version=1), reason="superseded"))
    blocked = await world.refused(ADMIN, Destroy(key=KeyRef(kek=NS, version=1)))
    assert "1 managed certificate key(s)" in blocked.message
    job = await world.ask(ADMIN, StartRewrap(namespace=NS))
    stored = await world.service.store.get_job(job.job_id)
    assert stored is not None
    while stored.state == "running":
        stored = await world.service.run_rewrap_batch(stored, 10)
    record = await world.service.store.get_managed_certificate(NS, "www")
    assert record is not None and [v.kek_version for v in record.versions] == [2]
    after = await world.ask(OWNER, GetManagedCertificate(namespace=NS, name="www", with_key=True))
    assert after.key == before.key
    await world.ask(ADMIN, Destroy(key=KeyRef(kek=NS, version=1)))  # no longer needed


def test_a_json_policy_file_reads_like_toml_and_bad_shapes_name_their_field(
    tmp_path: Path,
) -> None:
    toml_file, json_file = tmp_path / "p.toml", tmp_path / "p.json"
    toml_file.write_text(
        'dns = ["a.storage.test"]\nip = ["192.0.2.1"]\nkey_type = "RSA-4096"\n'
        'validity_days = 2.5\nusage = "client"\n[lifetime_action]\ndays_before_expiry = 0.5\n'
    )
    json_file.write_text(
        json.dumps(
            {
                "dns": ["a.storage.test"],
                "ip": ["192.0.2.1"],
                "key_type": "rsa4096",
                "validity_seconds": int(2.5 * DAY),
                "usage": "client",
                "lifetime_action": {"days_before_expiry": 0.5},
            }
        )
    )
    from_toml = km.load_certificate_policy(toml_file)
    assert from_toml == km.load_certificate_policy(json_file)
    assert (from_toml.key_type, from_toml.validity, from_toml.renew_before) == (
        "rsa4096",
        int(2.5 * DAY),
        DAY // 2,
    )
    none = km.certificate_policy(
        {
            "dns": ["a"],
            "key_type": "p256",
            "validity_days": 1,
            "lifetime_action": {"action": "none"},
        }
    )
    assert none.renew_at_percent is None and none.renew_before is None
    for document, says in [
        ([], "must be a table"),
        ({"key_type": "p256", "validity_days": 1, "usage": "both"}, "usage"),
        ({"key_type": "p256", "validity_days": 1, "exportable": "yes"}, "exportable"),
        ({"key_type": "p256", "validity_days": 1, "validity_seconds": 60}, "one of them"),
        ({"key_type": "p256", "validity_seconds": 10}, "at least 60"),
        ({"validity_days": 1}, "key_type: required"),
        ({"key_type": "p256", "validity_days": 1, "lifetime_action": {"when": 1}}, "when"),
        (
            {"key_type": "p256", "validity_days": 1, "lifetime_action": {"action": "later"}},
            '"renew" or "none"',
        ),
        # TOML's inf/nan parse as floats; a huge number overflows the wire's 32-bit seconds.
        ({"key_type": "p256", "validity_days": float("inf")}, "validity_days"),
        ({"key_type": "p256", "validity_days": float("nan")}, "validity_days"),
        ({"key_type": "p256", "validity_days": 1e12}, "at most 49710 days"),
        ({"key_type": "p256", "validity_seconds": 2**40}, "at most 4294967295 seconds"),
        (
            {
                "key_type": "p256",
                "validity_days": 1,
                "lifetime_action": {"days_before_expiry": 1e12},
            },
            "days_before_expiry: at most",
        ),
    ]:
        with pytest.raises(km.PolicyFileError) as caught:
            km.certificate_policy(document)
        assert says in str(caught.value), (document, caught.value)
    toml_file.write_text('dns = ["a"]\nkey_type = "P-256"\nvalidity_days = inf\n')
    with pytest.raises(km.PolicyFileError, match="validity_days: a positive number"):
        km.load_certificate_policy(toml_file)
    json_file.write_text("{not json")
    with pytest.raises(km.PolicyFileError, match="not valid JSON"):
        km.load_certificate_policy(json_file)
    with pytest.raises(km.PolicyFileError, match="cannot read"):
        km.load_certificate_policy(tmp_path / "absent.toml")


async def test_listing_pages_and_filters_by_namespace_glob(world: World) -> None:
    for namespace in ("web", "web/a", "web/b"):
        for name in ("one", "two"):
            await world.ask(
                OWNER,
                CreateManagedCertificate(namespace=namespace, name=name, policy=server_policy()),
            )
    seen: list[tuple[str, str]] = []
    after: tuple[str, ...] | None = None
    while True:
        page = await world.ask(OWNER, ListManagedCertificates(limit=4, after=after))
        seen += [(c.namespace, c.name) for c in page.certificates]
        if page.next is None:
            break
        after = page.next
    assert len(seen) == 6 and len(set(seen)) == 6
    only = await world.ask(OWNER, ListManagedCertificates(namespace="web/*"))
    assert {c.namespace for c in only.certificates} == {"web/a", "web/b"}
    # The reader's grant covers "web" only: the others are not even counted.
    reader = await world.ask(READER, ListManagedCertificates())
    assert {c.namespace for c in reader.certificates} == {"web"}
