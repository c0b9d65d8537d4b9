"""The server's TLS policy: what a handshake needs and what a peer must prove.

OpenSSL verifies the chain, the validity dates, the CRL and (when present)
the clientAuth EKU during the handshake, and a refused client gets the
alert that says why. What OpenSSL does not insist on is checked right after
the handshake, on every connection, resumed or not:

* the certificate carries an extendedKeyUsage with clientAuth (OpenSSL
  accepts a certificate with no EKU extension at all);
* exactly one SPIFFE URI SAN in our trust domain: that URI is the identity;
* its serial is not in the CRL and it is within its validity period (a
  resumed TLS session skips OpenSSL's verification; tickets are off by
  default, and this check keeps a revoked certificate out even when an
  operator turns them on).
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from kmipd.crypto import TransportTrust
from kmipd.net._tls_policy import KEY_EXCHANGE_GROUP
from pki import PkiError, load_certificate, load_crl_serials

#: TLS 1.2 is off unless enabled; when on, only forward-secret AEAD suites.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class TlsConfigError(Exception):
    """The TLS material cannot be loaded; the message names the file and the problem."""


class PeerRejectedError(Exception):
    """The client's certificate passed OpenSSL but not our identity rules.

    ``reason`` is a short fixed slug for metrics (handshake failures by reason).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@attrs.frozen
class TlsSettings:
    ca: Path
    cert: Path
    key: Path
    crl: Path
    trust_domain: str
    allow_tls12: bool = False
    #: TLS 1.3 session tickets per handshake; 0 (no resumption) by default.
    session_tickets: int = 0
    #: KMIP is served: accept TLS 1.2 (same suites) for it; the native protocol on a
    #: 1.2 connection is still refused after the handshake unless allow_tls12.
    kmip_tls12: bool = False
    #: The online issuing CA (an intermediate under ``ca``) and the CRL it signs:
    #: certificates it issued are trusted too, and checked against that CRL.
    online_ca: Path | None = None
    online_ca_crl: Path | None = None

    @property
    def accepts_tls12(self) -> bool:
        return self.allow_tls12 or self.kmip_tls12


@attrs.frozen
class ServerTls:
    """Everything a handshake needs, loaded together so a reload swaps it in one step."""

    settings: TlsSettings
    context: ssl.SSLContext
    revoked: frozenset[int]
    #: The CRL files' identity when loaded, to notice a new CRL (see crl_changed).
    crl_stamp: tuple[int, ...]
    #: The same CA and CRL, for key-transport certificates (the service checks them).
    transport_trust: TransportTrust
    #: The online issuing CA's certificate, when there is one.
    online_ca: x509.Certificate | None = None
    #: When the server certificate being served expires (Unix time), for metrics.
    server_not_after: float = 0.0

    @classmethod
    def load(cls, settings: TlsSettings) -> ServerTls:
        stamp = _crl_stamp(settings)
        online_ca = None
        try:
            revoked = load_crl_serials(settings.crl, settings.ca)
            ca_cert = load_certificate(settings.ca, "CA certificate")
            if settings.online_ca is not None:
                online_ca = load_certificate(settings.online_ca, "online CA certificate")
                if settings.online_ca_crl is None or not settings.online_ca_crl.exists():
                    raise TlsConfigError(
                        f"online_ca.crl: {settings.online_ca_crl} does not exist; "
                        "`kmipd ca crl CONFIG` signs one"
                    )
                # Serials are random 159-bit numbers: one set for both CAs is safe.
                revoked |= load_crl_serials(settings.online_ca_crl, settings.online_ca)
        except PkiError as exc:
            raise TlsConfigError(str(exc)) from None
        trust = TransportTrust(ca_cert, settings.trust_domain, revoked)
        context = _server_context(settings)
        try:
            served = load_certificate(settings.cert, "server certificate")
        except PkiError as exc:
            raise TlsConfigError(str(exc)) from None
        not_after = served.not_valid_after_utc.timestamp()
        return cls(settings, context, revoked, stamp, trust, online_ca, not_after)

    def current_crl_stamp(self) -> tuple[int, ...]:
        """The CRL files' identity now; differs from crl_stamp once one was replaced."""
        return _crl_stamp(self.settings)

    def verify_peer(self, der: bytes | None, now: datetime.datetime | None = None) -> str:
        """Return the peer's identity (its SPIFFE ID) or raise PeerRejectedError."""
        if der is None:
            raise PeerRejectedError("no client certificate", "no-certificate")
        cert = x509.load_der_x509_certificate(der)
        now = now or datetime.datetime.now(datetime.UTC)
        if cert.serial_number in self.revoked:
            raise PeerRejectedError("client certificate is revoked", "revoked")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise PeerRejectedError("client certificate is outside its validity period", "expired")
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise PeerRejectedError(
                "client certificate has no extendedKeyUsage; kmipd requires clientAuth",
                "no-client-auth",
            ) from None
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise PeerRejectedError(
                "client certificate lacks the clientAuth extended key usage", "no-client-auth"
            )
        return _spiffe_identity(cert, self.settings.trust_domain)

    def certificate_problem(
        self, cert: x509.Certificate, now: datetime.datetime, *, full: bool = False
    ) -> tuple[str, str] | None:
        """Why an authenticated peer's certificate no longer holds, or None.

        The periodic scan asks only the cheap questions (CRL, notAfter);
        ``full`` (after a reload) also checks the chain to the CA in force
        and the trust domain, which costs a signature check.
        """
        if cert.serial_number in self.revoked:
            return "revoked", "client certificate was revoked"
        if now > cert.not_valid_after_utc:
            return "expired", "client certificate expired"
        if full:
            online = self.online_ca is not None and cert.issuer == self.online_ca.subject
            try:
                if online:
                    assert self.online_ca is not None
                    cert.verify_directly_issued_by(self.online_ca)
                    self.online_ca.verify_directly_issued_by(self.transport_trust.ca_cert)
                else:
                    cert.verify_directly_issued_by(self.transport_trust.ca_cert)
                _spiffe_identity(cert, self.settings.trust_domain)
            except (ValueError, TypeError, InvalidSignature, PeerRejectedError):
                return "untrusted", "client certificate is no longer trusted"
        return None


