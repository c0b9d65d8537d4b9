"""The key store: wrapped DEKs and KEK metadata in one SQLite file.

Why one long module: every table's SQL shares one connection discipline (a single
writer, the commit point, the row cache); splitting it by table family, as the service is
split, waits until the PostgreSQL backend lands so both backends follow one layout.

Only wrapped key material ever reaches this file. SQLite runs in WAL mode
with ``synchronous=FULL``, so a DEK whose insert returned has reached the
disk and survives ``kill -9`` of the daemon; ``secure_delete`` overwrites
deleted rows instead of leaving them in free pages.

SQLite calls block, so they run on worker threads (one connection for
writes, one for reads: WAL lets the reader proceed while a write commits).
Reads of recently used DEKs are served from a bounded in-memory cache of
*wrapped* records and their KMIP attributes, which spares the ~0.1 ms
thread round trip on the hot path; one daemon owns the file (an exclusive
lock enforces it), so the cache cannot go stale behind its back.
"""

# ruff: noqa: S608 - queries interpolate only constant column lists and conditions;
# every value is a bound parameter.
from __future__ import annotations

import collections
import enum
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import trio

from kmipd.lifecycle import DEK_USAGES, KEK_USAGES, Lifecycle, State
from kmipd.store._certs import CERTIFICATES_MIGRATION, CertificateStore
from kmipd.store._commit import point_of_no_return
from kmipd.store._faults import (
    StoreUnavailableError,
    WriteHealth,
    directory_cause,
    os_cause,
    sqlite_cause,
)
from kmipd.store._managed import MANAGED_CERTIFICATES_MIGRATION, ManagedCertificateStore
from kmipd.store._signing import SIGNING_KEYS_MIGRATION, SigningKeyStore

#: The schema, as the migrations that build it, in order. A store at
#: user_version N has had the first N applied; opening it applies the rest in
#: one transaction. Never edit a released migration: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
CREATE TABLE keks (
    name        TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL
) STRICT;
CREATE TABLE kek_versions (
    kek         TEXT NOT NULL REFERENCES keks(name),
    version     INTEGER NOT NULL,
    hsm_handle  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (kek, version)
) STRICT;
CREATE TABLE deks (
    id          TEXT PRIMARY KEY,
    namespace   TEXT NOT NULL,
    kek_version INTEGER NOT NULL,
    wrapped     BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    FOREIGN KEY (namespace, kek_version) REFERENCES kek_versions(kek, version)
) STRICT;
CREATE INDEX deks_by_kek_version ON deks(namespace, kek_version);
""",
    # 2: a store identity (servers showing the same one share keys) and
    # idempotency keys, so a retried create-dek never makes a second DEK.
    """
CREATE TABLE store_meta (
    name        TEXT PRIMARY KEY,
    value       TEXT NOT NULL
) STRICT;
INSERT INTO store_meta (name, value) VALUES ('store_id', lower(hex(randomblob(16))));
CREATE TABLE idempotency_keys (
    identity    TEXT NOT NULL,
    key         BLOB NOT NULL,
    dek_id      TEXT NOT NULL REFERENCES deks(id),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (identity, key)
) STRICT;
CREATE INDEX idempotency_keys_by_age ON idempotency_keys(created_at);
""",
    # 3: lifecycles (state column for queries, the rest as JSON), an ordered
    # feed of state changes for clients' caches, and resumable rewrap jobs.
    """
ALTER TABLE kek_versions ADD COLUMN state TEXT NOT NULL DEFAULT 'active';
ALTER TABLE kek_versions ADD COLUMN purge_at INTEGER;
ALTER TABLE kek_versions ADD COLUMN lifecycle TEXT NOT NULL DEFAULT '{}';
ALTER TABLE deks ADD COLUMN state TEXT NOT NULL DEFAULT 'active';
ALTER TABLE deks ADD COLUMN purge_at INTEGER;
ALTER TABLE deks ADD COLUMN lifecycle TEXT NOT NULL DEFAULT '{}';
CREATE INDEX deks_to_purge ON deks(purge_at) WHERE purge_at IS NOT NULL;
CREATE INDEX kek_versions_to_purge ON kek_versions(purge_at) WHERE purge_at IS NOT NULL;
CREATE TABLE changes (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    namespace   TEXT NOT NULL,
    dek_id      TEXT,
    kek_version INTEGER,
    state       TEXT NOT NULL
) STRICT;
CREATE TABLE rewrap_jobs (
    id          TEXT PRIMARY KEY,
    namespace   TEXT NOT NULL,
    target      INTEGER NOT NULL,
    cursor      TEXT NOT NULL DEFAULT '',
    rewrapped   INTEGER NOT NULL DEFAULT 0,
    skipped     INTEGER NOT NULL DEFAULT 0,
    remaining   INTEGER NOT NULL,
    state       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL
) STRICT;
""",
    # 4: the directory of key-transport certificates: one current per identity.
    """
CREATE TABLE transport_certificates (
    identity      TEXT PRIMARY KEY,
    certificate   BLOB NOT NULL,
    fingerprint   BLOB NOT NULL,
    registered_at INTEGER NOT NULL
) STRICT;
""",
    # 5: what KMIP says about a key beside the DEK row: object type, algorithm
    # and length, usage mask, object group, names (a table of their own, for
    # Locate by name) and the rest (custom x- attributes, links) as JSON.
    # A DEK without a row here is an AES-256 symmetric key with no names.
    """
CREATE TABLE object_attributes (
    dek_id        TEXT PRIMARY KEY REFERENCES deks(id),
    object_type   TEXT NOT NULL,
    algorithm     TEXT,
    length        INTEGER NOT NULL,
    usage_mask    INTEGER,
    object_group  TEXT,
    attributes    TEXT NOT NULL DEFAULT '{}'
) STRICT;
CREATE INDEX object_attributes_by_group ON object_attributes(object_group);
CREATE TABLE object_names (
    name          TEXT NOT NULL,
    dek_id        TEXT NOT NULL REFERENCES deks(id),
    PRIMARY KEY (name, dek_id)
) STRICT;
""",
    # 6: secrets: named values kept beside the keys, each set adding a version.
    # A version's value is stored only wrapped under a KEK version of its
    # namespace; its attributes (enabled, dates, content type, tags) are per
    # version, as in a key vault. A deleted secret keeps its rows until purged.
    """
CREATE TABLE secrets (
    namespace   TEXT NOT NULL REFERENCES keks(name),
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    deleted_at  INTEGER,
    purge_at    INTEGER,
    PRIMARY KEY (namespace, name)
) STRICT;
CREATE INDEX secrets_to_purge ON secrets(purge_at) WHERE purge_at IS NOT NULL;
CREATE INDEX secrets_by_name ON secrets(name);
CREATE TABLE secret_versions (
    namespace    TEXT NOT NULL,
    name         TEXT NOT NULL,
    version      INTEGER NOT NULL,
    kek_version  INTEGER NOT NULL,
    wrapped      BLOB NOT NULL,
    size         INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    tags         TEXT NOT NULL DEFAULT '{}',
    enabled      INTEGER NOT NULL DEFAULT 1,
    not_before   INTEGER,
    expires      INTEGER,
    created_at   INTEGER NOT NULL,
    created_by   TEXT NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (namespace, name, version),
    FOREIGN KEY (namespace, name) REFERENCES secrets(namespace, name) ON DELETE CASCADE,
    FOREIGN KEY (namespace, kek_version) REFERENCES kek_versions(kek, version)
) STRICT;
CREATE INDEX secret_versions_by_kek_version ON secret_versions(namespace, kek_version);
""",
    # 7: certificates the online CA issued, and their revocations (kmipd.store._certs).
    CERTIFICATES_MIGRATION,
    # 8: managed certificates, their versions and wrapped keys (kmipd.store._managed).
    MANAGED_CERTIFICATES_MIGRATION,
    # 9: managed signing keys (kmipd.store._signing).
    SIGNING_KEYS_MIGRATION,
    # 10: the software HSM's keyring in the store. On SQLite the keyring stays a file
    # (hsm.keyring) and this table stays empty: it exists so that both backends' schema
    # version N means the same tables.
    """
