"""The kmipd client library: ``Client`` (blocking) and ``AsyncClient`` (trio).

Both verify the server's certificate and name against the kmipd CA, present
this client's certificate, keep long-lived connections to one or more
daemons and fail over between them, and raise exceptions named after the
wire error codes. Keys come back in protected memory (``Dek``, ``DataKey``:
locked, never dumped, zeroed when closed), optionally through a ``DekCache``;
so do secret values (``Secret``, in a ``ProtectedValue``), never cached.
With a ``TransportKey`` they ask for every key sealed to it (HPKE) and open
it themselves, and they seal and open files for one another (``seal``/``open``).

Every operation is written once, in the sans-IO core (``_core``); ``_sync``
and ``_async`` are the I/O shells that run it.
"""

from kmipd.client._async import AsyncClient
from kmipd.client._cache import CacheStats, DekCache
from kmipd.client._certs import IssuedCertificate, make_csr
from kmipd.client._common import ConnectionInfo
from kmipd.client._envelope import EnvelopeError
from kmipd.client._errors import (
    ERROR_CLASSES,
    AlreadyExistsError,
    AuditUnavailableError,
    BadRequestError,
    BusyError,
    CertificateIdentityMismatchError,
    CertificateKeyNotAllowedError,
    CertificateKeyReusedError,
    CertificateNameNotAllowedError,
    CertificateNotRenewableError,
    CertificateRejectedError,
    CertificateRevokedError,
    CertificateValidityTooLongError,
    CsrInvalidError,
    DeadlineExceededError,
    DependentsExistError,
    DestroyPendingError,
    DuplicateRequestIdError,
    FrameTooLargeError,
    HelloRequiredError,
    HsmUnavailableError,
    IntegrityFailureError,
    InternalError,
    KeyCompromisedError,
    KeyDeactivatedError,
    KeyDestroyedError,
    KeyNotActiveError,
    KmipdError,
    NoOnlineCaError,
    NotAuthorizedError,
    NotFoundError,
    NoTransportCertificateError,
    OutcomeUnknownError,
    ProtectStopPassedError,
    RemoteError,
    SealedDeliveryRequiredError,
    SealedKeyError,
    SecretDeletedError,
    SecretDisabledError,
    SecretExpiredError,
    SecretNotYetValidError,
    SecretTooLargeError,
    ServerCertificateError,
    ServerTimeoutError,
    ShuttingDownError,
    StoreOutcomeUnknownError,
    StoreUnavailableError,
    TransportCertificateError,
    TransportCertificateRejectedError,
    UnavailableError,
    UnknownOperationError,
    UnknownSecretVersionError,
    UnsupportedVersionError,
    UsageNotPermittedError,
    WrongStateError,
)
from kmipd.client._keys import DataKey, Dek, Secret
from kmipd.client._memory import KeyWipedError, ProtectedKey, ProtectedValue
from kmipd.client._sync import Client
from kmipd.client._tls import client_context
from kmipd.crypto import TransportKey
from kmipd.crypto._issuing import generate_key
from kmipd.protocol import KekInfo, SecretInfo, SecretSummary, StatusResult, TransportCertInfo
from pki import TransportKem

__all__ = [
    "ERROR_CLASSES",
    "AlreadyExistsError",
    "AsyncClient",
    "AuditUnavailableError",
    "BadRequestError",
    "BusyError",
    "CacheStats",
    "CertificateIdentityMismatchError",
    "CertificateKeyNotAllowedError",
    "CertificateKeyReusedError",
    "CertificateNameNotAllowedError",
    "CertificateNotRenewableError",
    "CertificateRejectedError",
    "CertificateRevokedError",
    "CertificateValidityTooLongError",
    "Client",
    "ConnectionInfo",
    "CsrInvalidError",
    "DataKey",
    "DeadlineExceededError",
    "Dek",
    "DekCache",
    "DependentsExistError",
    "DestroyPendingError",
    "DuplicateRequestIdError",
    "EnvelopeError",
    "FrameTooLargeError",
    "HelloRequiredError",
    "HsmUnavailableError",
    "IntegrityFailureError",
    "InternalError",
    "IssuedCertificate",
    "KekInfo",
    "KeyCompromisedError",
    "KeyDeactivatedError",
    "KeyDestroyedError",
    "KeyNotActiveError",
    "KeyWipedError",
    "KmipdError",
    "NoOnlineCaError",
    "NoTransportCertificateError",
    "NotAuthorizedError",
    "NotFoundError",
    "OutcomeUnknownError",
    "ProtectStopPassedError",
    "ProtectedKey",
    "ProtectedValue",
    "RemoteError",
    "SealedDeliveryRequiredError",
    "SealedKeyError",
    "Secret",
    "SecretDeletedError",
    "SecretDisabledError",
    "SecretExpiredError",
    "SecretInfo",
    "SecretNotYetValidError",
    "SecretSummary",
    "SecretTooLargeError",
    "ServerCertificateError",
    "ServerTimeoutError",
    "ShuttingDownError",
    "StatusResult",
    "StoreOutcomeUnknownError",
    "StoreUnavailableError",
    "TransportCertInfo",
    "TransportCertificateError",
    "TransportCertificateRejectedError",
    "TransportKem",
    "TransportKey",
    "UnavailableError",
    "UnknownOperationError",
    "UnknownSecretVersionError",
    "UnsupportedVersionError",
    "UsageNotPermittedError",
    "WrongStateError",
    "client_context",
    "generate_key",
    "make_csr",
]
