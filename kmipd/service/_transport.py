"""Transport certificates and sealed delivery: register-transport-cert, get-transport-cert,
and sealing a key to the caller's registered certificate (HPKE) instead of sending it clear.
"""

from __future__ import annotations

import fnmatch
import hmac
import logging

from cryptography import x509

from kmipd.crypto import (
    TransportCertError,
    TransportTrust,
    certificate_fingerprint,
    check_transport_certificate,
    dek_binding,
    delivery_info,
    parse_certificate,
    seal_to_certificate,
    transport_kem,
)
from kmipd.crypto._transport_cert import check_still_valid
from kmipd.protocol import (
    DekResult,
    ErrorCode,
    GetTransportCert,
    RegisterTransportCert,
    SealedDekResult,
    TransportCertInfo,
)
from kmipd.service._core import ServiceCore, ServiceError, _Call, handles
from kmipd.store import DekRecord, TransportCertRecord

log = logging.getLogger("kmipd.service")


class TransportOperations(ServiceCore):
    """The transport-certificate directory and the sealing of delivered keys."""

    def _check_sealed_policy(self, call: _Call, namespace: str, seal_to: bytes | None) -> None:
        if (
            seal_to is None
            and self.require_sealed
            and any(fnmatch.fnmatchcase(namespace, pattern) for pattern in self.require_sealed)
        ):
            raise ServiceError(
                ErrorCode.SEALED_DELIVERY_REQUIRED,
                f"keys of namespace {namespace!r} are delivered only sealed to a registered "
                "transport certificate (args.seal-to); nothing was done",
            )

    def _certificate(self, der: bytes) -> x509.Certificate:
        """Parsed once per certificate: a sealed delivery re-checks it, not re-parses it."""
        cert = self._parsed_certs.get(der)
        if cert is None:
            cert = parse_certificate(der)
            if len(self._parsed_certs) >= 4096:
                self._parsed_certs.clear()
            self._parsed_certs[der] = cert
        return cert

    def _usable_certificate(self, record: TransportCertRecord) -> x509.Certificate:
        """A registered certificate, checked again: validity and the CRL change after
        registration."""
        cert = self._certificate(record.certificate)
        try:
            check_still_valid(cert, self._trust())
        except TransportCertError as exc:
            raise ServiceError(
                ErrorCode.TRANSPORT_CERTIFICATE_REJECTED,
                f"{record.identity}'s registered transport certificate can no longer be used: "
                f"{exc}",
            ) from None
        return cert

    def _seal_target(self, call: _Call, fingerprint: bytes) -> x509.Certificate:
        """The caller's registered certificate named by ``fingerprint``, still acceptable."""
        identity = call.caller.identity
        record = self.store.get_transport_cert(identity)
        if record is None:
            raise ServiceError(
                ErrorCode.NO_TRANSPORT_CERTIFICATE,
                f"{identity} has no registered transport certificate; register one first "
                "(kmipd transport register)",
            )
        if not hmac.compare_digest(record.fingerprint, fingerprint):
            raise ServiceError(
                ErrorCode.NO_TRANSPORT_CERTIFICATE,
                f"args.seal-to is not the fingerprint of {identity}'s registered transport "
                f"certificate (that is {record.fingerprint.hex()[:16]}...; replaced meanwhile?)",
            )
        if call.caller.request_id is None:
            raise ServiceError(ErrorCode.BAD_REQUEST, "sealed delivery needs a request id")
        cert = self._usable_certificate(record)
        call.detail = (call.detail + ", " if call.detail else "") + "sealed"
        return cert

    def _seal(self, call: _Call, fingerprint: bytes, key: bytes, binding: list[object]) -> bytes:
        cert = self._seal_target(call, fingerprint)
        assert call.caller.request_id is not None
        info = delivery_info(
            call.operation, call.caller.request_id, call.caller.identity, fingerprint, binding
        )
        return seal_to_certificate(cert, key, info)

    def _dek_delivery(
        self, call: _Call, seal_to: bytes | None, record: DekRecord, key: bytes
    ) -> DekResult | SealedDekResult:
        if seal_to is None:
            return _dek_result(record, key)
        binding = dek_binding(record.dek_id, record.namespace, record.kek_version)
        return SealedDekResult(
            dek_id=record.dek_id,
            namespace=record.namespace,
            kek_version=record.kek_version,
            sealed_key=self._seal(call, seal_to, key, binding),
        )

    def _trust(self) -> TransportTrust:
        if self.transport_trust is None:
            raise ServiceError(
                ErrorCode.TRANSPORT_CERTIFICATE_REJECTED,
                "this daemon has no CA loaded for transport certificates",
            )
        return self.transport_trust

    @handles(RegisterTransportCert, changes_state=True)
    async def _register_transport_cert(
        self, call: _Call, request: RegisterTransportCert
    ) -> TransportCertInfo:
        identity = call.caller.identity
        try:
            cert = parse_certificate(request.certificate)
            kem = check_transport_certificate(cert, self._trust(), identity=identity)
        except TransportCertError as exc:
            raise ServiceError(
                ErrorCode.TRANSPORT_CERTIFICATE_REJECTED,
                f"transport certificate refused: {exc}; the registered one (if any) stays",
            ) from None
        fingerprint = certificate_fingerprint(cert)
        call.detail = f"transport certificate {fingerprint.hex()[:16]}... ({kem.value})"
        record = TransportCertRecord(identity, request.certificate, fingerprint, self._now())
        await self.store.put_transport_cert(record)
        log.info("registered the transport certificate of %s (%s)", identity, kem.value)
        return _transport_info(record, cert)

    @handles(GetTransportCert)
    async def _get_transport_cert(
        self, call: _Call, request: GetTransportCert
    ) -> TransportCertInfo:
        call.detail = f"of {request.identity}"
        # Not open to every authenticated client: the directory would tell anyone
        # which identities exist.
        self._require_some_grant(call, "get-transport-cert")
        record = self.store.get_transport_cert(request.identity)
        if record is None:
            raise ServiceError(
                ErrorCode.NO_TRANSPORT_CERTIFICATE,
                f"{request.identity} has no registered transport certificate",
            )
        return _transport_info(record, self._usable_certificate(record))


def _dek_result(record: DekRecord, key: bytes) -> DekResult:
    return DekResult(
        dek_id=record.dek_id, namespace=record.namespace, kek_version=record.kek_version, key=key
    )


def _transport_info(record: TransportCertRecord, cert: x509.Certificate) -> TransportCertInfo:
    return TransportCertInfo(
        identity=record.identity,
        certificate=record.certificate,
        fingerprint=record.fingerprint,
        suite=transport_kem(cert).value,
        registered=record.registered_at,
        not_after=int(cert.not_valid_after_utc.timestamp()),
    )
