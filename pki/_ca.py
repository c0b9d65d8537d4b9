"""A small certificate authority for kmipd deployments and tests.

One directory holds everything (0700):

    ca.pem, ca-key.pem           the CA (self-signed)
    server.pem, server-key.pem   the daemon's certificate
    <name>.pem, <name>-key.pem   client certificates
    crl.pem                      the CRL the daemon checks on every handshake
    index.json                   trust domain, issued names and serials, revocations

Every extension is set explicitly, with the reason next to it, in the manner
of trustme. Client certificates are X.509-SVIDs: the single URI SAN
``spiffe://<trust-domain>/<name>`` is the client's identity, so certificates
from an existing SPIFFE deployment fit the same daemon.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from pki._files import write_private_file

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_RESERVED_NAMES = frozenset({"ca", "server", "crl", "index"})
#: Mozilla's "modern" TLS profile caps a server certificate's lifespan at 90 days
#: (sslyze flags anything longer); renew_server() re-issues one for the same names.
SERVER_VALIDITY_DAYS = 90
#: Issued certificates start a little in the past, so a peer whose clock
#: runs slightly behind does not reject a fresh certificate.
_CLOCK_SKEW = datetime.timedelta(minutes=5)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class PkiError(Exception):
    """A refused operation or unusable file; the message names which and why."""


class KeyType(enum.Enum):
    EC_P256 = "ec"
    RSA_3072 = "rsa"


@attrs.frozen
class IssuedCertificate:
    name: str
    cert_path: Path
    key_path: Path
    serial: int
    #: The SPIFFE ID for client certificates, None for the server's.
    identity: str | None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _generate_key(key_type: KeyType) -> PrivateKey:
    if key_type is KeyType.RSA_3072:
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_pem_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    data = _load_pem_file(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{what} {path} is not a PEM certificate") from None


def load_crl_serials(crl_path: str | Path, ca_cert_path: str | Path) -> frozenset[int]:
    """The serials a CRL revokes, after checking its signature and freshness."""
    crl_path, ca_cert_path = Path(crl_path), Path(ca_cert_path)
    ca_cert = load_certificate(ca_cert_path, "CA certificate")
    data = _load_pem_file(crl_path, "CRL")
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        raise PkiError(f"CRL {crl_path} is not a PEM CRL") from None
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise PkiError(f"CRL {crl_path} is not signed by the CA in {ca_cert_path}")
    next_update = crl.next_update_utc
    if next_update is not None and next_update < _now():
        raise PkiError(
            f"CRL {crl_path} expired at {next_update:%Y-%m-%d %H:%M} UTC; "
            "refresh it (kmipd pki crl DIR)"
        )
    return frozenset(entry.serial_number for entry in crl)


def _check_trust_domain(trust_domain: str) -> None:
    if _TRUST_DOMAIN.fullmatch(trust_domain) is None:
        raise PkiError(
            f"trust domain {trust_domain!r} is invalid: use 1..255 lowercase letters, "
            "digits, '.', '-' or '_'"
        )


def _new_index(trust_domain: str, key_type: KeyType) -> dict[str, Any]:
    return {
        "trust_domain": trust_domain,
        "key_type": key_type.value,
        "crl_number": 0,
        "issued": {},
        "revoked": {},
    }


def _load_ca_key(path: Path, cert: x509.Certificate, cert_path: Path) -> PrivateKey:
    key_data = _load_pem_file(path, "CA key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise PkiError(f"CA key {path} is not an unencrypted PEM key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"CA key {path} is neither EC nor RSA")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise PkiError(f"CA key {path} does not match {cert_path}")
    return key


def _load_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(_load_pem_file(path, "CA index"))
    except ValueError:
        index = None
    required = {"trust_domain", "key_type", "crl_number", "issued", "revoked"}
    if not isinstance(index, dict) or not required <= set(index):
        raise PkiError(f"CA index {path} is corrupt")
    return index


class CertificateAuthority:
    """A CA on disk. Create one with ``init``, open an existing one with ``load``."""

    def __init__(
        self, directory: Path, key: PrivateKey, cert: x509.Certificate, index: dict[str, Any]
    ) -> None:
        self.directory = directory
        self._key = key
        self._cert = cert
        self._index = index

    def __repr__(self) -> str:
        return f"CertificateAuthority({str(self.directory)!r}, trust_domain={self.trust_domain!r})"

    # -- paths --------------------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return str(self._index["trust_domain"])

    @property
    def key_type(self) -> KeyType:
        return KeyType(self._index["key_type"])

    @property
    def ca_cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def crl_path(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def server_cert_path(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key_path(self) -> Path:
        return self.directory / "server-key.pem"

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    def identity_for(self, name: str) -> str:
        return f"spiffe://{self.trust_domain}/{name}"

    # -- creating and opening --------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: str | Path,
        *,
        trust_domain: str = "kmipd.test",
        key_type: KeyType = KeyType.EC_P256,
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1",),
        force: bool = False,
        validity_days: int = 3650,
    ) -> CertificateAuthority:
        directory = Path(directory)
        _check_trust_domain(trust_domain)
        if not force and any((directory / f).exists() for f in ("ca.pem", "ca-key.pem")):
            raise PkiError(f"{directory} already holds a CA; pass force to replace it")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)

        key = _generate_key(key_type)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kmipd test CA {trust_domain}")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=validity_days))
            # A CA, and it signs only end-entity certificates (no intermediates).
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            # It signs certificates and CRLs, and nothing else.
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            # Lets verifiers match issued certificates' AKI to this key.
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        index = _new_index(trust_domain, key_type)
        write_private_file(directory / "ca-key.pem", _key_pem(key))
        write_private_file(directory / "ca.pem", _cert_pem(cert), mode=0o644)
        ca = cls(directory, key, cert, index)
        ca.issue_server(dns_names=dns_names, ip_addresses=ip_addresses)
        ca.write_crl()
        return ca

    @classmethod
    def load(cls, directory: str | Path) -> CertificateAuthority:
        directory = Path(directory)
        cert = load_certificate(directory / "ca.pem", "CA certificate")
        key = _load_ca_key(directory / "ca-key.pem", cert, directory / "ca.pem")
        return cls(directory, key, cert, _load_index(directory / "index.json"))

    @classmethod
    def adopt(
        cls,
        directory: str | Path,
        ca_cert: str | Path,
        ca_key: str | Path,
        *,
        trust_domain: str,
    ) -> CertificateAuthority:
        """Issue with an existing CA's certificate and key, from a new directory.

        For tools given a deployment's CA key (the conformance suite makes
        expired, wrong-usage and foreign-domain client certificates with it).
        The CA files are copied into ``directory`` with a fresh index and CRL;
        the deployment's own CA directory and CRL are not touched.
        """
        directory, ca_cert, ca_key = Path(directory), Path(ca_cert), Path(ca_key)
        _check_trust_domain(trust_domain)
        cert = load_certificate(ca_cert, "CA certificate")
        key = _load_ca_key(ca_key, cert, ca_cert)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if any((directory / f).exists() for f in ("ca.pem", "ca-key.pem")):
            raise PkiError(f"{directory} already holds a CA")
        write_private_file(directory / "ca-key.pem", _key_pem(key))
        write_private_file(directory / "ca.pem", _cert_pem(cert), mode=0o644)
        index = _new_index(
            trust_domain,
            KeyType.RSA_3072 if isinstance(key, rsa.RSAPrivateKey) else KeyType.EC_P256,
        )
        ca = cls(directory, key, cert, index)
        ca.write_crl()
        return ca

    def _save_index(self) -> None:
        data = json.dumps(self._index, indent=2, sort_keys=True).encode()
        write_private_file(self.directory / "index.json", data, mode=0o644)

    # -- issuing -----------------------------------------------------------------------------

    def _leaf(
        self,
        *,
        subject_cn: str,
        sans: list[x509.GeneralName],
        extended_key_usages: Sequence[ObjectIdentifier],
        not_before: datetime.datetime,
        not_after: datetime.datetime,
    ) -> tuple[PrivateKey, x509.Certificate]:
        key = _generate_key(self.key_type)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # An end entity: it may not sign certificates (X.509-SVID requires this).
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # TLS signatures only; RSA keys also get keyEncipherment for
            # verifiers that still expect it on TLS certificates.
            .add_extension(
                _key_usage(
                    digital_signature=True, key_encipherment=self.key_type is KeyType.RSA_3072
                ),
                critical=True,
            )
            # Names the peer verifies: the server's host names, the client's SPIFFE ID.
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            # Ties the certificate to the CA key that signed it.
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if extended_key_usages:
            # One TLS role per certificate: a server certificate cannot act as
            # a client and the reverse (single-purpose keys, SP 800-57).
            builder = builder.add_extension(
                x509.ExtendedKeyUsage(list(extended_key_usages)), critical=False
            )
        return key, builder.sign(self._key, hashes.SHA256())

    def _validity(
        self,
        validity_days: int,
        not_before: datetime.datetime | None,
        not_after: datetime.datetime | None,
    ) -> tuple[datetime.datetime, datetime.datetime]:
        now = _now()
        start = not_before or now - _CLOCK_SKEW
        end = not_after or now + datetime.timedelta(days=validity_days)
        if end <= start:
            raise PkiError("a certificate's not_after must be later than its not_before")
        return start, end

    def _write_issued(
        self, name: str, kind: str, key: PrivateKey, cert: x509.Certificate, identity: str | None
    ) -> IssuedCertificate:
        key_path, cert_path = self.directory / f"{name}-key.pem", self.directory / f"{name}.pem"
        write_private_file(key_path, _key_pem(key))
        write_private_file(cert_path, _cert_pem(cert), mode=0o644)
        self._index["issued"][name] = {"serial": str(cert.serial_number), "kind": kind}
        self._save_index()
        return IssuedCertificate(name, cert_path, key_path, cert.serial_number, identity)

    def issue_server(
        self,
        *,
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1",),
        validity_days: int = SERVER_VALIDITY_DAYS,
    ) -> IssuedCertificate:
        """(Re)issue the daemon's certificate; used at init and to rotate it."""
        try:
            ips = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        except ValueError as exc:
            raise PkiError(f"invalid server IP address: {exc}") from None
        sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        sans += ips
        if not sans:
            raise PkiError("the server certificate needs at least one DNS name or IP address")
        start, end = self._validity(validity_days, None, None)
        cn = dns_names[0] if dns_names else ip_addresses[0]
        key, cert = self._leaf(
            subject_cn=cn,
            sans=sans,
            not_before=start,
            not_after=end,
            extended_key_usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        )
        return self._write_issued("server", "server", key, cert, None)

    def renew_server(self, *, validity_days: int = SERVER_VALIDITY_DAYS) -> IssuedCertificate:
        """Re-issue the server certificate, with a new key, for the names the current one has."""
        current = load_certificate(self.server_cert_path, "server certificate")
        try:
            sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise PkiError(f"{self.server_cert_path} names no host (no subjectAltName)") from None
        return self.issue_server(
            dns_names=sans.get_values_for_type(x509.DNSName),
            ip_addresses=[str(ip) for ip in sans.get_values_for_type(x509.IPAddress)],
            validity_days=validity_days,
        )

    def issue_client(
        self,
        name: str,
        *,
        validity_days: int = 365,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        extended_key_usages: Sequence[ObjectIdentifier] | None = None,
        force: bool = False,
    ) -> IssuedCertificate:
        """Issue a client certificate whose identity is ``spiffe://<trust-domain>/<name>``.

        ``extended_key_usages`` defaults to clientAuth; an empty list omits the
        extension (for negative tests).
        """
        if _NAME.fullmatch(name) is None or name in _RESERVED_NAMES:
            raise PkiError(
                f"client name {name!r} is invalid: use 1..64 of [A-Za-z0-9._-], not starting "
                f"with '.' or '-', and none of {', '.join(sorted(_RESERVED_NAMES))}"
            )
        if not force and (self.directory / f"{name}.pem").exists():
            raise PkiError(f"a certificate for {name!r} already exists; pass force to replace it")
        start, end = self._validity(validity_days, not_before, not_after)
        identity = self.identity_for(name)
        usages = (
            [ExtendedKeyUsageOID.CLIENT_AUTH]
            if extended_key_usages is None
            else extended_key_usages
        )
        key, cert = self._leaf(
            subject_cn=name,
            sans=[x509.UniformResourceIdentifier(identity)],
            extended_key_usages=usages,
            not_before=start,
            not_after=end,
        )
        return self._write_issued(name, "client", key, cert, identity)

    # -- revocation -----------------------------------------------------------------------------

    def revoke(self, name: str, *, reason: x509.ReasonFlags = x509.ReasonFlags.unspecified) -> None:
        """Put the named certificate on the CRL; revoking twice changes nothing."""
        issued = self._index["issued"].get(name)
        if issued is None:
            raise PkiError(f"no certificate named {name!r} was issued by this CA")
        serial = issued["serial"]
        if serial in self._index["revoked"]:
            return
        self._index["revoked"][serial] = {
            "name": name,
            "time": int(_now().timestamp()),
            "reason": reason.name,
        }
        self._save_index()
        self.write_crl()

    def revoked_serials(self) -> frozenset[int]:
        return frozenset(int(serial) for serial in self._index["revoked"])

    def write_crl(self, *, next_update_days: int = 365) -> None:
        """Sign and write the CRL with every revocation so far (also to refresh it)."""
        if next_update_days < 1:
            raise PkiError("next_update_days must be at least 1")
        now = _now()
        self._index["crl_number"] += 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._cert.subject)
            .last_update(now - _CLOCK_SKEW)
            .next_update(now + datetime.timedelta(days=next_update_days))
            # Lets a verifier tell a newer CRL from an older one.
            .add_extension(x509.CRLNumber(self._index["crl_number"]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        for serial, entry in self._index["revoked"].items():
            revoked = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial))
                .revocation_date(datetime.datetime.fromtimestamp(entry["time"], datetime.UTC))
            )
            reason = x509.ReasonFlags[entry["reason"]]
            if (
                reason is not x509.ReasonFlags.unspecified
            ):  # RFC 5280 5.3.1: omit, not "unspecified"
                revoked = revoked.add_extension(x509.CRLReason(reason), critical=False)
            builder = builder.add_revoked_certificate(revoked.build())
        crl = builder.sign(self._key, hashes.SHA256())
        write_private_file(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
        self._save_index()
