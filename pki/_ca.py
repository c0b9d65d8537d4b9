"""The issuing side: a small certificate authority for kmipd deployments and tests.

One directory (mode 0700) holds everything::

    ca.pem, ca-key.pem           the CA (self-signed)
    server.pem, server-key.pem   the daemon's certificate
    <name>.pem, <name>-key.pem   client certificates
    <name>-transport.pem, <name>-transport-key.pem
                                 key-transport certificates (pki._transport)
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
import os
import re
from collections.abc import Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from pki._errors import PkiError
from pki._files import read_file, write_private_file
from pki._index import Index, Issued, Revocation
from pki._load import CLOCK_SKEW, load_certificate
from pki._transport import (
    TRANSPORT_SUFFIX,
    TransportKem,
    generate_transport_keys,
    hybrid_extension,
    transport_keys_pem,
)

#: SPIFFE trust domain names (SPIFFE ID specification, section 2.1).
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
#: Client names become file names and the SPIFFE ID's path: keep them boring.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
#: Names whose files the CA uses itself. Compared case-insensitively, for
#: case-insensitive file systems. Names ending in "-key" are refused as well:
#: "<name>.pem" would be another name's key file ("ca-key" -> the CA key).
_RESERVED_NAMES = frozenset({"ca", "server", "crl", "index"})
_DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: Mozilla's "modern" TLS profile caps a server certificate's lifespan at 90 days
#: (sslyze flags anything longer); renew_server() re-issues one for the same names.
SERVER_VALIDITY_DAYS = 90


class KeyType(enum.Enum):
    """The CA's key type; certificates it issues get keys of the same type."""

    EC_P256 = "ec"  # the default: small, fast, and what TLS 1.3 peers all support
    RSA_3072 = "rsa"  # for peers that still cannot do ECDSA


@attrs.frozen
class IssuedCertificate:
    """Where an issued certificate and its key were written, and who it names."""

    name: str
    cert_path: Path
    key_path: Path
    serial: int
    #: The SPIFFE ID for client certificates, None for the server's.
    identity: str | None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _utc(time: datetime.datetime | None) -> datetime.datetime | None:
    """A naive time means UTC, as it does to cryptography's builders."""
    if time is None or time.tzinfo is not None:
        return time
    return time.replace(tzinfo=datetime.UTC)


def _generate_key(key_type: KeyType) -> PrivateKey:
    if key_type is KeyType.RSA_3072:
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return ec.generate_private_key(ec.SECP256R1())


