"""Client exceptions: one per wire error code, plus the client's own failures.

Every message names the server address and, where there was one, the
request id, so a storage engineer reading a log line knows where to look.
"""

from __future__ import annotations

import ssl

from kmipd.protocol import ErrorCode, ErrorInfo


class KmipdError(Exception):
    """Base of every error the client library raises."""

    #: The wire code this error stands for; None for client-side failures.
    code: ErrorCode | None = None

    def __init__(self, message: str, *, server: str = "", request_id: int | None = None) -> None:
        where = f"server {server}" if server else ""
        if request_id is not None:
            where += f", request {request_id}" if where else f"request {request_id}"
        super().__init__(f"{message} ({where})" if where else message)
        self.server = server
        self.request_id = request_id
        self.detail = message


class RemoteError(KmipdError):
    """The server answered with an error response."""


class BadRequestError(RemoteError):
    code = ErrorCode.BAD_REQUEST


class UnsupportedVersionError(RemoteError):
    code = ErrorCode.UNSUPPORTED_VERSION


class HelloRequiredError(RemoteError):
    code = ErrorCode.HELLO_REQUIRED


class UnknownOperationError(RemoteError):
    code = ErrorCode.UNKNOWN_OPERATION


class FrameTooLargeError(RemoteError):
    code = ErrorCode.FRAME_TOO_LARGE


class DuplicateRequestIdError(RemoteError):
    code = ErrorCode.DUPLICATE_REQUEST_ID


class ServerTimeoutError(RemoteError):
    """The server closed the connection because it was idle or a frame stalled."""

    code = ErrorCode.TIMEOUT


class CertificateRejectedError(RemoteError):
    """The server refused this client's certificate (by TLS alert or after the handshake)."""

    code = ErrorCode.CERTIFICATE_REJECTED


class CertificateRevokedError(CertificateRejectedError):
    """The server closed an open connection: this client's certificate was revoked or expired.

    A CertificateRejectedError, so the same handling applies: never retried on
    another daemon (they share the CA and the CRL), and the DEK cache is emptied.
    """

    code = ErrorCode.CERTIFICATE_REVOKED


class NotAuthorizedError(RemoteError):
    code = ErrorCode.NOT_AUTHORIZED


class NotFoundError(RemoteError):
    code = ErrorCode.NOT_FOUND


class IntegrityFailureError(RemoteError):
    """A wrapped key failed authentication: wrong context, or tampered with."""

    code = ErrorCode.INTEGRITY_FAILURE


class AlreadyExistsError(RemoteError):
    code = ErrorCode.ALREADY_EXISTS


class WrongStateError(RemoteError):
    code = ErrorCode.WRONG_STATE


class UsageNotPermittedError(RemoteError):
    code = ErrorCode.USAGE_NOT_PERMITTED


class KeyNotActiveError(RemoteError):
    code = ErrorCode.KEY_NOT_ACTIVE


class KeyDeactivatedError(RemoteError):
    code = ErrorCode.KEY_DEACTIVATED


class ProtectStopPassedError(RemoteError):
    code = ErrorCode.PROTECT_STOP_PASSED


class KeyCompromisedError(RemoteError):
    code = ErrorCode.KEY_COMPROMISED


class KeyDestroyedError(RemoteError):
    code = ErrorCode.KEY_DESTROYED


class DependentsExistError(RemoteError):
    code = ErrorCode.DEPENDENTS_EXIST


class DestroyPendingError(RemoteError):
    code = ErrorCode.DESTROY_PENDING


class TransportCertificateRejectedError(RemoteError):
    """The daemon refused a transport certificate (registration), or no longer accepts it."""

    code = ErrorCode.TRANSPORT_CERTIFICATE_REJECTED


class NoTransportCertificateError(RemoteError):
    """No transport certificate is registered for that identity (or seal-to names another)."""

    code = ErrorCode.NO_TRANSPORT_CERTIFICATE


