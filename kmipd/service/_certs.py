"""Certificates from the online issuing CA, whose key signs inside the HSM backend.

The online CA is an intermediate signed by the offline root (``kmipd pki
init --online-ca`` then ``kmipd ca init``); its private key is an HSM signing
key (``HsmBackend.sign``), so the daemon signs without ever holding it. What
a caller may have signed is decided by the [[certificate_grant]] tables
(``CertificateGrant``) matching its SPIFFE ID:

- ``issue-certificate`` profile ``client``: clientAuth, for the caller's own
  SPIFFE ID and nothing else (a CSR naming another ID is refused);
- profile ``server``: serverAuth, for the CSR's DNS names, each matching one
  of a grant's ``server_dns`` globs;
- ``renew-certificate``: the caller's current certificate (the verified TLS
  peer certificate, from this online CA) is the proof; the new one has the
  same names, a new key (the same key is refused), and the grant must still
  allow it;
- every grant bounds the validity (``max_validity_days``) and the key types
  (P-256, P-384, RSA-3072 and larger, Ed25519).

Every certificate is recorded (``issued_certificates``) before it is handed
out, and audited with its serial, subject, profile, key type and expiry,
never key material. ``revoke-certificate`` puts one on the online CA's CRL,
re-signed at once and handed to ``publish_crl`` (the daemon writes the file
its TLS layer checks every handshake against, and cuts connections that
present it); the CRL is re-signed before half its validity has passed.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from kmipd.crypto._issuing import (
    BACKDATE,
    CsrError,
    PublicKey,
    assemble_certificate,
    assemble_crl,
    describe_key,
    generate_key,
    key_type_of,
    leaf_builder,
    load_csr,
    requested_names,
    spki_der,
    unsigned_certificate,
    unsigned_crl,
)
from kmipd.hsm import HsmBackend
from kmipd.protocol import (
    CaCertificates,
    CertificateResult,
    ErrorCode,
    GetCaCertificates,
    IssueCertificate,
    IssuedCertificateInfo,
    ListCertificates,
    ListCertificatesResult,
    RenewCertificate,
    RevokeCertificate,
)
from kmipd.service._core import Caller, ServiceError, _Call, handles
from kmipd.service._maintenance import MaintenanceOperations
from kmipd.service._policy import CertificateGrant
from kmipd.store import IssuedCertificateRecord

log = logging.getLogger("kmipd.service")

DAY = 86400
#: How long each CRL of the online CA is valid; it is re-signed after half of it.
CRL_VALIDITY = 7 * DAY
LIST_DEFAULT_LIMIT = 100
#: The daemon's own server certificate lives at most this long (Mozilla "modern": 90 days).
SERVER_VALIDITY = 90 * DAY
#: Who the audit trail says asked for the daemon's own server certificate.
SERVER_RENEWAL_IDENTITY = "local:kmipd"

#: Wire revocation reasons ("key-compromise") to RFC 5280's ("keyCompromise").
_REASONS = {flag.value.lower(): flag for flag in x509.ReasonFlags}

PublishCrl = Callable[[bytes], Awaitable[None]]


@attrs.frozen
class OnlineCa:
    """The online issuing CA: its certificate, the root above it, its HSM key handle."""

    certificate: x509.Certificate
    root: x509.Certificate
    #: The HSM backend's handle of the CA's signing key (an EC key: p256 or p384).
    key_handle: str

    @property
    def curve(self) -> str:
        key = self.certificate.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return "p384" if isinstance(key.curve, ec.SECP384R1) else "p256"

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        key = self.certificate.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return key

    @property
    def chain(self) -> tuple[bytes, ...]:
        return tuple(
            c.public_bytes(serialization.Encoding.DER) for c in (self.certificate, self.root)
        )

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether this CA signed ``cert`` (its signature, not just its issuer name)."""
        try:
            cert.verify_directly_issued_by(self.certificate)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True


class OnlineCaError(Exception):
    """The online CA's certificate, root and HSM key do not belong together."""


