"""The built-in CA: files, modes, extensions, chains, revocation, refusals."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from kmipd.dev import prepare_dev
from pki import (
    SERVER_VALIDITY_DAYS,
    CertificateAuthority,
    KeyType,
    PkiError,
    load_certificate,
    load_crl_serials,
    write_private_file,
)
from tests.processes import run_kmipd

NOW = datetime.datetime.now(datetime.UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(
        tmp_path / "pki",
        trust_domain="example.org",
        dns_names=("kms.example.org", "localhost"),
        ip_addresses=("127.0.0.1", "::1"),
    )


def test_init_writes_every_file_with_safe_modes(ca: CertificateAuthority) -> None:
    assert mode(ca.directory) == 0o700
    for key in ("ca-key.pem", "server-key.pem"):
        assert mode(ca.directory / key) == 0o600
    for public in ("ca.pem", "server.pem", "crl.pem", "index.json"):
        assert mode(ca.directory / public) == 0o644
    assert not [p for p in ca.directory.iterdir() if p.name.endswith(".tmp")]


def test_ca_certificate_is_a_constrained_ca(ca: CertificateAuthority) -> None:
    cert = load_certificate(ca.ca_cert_path)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_server_certificate_verifies_for_its_names(ca: CertificateAuthority) -> None:
    cert = load_certificate(ca.server_cert_path)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    store = Store([load_certificate(ca.ca_cert_path)])
    for name in ("kms.example.org", "localhost"):
        verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name))
        verifier.verify(cert, [])
    verifier = (
        PolicyBuilder()
        .store(store)
        .build_server_verifier(x509.IPAddress(ipaddress.ip_address("::1")))
    )
    verifier.verify(cert, [])


def test_client_certificate_is_an_x509_svid(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("db-node-7")
    assert issued.identity == "spiffe://example.org/db-node-7"
    assert mode(issued.key_path) == 0o600
    cert = load_certificate(issued.cert_path)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [issued.identity]
    assert sans.get_values_for_type(x509.DNSName) == []
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verifier = (
        PolicyBuilder().store(Store([load_certificate(ca.ca_cert_path)])).build_client_verifier()
    )
    verified = verifier.verify(cert, [])
    assert x509.UniformResourceIdentifier(issued.identity) in verified.subjects


def test_rsa_option(tmp_path: Path) -> None:
    authority = CertificateAuthority.init(tmp_path / "rsa", key_type=KeyType.RSA_3072)
    issued = authority.issue_client("legacy")
    key = load_certificate(issued.cert_path).public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 3072
    assert CertificateAuthority.load(tmp_path / "rsa").key_type is KeyType.RSA_3072


def test_existing_ca_is_not_overwritten_without_force(ca: CertificateAuthority) -> None:
    before = ca.ca_cert_path.read_bytes()
    with pytest.raises(PkiError, match="already holds a CA"):
        CertificateAuthority.init(ca.directory)
    assert ca.ca_cert_path.read_bytes() == before  # nothing lost
    CertificateAuthority.init(ca.directory, force=True)
    assert ca.ca_cert_path.read_bytes() != before


def test_existing_client_is_not_overwritten_without_force(ca: CertificateAuthority) -> None:
    first = ca.issue_client("app")
    with pytest.raises(PkiError, match="already exists"):
        ca.issue_client("app")
    assert load_certificate(first.cert_path).serial_number == first.serial
    assert ca.issue_client("app", force=True).serial != first.serial


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-x", "a/b", "ca", "server", "x" * 65, "spaced name"]
)
def test_bad_client_names_are_refused(ca: CertificateAuthority, name: str) -> None:
    with pytest.raises(PkiError, match="client name"):
        ca.issue_client(name)


@pytest.mark.parametrize("domain", ["", "UPPER.case", "has space", "a/b", "x" * 256])
def test_bad_trust_domains_are_refused(tmp_path: Path, domain: str) -> None:
    with pytest.raises(PkiError, match="trust domain"):
        CertificateAuthority.init(tmp_path / "x", trust_domain=domain)
    assert not (tmp_path / "x" / "ca.pem").exists()


def test_revocation_reaches_the_crl(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("leaver")
    assert load_crl_serials(ca.crl_path, ca.ca_cert_path) == frozenset()
    ca.revoke("leaver", reason=x509.ReasonFlags.key_compromise)
    ca.revoke("leaver")  # twice: no error, no duplicate
    assert load_crl_serials(ca.crl_path, ca.ca_cert_path) == {issued.serial}
    assert CertificateAuthority.load(ca.directory).revoked_serials() == {issued.serial}
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(issued.serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
        x509.ReasonFlags.key_compromise
    )
    with pytest.raises(PkiError, match="no certificate named"):
        ca.revoke("never-issued")


def test_crl_from_another_ca_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other")
    with pytest.raises(PkiError, match="not signed by the CA"):
        load_crl_serials(other.crl_path, ca.ca_cert_path)


def test_expired_crl_is_refused(ca: CertificateAuthority) -> None:
    ca_key = serialization.load_pem_private_key(ca.ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    stale = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(NOW - datetime.timedelta(days=30))
        .next_update(NOW - datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    ca.crl_path.write_bytes(stale.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PkiError, match="expired"):
        load_crl_serials(ca.crl_path, ca.ca_cert_path)
    with pytest.raises(PkiError, match="next_update_days"):
        ca.write_crl(next_update_days=0)


def test_certificates_for_negative_tests(ca: CertificateAuthority) -> None:
    expired = ca.issue_client(
        "old",
        not_before=NOW - datetime.timedelta(days=3),
        not_after=NOW - datetime.timedelta(days=1),
    )
    assert load_certificate(expired.cert_path).not_valid_after_utc < NOW
    bare = ca.issue_client("bare", extended_key_usages=[])
    with pytest.raises(x509.ExtensionNotFound):
        load_certificate(bare.cert_path).extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    with pytest.raises(PkiError, match="later than"):
        ca.issue_client("backwards", not_before=NOW, not_after=NOW - datetime.timedelta(days=1))


@pytest.mark.parametrize("damage", ["missing ca.pem", "garbage ca.pem", "swapped key", "bad index"])
def test_load_names_the_broken_file(ca: CertificateAuthority, tmp_path: Path, damage: str) -> None:
    if damage == "missing ca.pem":
        ca.ca_cert_path.unlink()
        expected = "ca.pem"
    elif damage == "garbage ca.pem":
        ca.ca_cert_path.write_text("not a certificate")
        expected = "ca.pem"
    elif damage == "swapped key":
        other = CertificateAuthority.init(tmp_path / "other")
        ca.ca_key_path.write_bytes(other.ca_key_path.read_bytes())
        expected = "does not match"
    else:
        (ca.directory / "index.json").write_text(json.dumps({"nope": 1}))
        expected = "index.json"
    with pytest.raises(PkiError, match=expected):
        CertificateAuthority.load(ca.directory)


def test_write_private_file_is_atomic_and_private(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    old_umask = os.umask(0)
    try:
        write_private_file(target, b"one")
    finally:
        os.umask(old_umask)
    assert mode(target) == 0o600
    write_private_file(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_real_tls_handshake_accepts_issued_and_refuses_revoked(ca: CertificateAuthority) -> None:
    good, bad = ca.issue_client("good"), ca.issue_client("bad")
    ca.revoke("bad")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(ca.server_cert_path, ca.server_key_path)
    server.load_verify_locations(ca.ca_cert_path)
    server.load_verify_locations(ca.crl_path)
    server.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    server.verify_mode = ssl.CERT_REQUIRED

    def handshake(issued_cert: Path, issued_key: Path) -> str | None:
        client = ssl.create_default_context(cafile=str(ca.ca_cert_path))
        client.load_cert_chain(issued_cert, issued_key)
        left, right = socket.socketpair()
        outcome: list[str | None] = []

        def serve() -> None:
            try:
                with server.wrap_socket(right, server_side=True) as tls:
                    tls.recv(1)
                    outcome.append(None)
            except ssl.SSLError as exc:
                outcome.append(
                    exc.verify_message
                    if isinstance(exc, ssl.SSLCertVerificationError)
                    else exc.reason
                )

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with client.wrap_socket(left, server_hostname="localhost") as tls:
                tls.sendall(b"x")
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass
        thread.join(10)
        return outcome[0]

    assert handshake(good.cert_path, good.key_path) is None
    assert handshake(bad.cert_path, bad.key_path) == "certificate revoked"


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
    assert crl.next_update_utc < NOW + datetime.timedelta(days=31)
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
