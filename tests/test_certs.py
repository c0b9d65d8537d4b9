"""The online issuing CA: issue, renew, refuse, revoke, over real TLS to a real daemon.

The daemon runs as a subprocess (``kmipd serve --config``) with an online CA
made by the real ``kmipd pki init --online-ca`` and ``kmipd ca init``
commands: its key in the software keyring, or non-extractable on a SoftHSM2
token. Issued certificates are used for real: a renewed client certificate
connects, an issued server certificate serves a TLS handshake, and both
chains pass ``openssl verify`` and ``cryptography``'s path validation.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client.parser import text_string_to_metric_families

from kmipd import client as km
from kmipd.client._certs import write_key_and_certificate
from kmipd.crypto._issuing import BACKDATE, renewal_due
from kmipd.hsm import HsmError, HsmKeyNotFoundError, SoftwareHsm
from kmipd.protocol import ErrorCode
from pki import CertificateAuthority
from tests.conftest import TRUST_DOMAIN
from tests.processes import Daemon, run_kmipd
from tests.test_pkcs11 import SOFTHSM_LIBRARY, TOKEN_LABEL, SoftToken, softhsm
from tests.test_tls import _hello_over_tls

__all__ = ["softhsm"]  # the SoftHSM2 token fixture (fails under CI=true without SoftHSM2)

STORAGE = f"spiffe://{TRUST_DOMAIN}/storage"
ADMIN = f"spiffe://{TRUST_DOMAIN}/admin"
WEB = f"spiffe://{TRUST_DOMAIN}/web"
STRANGER = f"spiffe://{TRUST_DOMAIN}/stranger"


def write_config(directory: Path, root: CertificateAuthority, hsm: str, tls: str = "") -> Path:
    config = directory / "kmipd.toml"
    config.write_text(
        f"""[server]