async def open_online_ca(
    hsm: HsmBackend, certificate: x509.Certificate, root: x509.Certificate, key_handle: str
) -> OnlineCa:
    """The online CA, once its certificate is a CA under ``root`` and the HSM holds its key."""
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = x509.BasicConstraints(ca=False, path_length=None)
    if not constraints.ca:
        raise OnlineCaError("the online CA certificate is not a CA certificate")
    if not isinstance(certificate.public_key(), ec.EllipticCurvePublicKey):
        raise OnlineCaError("the online CA's key must be EC (P-256 or P-384)")
    try:
        certificate.verify_directly_issued_by(root)
    except (InvalidSignature, ValueError, TypeError):
        raise OnlineCaError("the online CA certificate is not signed by the CA in tls.ca") from None
    held = await hsm.signing_public_key(key_handle)
    if held != spki_der(certificate.public_key()):  # type: ignore[arg-type]
        raise OnlineCaError(f"the HSM key {key_handle} is not the key of the online CA certificate")
    return OnlineCa(certificate, root, key_handle)


@attrs.frozen
class _Decision:
    not_before: int
    not_after: int
    key_type: str


class CertificateOperations(MaintenanceOperations):
    """The online CA's operations (see the module docstring)."""

    def __init__(
        self,
        *,
        online_ca: OnlineCa | None = None,
        publish_crl: PublishCrl | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.online_ca = online_ca
        #: Called with each newly signed CRL (PEM); the daemon writes and loads it.
        self.publish_crl = publish_crl
        self._crl: x509.CertificateRevocationList | None = None

    # -- issue and renew ---------------------------------------------------------------

    @handles(IssueCertificate, changes_state=True)
    async def _issue_certificate(self, call: _Call, request: IssueCertificate) -> CertificateResult:
        ca = self._require_online_ca()
        grants = self._certificate_grants(call)
        csr = _csr(request.csr)
        uris, dns = _names(csr)
        identity = call.caller.identity
        sans: list[x509.GeneralName]
        names: tuple[str, ...]
        if request.profile == "client":
            if dns or any(uri != identity for uri in uris):
                other = next((u for u in uris if u != identity), None)
                raise ServiceError(
                    ErrorCode.CERTIFICATE_IDENTITY_MISMATCH,
                    f"a client certificate names only the caller's own SPIFFE ID {identity}; "
                    f"the CSR asks for {other if other is not None else 'DNS names'}",
                )
            grants = [g for g in grants if g.client]
            if not grants:
                raise ServiceError(
                    ErrorCode.NOT_AUTHORIZED,
                    f"{identity}'s certificate grant does not allow client certificates",
                )
            subject, sans = identity, [x509.UniformResourceIdentifier(identity)]
            usage, names = ExtendedKeyUsageOID.CLIENT_AUTH, (identity,)
        else:
            if uris or not dns:
                raise ServiceError(
                    ErrorCode.CERTIFICATE_NAME_NOT_ALLOWED,
                    "a server certificate names DNS names only: the CSR's subjectAltName "
                    "must list at least one DNS name and no URI",
                )
            allowed = [g for g in grants if g.server_dns and all(g.allows_dns(n) for n in dns)]
            if not allowed:
                outside = next(n for n in dns if not any(g.allows_dns(n) for g in grants))
                patterns = sorted({p for g in grants for p in g.server_dns})
                raise ServiceError(
                    ErrorCode.CERTIFICATE_NAME_NOT_ALLOWED,
                    f"{identity} may not have a server certificate for {outside!r}"
                    + (
                        f" (its grants allow {', '.join(patterns)})"
                        if patterns
                        else " (its grants allow no server certificates)"
                    ),
                )
            grants = allowed
            subject, sans = dns[0], [x509.DNSName(n) for n in dns]
            usage, names = ExtendedKeyUsageOID.SERVER_AUTH, tuple(dns)
        public_key = _public_key(csr)
        decision = self._decide(grants, public_key, request.validity, None)
        return await self._sign_and_record(
            call,
            ca,
            public_key,
            subject=subject,
            sans=sans,
            usage=usage,
            profile=request.profile,
            names=names,
            decision=decision,
            renewed_from=None,
        )

    @handles(RenewCertificate, changes_state=True)
    async def _renew_certificate(self, call: _Call, request: RenewCertificate) -> CertificateResult:
        ca = self._require_online_ca()
        current = call.caller.certificate
        if current is None or not ca.issued(current):
            raise ServiceError(
                ErrorCode.CERTIFICATE_NOT_RENEWABLE,
                "renew-certificate renews a certificate the online CA issued; the caller's "
                "certificate comes from elsewhere (ask for a new one with issue-certificate)",
            )
        grants = [g for g in self._certificate_grants(call) if g.client]
        if not grants:
            raise ServiceError(
                ErrorCode.NOT_AUTHORIZED,
                f"{call.caller.identity}'s certificate grant no longer allows client certificates",
            )
        csr = _csr(request.csr)
        uris, dns = _names(csr)
        if dns or any(uri != call.caller.identity for uri in uris):
            raise ServiceError(
                ErrorCode.CERTIFICATE_IDENTITY_MISMATCH,
                f"a renewal keeps the SPIFFE ID {call.caller.identity}; the CSR asks for others",
            )
        public_key = _public_key(csr)
        if spki_der(public_key) == spki_der(current.public_key()):  # type: ignore[arg-type]
            raise ServiceError(
                ErrorCode.CERTIFICATE_KEY_REUSED,
                "the CSR carries the key of the certificate being renewed; make a new key",
            )
        # The same lifetime as the current one (whose start was backdated).
        span = current.not_valid_after_utc - current.not_valid_before_utc
        lifetime = max(60, int(span.total_seconds()) - BACKDATE)
        decision = self._decide(grants, public_key, request.validity, lifetime)
        identity = call.caller.identity
        return await self._sign_and_record(
            call,
            ca,
            public_key,
            subject=identity,
            sans=[x509.UniformResourceIdentifier(identity)],
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            profile="client",
            names=(identity,),
            decision=decision,
            renewed_from=_serial_text(current.serial_number),
        )

    def _decide(
        self,
        grants: list[CertificateGrant],
        public_key: PublicKey,
        validity: int | None,
        default_validity: int | None,
    ) -> _Decision:
        key_type = key_type_of(public_key)
        if key_type is None:
            raise _key_not_accepted(public_key)
        grants = [g for g in grants if key_type in g.key_types]
        if not grants:
            raise ServiceError(
                ErrorCode.CERTIFICATE_KEY_NOT_ALLOWED,
                f"the grant does not allow {key_type} keys",
            )
        longest = int(max(g.max_validity_days for g in grants) * DAY)
        if validity is not None and validity > longest:
            raise ServiceError(
                ErrorCode.CERTIFICATE_VALIDITY_TOO_LONG,
                f"a validity of {validity} s is longer than the grant allows ({longest} s, "
                f"{longest / DAY:g} days)",
            )
        seconds = validity or min(default_validity or longest, longest)
        now = self._now()
        ca = self.online_ca
        assert ca is not None
        # Never beyond the online CA itself: a chain is only as valid as its shortest link.
        ca_end = int(ca.certificate.not_valid_after_utc.timestamp())
        return _Decision(now - BACKDATE, min(now + seconds, ca_end), key_type)

    async def _sign_and_record(
        self,
        call: _Call,
        ca: OnlineCa,
        public_key: PublicKey,
        *,
        subject: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        profile: str,
        names: tuple[str, ...],
        decision: _Decision,
        renewed_from: str | None,
        subject_name: x509.Name | None = None,
    ) -> CertificateResult:
        serial = x509.random_serial_number()
        builder = leaf_builder(
            ca.certificate,
            public_key,
            common_name=subject,
            sans=sans,
            extended_key_usage=usage,
            not_before=_time(decision.not_before),
            not_after=_time(decision.not_after),
            serial=serial,
            subject=subject_name,
        )
        cert = await self._ca_sign_certificate(ca, builder)
        der = cert.public_bytes(serialization.Encoding.DER)
        record = IssuedCertificateRecord(
            serial=_serial_text(serial),
            requested_by=call.caller.identity,
            subject=subject,
            profile=profile,
            names=names,
            key_type=decision.key_type,
            spki_sha256=hashlib.sha256(spki_der(public_key)).digest(),
            not_before=decision.not_before,
            not_after=decision.not_after,
            issued_at=self._now(),
            renewed_from=renewed_from,
            certificate=der,
        )
        call.detail = (
            f"{'renewed' if renewed_from else 'issued'} {profile} certificate {record.serial}"
            f" for {subject}, {decision.key_type}, until {decision.not_after}"
            + (f", renewing {renewed_from}" if renewed_from else "")
        )[:512]
        await self.store.put_issued_certificate(record)
        log.info("online CA: %s (for %s)", call.detail, call.caller.identity)
        return CertificateResult(
            serial=record.serial,
            certificate=der,
            chain=ca.chain,
            not_before=decision.not_before,
            not_after=decision.not_after,
        )

    async def _ca_sign_certificate(
        self, ca: OnlineCa, builder: x509.CertificateBuilder
    ) -> x509.Certificate:
        unsigned = unsigned_certificate(builder, ca.curve)
        signature = await self.hsm.sign(ca.key_handle, unsigned.tbs)
        return assemble_certificate(unsigned, signature, ca.public_key)

    # -- the daemon's own server certificate -------------------------------------------

    async def renew_server_certificate(
        self, current: x509.Certificate, *, max_validity: int = SERVER_VALIDITY
    ) -> tuple[bytes, bytes]:
        """A new key and certificate for the names ``current`` has, from the online CA.

        Returns (private key PEM, certificate + online CA PEM) for the daemon to
        write where tls.key and tls.cert point; recorded and audited like an
        issuance (requested by ``local:kmipd``), never showing the key.
        """
        ca = self._require_online_ca()
        try:
            names = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise OnlineCaError(
                "the server certificate names no host (no subjectAltName)"
            ) from None
        sans = list(names)
        key = generate_key(key_type_of(current.public_key()) or "p256")
        public_key = key.public_key()
        span = current.not_valid_after_utc - current.not_valid_before_utc
        # At least an hour: a short-lived certificate renewed for its own short span
        # would be due again at once (its start is backdated).
        seconds = min(max_validity, max(3600, int(span.total_seconds()) - BACKDATE))
        now = self._now()
        decision = _Decision(
            now - BACKDATE,
            min(now + seconds, int(ca.certificate.not_valid_after_utc.timestamp())),
            key_type_of(public_key) or "p256",
        )
        call = _Call(Caller(SERVER_RENEWAL_IDENTITY), "renew-server-certificate")
        texts = tuple(str(n.value) for n in sans)
        result = await self._sign_and_record(
            call,
            ca,
            public_key,
            subject=texts[0],
            sans=sans,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            profile="server",
            names=texts,
            decision=decision,
            renewed_from=_serial_text(current.serial_number),
        )
        self._audit(call, "ok")
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        chain = (
            x509.load_der_x509_certificate(result.certificate),
            ca.certificate,
        )
        return key_pem, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)

    # -- revocation and the CRL --------------------------------------------------------

    @handles(RevokeCertificate, changes_state=True)
    async def _revoke_certificate(
        self, call: _Call, request: RevokeCertificate
    ) -> IssuedCertificateInfo:
        self._require_some_grant(call, "revoke-certificate")
        self._require_online_ca()
        record = await self.store.get_issued_certificate(request.serial)
        if record is None:
            raise ServiceError(
                ErrorCode.NOT_FOUND, f"the online CA issued no certificate {request.serial}"
            )
        reason = request.reason or "unspecified"
        call.detail = f"certificate {record.serial} of {record.subject}, reason {reason}"
        now = self._now()
        if await self.store.revoke_issued_certificate(record.serial, now, reason):
            record = attrs.evolve(record, revoked_at=now, revocation_reason=reason)
            log.warning("online CA: revoked %s for %s", call.detail, call.caller.identity)
        await self.refresh_crl()
        return _info(record)

    async def refresh_crl(self) -> bytes:
        """Sign a new CRL of the online CA (every revoked, unexpired certificate) and
        publish it; returns it as PEM."""
        ca = self._require_online_ca()
        now = self._now()
        revoked = await self.store.revoked_certificates(now)
        crl = await sign_crl(self.hsm, ca, revoked, now)
        self._crl = crl
        pem = crl.public_bytes(serialization.Encoding.PEM)
        if self.publish_crl is not None:
            await self.publish_crl(pem)
        return pem

    async def refresh_crl_if_due(self) -> bool:
        """Re-sign the CRL once half its validity has passed (the maintenance pass)."""
        if self.online_ca is None:
            return False
        crl = self._crl
        if crl is not None and crl.next_update_utc is not None:
            half = crl.last_update_utc + (crl.next_update_utc - crl.last_update_utc) / 2
            if _time(self._now()) < half:
                return False
        await self.refresh_crl()
        return True

    async def maintain(self) -> None:
        await super().maintain()
        await self.refresh_crl_if_due()

    # -- reads -------------------------------------------------------------------------

    @handles(ListCertificates)
    async def _list_certificates(
        self, call: _Call, request: ListCertificates
    ) -> ListCertificatesResult:
        self._require_some_grant(call, "list-certificates")
        limit = request.limit or LIST_DEFAULT_LIMIT
        records = await self.store.list_issued_certificates(
            subject=request.subject, after=request.after or "", limit=limit
        )
        return ListCertificatesResult(
            certificates=tuple(_info(r) for r in records),
            next=records[-1].serial if len(records) == limit else None,
        )

    @handles(GetCaCertificates)
    async def _get_ca_certificates(self, call: _Call, request: GetCaCertificates) -> CaCertificates:
        ca = self._require_online_ca()
        if self._crl is None:
            await self.refresh_crl()
        assert self._crl is not None
        return CaCertificates(
            chain=ca.chain, crl=self._crl.public_bytes(serialization.Encoding.DER)
        )

    # -- helpers -----------------------------------------------------------------------

    def _require_online_ca(self) -> OnlineCa:
        if self.online_ca is None:
            raise ServiceError(
                ErrorCode.NO_ONLINE_CA,
                "this daemon has no online CA (configure [online_ca]; see docs/operators.md)",
            )
        return self.online_ca

    def _certificate_grants(self, call: _Call) -> list[CertificateGrant]:
        grants = self.policy.certificate_grants_for(call.caller.identity)
        if not grants:
            raise ServiceError(
                ErrorCode.NOT_AUTHORIZED,
                f"{call.caller.identity} has no certificate grant ([[certificate_grant]])",
            )
        return grants


