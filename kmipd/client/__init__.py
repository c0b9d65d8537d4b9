"""The kmipd client library: ``Client`` (blocking) and ``AsyncClient`` (trio).

Both verify the server's certificate and name against the kmipd CA, present
this client's certificate, and raise exceptions named after the wire error
codes. Results that carry a key redact it in ``repr``.
"""

from kmipd.client._async import AsyncClient
from kmipd.client._common import ConnectionInfo
from kmipd.client._errors import (
    ERROR_CLASSES,
    AlreadyExistsError,
    BadRequestError,
    BusyError,
    CertificateRejectedError,
    DeadlineExceededError,
    DuplicateRequestIdError,
    FrameTooLargeError,
    HelloRequiredError,
    HsmUnavailableError,
    IntegrityFailureError,
    InternalError,
    KmipdError,
    NotAuthorizedError,
    NotFoundError,
    RemoteError,
    ServerCertificateError,
    ServerTimeoutError,
    ShuttingDownError,
    UnavailableError,
    UnknownOperationError,
    UnsupportedVersionError,
)
from kmipd.client._sync import Client
from kmipd.client._tls import client_context
from kmipd.protocol import DataKeyResult, DekResult, KekInfo, StatusResult, UnwrapResult

__all__ = [
    "ERROR_CLASSES",
    "AlreadyExistsError",
    "AsyncClient",
    "BadRequestError",
    "BusyError",
    "CertificateRejectedError",
    "Client",
    "ConnectionInfo",
    "DataKeyResult",
    "DeadlineExceededError",
    "DekResult",
    "DuplicateRequestIdError",
    "FrameTooLargeError",
    "HelloRequiredError",
    "HsmUnavailableError",
    "IntegrityFailureError",
    "InternalError",
    "KekInfo",
    "KmipdError",
    "NotAuthorizedError",
    "NotFoundError",
    "RemoteError",
    "ServerCertificateError",
    "ServerTimeoutError",
    "ShuttingDownError",
    "StatusResult",
    "UnavailableError",
    "UnknownOperationError",
    "UnsupportedVersionError",
    "UnwrapResult",
    "client_context",
]