listen = ["127.0.0.1:0"]
[tls]
ca = "{root.ca_cert_path}"
cert = "{root.server_cert_path}"
key = "{root.server_key_path}"
crl = "{root.crl_path}"
trust_domain = "{TRUST_DOMAIN}"
{tls}
[store]
path = "{directory / "kmipd.db"}"
[hsm]
{hsm}
[audit]
path = "{directory / "audit.log"}"
key = "{directory / "audit.key"}"
[[grant]]
identity = "{ADMIN}"
namespaces = ["*"]
operations = ["certificates-admin"]
[[certificate_grant]]
identity = "{STORAGE}"
max_validity_days = 10
key_types = ["p256", "p384", "ed25519", "rsa3072"]
[[certificate_grant]]
identity = "{WEB}"
client = false
server_dns = ["*.storage.test"]
max_validity_days = 90
key_types = ["p256"]
"""
    )
    config.chmod(0o600)
    return config


@attrs.frozen
class Deployment:
    root: CertificateAuthority
    config: Path
    daemon: Daemon
    directory: Path

    def client(self, name: str, **kwargs: Any) -> km.Client:
        return km.Client(
            self.daemon.address,
            ca=self.root.ca_cert_path,
            cert=self.root.directory / f"{name}.pem",
            key=self.root.directory / f"{name}-key.pem",
            **kwargs,
        )

    def client_with(self, cert: Path, key: Path) -> km.Client:
        return km.Client(self.daemon.address, ca=self.root.ca_cert_path, cert=cert, key=key)


def make_root(directory: Path) -> CertificateAuthority:
    result = run_kmipd(
        "pki", "init", directory, "--trust-domain", TRUST_DOMAIN, "--online-ca", "--ip", "127.0.0.1"
    )
    assert result.returncode == 0, result.stderr
    root = CertificateAuthority.load(directory)
    for name in ("storage", "admin", "web", "stranger"):
        root.issue_client(name)
    return root


def start(directory: Path, hsm: str, extra: str = "", tls: str = "") -> Deployment:
    root = make_root(directory / "pki")
    config = write_config(directory, root, hsm, tls)
    result = run_kmipd("ca", "init", "--config", config, "--root", root.directory)
    assert result.returncode == 0, result.stderr
    snippet = result.stdout[result.stdout.index("[online_ca]") :]
    with config.open("a") as f:
        f.write(snippet + "\n" + extra)
    daemon = Daemon("--config", config, log=directory / "daemon.log")
    return Deployment(root, config, daemon, directory)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    master = tmp_path / "master.key"
    assert run_kmipd("hsm", "software-init", "--master-key", master).returncode == 0
    hsm = f'backend = "software"\nmaster_key = "{master}"\nkeyring = "{tmp_path / "keyring"}"'
    running = start(tmp_path, hsm)
    yield running
    running.daemon.stop()


def remote_code(exc: pytest.ExceptionInfo[km.RemoteError]) -> ErrorCode:
    code = exc.value.code
    assert code is not None
    return code


def verify_chain(deployment: Deployment, issued: km.IssuedCertificate, tmp: Path) -> None:
    """``cryptography``'s path building and ``openssl verify``, from the root alone."""
    root = deployment.root.certificate
    store = verification.Store([root])
    builder = verification.PolicyBuilder().store(store)
    intermediates = list(issued.chain[:-1])
    eku = issued.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    if ExtendedKeyUsageOID.SERVER_AUTH in eku:
        names = issued.certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
        verifier = builder.build_server_verifier(x509.DNSName(names[0]))
        chain = verifier.verify(issued.certificate, intermediates)
    else:
        client_verifier = builder.build_client_verifier()
        chain = client_verifier.verify(issued.certificate, intermediates).chain
    assert chain[-1] == root
    leaf_pem, untrusted = tmp / "leaf.pem", tmp / "untrusted.pem"
    leaf_pem.write_bytes(issued.certificate.public_bytes(serialization.Encoding.PEM))
    untrusted.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in intermediates)
    )
    purpose = "sslserver" if ExtendedKeyUsageOID.SERVER_AUTH in eku else "sslclient"
    result = subprocess.run(
        [
            "openssl", "verify", "-x509_strict", "-purpose", purpose,
            "-CAfile", str(deployment.root.ca_cert_path),
            "-untrusted", str(untrusted), str(leaf_pem),
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result


def test_a_client_issues_connects_with_and_renews_its_own_certificate(
    deployment: Deployment, tmp_path: Path
) -> None:
    key = km.generate_key("p256")
    with deployment.client("storage") as kms:
        issued = kms.issue_certificate(km.make_csr(key, identity=STORAGE), validity=3 * 86400)
    assert issued.not_after - issued.not_before == 3 * 86400 + 300  # backdated 5 minutes
    leaf = issued.certificate
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [STORAGE]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert issued.chain[-1] == deployment.root.certificate
    verify_chain(deployment, issued, tmp_path)

    first = tmp_path / "first"
    write_key_and_certificate(first, key, issued)
    with deployment.client_with(first / "cert.pem", first / "key.pem") as kms:
        assert kms.status().state == "serving"  # the issued certificate passes the handshake
        # The same key again is refused; a new key renews.
        with pytest.raises(km.CertificateKeyReusedError) as reused:
            kms.renew_certificate(km.make_csr(key, identity=STORAGE))
        assert "new key" in str(reused.value)
        new_key = km.generate_key("ed25519")
        renewed = kms.renew_certificate(km.make_csr(new_key))
    assert renewed.serial != issued.serial
    assert renewed.not_after - renewed.not_before == issued.not_after - issued.not_before
    verify_chain(deployment, renewed, tmp_path)
    second = tmp_path / "second"
    write_key_and_certificate(second, new_key, renewed)
    with deployment.client_with(second / "cert.pem", second / "key.pem") as kms:
        assert kms.status().state == "serving"
    # A certificate from the offline root is not the online CA's to renew.
    with deployment.client("storage") as kms, pytest.raises(km.CertificateNotRenewableError):
        kms.renew_certificate(km.make_csr(km.generate_key(), identity=STORAGE))
    with deployment.client("admin") as kms:
        listed = kms.list_certificates(subject=STORAGE).certificates
    assert {c.serial for c in listed} == {issued.serial, renewed.serial}
    [renewal] = [c for c in listed if c.serial == renewed.serial]
    assert renewal.renewed_from == issued.serial
    assert renewal.key_type == "ed25519"


def _csr_with_bad_signature() -> bytes:
    der = bytearray(km.make_csr(km.generate_key(), identity=STORAGE))
    der[-3] ^= 0x01  # inside the signature value
    return bytes(der)


def test_every_refusal_says_why_and_issues_nothing(deployment: Deployment) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with deployment.client("storage") as kms:
        cases = [
            (km.make_csr(km.generate_key(), identity=WEB), {},
             ErrorCode.CERTIFICATE_IDENTITY_MISMATCH, WEB),
            (km.make_csr(km.generate_key(), dns_names=["a.storage.test"]), {"profile": "server"},
             ErrorCode.CERTIFICATE_NAME_NOT_ALLOWED, "a.storage.test"),
            (km.make_csr(km.generate_key(), identity=STORAGE), {"validity": 11 * 86400},
             ErrorCode.CERTIFICATE_VALIDITY_TOO_LONG, "864000 s"),
            (km.make_csr(weak, identity=STORAGE), {},
             ErrorCode.CERTIFICATE_KEY_NOT_ALLOWED, "RSA-2048"),
            (b"\x30\x03\x02\x01\x00", {}, ErrorCode.CSR_INVALID, "not a valid DER"),
            (_csr_with_bad_signature(), {}, ErrorCode.CSR_INVALID, "signature does not verify"),
        ]  # fmt: skip
        for csr, kwargs, code, said in cases:
            with pytest.raises(km.RemoteError) as refused:
                kms.issue_certificate(csr, **kwargs)
            assert remote_code(refused) is code, (code, refused.value)
            assert said in str(refused.value), refused.value
        assert kms.status().state == "serving"  # the connection survived every refusal
    with deployment.client("web") as kms:
        # A DNS name outside the grant's pattern, a key type the grant leaves out,
        # and a client certificate the grant does not give.
        with pytest.raises(km.CertificateNameNotAllowedError) as outside:
            kms.issue_certificate(
                km.make_csr(km.generate_key(), dns_names=["a.storage.test", "evil.example"]),
                profile="server",
            )
        assert "evil.example" in str(outside.value) and "*.storage.test" in str(outside.value)
        with pytest.raises(km.CertificateKeyNotAllowedError) as p384:
            kms.issue_certificate(
                km.make_csr(km.generate_key("p384"), dns_names=["a.storage.test"]),
                profile="server",
            )
        assert "p384" in str(p384.value)
        with pytest.raises(km.NotAuthorizedError):
            kms.issue_certificate(km.make_csr(km.generate_key(), identity=WEB))
    with deployment.client("stranger") as kms, pytest.raises(km.NotAuthorizedError) as none:
        kms.issue_certificate(km.make_csr(km.generate_key(), identity=STRANGER))
    assert "no certificate grant" in str(none.value)
    with deployment.client("admin") as kms:
        assert kms.list_certificates().certificates == ()  # nothing was issued
    with deployment.client("storage") as kms:  # and a good request still works
        kms.issue_certificate(km.make_csr(km.generate_key(), identity=STORAGE))
    audit = (deployment.directory / "audit.log").read_text()
    assert "certificate-validity-too-long" in audit and "issued client certificate" in audit
    assert "PRIVATE" not in audit and "BEGIN" not in audit


def _serve_tls_once(context: ssl.SSLContext, listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with context.wrap_socket(conn, server_side=True) as tls:
        tls.sendall(b"hello from an issued server certificate")


def test_an_issued_server_certificate_serves_tls(deployment: Deployment, tmp_path: Path) -> None:
    key = km.generate_key("p256")
    with deployment.client("web") as kms:
        issued = kms.issue_certificate(
            km.make_csr(key, dns_names=["node1.storage.test"]), profile="server"
        )
    eku = issued.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert issued.not_after - issued.not_before == 90 * 86400 + 300  # the grant's maximum
    verify_chain(deployment, issued, tmp_path)
    write_key_and_certificate(tmp_path / "web", key, issued)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "web" / "cert.pem", tmp_path / "web" / "key.pem")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=_serve_tls_once, args=(server, listener))
        thread.start()
        client = ssl.create_default_context(cafile=deployment.root.ca_cert_path)
        with (
            socket.create_connection(listener.getsockname()) as raw,
            client.wrap_socket(raw, server_hostname="node1.storage.test") as tls,
        ):
            assert tls.recv(100) == b"hello from an issued server certificate"
        thread.join()


def test_a_revoked_certificate_is_refused_at_once(deployment: Deployment, tmp_path: Path) -> None:
    key = km.generate_key()
    with deployment.client("storage") as kms:
        issued = kms.issue_certificate(km.make_csr(key, identity=STORAGE))
    write_key_and_certificate(tmp_path / "s", key, issued)
    with deployment.client_with(tmp_path / "s" / "cert.pem", tmp_path / "s" / "key.pem") as kms:
        kms.status()
    with deployment.client("admin") as kms:
        info = kms.revoke_certificate(issued.serial, reason="key-compromise")
        assert info.revoked is not None and info.revocation_reason == "key-compromise"
        ca = kms.get_ca_certificates()
    crl = x509.load_der_x509_crl(ca.crl)
    revoked = crl.get_revoked_certificate_by_serial_number(issued.certificate.serial_number)
    assert revoked is not None
    online_ca = x509.load_der_x509_certificate(ca.chain[0])
    assert crl.is_signature_valid(online_ca.public_key())  # type: ignore[arg-type]
    with (
        deployment.client_with(tmp_path / "s" / "cert.pem", tmp_path / "s" / "key.pem") as kms,
        pytest.raises(km.CertificateRejectedError),
    ):
        kms.status()
    # The CRL the daemon wrote for others says the same.
    published = x509.load_pem_x509_crl((deployment.directory / "online-ca-crl.pem").read_bytes())
    assert published.get_revoked_certificate_by_serial_number(revoked.serial_number) is not None


def test_a_revoked_issued_certificate_does_not_resume_its_tls_session(tmp_path: Path) -> None:
    """DESIGN.md 4a for the online CA: its revocation reaches resumed sessions too."""
    master = tmp_path / "master.key"
    assert run_kmipd("hsm", "software-init", "--master-key", master).returncode == 0
    hsm = f'backend = "software"\nmaster_key = "{master}"\nkeyring = "{tmp_path / "keyring"}"'
    deployment = start(tmp_path, hsm, tls="session_tickets = 2")
    try:
        key = km.generate_key()
        with deployment.client("storage") as kms:
            issued = kms.issue_certificate(km.make_csr(key, identity=STORAGE))
        write_key_and_certificate(tmp_path / "s", key, issued)
        context = km.client_context(
            ca=deployment.root.ca_cert_path, cert=tmp_path / "s" / "cert.pem",
            key=tmp_path / "s" / "key.pem",
        )  # fmt: skip
        address = deployment.daemon.address
        first, resumed, what = _hello_over_tls(address, context, None)
        assert (resumed, what) == (False, "served") and first is not None
        again, resumed, what = _hello_over_tls(address, context, first)
        assert (resumed, what) == (True, "served")  # the ticket works before the revocation
        with deployment.client("admin") as kms:
            kms.revoke_certificate(issued.serial, reason="key-compromise")
        _, resumed, what = _hello_over_tls(address, context, again)
        assert not resumed and "revoked" in what and not what.startswith("served"), what
        with deployment.client("storage") as kms:  # everyone else is still served
            assert kms.status().state == "serving"
    finally:
        deployment.daemon.stop()


def test_the_daemon_refuses_an_online_ca_key_that_is_not_the_certificates(tmp_path: Path) -> None:
    master = tmp_path / "master.key"
    assert run_kmipd("hsm", "software-init", "--master-key", master).returncode == 0
    hsm = f'backend = "software"\nmaster_key = "{master}"\nkeyring = "{tmp_path / "keyring"}"'
    running = start(tmp_path, hsm)
    running.daemon.stop()
    # A second online CA certificate, for a new key: the config still names the first key.
    result = run_kmipd("ca", "init", "--config", running.config, "--root", running.root.directory)
    assert result.returncode == 0, result.stderr
    failed = run_kmipd("serve", "--config", running.config)
    assert failed.returncode != 0
    assert "is not the key of the online CA certificate" in failed.stderr


# -- the online CA's key on a PKCS#11 token -------------------------------------------------


def test_the_online_ca_key_on_softhsm_is_not_extractable_and_signs(
    softhsm: SoftToken, tmp_path: Path
) -> None:
    hsm = (
        f'backend = "pkcs11"\nlibrary = "{SOFTHSM_LIBRARY}"\ntoken_label = "{TOKEN_LABEL}"\n'
        f'pin_file = "{softhsm.pin_file}"'
    )
    running = start(tmp_path, hsm)
    try:
        key = km.generate_key("p384")
        with running.client("storage") as kms:
            issued = kms.issue_certificate(km.make_csr(key, identity=STORAGE))
        verify_chain(running, issued, tmp_path)
        online_ca = issued.chain[0]
        public = online_ca.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(
            issued.certificate.signature,
            issued.certificate.tbs_certificate_bytes,
            ec.ECDSA(hashes.SHA256()),
        )
    finally:
        running.daemon.stop()
    # The token's own attributes of the CA's private key, read in a process of their own
    # (python-pkcs11 initialises the library its own way; this process keeps kmipd's).
    attributes = subprocess.run(
        [sys.executable, "-c", READ_PRIVATE_KEY_ATTRIBUTES, str(SOFTHSM_LIBRARY), TOKEN_LABEL,
         softhsm.pin_file.read_text().strip()],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(attributes.stdout) == {
        "count": 1,
        "sensitive": True,
        "extractable": False,
        "never_extractable": True,
        "sign": True,
        "decrypt": False,
        "unwrap": False,
        "derive": False,
        "value": "AttributeSensitive",
    }


READ_PRIVATE_KEY_ATTRIBUTES = """
import json, sys
import pkcs11
from pkcs11 import Attribute, ObjectClass
token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])
with token.open(user_pin=sys.argv[3]) as session:
    keys = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
    key = keys[0]
    try:
        key[Attribute.VALUE]
        value = "readable"
    except pkcs11.exceptions.PKCS11Error as exc:
        value = type(exc).__name__
    names = ["sensitive", "extractable", "never_extractable", "sign", "decrypt", "unwrap", "derive"]
    found = {n: bool(key[getattr(Attribute, n.upper())]) for n in names}
    print(json.dumps({"count": len(keys), **found, "value": value}))
"""


def test_a_client_with_a_renewal_directory_renews_itself_and_keeps_serving(
    deployment: Deployment, tmp_path: Path
) -> None:
    key = km.generate_key()
    with deployment.client("storage") as kms:
        # One minute, backdated five: already past two thirds of its lifetime.
        issued = kms.issue_certificate(km.make_csr(key, identity=STORAGE), validity=60)
    directory = tmp_path / "renewing"
    write_key_and_certificate(directory, key, issued)
    cert, key_file = directory / "cert.pem", directory / "key.pem"
    with km.Client(
        deployment.daemon.address,
        ca=deployment.root.ca_cert_path,
        cert=cert,
        key=key_file,
        renewal_dir=directory,
    ) as kms:
        assert kms.status().state == "serving"  # renewed first, then answered
        renewed = x509.load_pem_x509_certificate(cert.read_bytes())
        assert renewed.serial_number != issued.certificate.serial_number
        assert cert.stat().st_mode & 0o777 == 0o600
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert kms.status().state == "serving"  # the connection opened before still serves
    # The files on disk belong together and connect.
    with deployment.client_with(cert, key_file) as kms:
        assert kms.status().state == "serving"
    with deployment.client("admin") as kms:
        serials = {c.serial for c in kms.list_certificates(subject=STORAGE).certificates}
    assert format(renewed.serial_number, "x") in serials


def test_renewal_that_fails_keeps_the_certificate_and_the_request(
    deployment: Deployment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A root-issued certificate cannot be renewed by the online CA: the renewal
    # fails (logged), the request itself is answered, and nothing is written.
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    old = deployment.root.issue_client("old", not_before=now - 2 * day, not_after=now + day / 2)
    directory = tmp_path / "renewing"
    with km.Client(
        deployment.daemon.address,
        ca=deployment.root.ca_cert_path,
        cert=old.cert_path,
        key=old.key_path,
        renewal_dir=directory,
    ) as kms:
        assert kms.renewal_due  # past two thirds of its lifetime
        assert kms.status().state == "serving"
    assert "certificate renewal failed" in caplog.text
    assert not (directory / "cert.pem").exists()


def test_a_short_lived_certificate_is_due_at_its_share_of_the_lifetime_from_issuance() -> None:
    """Issued certificates start BACKDATE before their issuance; renewal counts from it.

    Counted from the backdated start, a 150 s certificate would be due on
    arrival (two thirds of 450 s is 300 s), and renewed before every request.
    Counted from the middle of its validity (the backdate is more than half
    of it), it is due 75 s after its issuance.
    """
    now = time.time()

    def certificate(start: float, end: float) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([])
        return (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(datetime.datetime.fromtimestamp(start, datetime.UTC))
            .not_valid_after(datetime.datetime.fromtimestamp(end, datetime.UTC))
            .sign(key, hashes.SHA256())
        )  # fmt: skip

    short = certificate(now - BACKDATE, now + 150)
    assert not renewal_due(short, 2 / 3, now)
    assert not renewal_due(short, 2 / 3, now + 70)
    assert renewal_due(short, 2 / 3, now + 80)
    # Not backdated: still renewed before it expires, whatever its length.
    for seconds in (60, 600, 86400):
        plain = certificate(now, now + seconds)
        assert not renewal_due(plain, 2 / 3, now)
        assert renewal_due(plain, 2 / 3, now + seconds - 1)
    # A long one: the backdate barely matters.
    ten_days = certificate(now - BACKDATE, now + 10 * 86400)
    assert renewal_due(ten_days, 0.5, now + 5 * 86400) and not renewal_due(ten_days, 0.5, now)


def test_the_cert_cli_issues_renews_when_due_and_revokes(
    deployment: Deployment, tmp_path: Path
) -> None:
    root = deployment.root
    connection = ["--server", deployment.daemon.address, "--ca", root.ca_cert_path]
    storage = [*connection, "--cert", root.directory / "storage.pem"]
    storage += ["--key", root.directory / "storage-key.pem"]
    out = tmp_path / "node"
    issued = run_kmipd("cert", "issue", *storage, "--out", out, "--days", "3")
    assert issued.returncode == 0, issued.stderr
    first = json.loads(issued.stdout)
    assert first["issued"] and first["subject"] == STORAGE
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    again = run_kmipd("cert", "issue", *storage, "--out", out)
    assert again.returncode != 0 and "--force" in again.stderr  # nothing replaced
    assert json.loads(issued.stdout)["serial"] == first["serial"]
    # Renewal connects with the certificate in the directory itself.
    fresh = run_kmipd("cert", "renew", *connection, "--dir", out)
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(fresh.stdout)["renewed"] is False  # not due yet
    forced = run_kmipd("cert", "renew", *connection, "--dir", out, "--force")
    assert forced.returncode == 0, forced.stderr
    second = json.loads(forced.stdout)
    assert second["renewed"] and second["serial"] != first["serial"]
    admin = [*connection, "--cert", root.directory / "admin.pem"]
    admin += ["--key", root.directory / "admin-key.pem"]
    revoked = run_kmipd("cert", "revoke", *admin, first["serial"], "--reason", "superseded")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revocation_reason"] == "superseded"
    listed = run_kmipd("cert", "issued", *admin, "--subject", STORAGE)
    serials = {c["serial"] for c in json.loads(listed.stdout)["certificates"]}
    assert serials == {first["serial"], second["serial"]}
    fetched = run_kmipd("cert", "ca", *admin, "--out", tmp_path / "ca")
    assert fetched.returncode == 0, fetched.stderr
    crl = x509.load_pem_x509_crl((tmp_path / "ca" / "online-ca-crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(first["serial"], 16)) is not None
    bad = run_kmipd("cert", "issue", *storage, "--out", tmp_path / "x", "--days", "30")
    assert bad.returncode != 0 and "certificate-validity-too-long" in bad.stderr
    assert not (tmp_path / "x" / "key.pem").exists()


def _short_server_certificate(root: CertificateAuthority, seconds: int) -> None:
    """Replace the root's server certificate by one that lives ``seconds`` from now."""
    root_key = serialization.load_pem_private_key(root.ca_key_path.read_bytes(), password=None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(seconds=2))
        .not_valid_after(now + datetime.timedelta(seconds=seconds))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    root.server_key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    root.server_cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _served_certificate(address: str, root: CertificateAuthority) -> x509.Certificate:
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=root.ca_cert_path)
    context.load_cert_chain(root.directory / "storage.pem", root.directory / "storage-key.pem")
    with (
        socket.create_connection((host, int(port))) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_the_daemon_renews_its_own_server_certificate_without_dropping_connections(
    tmp_path: Path,
) -> None:
    master = tmp_path / "master.key"
    assert run_kmipd("hsm", "software-init", "--master-key", master).returncode == 0
    hsm = f'backend = "software"\nmaster_key = "{master}"\nkeyring = "{tmp_path / "keyring"}"'
    root = make_root(tmp_path / "pki")
    # Due at two thirds of 12 s: a few maintenance passes after the start.
    _short_server_certificate(root, 10)
    config = write_config(tmp_path, root, hsm)
    result = run_kmipd("ca", "init", "--config", config, "--root", root.directory)
    assert result.returncode == 0, result.stderr
    text = config.read_text() + result.stdout[result.stdout.index("[online_ca]") :]
    config.write_text(text + "\n[lifecycle]\ncheck_interval = 0.2\n")
    daemon = Daemon("--config", config, log=tmp_path / "daemon.log")
    try:
        before = _served_certificate(daemon.address, root)
        assert before.issuer == root.certificate.subject
        with km.Client(
            daemon.address,
            ca=root.ca_cert_path,
            cert=root.directory / "storage.pem",
            key=root.directory / "storage-key.pem",
        ) as kms:
            assert kms.status().state == "serving"  # a connection opened before the renewal
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # a condition with a deadline, not a fixed sleep
                current = x509.load_pem_x509_certificate(root.server_cert_path.read_bytes())
                if current.serial_number != before.serial_number:
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"the server certificate was not renewed: {daemon.stderr()}")
            renewed = _served_certificate(daemon.address, root)  # a new handshake: the new one
            assert renewed.serial_number == current.serial_number
            assert renewed.issuer != root.certificate.subject  # from the online CA now
            assert renewed.not_valid_after_utc - renewed.not_valid_before_utc >= (
                datetime.timedelta(hours=1)
            )
            assert kms.status().state == "serving"  # the old connection still serves
        assert root.server_key_path.stat().st_mode & 0o777 == 0o600
        audit = (tmp_path / "audit.log").read_text()
        assert "renew-server-certificate" in audit and "BEGIN" not in audit
    finally:
        daemon.stop()


async def test_an_async_client_renews_while_requests_are_in_flight(
    deployment: Deployment, tmp_path: Path
) -> None:
    key = km.generate_key("p384")
    with deployment.client("storage") as kms:
        issued = kms.issue_certificate(km.make_csr(key, identity=STORAGE), validity=60)
    directory = tmp_path / "async"
    write_key_and_certificate(directory, key, issued)
    answered: list[str] = []
    async with km.AsyncClient(
        deployment.daemon.address,
        ca=deployment.root.ca_cert_path,
        cert=directory / "cert.pem",
        key=directory / "key.pem",
        renewal_dir=directory,
    ) as kms:

        async def ask() -> None:
            answered.append((await kms.status()).state)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(ask)
        assert kms.certificate is not None
        assert kms.certificate.serial_number != issued.certificate.serial_number
    assert answered == ["serving"] * 20  # not one request failed across the renewal
    renewed = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
    public = renewed.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    with deployment.client_with(directory / "cert.pem", directory / "key.pem") as sync:
        assert sync.status().state == "serving"


# -- signing keys in both HSM backends ---------------------------------------------------


async def _check_signing_keys(hsm: Any) -> None:
    for curve, digest in (("p256", hashes.SHA256()), ("p384", hashes.SHA384())):
        handle = await hsm.generate_signing_key("ca", curve)
        public = serialization.load_der_public_key(await hsm.signing_public_key(handle))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(await hsm.sign(handle, b"tbs"), b"tbs", ec.ECDSA(digest))
        # One purpose per key: a signing key wraps nothing, a KEK signs nothing.
        with pytest.raises(HsmKeyNotFoundError):
            await hsm.wrap(handle, b"k" * 32, b"ad")
    kek = await hsm.generate_kek("kek")
    with pytest.raises(HsmKeyNotFoundError):
        await hsm.sign(kek, b"tbs")
    mine = ec.generate_private_key(ec.SECP256R1())
    der = mine.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    imported = await hsm.import_signing_key("imported", der)
    mine.public_key().verify(await hsm.sign(imported, b"x"), b"x", ec.ECDSA(hashes.SHA256()))
    weak = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_der = weak.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(HsmError, match="must be an EC key"):
        await hsm.import_signing_key("rsa", rsa_der)
    with pytest.raises(HsmError, match=r"p256, p384, rsa3072 or rsa4096, not 'p521'"):
        await hsm.generate_signing_key("ca", "p521")


async def test_software_keyring_signing_keys(tmp_path: Path) -> None:
    hsm = SoftwareHsm.open(tmp_path / "master", tmp_path / "keyring", create=True)
    await hsm.generate_kek("before")  # a keyring of KEKs only, as earlier daemons wrote
    await _check_signing_keys(hsm)
    reopened = SoftwareHsm.open(tmp_path / "master", tmp_path / "keyring")
    [handle, *_] = sorted(reopened._signers)
    assert await reopened.signing_public_key(handle) == await hsm.signing_public_key(handle)
    assert len(reopened._keks) == 2  # the KEKs survived the signing-key writes
    assert b"PRIVATE" not in (tmp_path / "keyring").read_bytes()  # sealed, not PEM


async def test_pkcs11_signing_keys(softhsm: SoftToken) -> None:
    hsm = await softhsm.open()
    try:
        await _check_signing_keys(hsm)
    finally:
        hsm.close()


def test_metrics_show_when_certificates_run_out(tmp_path: Path) -> None:
    master = tmp_path / "master.key"
    assert run_kmipd("hsm", "software-init", "--master-key", master).returncode == 0
    hsm = f'backend = "software"\nmaster_key = "{master}"\nkeyring = "{tmp_path / "keyring"}"'
    running = start(tmp_path, hsm, '[metrics]\nlisten = "127.0.0.1:0"\n')
    try:
        with running.client("storage") as kms:
            issued = kms.issue_certificate(km.make_csr(km.generate_key(), identity=STORAGE))
        [url] = re.findall(r"Prometheus metrics on http://(\S+?)/metrics", running.daemon.stderr())
        with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    finally:
        running.daemon.stop()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    issued_key = (
        "kmipd_issued_certificate_expiry_timestamp_seconds",
        (("profile", "client"), ("subject", STORAGE)),
    )
    assert samples[issued_key] == issued.not_after
    online_ca = issued.chain[0].not_valid_after_utc.timestamp()
    ours = "kmipd_certificate_expiry_timestamp_seconds"
    assert samples[(ours, (("certificate", "online-ca"),))] == online_ca
    assert samples[(ours, (("certificate", "server"),))] > issued.not_after


def test_check_config_checks_the_online_ca(deployment: Deployment, tmp_path: Path) -> None:
    deployment.daemon.stop()
    good = run_kmipd("check-config", deployment.config)
    assert good.returncode == 0, good.stdout + good.stderr
    # An online CA certificate that is not a CA: the server's own certificate.
    text = deployment.config.read_text()
    online = text.split("[online_ca]\ncert = ")[1].split("\n")[0]
    wrong = text.replace(f"cert = {online}", f'cert = "{deployment.root.server_cert_path}"', 1)
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text(wrong)
    bad_config.chmod(0o600)
    bad = run_kmipd("check-config", bad_config)
    assert bad.returncode != 0
    assert "online_ca.cert" in bad.stdout + bad.stderr and "not a CA" in bad.stdout + bad.stderr
