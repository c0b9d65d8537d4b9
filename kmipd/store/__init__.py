"""The key store: only wrapped keys and their metadata, never a plaintext key."""

from kmipd.store._sqlite import (
    IDEMPOTENCY_RETENTION,
    AlreadyExistsError,
    Change,
    DekRecord,
    IdempotencyKeyUsedError,
    KekRecord,
    KekVersion,
    KeyStore,
    RewrapJob,
    SecretDeletedError,
    SecretRecord,
    SecretVersion,
    StoreError,
    TransportCertRecord,
)

__all__ = [
    "IDEMPOTENCY_RETENTION",
    "AlreadyExistsError",
    "Change",
    "DekRecord",
    "IdempotencyKeyUsedError",
    "KekRecord",
    "KekVersion",
    "KeyStore",
    "RewrapJob",
    "SecretDeletedError",
    "SecretRecord",
    "SecretVersion",
    "StoreError",
    "TransportCertRecord",
]
