"""The built-in CA: files, modes, extensions, chains, revocation, refusals, real TLS."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import socket
import ssl
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    ClientVerifier,
    PolicyBuilder,
    Store,
    VerificationError,
)

from kmipd.daemon._dev import prepare_dev
from pki import (
    SERVER_VALIDITY_DAYS,
    CertificateAuthority,
    IssuedCertificate,
    KeyType,
    PkiError,
    load_certificate,
    load_crl_serials,
    write_private_file,
)
from tests.processes import run_kmipd

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)
CA_FILES = {"ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "crl.pem", "index.json"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Set the process umask for one test and restore it afterwards."""
    original = os.umask(0o022)
    os.umask(original)
    yield os.umask
    os.umask(original)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(
        tmp_path / "pki",
        trust_domain="example.org",
        dns_names=("kms.example.org", "localhost"),
        ip_addresses=("127.0.0.1", "::1"),
    )


@pytest.fixture(scope="module")
def rsa_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """The one RSA CA of this file: RSA-3072 keys take a while to generate."""
    return CertificateAuthority.init(
        tmp_path_factory.mktemp("rsa") / "pki", key_type=KeyType.RSA_3072
    )


def client_verifier(
    ca: CertificateAuthority, at: datetime.datetime | None = None
) -> ClientVerifier:
    builder = PolicyBuilder().store(Store([load_certificate(ca.ca_cert_path)]))
    return builder.time(at or datetime.datetime.now(datetime.UTC)).build_client_verifier()


def verified_identity(ca: CertificateAuthority, issued: IssuedCertificate) -> list[str]:
    """The URI SANs cryptography's verifier reports once the chain to the CA checks out."""
    verified = client_verifier(ca).verify(load_certificate(issued.cert_path), [])
    return [
        s.value for s in verified.subjects or [] if isinstance(s, x509.UniformResourceIdentifier)
    ]


def ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def aki(holder: x509.Certificate | x509.CertificateRevocationList) -> bytes | None:
    return holder.extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier
    ).value.key_identifier


def crl_of(ca: CertificateAuthority) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(ca.crl_path.read_bytes())


def crl_number(ca: CertificateAuthority) -> int:
    return crl_of(ca).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


# -- init and load ------------------------------------------------------------------------


def test_init_writes_every_file_with_safe_modes(
    tmp_path: Path, umask: Callable[[int], int]
) -> None:
    directory = tmp_path / "pki"
    directory.mkdir(mode=0o755)  # an existing, too open directory is tightened
    umask(0)  # the modes must not depend on the caller's umask
    authority = CertificateAuthority.init(directory, trust_domain="example.org")
    assert {p.name for p in directory.iterdir()} == CA_FILES
    assert mode(directory) == 0o700
    for private in (authority.ca_key_path, authority.server_key_path):
        assert mode(private) == 0o600
    for public in ("ca.pem", "server.pem", "crl.pem", "index.json"):
        assert mode(directory / public) == 0o644
    index = json.loads((directory / "index.json").read_text())
    assert (index["trust_domain"], index["key_type"], index["revoked"]) == ("example.org", "ec", [])
    server_serial = load_certificate(authority.server_cert_path).serial_number
    assert index["issued"]["server"] == {
        "serial": str(server_serial),
        "kind": "server",
        "cert": "server.pem",
        "key": "server-key.pem",
    }
    assert load_crl_serials(authority.crl_path, authority.ca_cert_path) == frozenset()
    assert crl_number(authority) == 1


def test_init_creates_missing_parents_with_mode_0700(tmp_path: Path) -> None:
    authority = CertificateAuthority.init(tmp_path / "a" / "b")
    assert mode(authority.directory) == 0o700
    assert (
        repr(authority)
        == f"CertificateAuthority({str(tmp_path / 'a' / 'b')!r}, trust_domain='kmipd.test')"
    )