CREATE TABLE hsm_keyring (
    handle      TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    label       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    sealed      BLOB NOT NULL
) STRICT;
""",
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The store cannot be opened or used; the message names the file and the problem."""


class AlreadyExistsError(StoreError):
    pass


class SecretDeletedError(StoreError):
    """The secret is soft-deleted: it must be recovered before a new version is set."""


class IdempotencyKeyUsedError(StoreError):
    """A create with this idempotency key was already applied."""


#: How long an idempotency key is remembered: far longer than any retry.
IDEMPOTENCY_RETENTION = 24 * 3600


@attrs.frozen
class DekRecord:
    dek_id: str
    namespace: str
    kek_version: int
    #: Empty once the DEK was destroyed and its material purged.
    wrapped: bytes = attrs.field(repr=False)
    created_at: int
    created_by: str
    lifecycle: Lifecycle


@attrs.frozen
class ObjectRecord:
    """A key's KMIP attributes (migration 5); never key material."""

    dek_id: str
    #: "symmetric-key" or "secret-data".
    object_type: str = "symmetric-key"
    algorithm: str | None = "aes"
    length: int = 256
    usage_mask: int | None = None
    object_group: str | None = None
    names: tuple[str, ...] = ()
    #: Custom (x-) attributes: name -> [KMIP item type number, JSON-able value].
    custom: dict[str, list[Any]] = attrs.field(factory=dict)
    #: Links: [KMIP link type number, linked id].
    links: tuple[tuple[int, str], ...] = ()
    last_change: int | None = None
    secret_data_type: int | None = None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {}
        if self.custom:
            document["custom"] = self.custom
        if self.links:
            document["links"] = [list(link) for link in self.links]
        if self.last_change is not None:
            document["last_change"] = self.last_change
        if self.secret_data_type is not None:
            document["secret_data_type"] = self.secret_data_type
        return document


@attrs.frozen
class KekVersion:
    kek: str
    version: int
    #: Empty once the version was destroyed and its HSM object erased.
    hsm_handle: str
    created_at: int
    lifecycle: Lifecycle


@attrs.frozen
class KekRecord:
    name: str
    created_at: int
    created_by: str
    versions: tuple[KekVersion, ...]

    @property
    def latest(self) -> KekVersion:
        return self.versions[-1]

    def version(self, number: int) -> KekVersion | None:
        for version in self.versions:
            if version.version == number:
                return version
        return None

    def for_protection(self, now: float) -> KekVersion | None:
        """The newest version that may wrap now (active, before its protect-stop)."""
        for version in reversed(self.versions):
            lifecycle = version.lifecycle
            if lifecycle.effective(now) is State.ACTIVE and (
                lifecycle.protect_stop is None or now < lifecycle.protect_stop
            ):
                return version
        return None


@attrs.frozen
class Change:
    """One entry of the change feed: a key's state changed (clients evict cached keys)."""

    seq: int
    at: int
    namespace: str
    dek_id: str | None
    kek_version: int | None
    state: str


@attrs.frozen
class RewrapJob:
    job_id: str
    namespace: str
    target: int
    cursor: str
    rewrapped: int
    skipped: int
    remaining: int
    state: str  # "running", "done", "failed"
    created_at: int
    updated_at: int
    created_by: str


@attrs.frozen
class TransportCertRecord:
    """An identity's current key-transport certificate (DER) and its SHA-256."""

    identity: str
    certificate: bytes = attrs.field(repr=False)
    fingerprint: bytes
    registered_at: int


@attrs.frozen
class SecretVersion:
    """One version of a secret: its value wrapped, and its attributes."""

    namespace: str
    name: str
    version: int
    kek_version: int
    #: The value under AES-GCM with secret_associated_data; never in clear here.
    wrapped: bytes = attrs.field(repr=False)
    size: int
    content_type: str
    tags: dict[str, str]
    enabled: bool
    not_before: int | None
    expires: int | None
    created_at: int
    created_by: str
    updated_at: int


@attrs.frozen
class SecretRecord:
    """A secret's metadata and its versions, oldest first (values stay wrapped)."""

    namespace: str
    name: str
    created_at: int
    created_by: str
    deleted_at: int | None
    purge_at: int | None
    versions: tuple[SecretVersion, ...]

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None

    @property
    def latest(self) -> SecretVersion | None:
        return self.versions[-1] if self.versions else None

    def version(self, number: int) -> SecretVersion | None:
        for version in self.versions:
            if version.version == number:
                return version
        return None


T = TypeVar("T")
log = logging.getLogger("kmipd.store")

_VALUE_VERSION_COLUMNS = (
    "namespace, name, version, kek_version, wrapped, size, content_type, tags, enabled,"
    " not_before, expires, created_at, created_by, updated_at"
)


class _Uncached(enum.Enum):
    UNCACHED = "uncached"


#: cached_object's answer when only the database knows.
UNCACHED: Final = _Uncached.UNCACHED

_DEK_COLUMNS = "id, namespace, kek_version, wrapped, created_at, created_by, state, lifecycle"