def _spiffe_identity(cert: x509.Certificate, trust_domain: str) -> str:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PeerRejectedError(
            "client certificate has no SPIFFE ID (no URI SAN)", "no-spiffe-id"
        ) from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        # X.509-SVID: exactly one URI SAN, and it is the SPIFFE ID.
        raise PeerRejectedError(
            "client certificate must carry exactly one spiffe:// URI SAN", "no-spiffe-id"
        )
    identity = uris[0]
    domain = identity[len("spiffe://") :].split("/", 1)[0]
    if domain != trust_domain:
        raise PeerRejectedError(
            f"client identity is in trust domain {domain!r}, not {trust_domain!r}",
            "wrong-trust-domain",
        )
    return identity


def _crl_stamp(settings: TlsSettings) -> tuple[int, ...]:
    stamp: tuple[int, ...] = _file_stamp(settings.crl)
    if settings.online_ca_crl is not None:
        stamp += _file_stamp(settings.online_ca_crl)
    return stamp


def _file_stamp(path: Path) -> tuple[int, int, int]:
    try:
        info = path.stat()
    except OSError:
        return (0, 0, 0)
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def _server_context(settings: TlsSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_2 if settings.accepts_tls12 else ssl.TLSVersion.TLSv1_3
    )
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    if settings.accepts_tls12:
        context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_ecdh_curve(KEY_EXCHANGE_GROUP)
    context.num_tickets = settings.session_tickets
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    trusted = [("CA certificate", settings.ca), ("CRL", settings.crl)]
    if settings.online_ca is not None and settings.online_ca_crl is not None:
        # The online CA is an intermediate: OpenSSL still builds every path to the
        # root, and with VERIFY_CRL_CHECK_LEAF checks a leaf against its issuer's CRL.
        trusted += [
            ("online CA certificate", settings.online_ca),
            ("online CA CRL", settings.online_ca_crl),
        ]
    for what, path in trusted:
        try:
            context.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"cannot load {what} {path}: {_reason(exc)}") from None
    try:
        context.load_cert_chain(settings.cert, settings.key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"cannot load server certificate {settings.cert} "
            f"with key {settings.key}: {_reason(exc)}"
        ) from None
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return exc.strerror or str(exc)
