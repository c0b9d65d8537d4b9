"""The key store: only wrapped keys and their metadata, never a plaintext key."""

from kmipd.store._certs import IssuedCertificateRecord
from kmipd.store._faults import StoreUnavailableError, WriteHealth
from kmipd.store._sqlite import (
    IDEMPOTENCY_RETENTION,
    UNCACHED,
    AlreadyExistsError,
    Change,
    DekRecord,
    IdempotencyKeyUsedError,
    KekRecord,
    KekVersion,
    KeyStore,
    ObjectRecord,
    RewrapJob,
    SecretDeletedError,
    SecretRecord,
    SecretVersion,
    StoreError,
    TransportCertRecord,
    store_problems,
)

__all__ = [
    "IDEMPOTENCY_RETENTION",
    "UNCACHED",
    "AlreadyExistsError",
    "Change",
    "DekRecord",
    "IdempotencyKeyUsedError",
    "IssuedCertificateRecord",
    "KekRecord",
    "KekVersion",
    "KeyStore",
    "ObjectRecord",
    "RewrapJob",
    "SecretDeletedError",
    "SecretRecord",
    "SecretVersion",
    "StoreError",
    "StoreUnavailableError",
    "TransportCertRecord",
    "WriteHealth",
    "store_problems",
]
