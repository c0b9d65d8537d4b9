"""What the service needs of a key store: the one interface both backends implement.

``KeyStore`` (SQLite, embedded, the default) and ``PostgresStore`` (several
daemons on several machines) answer the same calls with the same records;
the service is written against ``Store`` and never learns which it has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from kmipd.lifecycle import Lifecycle, State
from kmipd.store._faults import StoreUnavailableError, WriteHealth
from kmipd.store._sqlite import (
    Change,
    DekRecord,
    KekRecord,
    KekVersion,
    ObjectRecord,
    RewrapJob,
    SecretRecord,
    SecretVersion,
    StoreError,
    TransportCertRecord,
    _Uncached,
)


class StoreOutcomeUnknownError(StoreUnavailableError):
    """The connection to the database broke during COMMIT: the write may have committed.

    Unlike its base (refused, rolled back: not applied), nobody can say
    whether this write took effect. A create with an idempotency key can be
    retried safely; one without cannot.
    """


class StaleRecordError(StoreError):
    """A lifecycle change was decided on a row another daemon changed meanwhile.

    Nothing was written: the caller reads the key again and decides anew.
    """


class Store(Protocol):
    """The key store: only wrapped keys and metadata, never a plaintext key."""

    #: "sqlite" or "postgresql": for status, metrics and logs.
    backend: str
    #: Other daemons write to this store too: the service reloads what they changed.
    shared: bool
    store_id: str
    #: Whether writes go through now (health checks, metrics, systemd status read it).
    health: WriteHealth
    #: Where the store is served from, for status: the file, or the PostgreSQL server
    #: (host:port) the last check reached.
    server: str
    #: Told every database transaction's kind ("read", "write") and duration in
    #: seconds, if set (the daemon's metrics); called on the event loop.
    observer: Callable[[str, float], None] | None

    def close(self) -> None: ...

    # Faults: the probe that ends one.
    async def probe_write(self) -> bool: ...
    async def watch_writes(self, interval: float = 1.0) -> None: ...

    # KEKs: small, read on every request, held in memory.
    def get_kek(self, name: str) -> KekRecord | None: ...
    def list_keks(self, prefix: str | None = None) -> list[KekRecord]: ...
    async def create_kek(
        self, name: str, first_version: KekVersion, created_by: str
    ) -> KekRecord: ...
    async def add_kek_version(self, version: KekVersion) -> KekRecord: ...
    async def set_kek_version_lifecycle(
        self, version: KekVersion, lifecycle: Lifecycle
    ) -> None: ...

    # Key-transport certificates.
    def get_transport_cert(self, identity: str) -> TransportCertRecord | None: ...
    async def put_transport_cert(self, record: TransportCertRecord) -> None: ...

    # DEKs.
    async def put_dek(
        self,
        record: DekRecord,
        *,
        idempotency_key: bytes | None = None,
        kmip: ObjectRecord | None = None,
    ) -> None: ...
    def cached_dek(self, dek_id: str) -> DekRecord | None: ...
    async def find_idempotent(self, identity: str, key: bytes) -> str | None: ...
    async def get_dek(self, dek_id: str) -> DekRecord | None: ...
    async def set_dek_lifecycle(self, record: DekRecord, lifecycle: Lifecycle) -> DekRecord: ...
    async def rewrap_dek(self, record: DekRecord, version: int, wrapped: bytes) -> bool: ...

    # KMIP attributes.
    def cached_object(self, dek_id: str) -> ObjectRecord | _Uncached | None: ...
    async def get_object(self, dek_id: str) -> ObjectRecord | None: ...
    async def put_object(self, kmip: ObjectRecord) -> None: ...
    async def locate_objects(
        self,
        *,
        name: str | None = None,
        object_type: str | None = None,
        object_group: str | None = None,
        algorithm: str | None = None,
        length: int | None = None,
        state: str | None = None,
        limit: int = 1000,
    ) -> list[str]: ...

    # Queries and the change feed.
    async def locate_deks(
        self, *, namespace: str | None, state: State | None, after: str, limit: int
    ) -> list[DekRecord]: ...
    async def dependents(self, kek: str, version: int, limit: int) -> tuple[int, list[str]]: ...
    async def changes_since(self, seq: int, limit: int) -> tuple[list[Change], int, int]: ...
    async def prune_changes(self, max_age: int) -> int: ...

    # Destruction.
    async def due_for_purge(self, now: int) -> tuple[list[DekRecord], list[KekVersion]]: ...
    async def purge_dek(self, record: DekRecord, lifecycle: Lifecycle) -> None: ...
    async def purge_kek_version(self, version: KekVersion, lifecycle: Lifecycle) -> list[str]: ...
    async def checkpoint(self) -> None: ...

    # Rewrap jobs.
    async def create_job(self, job: RewrapJob) -> None: ...
    async def commit_rewrap_batch(
        self, job: RewrapJob, updates: list[tuple[DekRecord, bytes]]
    ) -> RewrapJob: ...
    async def get_job(self, job_id: str) -> RewrapJob | None: ...
    async def list_jobs(self, state: str | None = None) -> list[RewrapJob]: ...
    async def deks_to_rewrap(
        self, namespace: str, target: int, after: str, limit: int
    ) -> list[DekRecord]: ...
    async def count_to_rewrap(self, namespace: str, target: int) -> int: ...

    # Secrets (kmipd.service._secrets): values only ever wrapped.
    async def add_secret_version(self, version: SecretVersion) -> SecretRecord: ...
    async def get_secret(self, namespace: str, name: str) -> SecretRecord | None: ...
    async def list_secrets(
        self,
        *,
        namespace: str | None,
        deleted: bool | None,
        after: tuple[str, str],
        limit: int,
        name: str | None = None,
    ) -> list[SecretRecord]: ...
    async def update_secret_version(self, version: SecretVersion) -> SecretRecord: ...
    async def set_secret_deleted(
        self, namespace: str, name: str, deleted_at: int | None, purge_at: int | None
    ) -> bool: ...
    async def purge_secret(self, namespace: str, name: str) -> int: ...
    async def secrets_due_for_purge(self, now: int) -> list[tuple[str, str]]: ...
    async def secret_versions_to_rewrap(
        self, namespace: str, target: int, limit: int
    ) -> list[SecretVersion]: ...
    async def rewrap_secret_versions(
        self, target: int, updates: list[tuple[SecretVersion, bytes]]
    ) -> int: ...
    async def count_secret_versions_under(self, namespace: str, kek_version: int) -> int: ...

    # Health, sharing, maintenance.
    def pool_stats(self) -> dict[str, int]: ...
    async def refresh_if_changed(self) -> None: ...
    async def maintenance_turn(self) -> bool: ...
    async def count_deks(self) -> int: ...
    async def count_by_state(self) -> dict[tuple[str, str], int]: ...
    async def check(self) -> None: ...