async def sign_crl(
    hsm: HsmBackend, ca: OnlineCa, revoked: list[tuple[str, int, str]], now: int
) -> x509.CertificateRevocationList:
    """The online CA's CRL listing ``revoked`` (serial hex, time, reason), signed in the HSM."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(_time(now - BACKDATE))
        .next_update(_time(now + CRL_VALIDITY))
        # Time-based: every CRL is numbered higher than the one before, across
        # restarts and daemons sharing a store (RFC 5280 5.2.3).
        .add_extension(x509.CRLNumber(time.time_ns() // 1000), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key), critical=False
        )
    )
    for serial, at, reason in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
        entry = entry.revocation_date(_time(at))
        if reason != "unspecified":
            flag = _REASONS[reason.replace("-", "")]
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    unsigned = unsigned_crl(builder, ca.curve)
    signature = await hsm.sign(ca.key_handle, unsigned.tbs)
    return assemble_crl(unsigned, signature, ca.public_key)


def _csr(der: bytes) -> x509.CertificateSigningRequest:
    try:
        return load_csr(der)
    except CsrError as exc:
        raise ServiceError(ErrorCode.CSR_INVALID, str(exc)) from None


def _names(csr: x509.CertificateSigningRequest) -> tuple[list[str], list[str]]:
    try:
        return requested_names(csr)
    except CsrError as exc:
        raise ServiceError(ErrorCode.CSR_INVALID, str(exc)) from None


def _public_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    key = csr.public_key()
    if key_type_of(key) is None:
        raise _key_not_accepted(key)
    assert isinstance(key, PublicKey)
    return key


def _key_not_accepted(key: object) -> ServiceError:
    return ServiceError(
        ErrorCode.CERTIFICATE_KEY_NOT_ALLOWED,
        f"the CSR's key ({describe_key(key)}) is not accepted: use EC P-256, P-384, "
        "RSA of 3072 bits or more, or Ed25519",
    )


def _serial_text(serial: int) -> str:
    return format(serial, "x")


def _time(seconds: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def _info(record: IssuedCertificateRecord) -> IssuedCertificateInfo:
    return IssuedCertificateInfo(
        serial=record.serial,
        requested_by=record.requested_by,
        subject=record.subject,
        profile=record.profile,
        names=record.names,
        key_type=record.key_type,
        not_before=record.not_before,
        not_after=record.not_after,
        issued=record.issued_at,
        renewed_from=record.renewed_from,
        revoked=record.revoked_at,
        revocation_reason=record.revocation_reason,
    )