def test_ca_certificate_is_a_constrained_root(ca: CertificateAuthority) -> None:
    cert = load_certificate(ca.ca_cert_path)
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=kmipd test CA example.org"
    cert.verify_directly_issued_by(cert)  # self-signed
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not (usage.value.digital_signature or usage.value.key_encipherment)
    assert ski(cert) == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_load_reopens_the_same_ca(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("app")
    reopened = CertificateAuthority.load(ca.directory)
    assert (reopened.trust_domain, reopened.key_type) == ("example.org", KeyType.EC_P256)
    assert reopened.certificate == ca.certificate
    reopened.revoke("app")  # the index carried the name over
    assert load_crl_serials(ca.crl_path, ca.ca_cert_path) == {issued.serial}


@pytest.mark.parametrize("survivor", ["ca.pem", "ca-key.pem"])
def test_existing_ca_is_not_overwritten_without_force(
    ca: CertificateAuthority, survivor: str
) -> None:
    for name in CA_FILES - {survivor}:
        (ca.directory / name).unlink()
    before = snapshot(ca.directory)
    with pytest.raises(PkiError, match=f"already holds a CA \\({re.escape(survivor)}\\)"):
        CertificateAuthority.init(ca.directory)
    assert snapshot(ca.directory) == before  # nothing lost
    replaced = CertificateAuthority.init(ca.directory, force=True)
    assert replaced.ca_cert_path.read_bytes() != before.get("ca.pem")
    assert CertificateAuthority.load(ca.directory).certificate == replaced.certificate


def test_bad_server_names_are_refused_before_anything_is_written(ca: CertificateAuthority) -> None:
    before = snapshot(ca.directory)
    with pytest.raises(PkiError, match="server IP address 'not-an-ip' is invalid"):
        CertificateAuthority.init(ca.directory, ip_addresses=("not-an-ip",), force=True)
    with pytest.raises(PkiError, match="server DNS name 'bad name' is invalid"):
        CertificateAuthority.init(ca.directory, dns_names=("bad name",), force=True)
    with pytest.raises(PkiError, match="at least one DNS name or IP address"):
        CertificateAuthority.init(ca.directory, dns_names=(), ip_addresses=(), force=True)
    with pytest.raises(PkiError, match="validity_days"):
        CertificateAuthority.init(ca.directory, validity_days=0, force=True)
    assert snapshot(ca.directory) == before


@pytest.mark.parametrize("domain", ["", "UPPER.case", "has space", "a/b", "x" * 256, "dé.test"])
def test_bad_trust_domains_are_refused(tmp_path: Path, domain: str) -> None:
    with pytest.raises(PkiError, match=f"trust domain {re.escape(repr(domain))} is invalid"):
        CertificateAuthority.init(tmp_path / "x", trust_domain=domain)
    assert not (tmp_path / "x").exists()


def test_trust_domain_names_the_identities(tmp_path: Path) -> None:
    authority = CertificateAuthority.init(tmp_path / "x", trust_domain="prod_2.example-corp.io")
    assert authority.identity_for("db") == "spiffe://prod_2.example-corp.io/db"


def _swap_key(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other", trust_domain="example.org")
    ca.ca_key_path.write_bytes(other.ca_key_path.read_bytes())


def _foreign_index(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other", trust_domain="other.org")
    (ca.directory / "index.json").write_bytes((other.directory / "index.json").read_bytes())


def _write(name: str, text: str) -> Callable[[CertificateAuthority, Path], None]:
    def damage(ca: CertificateAuthority, tmp_path: Path) -> None:
        (ca.directory / name).write_text(text)

    return damage


def _remove(name: str) -> Callable[[CertificateAuthority, Path], None]:
    def damage(ca: CertificateAuthority, tmp_path: Path) -> None:
        (ca.directory / name).unlink()

    return damage


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_remove("ca.pem"), r"cannot read CA certificate .*/ca\.pem: No such file"),
        (_write("ca.pem", "not a certificate"), r"CA certificate .*/ca\.pem is not a PEM cert"),
        (_remove("ca-key.pem"), r"cannot read CA key .*/ca-key\.pem"),
        (_write("ca-key.pem", "-----BEGIN PRIVATE KEY-----\n"), r"CA key .*/ca-key\.pem is not"),
        (_swap_key, r"CA key .*/ca-key\.pem does not match the CA certificate .*/ca\.pem"),
        (_remove("index.json"), r"cannot read CA index .*/index\.json"),
        (_write("index.json", "{not json"), r"CA index .*/index\.json is corrupt"),
        (_write("index.json", '{"version": 1}'), r"index\.json is corrupt: 'trust_domain' is"),
        (_foreign_index, r"CA index .*/index\.json does not belong to the CA in .*/ca\.pem"),
    ],
    ids=[
        "missing-cert",
        "garbage-cert",
        "missing-key",
        "garbage-key",
        "swapped-key",
        "missing-index",
        "garbage-index",
        "incomplete-index",
        "foreign-index",
    ],
)
def test_load_names_the_broken_file(
    ca: CertificateAuthority,
    tmp_path: Path,
    damage: Callable[[CertificateAuthority, Path], None],
    expected: str,
) -> None:
    damage(ca, tmp_path)
    with pytest.raises(PkiError, match=expected):
        CertificateAuthority.load(ca.directory)


