"""The key store: only wrapped keys and their metadata, never a plaintext key.

Two backends behind one interface (``Store``): SQLite, embedded, the
default; PostgreSQL, for several daemons on several machines. The
PostgreSQL one (and psycopg) is imported only when it is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kmipd.store._certs import IssuedCertificateRecord
from kmipd.store._faults import StoreUnavailableError, WriteHealth
from kmipd.store._interface import StaleRecordError, Store, StoreOutcomeUnknownError
from kmipd.store._managed import ManagedCertificateRecord, ManagedCertificateVersion
from kmipd.store._signing import SigningKeyVersion
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

if TYPE_CHECKING:
    from kmipd.store._postgres import PostgresStore


def open_postgres_store(conninfo: str, **options: Any) -> PostgresStore:
    """The PostgreSQL store (imports psycopg now, not before)."""
    try:
        from kmipd.store._postgres import PostgresStore  # noqa: PLC0415 - psycopg on demand
    except ImportError as exc:
        raise StoreError(
            f"store.backend = 'postgresql' needs psycopg 3 ({exc}); "
            "install it: pip install 'psycopg[binary]' psycopg-pool"
        ) from None
    return PostgresStore.open(conninfo, **options)


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
    "ManagedCertificateRecord",
    "ManagedCertificateVersion",
    "ObjectRecord",
    "RewrapJob",
    "SecretDeletedError",
    "SecretRecord",
    "SecretVersion",
    "SigningKeyVersion",
    "StaleRecordError",
    "Store",
    "StoreError",
    "StoreOutcomeUnknownError",
    "StoreUnavailableError",
    "TransportCertRecord",
    "WriteHealth",
    "open_postgres_store",
    "store_problems",
]