class SealedDeliveryRequiredError(RemoteError):
    """The namespace's keys leave the daemon only sealed: give the client a transport key."""

    code = ErrorCode.SEALED_DELIVERY_REQUIRED


class BusyError(RemoteError):
    code = ErrorCode.BUSY


class ShuttingDownError(RemoteError):
    code = ErrorCode.SHUTTING_DOWN


class HsmUnavailableError(RemoteError):
    code = ErrorCode.HSM_UNAVAILABLE


class InternalError(RemoteError):
    code = ErrorCode.INTERNAL


class AuditUnavailableError(RemoteError):
    code = ErrorCode.AUDIT_UNAVAILABLE


class StoreUnavailableError(RemoteError):
    """The daemon's store cannot write now (disk full, read-only, damaged): not applied."""

    code = ErrorCode.STORE_UNAVAILABLE


class StoreOutcomeUnknownError(RemoteError):
    """The daemon lost its database while committing: the change may or may not be applied.

    The client library retries such a request elsewhere only where that is safe
    (as after a lost connection): idempotent requests, and a create on a daemon
    of the same store, where its idempotency key forbids a second DEK.
    """

    code = ErrorCode.STORE_OUTCOME_UNKNOWN


class SecretDisabledError(RemoteError):
    code = ErrorCode.SECRET_DISABLED


class SecretExpiredError(RemoteError):
    code = ErrorCode.SECRET_EXPIRED


class SecretNotYetValidError(RemoteError):
    code = ErrorCode.SECRET_NOT_YET_VALID


class SecretTooLargeError(RemoteError):
    code = ErrorCode.SECRET_TOO_LARGE


class UnknownSecretVersionError(RemoteError):
    code = ErrorCode.UNKNOWN_SECRET_VERSION


class SecretDeletedError(RemoteError):
    code = ErrorCode.SECRET_DELETED


class CertificateIdentityMismatchError(RemoteError):
    code = ErrorCode.CERTIFICATE_IDENTITY_MISMATCH


class CertificateNameNotAllowedError(RemoteError):
    code = ErrorCode.CERTIFICATE_NAME_NOT_ALLOWED


class CertificateValidityTooLongError(RemoteError):
    code = ErrorCode.CERTIFICATE_VALIDITY_TOO_LONG


class CertificateKeyNotAllowedError(RemoteError):
    code = ErrorCode.CERTIFICATE_KEY_NOT_ALLOWED


class CertificateKeyReusedError(RemoteError):
    code = ErrorCode.CERTIFICATE_KEY_REUSED


class CsrInvalidError(RemoteError):
    code = ErrorCode.CSR_INVALID


class NoOnlineCaError(RemoteError):
    code = ErrorCode.NO_ONLINE_CA


class CertificateNotRenewableError(RemoteError):
    code = ErrorCode.CERTIFICATE_NOT_RENEWABLE


class SigningKeyOnlyError(RemoteError):
    """A signing key was named where a DEK goes: it only signs and verifies."""

    code = ErrorCode.SIGNING_KEY_ONLY


class NotASigningKeyError(RemoteError):
    """A KEK or DEK was asked to sign: only signing keys sign."""

    code = ErrorCode.NOT_A_SIGNING_KEY


class DigestLengthMismatchError(RemoteError):
    code = ErrorCode.DIGEST_LENGTH_MISMATCH


class UnsupportedAlgorithmError(RemoteError):
    code = ErrorCode.UNSUPPORTED_ALGORITHM


class SigningPeriodEndedError(RemoteError):
    """The key's signing period ended: it still verifies; rotate it to sign."""

    code = ErrorCode.SIGNING_PERIOD_ENDED


class CertificatePolicyInvalidError(RemoteError):
    code = ErrorCode.CERTIFICATE_POLICY_INVALID


class ManagedCertificateDeletedError(RemoteError):
    code = ErrorCode.MANAGED_CERTIFICATE_DELETED