def test_corrupt_index_entries_are_named(ca: CertificateAuthority) -> None:
    ca.issue_client("app")
    ca.revoke("app")
    path = ca.directory / "index.json"
    document = json.loads(path.read_text())
    document["revoked"][0]["reason"] = "bored"
    path.write_text(json.dumps(document))
    with pytest.raises(
        PkiError, match=r"index\.json is corrupt: unknown revocation reason 'bored'"
    ):
        CertificateAuthority.load(ca.directory)


# -- server certificate -----------------------------------------------------------------


def test_server_certificate_verifies_for_its_names_only(ca: CertificateAuthority) -> None:
    cert = load_certificate(ca.server_cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kms.example.org"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert not eku.critical
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["kms.example.org", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    store = Store([load_certificate(ca.ca_cert_path)])
    names: list[x509.DNSName | x509.IPAddress] = [
        x509.DNSName("kms.example.org"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for name in names:
        PolicyBuilder().store(store).build_server_verifier(name).verify(cert, [])
    stranger = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("evil.example.org"))
    with pytest.raises(VerificationError, match="no matching subjectAltName"):
        stranger.verify(cert, [])
    with pytest.raises(VerificationError, match="EKU"):
        client_verifier(ca).verify(cert, [])  # serverAuth only: no use as a client


def test_server_certificate_rotation(ca: CertificateAuthority) -> None:
    old = load_certificate(ca.server_cert_path)
    with pytest.raises(PkiError, match=r"server\.pem already exists"):
        ca.issue_server(force=False)
    assert load_certificate(ca.server_cert_path) == old
    rotated = ca.issue_server(dns_names=("kms2.example.org",), ip_addresses=())
    assert (rotated.name, rotated.identity, rotated.cert_path) == (
        "server",
        None,
        ca.server_cert_path,
    )
    cert = load_certificate(ca.server_cert_path)
    assert cert.serial_number == rotated.serial != old.serial_number
    assert cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName) == ["kms2.example.org"]
    assert mode(ca.server_key_path) == 0o600
    ca.revoke("server")  # the index follows the rotation
    assert ca.revoked_serials() == {rotated.serial}


# -- client certificates ----------------------------------------------------------------


def test_client_certificate_is_an_x509_svid(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("db-node-7")
    assert issued.identity == "spiffe://example.org/db-node-7" == ca.identity_for("db-node-7")
    assert (issued.cert_path, issued.key_path) == (
        ca.directory / "db-node-7.pem",
        ca.directory / "db-node-7-key.pem",
    )
    assert (mode(issued.cert_path), mode(issued.key_path)) == (0o644, 0o600)
    cert = load_certificate(issued.cert_path)
    assert cert.serial_number == issued.serial
    assert cert.subject.rfc4514_string() == "CN=db-node-7"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier(issued.identity)]  # exactly one name
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not (usage.value.key_encipherment or usage.value.key_cert_sign)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert not eku.critical
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert aki(cert) == ski(load_certificate(ca.ca_cert_path))
    assert ski(cert) == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    now = datetime.datetime.now(datetime.UTC)
    assert now - datetime.timedelta(minutes=6) < cert.not_valid_before_utc < now
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > 364 * DAY
    assert verified_identity(ca, issued) == [issued.identity]


def test_client_from_another_ca_does_not_verify(ca: CertificateAuthority, tmp_path: Path) -> None:
    rogue = CertificateAuthority.init(tmp_path / "rogue", trust_domain="example.org")
    intruder = rogue.issue_client("db-node-7")  # same name, same trust domain, same CA subject
    with pytest.raises(VerificationError):
        client_verifier(ca).verify(load_certificate(intruder.cert_path), [])


def test_rsa_option(rsa_ca: CertificateAuthority) -> None:
    ca_key = load_certificate(rsa_ca.ca_cert_path).public_key()
    assert isinstance(ca_key, rsa.RSAPublicKey)
    assert ca_key.key_size == 3072
    issued = rsa_ca.issue_client("legacy")
    cert = load_certificate(issued.cert_path)
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 3072
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    assert verified_identity(rsa_ca, issued) == ["spiffe://kmipd.test/legacy"]
    assert CertificateAuthority.load(rsa_ca.directory).key_type is KeyType.RSA_3072


def test_existing_client_is_not_overwritten_without_force(ca: CertificateAuthority) -> None:
    first = ca.issue_client("app")
    before = snapshot(ca.directory)
    with pytest.raises(PkiError, match="a certificate for 'app' already exists"):
        ca.issue_client("app")
    assert snapshot(ca.directory) == before
    second = ca.issue_client("app", force=True)
    assert second.serial != first.serial
    assert load_certificate(second.cert_path).serial_number == second.serial
    ca.revoke("app")  # revokes the certificate now issued under the name
    assert ca.revoked_serials() == {second.serial}


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".hidden",
        "-x",
        "a/b",
        "../up",
        "ca",
        "CA",
        "server",
        "Server",
        "crl",
        "index",
        "ca-key",
        "app-key",
        "app-KEY",
        "x" * 65,
        "spaced name",
        "new\nline",
        "é",
    ],
)
def test_bad_client_names_are_refused(ca: CertificateAuthority, name: str) -> None:
    before = snapshot(ca.directory)
    with pytest.raises(PkiError, match=f"client name {re.escape(repr(name))} is invalid"):
        ca.issue_client(name, force=True)
    assert snapshot(ca.directory) == before  # force does not help: the CA key is intact