class KeyStore(CertificateStore, ManagedCertificateStore, SigningKeyStore):
    """The store. One daemon owns it, or (``shared``) several on one host serve it together.

    Shared mode is for availability: each daemon takes a shared lock instead
    of an exclusive one, reads DEK rows from the database instead of its
    cache, and reloads KEK metadata whenever another connection committed
    (``refresh_if_changed``), so what one daemon creates the others serve.
    """

    backend = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        cache_size: int = 10_000,
        shared: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.server = str(path)
        self.shared = shared
        #: See Store.observer: told each transaction's kind and duration.
        self.observer: Callable[[str, float], None] | None = None
        #: Whether writes go through; a write failing for an understood cause faults it.
        self.health = WriteHealth("key store", path)
        #: Set when a fault starts: the write probe (``watch_writes``) wakes.
        self._faulted = trio.Event()
        self.health.listeners.append(self._on_health_change)
        #: Stamps change-feed entries, and ages them for pruning (tests control it).
        self._clock = clock
        self._lock_fd = _lock(path, shared=shared)
        try:
            self._writer = _connect(path)
            self._reader = _connect(path)
            _refuse_unusable(path, self._reader, self._writer, int(clock()))
        except sqlite3.Error as exc:
            os.close(self._lock_fd)
            cause = sqlite_cause(exc, path.parent)
            raise StoreError(f"cannot open store {path}: {cause or exc}") from None
        except StoreError:
            os.close(self._lock_fd)
            raise
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(1)
        self._cache: collections.OrderedDict[str, DekRecord] = collections.OrderedDict()
        self._cache_size = cache_size
        #: KMIP attributes beside the DEK cache (None: the key has none), same rules: a
        #: KMIP Get reads them with the row, and a thread hop per Get cost more than both.
        self._objects: collections.OrderedDict[str, ObjectRecord | None] = collections.OrderedDict()
        #: Secrets as get-secret reads them (wrapped values only), same rules: a read is a
        #: thread hop, dearer than the rest of a get-secret. Every secret write forgets
        #: what it touched once it is done, and bumps the generation, so a read that
        #: raced with it is not remembered (a disabled version must not stay readable).
        self._secrets: collections.OrderedDict[tuple[str, str], SecretRecord] = (
            collections.OrderedDict()
        )
        self._secrets_generation = 0
        self._keks = {kek.name: kek for kek in _load_keks(self._reader)}
        self._transport = {r.identity: r for r in _load_transport_certs(self._reader)}
        #: Shared: a connection of its own, asked on the event loop (no thread hop) at each
        #: request whether anyone committed since; if so the caches are dropped (a new
        #: epoch) and the KEKs reread. A row read in a thread is remembered only if no
        #: epoch began meanwhile, so a row changed by another daemon is never kept stale.
        self._watch = _connect(path) if shared else None
        self._data_version = _data_version(self._watch) if self._watch is not None else 0
        self._cache_epoch = 0
        self._maintenance_fd: int | None = None
        (self.store_id,) = self._reader.execute(
            "SELECT value FROM store_meta WHERE name = 'store_id'"
        ).fetchone()

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        cache_size: int = 10_000,
        shared: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> KeyStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path, cache_size=cache_size, shared=shared, clock=clock)

    def __repr__(self) -> str:
        return f"KeyStore({str(self.path)!r})"

    def close(self) -> None:
        self._writer.close()
        self._reader.close()
        if self._watch is not None:
            self._watch.close()
        os.close(self._lock_fd)
        if self._maintenance_fd is not None:
            os.close(self._maintenance_fd)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one transaction; StoreUnavailableError if the machine refuses it.

        A transaction that fails is rolled back (``sqlite3.Connection.__exit__``
        rolls back after a failed COMMIT too), so the refusal means "not applied".
        While the store is faulted, writes are refused at once: the probe, not
        every request, finds out when writing works again.
        """
        if not self.health.ok:
            self.health.count_refused()
            raise StoreUnavailableError(self.health.cause or "cannot write")
        point_of_no_return()  # a request that writes is never cut off (and reported unapplied)
        started = time.perf_counter()
        try:
            result = await trio.to_thread.run_sync(
                self._transaction, fn, limiter=self._write_limiter
            )
        except sqlite3.Error as exc:
            cause = sqlite_cause(exc, self.path.parent)
            if cause is None:
                raise
            self.health.failed(cause, str(exc))
            raise StoreUnavailableError(cause, str(exc)) from None
        finally:
            if self.observer is not None:
                self.observer("write", time.perf_counter() - started)
        self.health.succeeded()
        return result

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._writer:  # one transaction: commit on success, roll back on error
            return fn(self._writer)

    def _on_health_change(self) -> None:
        if not self.health.ok:
            self._faulted.set()

    async def probe_write(self) -> bool:
        """One tiny write (a row of store_meta); True if it went through."""

        def touch(db: sqlite3.Connection) -> None:
            _touch_probe(db, int(self._clock()))

        try:
            await trio.to_thread.run_sync(self._transaction, touch, limiter=self._write_limiter)
        except sqlite3.Error as exc:
            cause = sqlite_cause(exc, self.path.parent)
            if cause is None:
                raise
            self.health.failed(cause, str(exc), refused=False)
            return False
        self.health.succeeded()
        return True

    async def watch_writes(self, interval: float = 1.0) -> None:
        """While the store is faulted, probe once per ``interval``; runs forever."""
        while True:
            await self._faulted.wait()
            while not self.health.ok:
                await trio.sleep(interval)  # a bounded probe rate, not a wait for an event
                try:
                    await self.probe_write()
                except sqlite3.Error as exc:
                    log.error("store write probe failed unexpectedly: %s", exc)
                self.health.tick()
            self._faulted = trio.Event()

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        started = time.perf_counter()
        try:
            return await trio.to_thread.run_sync(fn, self._reader, limiter=self._read_limiter)
        finally:
            if self.observer is not None:
                self.observer("read", time.perf_counter() - started)

    def pool_stats(self) -> dict[str, int]:
        """No pool: one writer and one reader connection, always open."""
        return {}

    # -- KEKs --------------------------------------------------------------------

    def get_kek(self, name: str) -> KekRecord | None:
        """KEK metadata is small and read on every request: it is held in memory."""
        return self._keks.get(name)

    def list_keks(self, prefix: str | None = None) -> list[KekRecord]:
        return sorted(
            (kek for kek in self._keks.values() if prefix is None or kek.name.startswith(prefix)),
            key=lambda kek: kek.name,
        )

    async def create_kek(self, name: str, first_version: KekVersion, created_by: str) -> KekRecord:
        record = KekRecord(name, first_version.created_at, created_by, (first_version,))

        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO keks (name, created_at, created_by) VALUES (?, ?, ?)",
                    (name, record.created_at, created_by),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExistsError(f"KEK {name!r} already exists") from None
            _insert_kek_version(db, first_version)

        await self._write(insert)
        self._keks[name] = record
        return record

    async def add_kek_version(self, version: KekVersion) -> KekRecord:
        """Rotation: append the next version (its number must be the next one)."""

        def insert(db: sqlite3.Connection) -> None:
            try:
                _insert_kek_version(db, version)
            except sqlite3.IntegrityError:
                raise AlreadyExistsError(
                    f"KEK {version.kek!r} already has a version {version.version}"
                ) from None

        await self._write(insert)
        kek = self._keks[version.kek]
        self._keks[version.kek] = attrs.evolve(kek, versions=(*kek.versions, version))
        return self._keks[version.kek]

    async def set_kek_version_lifecycle(self, version: KekVersion, lifecycle: Lifecycle) -> None:
        """Record a KEK version's new lifecycle and append it to the change feed."""

        def update(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE kek_versions SET state = ?, purge_at = ?, lifecycle = ?"
                " WHERE kek = ? AND version = ?",
                (
                    lifecycle.state.value,
                    lifecycle.purge_at,
                    json.dumps(lifecycle.to_json()),
                    version.kek,
                    version.version,
                ),
            )
            self._record_change(db, version.kek, None, version.version, lifecycle.state)

        await self._write(update)
        self._replace_version(attrs.evolve(version, lifecycle=lifecycle))

    def _replace_version(self, version: KekVersion) -> None:
        kek = self._keks[version.kek]
        versions = tuple(version if v.version == version.version else v for v in kek.versions)
        self._keks[version.kek] = attrs.evolve(kek, versions=versions)

    # -- key-transport certificates ----------------------------------------------

    def get_transport_cert(self, identity: str) -> TransportCertRecord | None:
        """Held in memory like KEK metadata: read on every sealed delivery."""
        return self._transport.get(identity)

    async def put_transport_cert(self, record: TransportCertRecord) -> None:
        """Register (or replace) an identity's certificate; durable when this returns."""

        def upsert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO transport_certificates (identity, certificate, fingerprint,"
                " registered_at) VALUES (?, ?, ?, ?) ON CONFLICT (identity) DO UPDATE SET"
                " certificate = excluded.certificate, fingerprint = excluded.fingerprint,"
                " registered_at = excluded.registered_at",
                (record.identity, record.certificate, record.fingerprint, record.registered_at),
            )

        await self._write(upsert)
        self._transport[record.identity] = record

    # -- DEKs --------------------------------------------------------------------

    async def put_dek(
        self,
        record: DekRecord,
        *,
        idempotency_key: bytes | None = None,
        kmip: ObjectRecord | None = None,
    ) -> None:
        """Insert a DEK; when this returns, the row is durable.

        With an idempotency key, the key is recorded in the same transaction
        (for the DEK's creator); a key already used raises
        IdempotencyKeyUsedError and inserts nothing.
        """

        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute(_INSERT_DEK, _dek_row(record))
            except sqlite3.IntegrityError:
                raise AlreadyExistsError(f"DEK {record.dek_id!r} already exists") from None
            if kmip is not None:
                _write_object(db, kmip)
            if idempotency_key is None:
                return
            db.execute(
                "DELETE FROM idempotency_keys WHERE created_at < ?",
                (record.created_at - IDEMPOTENCY_RETENTION,),
            )
            try:
                db.execute(
                    "INSERT INTO idempotency_keys (identity, key, dek_id, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (record.created_by, idempotency_key, record.dek_id, record.created_at),
                )
            except sqlite3.IntegrityError:
                # Rolls the DEK insert back too: the transaction fails as a whole.
                raise IdempotencyKeyUsedError from None

        await self._write(insert)
        self._remember(record)
        self._remember_object(record.dek_id, kmip)

    async def put_deks(self, records: Sequence[DekRecord]) -> None:
        """Insert many DEKs in one transaction (a bulk import, or a benchmark filling
        the store): all are durable when this returns, or none is inserted.

        No idempotency keys, no KMIP attributes, not cached: rows to be read later.
        """

        def insert(db: sqlite3.Connection) -> None:
            try:
                db.executemany(_INSERT_DEK, (_dek_row(record) for record in records))
            except sqlite3.IntegrityError as exc:
                raise AlreadyExistsError(f"a DEK in the batch already exists ({exc})") from None

        await self._write(insert)

    def cached_dek(self, dek_id: str) -> DekRecord | None:
        """The row if it is in the cache; shared, only while nobody committed since the
        last refresh_if_changed (the inline path skips that refresh: it must not serve a
        row another daemon changed). Never reads a table."""
        if self._stale():
            return None
        record = self._cache.get(dek_id)
        if record is not None:
            self._cache.move_to_end(dek_id)
        return record

    async def find_idempotent(self, identity: str, key: bytes) -> str | None:
        """The DEK a create with this idempotency key made for this identity, if any."""

        def select(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT dek_id FROM idempotency_keys WHERE identity = ? AND key = ?",
                (identity, key),
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._read(select)

    async def get_dek(self, dek_id: str) -> DekRecord | None:
        record = self.cached_dek(dek_id)
        if record is not None:
            return record

        def select(db: sqlite3.Connection) -> DekRecord | None:
            row = db.execute(f"SELECT {_DEK_COLUMNS} FROM deks WHERE id = ?", (dek_id,)).fetchone()
            return None if row is None else _dek_from_row(row)

        epoch = self._cache_epoch
        record = await self._read(select)
        if record is not None and epoch == self._cache_epoch:
            self._remember(record)
        return record

    async def set_dek_lifecycle(self, record: DekRecord, lifecycle: Lifecycle) -> DekRecord:
        """Record a DEK's new lifecycle and append it to the change feed."""

        def update(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE deks SET state = ?, purge_at = ?, lifecycle = ? WHERE id = ?",
                (
                    lifecycle.state.value,
                    lifecycle.purge_at,
                    json.dumps(lifecycle.to_json()),
                    record.dek_id,
                ),
            )
            self._record_change(db, record.namespace, record.dek_id, None, lifecycle.state)

        await self._write(update)
        updated = attrs.evolve(record, lifecycle=lifecycle)
        self._forget(record.dek_id)
        self._remember(updated)
        return updated

    async def rewrap_dek(self, record: DekRecord, version: int, wrapped: bytes) -> bool:
        """Replace a DEK's wrapping, only if it is still under the version read.

        Returns False (changing nothing) if another rewrap got there first,
        so a DEK is never wrapped twice from one reading.
        """

        def update(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE deks SET kek_version = ?, wrapped = ? WHERE id = ? AND kek_version = ?",
                (version, wrapped, record.dek_id, record.kek_version),
            )
            return cursor.rowcount == 1

        changed = await self._write(update)
        self._forget(record.dek_id)
        return changed

    def _remember(self, record: DekRecord) -> None:
        self._cache[record.dek_id] = record
        self._cache.move_to_end(record.dek_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _forget(self, dek_id: str) -> None:
        self._cache.pop(dek_id, None)
        self._objects.pop(dek_id, None)

    def _remember_object(self, dek_id: str, kmip: ObjectRecord | None) -> None:
        self._objects[dek_id] = kmip
        self._objects.move_to_end(dek_id)
        while len(self._objects) > self._cache_size:
            self._objects.popitem(last=False)

    # -- KMIP attributes -------------------------------------------------------------

    def cached_object(self, dek_id: str) -> ObjectRecord | _Uncached | None:
        """The key's KMIP attributes if the cache knows them (None: it has none), else
        UNCACHED; never reads a table (shared: see cached_dek)."""
        if self._stale():
            return UNCACHED
        if dek_id not in self._objects:
            return UNCACHED
        self._objects.move_to_end(dek_id)
        return self._objects[dek_id]

    async def get_object(self, dek_id: str) -> ObjectRecord | None:
        """The key's KMIP attributes, or None for a key that never had any (a native DEK)."""
        cached = self.cached_object(dek_id)
        if cached is not UNCACHED:
            return cached

        def select(db: sqlite3.Connection) -> ObjectRecord | None:
            row = db.execute(
                f"SELECT {_OBJECT_COLUMNS} FROM object_attributes WHERE dek_id = ?", (dek_id,)
            ).fetchone()
            if row is None:
                return None
            names = db.execute(
                "SELECT name FROM object_names WHERE dek_id = ? ORDER BY rowid", (dek_id,)
            ).fetchall()
            return _object_from_row(row, tuple(name for (name,) in names))

        epoch = self._cache_epoch
        found = await self._read(select)
        if epoch == self._cache_epoch:
            self._remember_object(dek_id, found)
        return found

    async def put_object(self, kmip: ObjectRecord) -> None:
        """Insert or replace a key's KMIP attributes (its DEK row must exist)."""
        self._objects.pop(kmip.dek_id, None)  # whatever the write's fate, reread next time
        await self._write(lambda db: _write_object(db, kmip))
        self._remember_object(kmip.dek_id, kmip)

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
    ) -> list[str]:
        """Ids of keys matching every given filter, oldest first; native DEKs count as AES-256."""
        where, args = _locate_filter(
            "?",
            name=name,
            object_type=object_type,
            object_group=object_group,
            algorithm=algorithm,
            length=length,
            state=state,
        )

        def select(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT d.id FROM deks d LEFT JOIN object_attributes o ON o.dek_id = d.id"
                f" WHERE {' AND '.join(where)} ORDER BY d.created_at, d.rowid LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [str(dek_id) for (dek_id,) in rows]

        return await self._read(select)

    # -- queries ----------------------------------------------------------------------

    async def locate_deks(
        self, *, namespace: str | None, state: State | None, after: str, limit: int
    ) -> list[DekRecord]:
        """DEKs in id order after ``after``, optionally of one namespace (glob) and state."""
        where, args = ["id > ?"], [after]
        if namespace is not None:
            where.append("namespace GLOB ?")
            args.append(namespace)
        if state is not None:
            where.append("state = ?")
            args.append(state.value)

        def select(db: sqlite3.Connection) -> list[DekRecord]:
            rows = db.execute(
                f"SELECT {_DEK_COLUMNS} FROM deks WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [_dek_from_row(row) for row in rows]

        return await self._read(select)

    async def dependents(self, kek: str, version: int, limit: int) -> tuple[int, list[str]]:
        """How many not-destroyed DEKs are wrapped under this version, and the first ids."""
        live = ("destroyed", "destroyed-compromised")

        def select(db: sqlite3.Connection) -> tuple[int, list[str]]:
            condition = "namespace = ? AND kek_version = ? AND state NOT IN (?, ?)"
            (count,) = db.execute(
                f"SELECT count(*) FROM deks WHERE {condition}", (kek, version, *live)
            ).fetchone()
            ids = [
                row[0]
                for row in db.execute(
                    f"SELECT id FROM deks WHERE {condition} ORDER BY id LIMIT ?",
                    (kek, version, *live, limit),
                )
            ]
            return int(count), ids

        return await self._read(select)

    async def changes_since(self, seq: int, limit: int) -> tuple[list[Change], int, int]:
        """Feed entries after ``seq`` (at most ``limit``), the newest sequence number, and
        the newest one pruned (0 if none): a reader behind it has missed changes."""

        def select(db: sqlite3.Connection) -> tuple[list[Change], int, int]:
            rows = db.execute(
                "SELECT seq, at, namespace, dek_id, kek_version, state FROM changes"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
            (newest,) = db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()
            pruned = db.execute(
                "SELECT value FROM store_meta WHERE name = 'changes_pruned_through'"
            ).fetchone()
            return [Change(*row) for row in rows], int(newest), int(pruned[0]) if pruned else 0

        return await self._read(select)

    def _record_change(
        self,
        db: sqlite3.Connection,
        namespace: str,
        dek_id: str | None,
        version: int | None,
        state: State,
    ) -> None:
        """Number a state change for the feed (in the caller's transaction)."""
        db.execute(
            "INSERT INTO changes (at, namespace, dek_id, kek_version, state)"
            " VALUES (?, ?, ?, ?, ?)",
            (int(self._clock()), namespace, dek_id, version, state.value),
        )

    async def prune_changes(self, max_age: int) -> int:
        """Drop feed entries older than ``max_age`` seconds (the newest always stays, so
        the feed's position survives); remember how far pruning went. Returns how many."""
        before = int(self._clock()) - max_age

        def prune(db: sqlite3.Connection) -> int:
            (through,) = db.execute(
                "SELECT max(seq) FROM changes WHERE at < ?"
                " AND seq < (SELECT max(seq) FROM changes)",
                (before,),
            ).fetchone()
            if through is None:
                return 0
            count = db.execute("DELETE FROM changes WHERE seq <= ?", (through,)).rowcount
            db.execute(
                "INSERT INTO store_meta (name, value) VALUES ('changes_pruned_through', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (str(through),),
            )
            return int(count)

        return await self._write(prune)

    # -- destruction --------------------------------------------------------------------

    async def due_for_purge(self, now: int) -> tuple[list[DekRecord], list[KekVersion]]:
        """Destroyed keys whose soft-delete window has ended."""

        def select(db: sqlite3.Connection) -> tuple[list[DekRecord], list[tuple[str, int]]]:
            deks = [
                _dek_from_row(row)
                for row in db.execute(
                    f"SELECT {_DEK_COLUMNS} FROM deks WHERE purge_at <= ?", (now,)
                )
            ]
            versions = db.execute(
                "SELECT kek, version FROM kek_versions WHERE purge_at <= ?", (now,)
            ).fetchall()
            return deks, versions

        deks, refs = await self._read(select)
        versions = []
        for name, number in refs:
            kek = self._keks.get(name)
            found = kek.version(number) if kek is not None else None
            if found is not None:
                versions.append(found)
        return deks, versions

    async def purge_dek(self, record: DekRecord, lifecycle: Lifecycle) -> None:
        """Erase a DEK's wrapped material and record it destroyed; its metadata stays."""

        def erase(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE deks SET wrapped = x'', state = ?, purge_at = NULL, lifecycle = ?"
                " WHERE id = ?",
                (lifecycle.state.value, json.dumps(lifecycle.to_json()), record.dek_id),
            )
            db.execute("DELETE FROM idempotency_keys WHERE dek_id = ?", (record.dek_id,))
            self._record_change(db, record.namespace, record.dek_id, None, lifecycle.state)

        await self._write(erase)
        self._forget(record.dek_id)

    async def purge_kek_version(self, version: KekVersion, lifecycle: Lifecycle) -> list[str]:
        """Record a KEK version destroyed (its HSM object is gone); its DEKs go with it.

        Returns the ids of the DEKs wrapped only under it: they are marked
        destroyed and their wrapped material erased too, since it could
        never be unwrapped again (crypto-shredding).
        """
        now = int(time.time())

        def erase(db: sqlite3.Connection) -> list[str]:
            db.execute(
                "UPDATE kek_versions SET hsm_handle = '', state = ?, purge_at = NULL, lifecycle = ?"
                " WHERE kek = ? AND version = ?",
                (
                    lifecycle.state.value,
                    json.dumps(lifecycle.to_json()),
                    version.kek,
                    version.version,
                ),
            )
            self._record_change(db, version.kek, None, version.version, lifecycle.state)
            # Secret values under it could never be unwrapped again either.
            db.execute(
                "DELETE FROM secret_versions WHERE namespace = ? AND kek_version = ?",
                (version.kek, version.version),
            )
            orphans = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM deks"
                    " WHERE namespace = ? AND kek_version = ? AND wrapped != x''",
                    (version.kek, version.version),
                )
            ]
            for dek_id in orphans:
                (state, document, created) = db.execute(
                    "SELECT state, lifecycle, created_at FROM deks WHERE id = ?", (dek_id,)
                ).fetchone()
                old = Lifecycle.from_json(
                    state, json.loads(document), default_usage=DEK_USAGES, created_at=created
                )
                shredded = (
                    State.DESTROYED_COMPROMISED
                    if state in ("compromised", "destroyed-compromised")
                    else State.DESTROYED
                )
                gone = attrs.evolve(
                    old, state=shredded, purge_at=None, destroy_date=old.destroy_date or now
                )
                db.execute(
                    "UPDATE deks SET wrapped = x'', state = ?, purge_at = NULL, lifecycle = ?"
                    " WHERE id = ?",
                    (shredded.value, json.dumps(gone.to_json()), dek_id),
                )
                self._record_change(db, version.kek, dek_id, None, shredded)
            return orphans

        try:
            orphans = await self._write(erase)
        finally:
            self._secrets_written(None)  # its secret versions went
        self._replace_version(attrs.evolve(version, hsm_handle="", lifecycle=lifecycle))
        for dek_id in orphans:
            self._forget(dek_id)
        return orphans

    async def checkpoint(self) -> None:
        """Move the WAL into the database file and truncate it: erased bytes leave both."""
        await self._write(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())

    # -- rewrap jobs ------------------------------------------------------------------------

    async def create_job(self, job: RewrapJob) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO rewrap_jobs (id, namespace, target, cursor, rewrapped, skipped,"
                " remaining, state, created_at, updated_at, created_by)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                attrs.astuple(job),
            )

        await self._write(insert)

    async def commit_rewrap_batch(
        self, job: RewrapJob, updates: list[tuple[DekRecord, bytes]]
    ) -> RewrapJob:
        """Apply a batch of rewrappings and the job's progress in one transaction.

        A row is replaced only if it is still under the version read, so a
        batch replayed after a crash changes nothing twice. Returns the job
        with its counts as committed.
        """

        def apply(db: sqlite3.Connection) -> RewrapJob:
            changed = 0
            for record, wrapped in updates:
                cursor = db.execute(
                    "UPDATE deks SET kek_version = ?, wrapped = ? WHERE id = ? AND kek_version = ?",
                    (job.target, wrapped, record.dek_id, record.kek_version),
                )
                changed += cursor.rowcount
            (remaining,) = db.execute(
                "SELECT count(*) FROM deks WHERE namespace = ? AND kek_version < ?"
                " AND wrapped != x''",
                (job.namespace, job.target),
            ).fetchone()
            saved = attrs.evolve(job, rewrapped=job.rewrapped + changed, remaining=remaining)
            db.execute(
                "UPDATE rewrap_jobs SET cursor = ?, rewrapped = ?, skipped = ?, remaining = ?,"
                " state = ?, updated_at = ? WHERE id = ?",
                (
                    saved.cursor,
                    saved.rewrapped,
                    saved.skipped,
                    saved.remaining,
                    saved.state,
                    saved.updated_at,
                    saved.job_id,
                ),
            )
            return saved

        saved = await self._write(apply)
        for record, _ in updates:
            self._forget(record.dek_id)
        return saved

    async def get_job(self, job_id: str) -> RewrapJob | None:
        def select(db: sqlite3.Connection) -> RewrapJob | None:
            row = db.execute("SELECT * FROM rewrap_jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else RewrapJob(*row)

        return await self._read(select)

    async def list_jobs(self, state: str | None = None) -> list[RewrapJob]:
        def select(db: sqlite3.Connection) -> list[RewrapJob]:
            rows = db.execute(
                "SELECT * FROM rewrap_jobs WHERE ? IS NULL OR state = ? ORDER BY created_at",
                (state, state),
            ).fetchall()
            return [RewrapJob(*row) for row in rows]

        return await self._read(select)

    async def deks_to_rewrap(
        self, namespace: str, target: int, after: str, limit: int
    ) -> list[DekRecord]:
        """The next batch of a namespace's DEKs under an older version than ``target``."""

        def select(db: sqlite3.Connection) -> list[DekRecord]:
            rows = db.execute(
                f"SELECT {_DEK_COLUMNS} FROM deks WHERE namespace = ? AND kek_version < ?"
                " AND id > ? AND wrapped != x'' ORDER BY id LIMIT ?",
                (namespace, target, after, limit),
            ).fetchall()
            return [_dek_from_row(row) for row in rows]

        return await self._read(select)

    async def count_to_rewrap(self, namespace: str, target: int) -> int:
        def select(db: sqlite3.Connection) -> int:
            (count,) = db.execute(
                "SELECT count(*) FROM deks WHERE namespace = ? AND kek_version < ?"
                " AND wrapped != x''",
                (namespace, target),
            ).fetchone()
            return int(count)

        return await self._read(select)

    # -- secrets ---------------------------------------------------------------------

    async def add_secret_version(self, version: SecretVersion) -> SecretRecord:
        """Add a version (creating the secret at version 1); durable when this returns.

        The caller numbers the version (the number is bound into the wrapping)
        as the latest plus one; if another set took that number first this
        raises AlreadyExistsError and the caller wraps again with the next.
        A deleted secret is refused: recover it first (StoreError).
        """

        def insert(db: sqlite3.Connection) -> SecretRecord:
            row = db.execute(
                "SELECT deleted_at FROM secrets WHERE namespace = ? AND name = ?",
                (version.namespace, version.name),
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO secrets (namespace, name, created_at, created_by)"
                    " VALUES (?, ?, ?, ?)",
                    (version.namespace, version.name, version.created_at, version.created_by),
                )
            elif row[0] is not None:
                raise SecretDeletedError(
                    f"secret {version.name!r} in {version.namespace!r} is deleted"
                )
            try:
                db.execute(
                    f"INSERT INTO secret_versions ({_VALUE_VERSION_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _secret_version_row(version),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExistsError(
                    f"secret {version.name!r} already has a version {version.version}"
                ) from None
            found = _load_secret(db, version.namespace, version.name)
            assert found is not None
            return found

        return await self._write_secret((version.namespace, version.name), insert)

    async def get_secret(self, namespace: str, name: str) -> SecretRecord | None:
        key = (namespace, name)
        if not self.shared and (cached := self._secrets.get(key)) is not None:
            self._secrets.move_to_end(key)
            return cached
        generation = self._secrets_generation
        found = await self._read(lambda db: _load_secret(db, namespace, name))
        if found is not None and not self.shared and generation == self._secrets_generation:
            self._secrets[key] = found
            while len(self._secrets) > self._cache_size:
                self._secrets.popitem(last=False)
        return found

    async def _write_secret(
        self, key: tuple[str, str] | None, fn: Callable[[sqlite3.Connection], T]
    ) -> T:
        """A write touching secret ``key`` (None: any), which the cache then forgets."""
        try:
            return await self._write(fn)
        finally:
            self._secrets_written(key)

    def _secrets_written(self, key: tuple[str, str] | None) -> None:
        self._secrets_generation += 1
        if key is None:
            self._secrets.clear()
        else:
            self._secrets.pop(key, None)

    async def list_secrets(
        self,
        *,
        namespace: str | None,
        deleted: bool | None,
        after: tuple[str, str],
        limit: int,
        name: str | None = None,
    ) -> list[SecretRecord]:
        """Secrets in (namespace, name) order after ``after``; namespace is a glob, name exact."""
        where, args = ["(namespace, name) > (?, ?)"], [after[0], after[1]]
        if namespace is not None:
            where.append("namespace GLOB ?")
            args.append(namespace)
        if name is not None:
            where.append("name = ?")
            args.append(name)
        if deleted is not None:
            where.append("deleted_at IS NOT NULL" if deleted else "deleted_at IS NULL")

        def select(db: sqlite3.Connection) -> list[SecretRecord]:
            keys = db.execute(
                f"SELECT namespace, name FROM secrets WHERE {' AND '.join(where)}"
                " ORDER BY namespace, name LIMIT ?",
                (*args, limit),
            ).fetchall()
            found = [_load_secret(db, ns, name) for ns, name in keys]
            return [record for record in found if record is not None]

        return await self._read(select)

    async def update_secret_version(self, version: SecretVersion) -> SecretRecord:
        """Replace a version's attributes (never its value or wrapping)."""

        def update(db: sqlite3.Connection) -> SecretRecord:
            cursor = db.execute(
                "UPDATE secret_versions SET content_type = ?, tags = ?, enabled = ?,"
                " not_before = ?, expires = ?, updated_at = ?"
                " WHERE namespace = ? AND name = ? AND version = ?",
                (
                    version.content_type,
                    json.dumps(version.tags, sort_keys=True),
                    int(version.enabled),
                    version.not_before,
                    version.expires,
                    version.updated_at,
                    version.namespace,
                    version.name,
                    version.version,
                ),
            )
            if cursor.rowcount != 1:
                raise StoreError(f"secret {version.name!r} has no version {version.version}")
            found = _load_secret(db, version.namespace, version.name)
            assert found is not None
            return found

        return await self._write_secret((version.namespace, version.name), update)

    async def set_secret_deleted(
        self, namespace: str, name: str, deleted_at: int | None, purge_at: int | None
    ) -> bool:
        """Soft-delete (both set) or recover (both None) a secret; False if it is gone."""

        def update(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE secrets SET deleted_at = ?, purge_at = ? WHERE namespace = ? AND name = ?",
                (deleted_at, purge_at, namespace, name),
            )
            return cursor.rowcount == 1

        return await self._write_secret((namespace, name), update)

    async def purge_secret(self, namespace: str, name: str) -> int:
        """Erase a secret and every version; secure_delete overwrites the freed bytes.

        Returns how many versions went. Call checkpoint() after to clear the WAL too.
        """

        def erase(db: sqlite3.Connection) -> int:
            count = db.execute(
                "DELETE FROM secret_versions WHERE namespace = ? AND name = ?", (namespace, name)
            ).rowcount
            db.execute("DELETE FROM secrets WHERE namespace = ? AND name = ?", (namespace, name))
            return int(count)

        return await self._write_secret((namespace, name), erase)

    async def secrets_due_for_purge(self, now: int) -> list[tuple[str, str]]:
        return await self._read(
            lambda db: [
                (str(ns), str(name))
                for ns, name in db.execute(
                    "SELECT namespace, name FROM secrets WHERE purge_at <= ?", (now,)
                )
            ]
        )

    async def secret_versions_to_rewrap(
        self, namespace: str, target: int, limit: int
    ) -> list[SecretVersion]:
        """The next batch of a namespace's secret versions under an older KEK version."""

        def select(db: sqlite3.Connection) -> list[SecretVersion]:
            rows = db.execute(
                f"SELECT {_VALUE_VERSION_COLUMNS} FROM secret_versions"
                " WHERE namespace = ? AND kek_version < ? ORDER BY name, version LIMIT ?",
                (namespace, target, limit),
            ).fetchall()
            return [_secret_version_from_row(row) for row in rows]

        return await self._read(select)

    async def rewrap_secret_versions(
        self, target: int, updates: list[tuple[SecretVersion, bytes]]
    ) -> int:
        """Replace wrappings in one transaction, each only if still under the version read."""

        def apply(db: sqlite3.Connection) -> int:
            changed = 0
            for version, wrapped in updates:
                changed += db.execute(
                    "UPDATE secret_versions SET kek_version = ?, wrapped = ?"
                    " WHERE namespace = ? AND name = ? AND version = ? AND kek_version = ?",
                    (
                        target,
                        wrapped,
                        version.namespace,
                        version.name,
                        version.version,
                        version.kek_version,
                    ),
                ).rowcount
            return changed

        return await self._write_secret(None, apply)

    async def count_secret_versions_under(self, namespace: str, kek_version: int) -> int:
        """Secret versions wrapped under this KEK version: they depend on it."""
        return await self._read(
            lambda db: int(
                db.execute(
                    "SELECT count(*) FROM secret_versions WHERE namespace = ? AND kek_version = ?",
                    (namespace, kek_version),
                ).fetchone()[0]
            )
        )

    # -- health and shared mode ------------------------------------------------------------

    def _stale(self) -> bool:
        """Shared: whether anyone committed since the caches were last validated."""
        return self._watch is not None and _data_version(self._watch) != self._data_version

    async def refresh_if_changed(self) -> None:
        """Shared mode: if any connection committed since (another daemon, or this one's
        writer), drop the row caches and reload KEK metadata."""
        if self._watch is None:
            return
        # A read of the WAL index in shared memory: microseconds, no disk I/O.
        version = _data_version(self._watch)
        if version == self._data_version:
            return
        self._data_version = version
        self._cache_epoch += 1
        self._cache.clear()
        self._objects.clear()
        keks, certs = await self._read(lambda db: (_load_keks(db), _load_transport_certs(db)))
        self._keks = {kek.name: kek for kek in keks}
        self._transport = {record.identity: record for record in certs}

    async def maintenance_turn(self) -> bool:
        """Whether this daemon runs maintenance now: always when it owns the store;
        shared, the one holding the maintenance lock (released when it dies)."""
        if not self.shared or self._maintenance_fd is not None:
            return True
        lock_path = self.path.with_name(self.path.name + ".maintenance.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._maintenance_fd = fd
        return True

    async def count_deks(self) -> int:
        return await self._read(
            lambda db: int(db.execute("SELECT count(*) FROM deks").fetchone()[0])
        )

    async def count_by_state(self) -> dict[tuple[str, str], int]:
        """(kind, state) -> how many, kind "dek" or "kek-version": for metrics."""

        def select(db: sqlite3.Connection) -> dict[tuple[str, str], int]:
            counts = {}
            for kind, table in (("dek", "deks"), ("kek-version", "kek_versions")):
                for state, count in db.execute(
                    f"SELECT state, count(*) FROM {table} GROUP BY state"
                ):
                    counts[(kind, state)] = int(count)
            return counts

        return await self._read(select)

    async def check(self) -> None:
        """Raise StoreError unless the database answers a trivial query."""
        try:
            await self._read(lambda db: db.execute("SELECT 1").fetchone())
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path} does not answer: {exc}") from None


_OBJECT_COLUMNS = "dek_id, object_type, algorithm, length, usage_mask, object_group, attributes"


def _write_object(db: sqlite3.Connection, kmip: ObjectRecord) -> None:
    db.execute(
        f"INSERT OR REPLACE INTO object_attributes ({_OBJECT_COLUMNS})"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            kmip.dek_id,
            kmip.object_type,
            kmip.algorithm,
            kmip.length,
            kmip.usage_mask,
            kmip.object_group,
            json.dumps(kmip.to_json()),
        ),
    )
    db.execute("DELETE FROM object_names WHERE dek_id = ?", (kmip.dek_id,))
    db.executemany(
        "INSERT OR IGNORE INTO object_names (name, dek_id) VALUES (?, ?)",
        [(name, kmip.dek_id) for name in kmip.names],
    )


def _object_from_row(row: tuple[Any, ...], names: tuple[str, ...]) -> ObjectRecord:
    dek_id, object_type, algorithm, length, usage_mask, object_group, document = row
    extra = json.loads(document)
    return ObjectRecord(
        dek_id=dek_id,
        object_type=object_type,
        algorithm=algorithm,
        length=length,
        usage_mask=usage_mask,
        object_group=object_group,
        names=names,
        custom=extra.get("custom", {}),
        links=tuple((int(kind), str(target)) for kind, target in extra.get("links", [])),
        last_change=extra.get("last_change"),
        secret_data_type=extra.get("secret_data_type"),
    )


def _secret_version_row(version: SecretVersion) -> tuple[Any, ...]:
    return (
        version.namespace,
        version.name,
        version.version,
        version.kek_version,
        version.wrapped,
        version.size,
        version.content_type,
        json.dumps(version.tags, sort_keys=True),
        int(version.enabled),
        version.not_before,
        version.expires,
        version.created_at,
        version.created_by,
        version.updated_at,
    )


def _secret_version_from_row(row: tuple[Any, ...]) -> SecretVersion:
    (ns, name, number, kek_version, wrapped, size, content_type, tags, enabled) = row[:9]
    not_before, expires, created_at, created_by, updated_at = row[9:]
    return SecretVersion(
        ns,
        name,
        number,
        kek_version,
        bytes(wrapped),
        size,
        content_type,
        json.loads(tags),
        bool(enabled),
        not_before,
        expires,
        created_at,
        created_by,
        updated_at,
    )


def _load_secret(db: sqlite3.Connection, namespace: str, name: str) -> SecretRecord | None:
    row = db.execute(
        "SELECT created_at, created_by, deleted_at, purge_at FROM secrets"
        " WHERE namespace = ? AND name = ?",
        (namespace, name),
    ).fetchone()
    if row is None:
        return None
    versions = tuple(
        _secret_version_from_row(r)
        for r in db.execute(
            f"SELECT {_VALUE_VERSION_COLUMNS} FROM secret_versions"
            " WHERE namespace = ? AND name = ? ORDER BY version",
            (namespace, name),
        )
    )
    created_at, created_by, deleted_at, purge_at = row
    return SecretRecord(namespace, name, created_at, created_by, deleted_at, purge_at, versions)


def _dek_from_row(row: tuple[Any, ...]) -> DekRecord:
    dek_id, namespace, version, wrapped, created_at, created_by, state, document = row
    lifecycle = Lifecycle.from_json(
        state, json.loads(document), default_usage=DEK_USAGES, created_at=created_at
    )
    return DekRecord(dek_id, namespace, version, wrapped, created_at, created_by, lifecycle)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA secure_delete = ON")
    db.execute("PRAGMA busy_timeout = 5000")
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        db.close()
        raise StoreError(
            f"store {path} has schema version {version}, newer than this kmipd "
            f"({SCHEMA_VERSION}); upgrade kmipd"
        )
    if version < SCHEMA_VERSION:
        # executescript commits first, so the BEGIN/COMMIT are spelled out:
        # a crash mid-way leaves the store at its old version, untouched.
        pending = "".join(MIGRATIONS[version:])
        db.executescript(f"BEGIN; {pending} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    return db


def _touch_probe(db: sqlite3.Connection, now: int) -> None:
    """The smallest real write: one row of store_meta."""
    db.execute(
        "INSERT INTO store_meta (name, value) VALUES ('write_probe', ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (str(now),),
    )


def _refuse_unusable(
    path: Path, reader: sqlite3.Connection, writer: sqlite3.Connection, now: int
) -> None:
    """Refuse a damaged store (never "repaired": restore a backup), or one that cannot
    take a write, at startup rather than with the first request."""
    damage = _quick_check(reader)
    if damage is not None:
        raise StoreError(
            f"store {path} fails SQLite's integrity check ({damage}); restore it "
            "from a kmipd backup"
        )
    with writer:
        _touch_probe(writer, now)


def _quick_check(db: sqlite3.Connection) -> str | None:
    """SQLite's ``PRAGMA quick_check`` (O(size), no index cross-check): None if ok."""
    rows = [str(row[0]) for row in db.execute("PRAGMA quick_check(3)")]
    return None if rows == ["ok"] else " ".join("; ".join(rows).split())  # one line


def store_problems(path: Path) -> list[str]:
    """What would make ``KeyStore.open`` refuse an existing store (for check-config).

    Read-only: nothing is migrated, locked or written, and nothing is repaired.
    """
    problems = []
    cause = directory_cause(path.parent)
    if cause is not None:
        problems.append(f"{path} cannot be written: {cause}")
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            damage = _quick_check(db)
        finally:
            db.close()
    except sqlite3.Error as exc:
        damage = sqlite_cause(exc, path.parent) or str(exc)
    if damage is not None:
        problems.append(
            f"{path} fails SQLite's integrity check ({damage}); restore it from a kmipd backup"
        )
    return problems


def _lock(path: Path, *, shared: bool) -> int:
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(
            f"store {path} cannot be opened for writing: {lock_path}: "
            f"{os_cause(exc) or exc.strerror}"
        ) from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        why = (
            "by a kmipd that does not share it (store.shared is off there)"
            if shared
            else "by another kmipd process (set store.shared = true on every daemon to share it)"
        )
        raise StoreError(f"store {path} is in use {why}") from None
    return fd


def _locate_filter(
    marker: str,
    *,
    name: str | None,
    object_type: str | None,
    object_group: str | None,
    algorithm: str | None,
    length: int | None,
    state: str | None,
) -> tuple[list[str], list[str | int]]:
    """locate_objects' WHERE terms over ``deks d LEFT JOIN object_attributes o`` and their
    arguments, for either store (``marker``: the driver's parameter marker)."""
    where: list[str] = ["1 = 1"]
    args: list[str | int] = []
    if name is not None:
        where.append(f"d.id IN (SELECT dek_id FROM object_names WHERE name = {marker})")
        args.append(name)
    for column, default, value in (
        ("object_type", "'symmetric-key'", object_type),
        ("algorithm", "'aes'", algorithm),
        ("length", "256", length),
    ):
        if value is not None:
            where.append(f"coalesce(o.{column}, {default}) = {marker}")
            args.append(value)
    if object_group is not None:
        where.append(f"o.object_group = {marker}")
        args.append(object_group)
    if state is not None:
        where.append(f"d.state = {marker}")
        args.append(state)
    return where, args


def _data_version(db: sqlite3.Connection) -> int:
    """Changes whenever another connection commits (SQLite's PRAGMA data_version)."""
    return int(db.execute("PRAGMA data_version").fetchone()[0])


_INSERT_DEK = f"INSERT INTO deks ({_DEK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


def _dek_row(record: DekRecord) -> tuple[object, ...]:
    return (
        record.dek_id,
        record.namespace,
        record.kek_version,
        record.wrapped,
        record.created_at,
        record.created_by,
        record.lifecycle.state.value,
        json.dumps(record.lifecycle.to_json()),
    )


def _insert_kek_version(db: sqlite3.Connection, version: KekVersion) -> None:
    db.execute(
        "INSERT INTO kek_versions (kek, version, hsm_handle, created_at, state, purge_at,"
        " lifecycle) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            version.kek,
            version.version,
            version.hsm_handle,
            version.created_at,
            version.lifecycle.state.value,
            version.lifecycle.purge_at,
            json.dumps(version.lifecycle.to_json()),
        ),
    )


def _load_transport_certs(db: sqlite3.Connection) -> list[TransportCertRecord]:
    return [
        TransportCertRecord(identity, bytes(certificate), bytes(fingerprint), registered_at)
        for identity, certificate, fingerprint, registered_at in db.execute(
            "SELECT identity, certificate, fingerprint, registered_at FROM transport_certificates"
        )
    ]


def _load_keks(db: sqlite3.Connection) -> list[KekRecord]:
    versions: dict[str, list[KekVersion]] = collections.defaultdict(list)
    for kek, number, handle, created_at, state, document in db.execute(
        "SELECT kek, version, hsm_handle, created_at, state, lifecycle FROM kek_versions"
        " ORDER BY kek, version"
    ):
        lifecycle = Lifecycle.from_json(
            state, json.loads(document), default_usage=KEK_USAGES, created_at=created_at
        )
        versions[kek].append(KekVersion(kek, number, handle, created_at, lifecycle))
    return [
        KekRecord(name, created_at, created_by, tuple(versions[name]))
        for name, created_at, created_by in db.execute(
            "SELECT name, created_at, created_by FROM keks"
        )
    ]