class UnknownCertificateVersionError(RemoteError):
    code = ErrorCode.UNKNOWN_CERTIFICATE_VERSION


class CertificateImportInvalidError(RemoteError):
    code = ErrorCode.CERTIFICATE_IMPORT_INVALID


class KeyNotExportableError(RemoteError):
    code = ErrorCode.KEY_NOT_EXPORTABLE


class SealedKeyError(KmipdError):
    """A sealed key from the daemon did not open with this client's transport key.

    Raised instead of handing out a key: the sealed key was altered, belongs to
    another request, identity or certificate, or the transport key is wrong.
    """


class TransportCertificateError(KmipdError):
    """A transport certificate fetched from the daemon does not verify against our CA."""


class UnavailableError(KmipdError):
    """The server could not be reached, or the connection was lost."""


class ServerCertificateError(KmipdError):
    """The server's certificate did not verify against our CA, or names another host."""


class DeadlineExceededError(KmipdError):
    """The call did not complete within its deadline; its outcome is unknown."""


class OutcomeUnknownError(UnavailableError):
    """A create was sent but its answer was lost, and no server could settle it.

    ``idempotency_key`` identifies the attempt: calling ``create_dek`` again
    with the same key returns the DEK if the first attempt was applied, and
    creates it once if it was not.
    """

    def __init__(
        self,
        message: str,
        *,
        idempotency_key: bytes,
        server: str = "",
        request_id: int | None = None,
    ) -> None:
        super().__init__(message, server=server, request_id=request_id)
        self.idempotency_key = idempotency_key


_REMOTE_ERRORS: list[type[RemoteError]] = [*RemoteError.__subclasses__(), CertificateRevokedError]
ERROR_CLASSES: dict[ErrorCode, type[RemoteError]] = {
    cls.code: cls for cls in _REMOTE_ERRORS if cls.code is not None
}


def remote_error(error: ErrorInfo, *, server: str, request_id: int | None) -> RemoteError:
    cls = ERROR_CLASSES.get(error.code, InternalError)
    return cls(f"{error.code.wire_name}: {error.message}", server=server, request_id=request_id)


#: What the server's TLS alert means for this client, by OpenSSL reason code.
_ALERT_MEANINGS: dict[str, tuple[type[KmipdError], str]] = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        CertificateRejectedError,
        "the server requires a client certificate",
    ),
    "TLSV1_ALERT_UNKNOWN_CA": (
        CertificateRejectedError,
        "the server does not trust the CA that issued this client certificate (unknown_ca)",
    ),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": (
        CertificateRejectedError,
        "the server says this client certificate has expired",
    ),
    "SSLV3_ALERT_CERTIFICATE_REVOKED": (
        CertificateRejectedError,
        "the server says this client certificate is revoked",
    ),
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": (
        CertificateRejectedError,
        "the server refused this client certificate: it is not valid for client "
        "authentication (extendedKeyUsage clientAuth)",
    ),
    "SSLV3_ALERT_BAD_CERTIFICATE": (
        CertificateRejectedError,
        "the server refused this client certificate (bad_certificate)",
    ),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": (
        CertificateRejectedError,
        "the server refused this client certificate (certificate_unknown)",
    ),
    "TLSV1_ALERT_PROTOCOL_VERSION": (
        UnavailableError,
        "the server refused the TLS version (kmipd requires TLS 1.3 unless 1.2 is enabled)",
    ),
}


def tls_failure(exc: ssl.SSLError, *, server: str) -> KmipdError:
    """Turn an OpenSSL failure into the error a storage engineer can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ServerCertificateError(
            f"the server's certificate did not verify: {exc.verify_message}", server=server
        )
    reason = exc.reason or ""
    cls, meaning = _ALERT_MEANINGS.get(reason, (UnavailableError, ""))
    return cls(meaning or f"TLS failure: {reason.lower() or exc}", server=server)