@pytest.mark.parametrize("name", ["a", "_svc", "node_1.prod-2", "x" * 64, "key", "keystore"])
def test_good_client_names_are_accepted(ca: CertificateAuthority, name: str) -> None:
    issued = ca.issue_client(name)
    assert issued.cert_path.name == f"{name}.pem"
    assert verified_identity(ca, issued) == [f"spiffe://example.org/{name}"]


def test_certificates_for_negative_tests(ca: CertificateAuthority) -> None:
    expired = ca.issue_client("old", not_after=NOW - DAY)  # only not_after: still works
    cert = load_certificate(expired.cert_path)
    assert cert.not_valid_before_utc < cert.not_valid_after_utc < NOW
    with pytest.raises(VerificationError, match="not valid at validation time"):
        client_verifier(ca).verify(cert, [])
    cert.verify_directly_issued_by(ca.certificate)  # a real, merely expired certificate

    early = ca.issue_client("early", not_before=NOW + DAY)
    cert = load_certificate(early.cert_path)
    assert cert.not_valid_before_utc > NOW
    assert cert.not_valid_after_utc > NOW + 365 * DAY
    with pytest.raises(VerificationError, match="not valid at validation time"):
        client_verifier(ca).verify(cert, [])

    naive = ca.issue_client(
        "naive", not_before=datetime.datetime(2020, 1, 1), not_after=datetime.datetime(2021, 1, 1)
    )
    cert = load_certificate(naive.cert_path)
    assert cert.not_valid_before_utc == datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)

    bare = ca.issue_client("bare", extended_key_usages=[])
    with pytest.raises(x509.ExtensionNotFound):
        load_certificate(bare.cert_path).extensions.get_extension_for_class(x509.ExtendedKeyUsage)

    wrong = ca.issue_client("wrong", extended_key_usages=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(VerificationError, match="EKU"):
        client_verifier(ca).verify(load_certificate(wrong.cert_path), [])

    with pytest.raises(PkiError, match="later than"):
        ca.issue_client("backwards", not_before=NOW, not_after=NOW - DAY)
    with pytest.raises(PkiError, match="validity_days"):
        ca.issue_client("empty", validity_days=0)
    assert not (ca.directory / "backwards.pem").exists()


# -- revocation -------------------------------------------------------------------------


def test_revocation_reaches_the_crl(ca: CertificateAuthority) -> None:
    leaver, stayer, shrug = (
        ca.issue_client("leaver"),
        ca.issue_client("stayer"),
        ca.issue_client("shrug"),
    )
    assert crl_number(ca) == 1
    ca.revoke("leaver", reason=x509.ReasonFlags.key_compromise)
    assert crl_number(ca) == 2
    ca.revoke("leaver", reason=x509.ReasonFlags.superseded)  # twice: no error, no change
    assert crl_number(ca) == 2
    ca.revoke("shrug")
    assert load_crl_serials(ca.crl_path, ca.ca_cert_path) == {leaver.serial, shrug.serial}
    assert ca.revoked_serials() == {leaver.serial, shrug.serial}
    assert stayer.serial not in ca.revoked_serials()
    crl = crl_of(ca)
    assert crl.issuer == ca.certificate.subject
    assert aki(crl) == ski(ca.certificate)
    assert crl.next_update_utc is not None
    assert crl.next_update_utc > NOW + 364 * DAY
    entry = crl.get_revoked_certificate_by_serial_number(leaver.serial)
    assert entry is not None
    assert NOW - DAY < entry.revocation_date_utc <= datetime.datetime.now(datetime.UTC)
    reason = entry.extensions.get_extension_for_class(x509.CRLReason)
    assert reason.value.reason is x509.ReasonFlags.key_compromise
    unspecified = crl.get_revoked_certificate_by_serial_number(shrug.serial)
    assert unspecified is not None
    with pytest.raises(x509.ExtensionNotFound):  # RFC 5280 5.3.1: absent, not "unspecified"
        unspecified.extensions.get_extension_for_class(x509.CRLReason)


def test_revoking_an_unknown_name_is_refused(ca: CertificateAuthority) -> None:
    before = snapshot(ca.directory)
    with pytest.raises(PkiError, match="no certificate named 'never-issued'"):
        ca.revoke("never-issued")
    assert snapshot(ca.directory) == before


def test_write_crl_refreshes_and_keeps_revocations(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("leaver")
    ca.revoke("leaver", reason=x509.ReasonFlags.cessation_of_operation)
    first = crl_of(ca)
    CertificateAuthority.load(ca.directory).write_crl(next_update_days=7)
    refreshed = crl_of(ca)
    assert crl_number(ca) == 3
    assert refreshed.next_update_utc is not None
    assert refreshed.next_update_utc < NOW + 8 * DAY
    entry = refreshed.get_revoked_certificate_by_serial_number(issued.serial)
    old_entry = first.get_revoked_certificate_by_serial_number(issued.serial)
    assert entry is not None
    assert old_entry is not None
    assert entry.revocation_date_utc == old_entry.revocation_date_utc
    with pytest.raises(PkiError, match="next_update_days"):
        ca.write_crl(next_update_days=0)


def test_crl_signed_by_another_ca_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    # Same trust domain, so the same issuer name: only the signature tells them apart.
    other = CertificateAuthority.init(tmp_path / "other", trust_domain="example.org")
    assert crl_of(other).issuer == ca.certificate.subject
    with pytest.raises(
        PkiError, match=r"CRL .*/other/crl\.pem is not signed by the CA in .*/pki/ca\.pem"
    ):
        load_crl_serials(other.crl_path, ca.ca_cert_path)


def test_unusable_crl_files_are_named(ca: CertificateAuthority, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"CRL .*/pki/ca\.pem is not a PEM CRL"):
        load_crl_serials(ca.ca_cert_path, ca.ca_cert_path)
    with pytest.raises(PkiError, match=r"cannot read CRL .*/missing\.pem"):
        load_crl_serials(tmp_path / "missing.pem", ca.ca_cert_path)
    with pytest.raises(PkiError, match=r"cannot read CA certificate .*/missing\.pem"):
        load_crl_serials(ca.crl_path, tmp_path / "missing.pem")


def _sign_crl(
    ca: CertificateAuthority, last_update: datetime.datetime, next_update: datetime.datetime
) -> None:
    ca_key = serialization.load_pem_private_key(ca.ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(last_update)
        .next_update(next_update)
        .sign(ca_key, hashes.SHA256())
    )
    ca.crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def test_expired_or_future_crl_is_refused(ca: CertificateAuthority) -> None:
    _sign_crl(ca, NOW - 30 * DAY, NOW - DAY)
    with pytest.raises(PkiError, match=r"CRL .*crl\.pem expired at"):
        load_crl_serials(ca.crl_path, ca.ca_cert_path)
    _sign_crl(ca, NOW + DAY, NOW + 30 * DAY)
    with pytest.raises(PkiError, match=r"CRL .*crl\.pem is not valid before"):
        load_crl_serials(ca.crl_path, ca.ca_cert_path)
    ca.write_crl()  # the remedy
    assert load_crl_serials(ca.crl_path, ca.ca_cert_path) == frozenset()


# -- write_private_file -----------------------------------------------------------------


def test_write_private_file_is_private_whatever_the_umask(
    tmp_path: Path, umask: Callable[[int], int]
) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"old")
    target.chmod(0o644)  # replacing a readable file must not inherit its mode
    umask(0)
    write_private_file(target, b"one")
    assert (target.read_bytes(), mode(target)) == (b"one", 0o600)
    umask(0o077)
    write_private_file(tmp_path / "public.pem", b"cert", mode=0o644)
    assert mode(tmp_path / "public.pem") == 0o644  # explicit, not narrowed by the umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["public.pem", "secret"]


def test_write_private_file_is_never_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Watch the real rename: the temporary file must already be 0600 when it
    # takes the target's name, and it lives in the same directory (same file system).
    seen: list[tuple[Path, int]] = []
    real_replace = os.replace

    def watching_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append((Path(src), mode(Path(src))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watching_replace)
    write_private_file(tmp_path / "key.pem", b"secret")
    [(temporary, temporary_mode)] = seen
    assert temporary.parent == tmp_path
    assert temporary_mode == 0o600
    assert not temporary.exists()


def test_write_private_file_cleans_up_after_a_failure(tmp_path: Path) -> None:
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "inside").write_bytes(b"keep")
    with pytest.raises(OSError, match="directory"):
        write_private_file(target, b"data")  # rename over a non-empty directory fails
    assert [p.name for p in tmp_path.iterdir()] == ["occupied"]  # no temporary file left
    assert (target / "inside").read_bytes() == b"keep"


# -- a real TLS 1.3 handshake -----------------------------------------------------------


def server_context(ca: CertificateAuthority) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(ca.server_cert_path, ca.server_key_path)
    context.load_verify_locations(ca.ca_cert_path)
    context.load_verify_locations(ca.crl_path)
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def handshake(ca: CertificateAuthority, client: IssuedCertificate) -> str:
    """Run one mutual-TLS exchange over a socket pair; what the server saw."""
    client_context = ssl.create_default_context(cafile=str(ca.ca_cert_path))
    client_context.minimum_version = ssl.TLSVersion.TLSv1_3
    client_context.load_cert_chain(client.cert_path, client.key_path)
    server = server_context(ca)
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)
    outcome: list[str] = []

    def serve() -> None:
        try:
            with server.wrap_socket(right, server_side=True) as tls:
                peer = tls.getpeercert(binary_form=True)
                tls.sendall(tls.recv(1))
                assert peer is not None
                sans = x509.load_der_x509_certificate(peer).extensions.get_extension_for_class(
                    x509.SubjectAlternativeName
                )
                uris = sans.value.get_values_for_type(x509.UniformResourceIdentifier)
                outcome.append(f"ok {' '.join(uris)}")
        except ssl.SSLCertVerificationError as exc:
            outcome.append(exc.verify_message)
        except (ssl.SSLError, OSError) as exc:
            outcome.append(f"error {exc}")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with left, client_context.wrap_socket(left, server_hostname="kms.example.org") as tls:
            tls.sendall(b"x")
            tls.recv(1)
    except (ssl.SSLError, OSError):
        pass  # the server's verdict is what the test checks
    finally:
        thread.join(10)
    assert not thread.is_alive()
    return outcome[0]