def _key_type_of(key: PrivateKey) -> KeyType | None:
    if isinstance(key, rsa.RSAPrivateKey):
        return KeyType.RSA_3072 if key.key_size == 3072 else None
    return KeyType.EC_P256 if isinstance(key.curve, ec.SECP256R1) else None


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki(key: PrivateKey | x509.Certificate) -> bytes:
    public = key.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_name(trust_domain: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kmipd test CA {trust_domain}")])


def _check_trust_domain(trust_domain: str) -> None:
    if _TRUST_DOMAIN.fullmatch(trust_domain) is None:
        raise PkiError(
            f"trust domain {trust_domain!r} is invalid: use 1..255 lowercase letters, "
            "digits, '.', '-' or '_'"
        )


def _check_name(name: str) -> None:
    lowered = name.lower()
    if (
        _NAME.fullmatch(name) is None
        or lowered in _RESERVED_NAMES
        or lowered.endswith(("-key", TRANSPORT_SUFFIX))
    ):
        raise PkiError(
            f"client name {name!r} is invalid: use 1..64 of [A-Za-z0-9._-], not starting "
            f"with '.' or '-', not ending in '-key' or '{TRANSPORT_SUFFIX}', and none of "
            f"{', '.join(sorted(_RESERVED_NAMES))}"
        )


def _server_names(
    dns_names: Sequence[str], ip_addresses: Sequence[str]
) -> tuple[str, list[x509.GeneralName]]:
    """The server certificate's common name and SANs, checked before anything is written."""
    sans: list[x509.GeneralName] = []
    for dns in dns_names:
        if len(dns) > 253 or _DNS_NAME.fullmatch(dns) is None:
            raise PkiError(f"server DNS name {dns!r} is invalid")
        sans.append(x509.DNSName(dns))
    for ip in ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise PkiError(f"server IP address {ip!r} is invalid") from None
    if not sans:
        raise PkiError("the server certificate needs at least one DNS name or IP address")
    common_name = str(dns_names[0] if dns_names else ip_addresses[0])
    if len(common_name) > 64:
        raise PkiError(f"server name {common_name!r} is too long for a common name (64 at most)")
    return common_name, sans


def _validity(
    validity_days: int, not_before: datetime.datetime | None, not_after: datetime.datetime | None
) -> tuple[datetime.datetime, datetime.datetime]:
    """The validity period: explicit bounds win; otherwise from a little before now."""
    if validity_days < 1:
        raise PkiError("validity_days must be at least 1")
    days = datetime.timedelta(days=validity_days)
    now, start, end = _now(), _utc(not_before), _utc(not_after)
    if start is None:
        # Backdated so that a peer whose clock runs a little behind accepts it.
        start = now - CLOCK_SKEW
        if end is not None and end <= start:
            # An already expired certificate (for negative tests): a period of
            # the usual length that ended at not_after.
            start = end - days
    if end is None:
        end = max(start, now) + days
    if end <= start:
        raise PkiError("a certificate's not_after must be later than its not_before")
    return start, end


def _load_ca_key(key_path: Path, cert: x509.Certificate, cert_path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(read_file(key_path, "CA key"), password=None)
    except (ValueError, TypeError):
        raise PkiError(f"CA key {key_path} is not an unencrypted PEM private key") from None
    if not isinstance(key, PrivateKey):
        raise PkiError(f"CA key {key_path} is neither an EC nor an RSA key")
    if _spki(key) != _spki(cert):
        raise PkiError(f"CA key {key_path} does not match the CA certificate {cert_path}")
    return key


class CertificateAuthority:
    """A CA on disk. Create one with ``init``, open an existing one with ``load``.

    The constructor is internal: it trusts its arguments to agree.
    """

    def __init__(
        self, directory: Path, key: PrivateKey, cert: x509.Certificate, index: Index
    ) -> None:
        self.directory = directory
        self._key = key
        self._cert = cert
        self._index = index

    def __repr__(self) -> str:  # the key stays out of reprs and logs
        return f"CertificateAuthority({str(self.directory)!r}, trust_domain={self.trust_domain!r})"

    @property
    def trust_domain(self) -> str:
        return self._index.trust_domain

    @property
    def key_type(self) -> KeyType:
        return KeyType(self._index.key_type)

    @property
    def certificate(self) -> x509.Certificate:
        """The CA certificate, for tests that build odd certificates of their own."""
        return self._cert

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
    def _index_path(self) -> Path:
        return self.directory / "index.json"

    def identity_for(self, name: str) -> str:
        """The SPIFFE ID a client certificate for ``name`` carries."""
        return f"spiffe://{self.trust_domain}/{name}"

    # -- creating and opening -------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str],
        *,
        trust_domain: str = "kmipd.test",
        key_type: KeyType = KeyType.EC_P256,
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1",),
        force: bool = False,
        validity_days: int = 3650,
        path_length: int = 0,
    ) -> CertificateAuthority:
        """Create a CA, a server certificate and an empty CRL in ``directory``.

        Refuses to replace an existing CA unless ``force``: its key may be the
        only thing that can still revoke certificates out in the field.
        ``path_length`` 1 lets the root sign one level of intermediate CAs (the
        daemon's online issuing CA, ``issue_intermediate``); 0 forbids them.
        """
        directory = Path(directory)
        # Every argument is checked before anything is written: bad input loses nothing.
        _check_trust_domain(trust_domain)
        _server_names(dns_names, ip_addresses)
        if validity_days < 1:
            raise PkiError("validity_days must be at least 1")
        if path_length not in (0, 1):
            raise PkiError("path_length must be 0 (no intermediates) or 1 (an online CA)")
        existing = [f for f in ("ca.pem", "ca-key.pem") if (directory / f).exists()]
        if existing and not force:
            raise PkiError(
                f"{directory} already holds a CA ({', '.join(existing)}); pass force to replace it"
            )
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)  # an existing directory keeps its mode otherwise
        except OSError as exc:
            raise PkiError(
                f"cannot create CA directory {directory}: {exc.strerror or exc}"
            ) from None

        key = _generate_key(key_type)
        name = _ca_name(trust_domain)
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)  # self-signed: this is the root
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=validity_days))
            # A CA; pathlen 0 forbids intermediates, 1 allows the online CA (and no deeper).
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            # Certificates and CRLs, nothing else: the CA key never speaks TLS.
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            # Lets verifiers match the AKI of what it signs to this key (RFC 5280 4.2.1.2).
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        write_private_file(directory / "ca-key.pem", _key_pem(key))
        write_private_file(directory / "ca.pem", _cert_pem(cert), mode=0o644)
        ca = cls(directory, key, cert, Index(trust_domain, key_type.value))
        ca.issue_server(dns_names=dns_names, ip_addresses=ip_addresses, force=True)
        ca.write_crl()
        return ca

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """Open the CA in ``directory``, checking that its files belong together."""
        directory = Path(directory)
        cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
        cert = load_certificate(cert_path, "CA certificate")
        key = _load_ca_key(key_path, cert, cert_path)
        index_path = directory / "index.json"
        index = Index.load(index_path)
        key_type = _key_type_of(key)
        if (
            _TRUST_DOMAIN.fullmatch(index.trust_domain) is None
            or _ca_name(index.trust_domain) != cert.subject
            or key_type is None
            or index.key_type != key_type.value
        ):
            raise PkiError(f"CA index {index_path} does not belong to the CA in {cert_path}")
        return cls(directory, key, cert, index)

    @classmethod
    def adopt(
        cls,
        directory: str | os.PathLike[str],
        ca_cert: str | os.PathLike[str],
        ca_key: str | os.PathLike[str],
        *,
        trust_domain: str,
    ) -> CertificateAuthority:
        """Issue with an existing CA's certificate and key, from a new directory.

        For tools given a deployment's CA key (the conformance suite makes
        expired, wrong-usage and foreign-domain client certificates with it).
        The CA files are copied into ``directory`` with a fresh index and CRL;
        the deployment's own CA directory and CRL are not touched.
        """
        directory, cert_path, key_path = Path(directory), Path(ca_cert), Path(ca_key)
        _check_trust_domain(trust_domain)
        cert = load_certificate(cert_path, "CA certificate")
        key = _load_ca_key(key_path, cert, cert_path)
        key_type = _key_type_of(key)
        if key_type is None:
            raise PkiError(f"CA key {key_path} is neither EC P-256 nor RSA-3072")
        if any((directory / f).exists() for f in ("ca.pem", "ca-key.pem")):
            raise PkiError(f"{directory} already holds a CA")
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise PkiError(f"cannot create {directory}: {exc.strerror or exc}") from None
        write_private_file(directory / "ca-key.pem", _key_pem(key))
        write_private_file(directory / "ca.pem", _cert_pem(cert), mode=0o644)
        ca = cls(directory, key, cert, Index(trust_domain, key_type.value))
        ca.write_crl()
        return ca

    # -- issuing --------------------------------------------------------------------------

    def _leaf(
        self,
        *,
        common_name: str,
        sans: list[x509.GeneralName],
        extended_key_usages: Sequence[ObjectIdentifier],
        not_before: datetime.datetime,
        not_after: datetime.datetime,
    ) -> tuple[PrivateKey, x509.Certificate]:
        key = _generate_key(self.key_type)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # An end entity: it may not sign certificates (X.509-SVID requires this).
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # TLS handshake signatures only; RSA keys also get keyEncipherment
            # for verifiers that still expect it on RSA TLS certificates.
            .add_extension(
                _key_usage(
                    digital_signature=True, key_encipherment=self.key_type is KeyType.RSA_3072
                ),
                critical=True,
            )
            # The names the peer verifies: the server's host names and
            # addresses, the client's SPIFFE ID. Not critical: the subject is not empty.
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            # Identifies this key, for tools that index certificates by it.
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            # Names the CA key that signed it, so verifiers pick the right issuer.
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if extended_key_usages:
            # One TLS role per certificate: a server certificate cannot act as
            # a client and the reverse (one purpose per key, SP 800-57).
            # An empty list omits the extension, for negative tests.
            builder = builder.add_extension(
                x509.ExtendedKeyUsage(list(extended_key_usages)), critical=False
            )
        return key, builder.sign(self._key, hashes.SHA256())

    def _write_issued(
        self, name: str, kind: str, key: PrivateKey, cert: x509.Certificate, identity: str | None
    ) -> IssuedCertificate:
        issued = Issued(cert.serial_number, kind, f"{name}.pem", f"{name}-key.pem")
        # The index first: a certificate that exists must be revocable by name.
        # A crash may leave the index knowing a serial that was never written
        # out, which is harmless; the reverse would not be.
        self._index.issued[name] = issued
        self._index.save(self._index_path)
        key_path, cert_path = self.directory / issued.key, self.directory / issued.cert
        write_private_file(key_path, _key_pem(key))
        write_private_file(cert_path, _cert_pem(cert), mode=0o644)
        return IssuedCertificate(name, cert_path, key_path, cert.serial_number, identity)

    def issue_server(
        self,
        *,
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1",),
        validity_days: int = SERVER_VALIDITY_DAYS,
        force: bool = True,
    ) -> IssuedCertificate:
        """(Re)issue the daemon's certificate, at init and to rotate it.

        ``force`` defaults to True because rotation is the usual reason to
        call this; pass False to refuse replacing an existing one.
        """
        common_name, sans = _server_names(dns_names, ip_addresses)
        if not force and self.server_cert_path.exists():
            raise PkiError(f"{self.server_cert_path} already exists; pass force to replace it")
        start, end = _validity(validity_days, None, None)
        key, cert = self._leaf(
            common_name=common_name,
            sans=sans,
            extended_key_usages=[ExtendedKeyUsageOID.SERVER_AUTH],
            not_before=start,
            not_after=end,
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

        ``not_before``/``not_after`` override the validity period (naive times
        are UTC); a ``not_after`` in the past makes an expired certificate.
        ``extended_key_usages`` defaults to clientAuth; an empty list omits the
        extension. Both exist for negative tests.
        """
        _check_name(name)
        start, end = _validity(validity_days, not_before, not_after)
        paths = (self.directory / f"{name}.pem", self.directory / f"{name}-key.pem")
        if not force and any(path.exists() for path in paths):
            raise PkiError(f"a certificate for {name!r} already exists; pass force to replace it")
        identity = self.identity_for(name)
        usages = (
            [ExtendedKeyUsageOID.CLIENT_AUTH]
            if extended_key_usages is None
            else extended_key_usages
        )
        key, cert = self._leaf(
            common_name=name,
            # Exactly one URI SAN and no other name: the X.509-SVID shape.
            sans=[x509.UniformResourceIdentifier(identity)],
            extended_key_usages=usages,
            not_before=start,
            not_after=end,
        )
        return self._write_issued(name, "client", key, cert, identity)

    def issue_transport(
        self,
        name: str,
        *,
        kem: TransportKem = TransportKem.X25519,
        validity_days: int = 365,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        force: bool = False,
    ) -> IssuedCertificate:
        """Issue ``name``'s key-transport certificate, beside its TLS certificate.

        Same SPIFFE ID as the TLS certificate; a separate key that may only
        receive keys (keyAgreement, or keyEncipherment for the ML-KEM hybrid),
        no extendedKeyUsage, so it can never authenticate TLS. Written to
        ``NAME-transport.pem`` / ``NAME-transport-key.pem`` and recorded as
        ``NAME-transport`` (``revoke(f"{name}-transport")`` revokes it).
        """
        _check_name(name)
        start, end = _validity(validity_days, not_before, not_after)
        issued = self._index.issued.get(name)
        if issued is None or issued.kind != "client" or not (self.directory / issued.cert).exists():
            raise PkiError(
                f"{name!r} has no client TLS certificate from this CA; issue it first "
                f"(kmipd pki issue {self.directory} {name})"
            )
        record_name = name + TRANSPORT_SUFFIX
        paths = (self.directory / f"{record_name}.pem", self.directory / f"{record_name}-key.pem")
        if not force and any(path.exists() for path in paths):
            raise PkiError(
                f"a transport certificate for {name!r} already exists; pass force to replace it"
            )
        identity = self.identity_for(name)
        keys = generate_transport_keys(kem)
        public = keys[0].public_key()
        hybrid = kem is TransportKem.MLKEM768_X25519
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, record_name)]))
            .issuer_name(self._cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            # An end entity: it may not sign certificates.
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # Receives keys, nothing else: no digitalSignature, so it cannot sign a
            # TLS handshake. A KEM encapsulates (keyEncipherment); a DH key agrees.
            .add_extension(
                _key_usage(key_agreement=not hybrid, key_encipherment=hybrid), critical=True
            )
            # The same identity as the client's TLS certificate (no EKU: not for TLS).
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if hybrid:
            # Critical: a verifier that cannot read the X25519 half must refuse the
            # certificate instead of encrypting to the ML-KEM half alone.
            second = keys[1].public_key()
            assert isinstance(second, x25519.X25519PublicKey)
            builder = builder.add_extension(hybrid_extension(second), critical=True)
        cert = builder.sign(self._key, hashes.SHA256())
        self._index.issued[record_name] = Issued(
            cert.serial_number, "transport", paths[0].name, paths[1].name
        )
        self._index.save(self._index_path)
        write_private_file(paths[1], transport_keys_pem(keys))
        write_private_file(paths[0], _cert_pem(cert), mode=0o644)
        return IssuedCertificate(record_name, paths[0], paths[1], cert.serial_number, identity)

    def issue_intermediate(
        self,
        name: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        validity_days: int = 1825,
        force: bool = False,
    ) -> IssuedCertificate:
        """Sign an intermediate CA (the daemon's online issuing CA) for ``public_key``.

        Only the public key comes here: its private half stays in the daemon's HSM
        backend. Written to ``NAME.pem`` and recorded as ``NAME`` so that
        ``revoke(NAME)`` puts it on this root's CRL. It may sign end-entity
        certificates and CRLs only (pathlen 0).
        """
        _check_name(name)
        constraints = self._cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.path_length is not None and constraints.path_length < 1:
            raise PkiError(
                f"the CA in {self.directory} was created with pathlen 0 and cannot sign an "
                "intermediate; create one with `kmipd pki init --online-ca`"
            )
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise PkiError("the online CA's key must be an EC key")
        path = self.directory / f"{name}.pem"
        if not force and path.exists():
            raise PkiError(f"{path} already exists; pass force to replace it")
        start, end = _validity(validity_days, None, None)
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(
                            NameOID.COMMON_NAME, f"kmipd online CA {self.trust_domain}"
                        )
                    ]
                )
            )
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(min(end, self._cert.not_valid_after_utc))
            # A CA for end entities only: it cannot make further CAs.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            # Certificates and CRLs, nothing else: the key never speaks TLS.
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        self._index.issued[name] = Issued(cert.serial_number, "intermediate", path.name, "")
        self._index.save(self._index_path)
        write_private_file(path, _cert_pem(cert), mode=0o644)
        return IssuedCertificate(name, path, path, cert.serial_number, None)

    # -- revocation -----------------------------------------------------------------------

    def revoke(self, name: str, *, reason: x509.ReasonFlags = x509.ReasonFlags.unspecified) -> None:
        """Put the certificate now issued under ``name`` on the CRL.

        Revoking it again changes nothing (the first reason stands).
        """
        issued = self._index.issued.get(name)
        if issued is None:
            raise PkiError(
                f"no certificate named {name!r} was issued by the CA in {self.directory}"
            )
        if issued.serial in self._index.revoked:
            return
        self._index.revoked[issued.serial] = Revocation(issued.serial, name, _now(), reason)
        self.write_crl()

    def has_issued(self, name: str) -> bool:
        """Whether a certificate was issued under ``name`` (revoked or not)."""
        return name in self._index.issued

    def revoked_serials(self) -> frozenset[int]:
        return frozenset(self._index.revoked)

    def write_crl(self, *, next_update_days: int = 365) -> None:
        """Sign and write the CRL with every revocation so far; also to refresh it."""
        if next_update_days < 1:
            raise PkiError("next_update_days must be at least 1")
        self._index.crl_number += 1
        # The index first: if the CRL write fails, the revocation and the CRL
        # number are kept and the next write publishes them; the reverse order
        # could publish a revocation that a later CRL forgets.
        self._index.save(self._index_path)
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._cert.subject)
            # Backdated like certificates: OpenSSL refuses a CRL from its future.
            .last_update(now - CLOCK_SKEW)
            .next_update(now + datetime.timedelta(days=next_update_days))
            # Lets a verifier tell a newer CRL from an older one (RFC 5280 5.2.3).
            .add_extension(x509.CRLNumber(self._index.crl_number), critical=False)
            # Names the CA key that signed it (RFC 5280 5.2.1).
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        for serial, revocation in sorted(self._index.revoked.items()):
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(revocation.time)
            )
            # RFC 5280 5.3.1: omit the reason code rather than say "unspecified".
            if revocation.reason is not x509.ReasonFlags.unspecified:
                entry = entry.add_extension(x509.CRLReason(revocation.reason), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        crl = builder.sign(self._key, hashes.SHA256())
        write_private_file(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