def test_real_tls_accepts_issued_and_refuses_revoked(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    good, bad = ca.issue_client("good"), ca.issue_client("bad")
    ca.revoke("bad")
    assert handshake(ca, good) == "ok spiffe://example.org/good"
    assert handshake(ca, bad) == "certificate revoked"
    old = ca.issue_client("old", not_after=NOW - DAY)
    assert handshake(ca, old) == "certificate has expired"
    rogue = CertificateAuthority.init(tmp_path / "rogue", trust_domain="example.org")
    assert handshake(ca, rogue.issue_client("good")) == "unable to get local issuer certificate"


# -- the kmipd CLI on top of the package ------------------------------------------------


def test_cli_init_issue_revoke(tmp_path: Path) -> None:
    directory = tmp_path / "cli-ca"
    init = run_kmipd(
        "pki",
        "init",
        directory,
        "--trust-domain",
        "prod.example",
        "--dns",
        "kms1",
        "--ip",
        "10.0.0.5",
    )
    assert init.returncode == 0, init.stderr
    issue = run_kmipd("pki", "issue", directory, "node-1")
    assert issue.returncode == 0
    assert "spiffe://prod.example/node-1" in issue.stdout
    again = run_kmipd("pki", "init", directory)
    assert again.returncode == 1
    assert "already holds a CA" in again.stderr
    revoke = run_kmipd("pki", "revoke", directory, "node-1", "--reason", "key_compromise")
    assert revoke.returncode == 0
    serial = load_certificate(directory / "node-1.pem").serial_number
    assert load_crl_serials(directory / "crl.pem", directory / "ca.pem") == {serial}
    refreshed = run_kmipd("pki", "crl", directory, "--days", "30")
    assert refreshed.returncode == 0
    crl = x509.load_pem_x509_crl((directory / "crl.pem").read_bytes())
    assert crl.next_update_utc is not None
    assert crl.next_update_utc < NOW + 31 * DAY
    assert load_crl_serials(directory / "crl.pem", directory / "ca.pem") == {serial}
    unknown = run_kmipd("pki", "revoke", directory, "ghost")
    assert unknown.returncode == 1
    assert "no certificate named 'ghost'" in unknown.stderr
    server = load_certificate(directory / "server.pem")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["kms1"]


def san_names(path: Path) -> set[str]:
    sans = load_certificate(path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return {str(name.value) for name in sans.value}


def test_server_certificate_lives_90_days_and_renews_for_the_same_names(
    ca: CertificateAuthority,
) -> None:
    # Mozilla's "modern" profile (checked by the conformance suite's sslyze group).
    first = load_certificate(ca.server_cert_path)
    lifespan = first.not_valid_after_utc - first.not_valid_before_utc
    assert lifespan.days == SERVER_VALIDITY_DAYS == 90
    old_key = ca.server_key_path.read_bytes()
    ca.renew_server()
    renewed = load_certificate(ca.server_cert_path)
    assert san_names(ca.server_cert_path) == {"kms.example.org", "localhost", "127.0.0.1", "::1"}
    assert renewed.serial_number != first.serial_number
    assert ca.server_key_path.read_bytes() != old_key
    assert mode(ca.server_key_path) == 0o600


def test_dev_setup_renews_a_server_certificate_near_its_end(tmp_path: Path) -> None:
    prepare_dev(tmp_path / "dev", "127.0.0.1:0")
    ca = CertificateAuthority.load(tmp_path / "dev" / "pki")
    ca.issue_server(dns_names=("localhost",), ip_addresses=("127.0.0.1",), validity_days=20)
    prepare_dev(tmp_path / "dev", "127.0.0.1:0")
    cert = load_certificate(ca.server_cert_path)
    assert cert.not_valid_after_utc - NOW > datetime.timedelta(days=80)
    assert san_names(ca.server_cert_path) == {"localhost", "127.0.0.1"}


def test_adopting_a_ca_issues_without_touching_its_directory(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    before = {p.name: p.read_bytes() for p in ca.directory.iterdir()}
    adopted = CertificateAuthority.adopt(
        tmp_path / "scratch", ca.ca_cert_path, ca.ca_key_path, trust_domain="other.test"
    )
    issued = adopted.issue_client("probe")
    assert issued.identity == "spiffe://other.test/probe"
    chain = load_certificate(issued.cert_path)
    chain.verify_directly_issued_by(load_certificate(ca.ca_cert_path))
    assert {p.name: p.read_bytes() for p in ca.directory.iterdir()} == before
    with pytest.raises(PkiError, match="already holds a CA"):
        CertificateAuthority.adopt(
            tmp_path / "scratch", ca.ca_cert_path, ca.ca_key_path, trust_domain="other.test"
        )
    other = CertificateAuthority.init(tmp_path / "other")
    with pytest.raises(PkiError, match="does not match"):
        CertificateAuthority.adopt(
            tmp_path / "mismatch", ca.ca_cert_path, other.ca_key_path, trust_domain="x.test"
        )


def test_cli_revoke_takes_the_transport_certificate_along_unless_told(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    assert run_kmipd("pki", "init", directory).returncode == 0
    for name in ("node-1", "node-2"):
        assert run_kmipd("pki", "issue", directory, name).returncode == 0
        assert run_kmipd("pki", "issue-transport", directory, name).returncode == 0
    serial = {
        name: load_certificate(directory / f"{name}.pem").serial_number
        for name in ("node-1", "node-1-transport", "node-2", "node-2-transport")
    }

    both = run_kmipd("pki", "revoke", directory, "node-1", "--reason", "key_compromise")
    assert both.returncode == 0, both.stderr
    assert "revoked node-1 and node-1-transport" in both.stdout
    revoked = load_crl_serials(directory / "crl.pem", directory / "ca.pem")
    assert revoked == {serial["node-1"], serial["node-1-transport"]}

    only_tls = run_kmipd("pki", "revoke", directory, "node-2", "--keep-transport")
    assert only_tls.returncode == 0, only_tls.stderr
    assert "revoked node-2;" in only_tls.stdout
    revoked = load_crl_serials(directory / "crl.pem", directory / "ca.pem")
    assert serial["node-2"] in revoked and serial["node-2-transport"] not in revoked
