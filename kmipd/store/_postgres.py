"""The key store on PostgreSQL: any number of daemons, on any number of machines.

The same records, the same migrations (numbered as SQLite's) and the same
calls as ``kmipd.store._sqlite``; what SQLite gave for free with one writer
is designed here for many:

- Migrations are applied in one transaction under an advisory lock, so the
  daemon that starts first migrates and the others wait, then find nothing
  left to do.
- The change feed is numbered by a one-row counter that every feed-writing
  transaction locks first: numbers are handed out in commit order, so a
  ``changes_since`` reader can never skip an entry that commits late (a
  sequence would hand them out in start order).
- A lifecycle transition locks the key's row (``SELECT ... FOR UPDATE``)
  and is refused with StaleRecordError if the row no longer holds the
  lifecycle the service decided on: two daemons revoking and recovering
  one key at once cannot both win. Row locks rather than SERIALIZABLE:
  the conflict is always on one known row, a row lock makes exactly the
  contenders wait, and nothing else (creates, reads) pays for predicate
  locks or needs a retry loop.
- Idempotency keys are a primary key: a second create with the same key
  waits for the first to commit, then fails on the unique index and
  rolls its DEK back.
- Maintenance (dates, rotation, purge, feed pruning) runs where
  ``maintenance_turn`` says: the daemon holding a session advisory lock,
  which PostgreSQL releases when that daemon's connection dies.
- Every daemon keeps KEK metadata, transport certificates and recently
  used *wrapped* DEK rows in memory (never a plaintext key). Writes send a
  NOTIFY in their transaction; a listener thread evicts what changed as
  soon as it commits. While the listener is not connected nothing is
  served from memory, and when it reconnects everything is reloaded: a
  missed notification can only cost a round trip, never a stale answer.

psycopg is imported here only, so the embedded SQLite default needs
nothing but Python. Calls run on worker threads through a connection pool,
as the SQLite store's do.
"""

# ruff: noqa: S608 - queries interpolate only constant column lists and conditions;
# every value is a bound parameter.
from __future__ import annotations

import collections
import json
import logging
import os
import re
import secrets
import select
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import attrs
import psycopg
import psycopg_pool
import trio
from psycopg import errors as pg_errors

from kmipd.lifecycle import DEK_USAGES, KEK_USAGES, Lifecycle, State
from kmipd.store._certs import CertificateStore, IssuedCertificateRecord
from kmipd.store._commit import point_of_no_return
from kmipd.store._faults import StoreUnavailableError, WriteHealth
from kmipd.store._interface import StaleRecordError, StoreOutcomeUnknownError
from kmipd.store._managed import (
    AddOutcome,
    ManagedCertificateRecord,
    ManagedCertificateStore,
    ManagedCertificateVersion,
    expiry_rows,
)
from kmipd.store._signing import (
    SIGNING_KEYS_MIGRATION_POSTGRES,
    SigningKeyStore,
    SigningKeyVersion,
)
from kmipd.store._sqlite import (
    _VALUE_VERSION_COLUMNS,
    IDEMPOTENCY_RETENTION,
    UNCACHED,
    AlreadyExistsError,
    Change,
    DekRecord,
    IdempotencyKeyUsedError,
    KekRecord,
    KekVersion,
    ObjectRecord,
    RewrapJob,
    SecretDeletedError,
    SecretRecord,
    SecretVersion,
    StoreError,
    TransportCertRecord,
    _dek_row,
    _locate_filter,
    _object_from_row,
    _secret_version_from_row,
    _Uncached,
)

#: The schema, numbered as SQLite's MIGRATIONS: entry N here is the same change
#: as entry N there (a test holds them to the same length). Never edit one.
MIGRATIONS: tuple[str, ...] = (
    """
CREATE TABLE keks (
    name        TEXT PRIMARY KEY,
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL
);
CREATE TABLE kek_versions (
    kek         TEXT NOT NULL REFERENCES keks(name),
    version     INTEGER NOT NULL,
    hsm_handle  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (kek, version)
);
-- Ids compare bytewise, as in SQLite, whatever the database's collation: paging by
-- "id > cursor" must visit every row once.
CREATE TABLE deks (
    id          TEXT COLLATE "C" PRIMARY KEY,
    namespace   TEXT NOT NULL,
    kek_version INTEGER NOT NULL,
    wrapped     BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    FOREIGN KEY (namespace, kek_version) REFERENCES kek_versions(kek, version)
);
CREATE INDEX deks_by_kek_version ON deks(namespace, kek_version);
""",
    """
CREATE TABLE store_meta (
    name        TEXT PRIMARY KEY,
    value       TEXT NOT NULL
);
INSERT INTO store_meta (name, value)
    VALUES ('store_id', replace(gen_random_uuid()::text, '-', ''));
CREATE TABLE idempotency_keys (
    identity    TEXT NOT NULL,
    key         BYTEA NOT NULL,
    dek_id      TEXT NOT NULL REFERENCES deks(id),
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (identity, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys(created_at);
""",
    """
ALTER TABLE kek_versions ADD COLUMN state TEXT NOT NULL DEFAULT 'active';
ALTER TABLE kek_versions ADD COLUMN purge_at BIGINT;
ALTER TABLE kek_versions ADD COLUMN lifecycle TEXT NOT NULL DEFAULT '{}';
ALTER TABLE deks ADD COLUMN state TEXT NOT NULL DEFAULT 'active';
ALTER TABLE deks ADD COLUMN purge_at BIGINT;
ALTER TABLE deks ADD COLUMN lifecycle TEXT NOT NULL DEFAULT '{}';
CREATE INDEX deks_to_purge ON deks(purge_at) WHERE purge_at IS NOT NULL;
CREATE INDEX kek_versions_to_purge ON kek_versions(purge_at) WHERE purge_at IS NOT NULL;
CREATE TABLE changes (
    seq         BIGINT PRIMARY KEY,
    at          BIGINT NOT NULL,
    namespace   TEXT NOT NULL,
    dek_id      TEXT,
    kek_version INTEGER,
    state       TEXT NOT NULL
);
-- The feed's counter: locked by every transaction that appends, so numbers
-- follow commit order (see the module docstring).
CREATE TABLE feed_position (
    one         BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    seq         BIGINT NOT NULL
);
INSERT INTO feed_position (seq) VALUES (0);
CREATE TABLE rewrap_jobs (
    id          TEXT PRIMARY KEY,
    namespace   TEXT NOT NULL,
    target      INTEGER NOT NULL,
    cursor      TEXT NOT NULL DEFAULT '',
    rewrapped   INTEGER NOT NULL DEFAULT 0,
    skipped     INTEGER NOT NULL DEFAULT 0,
    remaining   INTEGER NOT NULL,
    state       TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL
);
""",
    """
CREATE TABLE transport_certificates (
    identity      TEXT PRIMARY KEY,
    certificate   BYTEA NOT NULL,
    fingerprint   BYTEA NOT NULL,
    registered_at BIGINT NOT NULL
);
""",
    # 5: KMIP attributes beside the DEK row (see SQLite's migration 5). SQLite orders
    # by rowid where PostgreSQL has none: deks.created_seq and object_names.position
    # keep insertion order for Locate and Get Attributes.
    """
ALTER TABLE deks ADD COLUMN created_seq BIGINT GENERATED ALWAYS AS IDENTITY;
CREATE TABLE object_attributes (
    dek_id        TEXT COLLATE "C" PRIMARY KEY REFERENCES deks(id),
    object_type   TEXT NOT NULL,
    algorithm     TEXT,
    length        INTEGER NOT NULL,
    usage_mask    BIGINT,
    object_group  TEXT,
    attributes    TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX object_attributes_by_group ON object_attributes(object_group);
CREATE TABLE object_names (
    name          TEXT NOT NULL,
    dek_id        TEXT COLLATE "C" NOT NULL REFERENCES deks(id),
    position      INTEGER NOT NULL,
    PRIMARY KEY (name, dek_id)
);
CREATE INDEX object_names_by_dek ON object_names(dek_id);
""",
    # 6: secrets (see SQLite's migration 6). Names compare bytewise ("C"), as in
    # SQLite, so list_secrets' (namespace, name) paging visits every row once.
    """
CREATE TABLE secrets (
    namespace   TEXT COLLATE "C" NOT NULL REFERENCES keks(name),
    name        TEXT COLLATE "C" NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    deleted_at  BIGINT,
    purge_at    BIGINT,
    PRIMARY KEY (namespace, name)
);
CREATE INDEX secrets_to_purge ON secrets(purge_at) WHERE purge_at IS NOT NULL;
CREATE INDEX secrets_by_name ON secrets(name);
CREATE TABLE secret_versions (
    namespace    TEXT COLLATE "C" NOT NULL,
    name         TEXT COLLATE "C" NOT NULL,
    version      INTEGER NOT NULL,
    kek_version  INTEGER NOT NULL,
    wrapped      BYTEA NOT NULL,
    size         INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    tags         TEXT NOT NULL DEFAULT '{}',
    enabled      BOOLEAN NOT NULL DEFAULT true,
    not_before   BIGINT,
    expires      BIGINT,
    created_at   BIGINT NOT NULL,
    created_by   TEXT NOT NULL,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (namespace, name, version),
    FOREIGN KEY (namespace, name) REFERENCES secrets(namespace, name) ON DELETE CASCADE,
    FOREIGN KEY (namespace, kek_version) REFERENCES kek_versions(kek, version)
);
CREATE INDEX secret_versions_by_kek_version ON secret_versions(namespace, kek_version);
""",
    # 7: certificates the online CA issued (see kmipd.store._certs). Serials compare
    # bytewise ("C"), as in SQLite, so list_issued_certificates pages visit each once.
    """
CREATE TABLE issued_certificates (
    serial        TEXT COLLATE "C" PRIMARY KEY,
    requested_by  TEXT NOT NULL,
    subject       TEXT NOT NULL,
    profile       TEXT NOT NULL,
    names         TEXT NOT NULL,
    key_type      TEXT NOT NULL,
    spki_sha256   BYTEA NOT NULL,
    not_before    BIGINT NOT NULL,
    not_after     BIGINT NOT NULL,
    issued_at     BIGINT NOT NULL,
    renewed_from  TEXT,
    certificate   BYTEA NOT NULL,
    revoked_at    BIGINT,
    revocation_reason TEXT
);
CREATE INDEX issued_by_subject ON issued_certificates(subject, not_after);
CREATE INDEX issued_revoked ON issued_certificates(not_after) WHERE revoked_at IS NOT NULL;
""",
    # 8: managed certificates (see kmipd.store._managed; SQLite's migration 8).
    """
CREATE TABLE managed_certificates (
    namespace   TEXT COLLATE "C" NOT NULL REFERENCES keks(name),
    name        TEXT COLLATE "C" NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    policy      TEXT,
    deleted_at  BIGINT,
    purge_at    BIGINT,
    PRIMARY KEY (namespace, name)
);
CREATE INDEX managed_certificates_to_purge ON managed_certificates(purge_at)
    WHERE purge_at IS NOT NULL;
CREATE TABLE managed_certificate_versions (
    namespace    TEXT COLLATE "C" NOT NULL,
    name         TEXT COLLATE "C" NOT NULL,
    version      INTEGER NOT NULL,
    kek_version  INTEGER NOT NULL,
    wrapped_key  BYTEA NOT NULL,
    key_type     TEXT NOT NULL,
    exportable   INTEGER NOT NULL,
    serial       TEXT NOT NULL,
    issuer       TEXT NOT NULL,
    subject      TEXT NOT NULL,
    names        TEXT NOT NULL,
    not_before   BIGINT NOT NULL,
    not_after    BIGINT NOT NULL,
    certificate  BYTEA NOT NULL,
    chain        TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    created_by   TEXT NOT NULL,
    revoked_at   BIGINT,
    revocation_reason TEXT,
    PRIMARY KEY (namespace, name, version),
    FOREIGN KEY (namespace, name) REFERENCES managed_certificates(namespace, name)
        ON DELETE CASCADE,
    FOREIGN KEY (namespace, kek_version) REFERENCES kek_versions(kek, version)
);
CREATE INDEX managed_certificate_versions_by_kek_version
    ON managed_certificate_versions(namespace, kek_version);
""",
    # 9: managed signing keys (kmipd.store._signing).
    SIGNING_KEYS_MIGRATION_POSTGRES,
    # 10: the software HSM's keyring, shared by every daemon (see SQLite's migration 10).
    # Each entry is sealed under the master key by the daemon that made it; this table
    # never sees a plaintext key.
    """
CREATE TABLE hsm_keyring (
    handle      TEXT COLLATE "C" PRIMARY KEY,
    kind        TEXT NOT NULL,
    label       TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    sealed      BYTEA NOT NULL
);
""",
)
SCHEMA_VERSION = len(MIGRATIONS)

#: Advisory lock keys (one 64-bit space per database): "kmipd" + a number.
MIGRATION_LOCK = 0x6B6D69706401
MAINTENANCE_LOCK = 0x6B6D69706402
#: NOTIFY channel; payloads "d:<dek id>", "k" (KEK metadata), "t" (transport certificates),
#: "h:<handle>" (a keyring entry removed),
#: each followed by "@<origin>": the sending store's random id, so a daemon skips what it
#: already applied to its own memory.
CHANNEL = "kmipd_changes"

_DEK_COLUMNS = "id, namespace, kek_version, wrapped, created_at, created_by, state, lifecycle"
_INSERT_DEK = f"INSERT INTO deks ({_DEK_COLUMNS}) VALUES ({', '.join(['%s'] * 8)})"
_DESTROYED = ("destroyed", "destroyed-compromised")
#: Deadlocks and serialization failures are retried; each attempt is a fresh transaction.
_RETRIED = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
_ATTEMPTS = 5

T = TypeVar("T")
Db = psycopg.Connection[Any]
log = logging.getLogger("kmipd.store")


def describe_conninfo(conninfo: str) -> str:
    """host/port/dbname/user of a connection string, never its password."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "(unparsable connection string)"
    shown = [f"{k}={parts[k]}" for k in ("host", "port", "dbname", "user") if k in parts]
    return " ".join(shown) or "(libpq defaults)"


class _DatabaseFaultError(Exception):
    """Raised on a worker thread; the trio side updates the health and raises the
    StoreUnavailableError (or StoreOutcomeUnknownError) the service answers with."""

    def __init__(self, cause: str, detail: str, *, unknown: bool = False, fault: bool = True):
        super().__init__(cause)
        self.cause, self.detail = cause, detail
        #: The connection broke during COMMIT: the write may have committed.
        self.unknown = unknown
        #: A fault of the database (health); False for a conflict that ran out of retries.
        self.fault = fault


#: SQLSTATEs (and classes) that are the database's condition, not kmipd's bug: the
#: transaction was rolled back, so a refusal promises "not applied".
_UNREACHABLE = "PostgreSQL unreachable"
_CAUSES = {
    "25006": "PostgreSQL is read-only (a standby, or default_transaction_read_only)",
    "42501": "PostgreSQL user may not write (permission denied)",  # fits status (64)
    "53100": "PostgreSQL's disk is full",
    "53200": "PostgreSQL is out of memory",
    "53300": "PostgreSQL has too many connections",
    "57P01": _UNREACHABLE,  # admin shutdown
    "57P02": _UNREACHABLE,  # crash shutdown
    "57P03": _UNREACHABLE,  # cannot connect now (starting up, shutting down)
    "57P04": _UNREACHABLE,  # database dropped
}


def _cause(exc: psycopg.Error) -> str | None:
    """What an operator must fix, or None for an error that is kmipd's own."""
    state = exc.sqlstate
    if state is None:
        # No answer from the server: the connection failed or broke.
        return _UNREACHABLE if isinstance(exc, psycopg.OperationalError) else None
    if state.startswith("08"):  # connection exception
        return _UNREACHABLE
    return _CAUSES.get(state)


def _error_text(exc: BaseException) -> str:
    """The first line of a libpq error: it never holds a password, only where it failed."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class PostgresStore:
    """The store in one PostgreSQL database, shared by every daemon pointed at it."""

    backend = "postgresql"
    shared = True

    def __init__(
        self,
        conninfo: str,
        *,
        cache_size: int = 10_000,
        pool_size: int = 8,
        connect_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._conninfo = conninfo
        self.where = describe_conninfo(conninfo)
        self.server = self.where
        self._clock = clock
        #: See Store.observer: told each transaction's kind and duration.
        self.observer: Callable[[str, float], None] | None = None
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[str, DekRecord] = collections.OrderedDict()
        #: KMIP attributes beside the rows (None: the key has none), under the same rules:
        #: evicted with the row by the same notification, cached only while listening.
        self._objects: collections.OrderedDict[str, ObjectRecord | None] = collections.OrderedDict()
        #: Guards the cache and the in-memory metadata: the listener thread edits them.
        self._lock = threading.Lock()
        self._listening = False
        #: Bumped by every eviction and every listener (re)connect: a row read from the
        #: database is cached only if nothing was evicted meanwhile, since the eviction
        #: may have been for a change newer than the row's snapshot.
        self._epoch = 0
        #: Bumped (under the lock) by every change this daemon makes to its in-memory
        #: KEKs or certificates: a load from the database that started before it may
        #: predate that change, and is redone rather than installed over it.
        self._metadata_generation = 0
        #: One metadata load at a time (listener, request path, a writer after its
        #: commit): each installs a snapshot at least as new as the one it replaces.
        self._load_lock = threading.Lock()
        self._reload_wanted = False
        self._origin = secrets.token_hex(8)
        #: Told (on the listener thread) the handle of each keyring entry another daemon
        #: removed, and None when notifications may have been missed (a reconnect).
        self.keyring_listeners: list[Callable[[str | None], None]] = []
        self._maintenance: Db | None = None
        self._certificates = _PostgresCertificates(self)
        self._managed = _PostgresManaged(self)
        #: Whether the database takes writes; a write failing for a cause an operator
        #: must fix (unreachable, standby, disk full, permission) faults it, and while
        #: faulted what needs the database is refused at once until a probe succeeds.
        self.health = WriteHealth("key store", self.where)
        #: While unreachable, reads are refused at once too (they would wait for the
        #: pool's timeout); a read-only or full database still serves reads.
        self._unreachable = False
        self._faulted = trio.Event()
        self.health.listeners.append(self._on_health_change)
        self._connect_timeout = connect_timeout
        self._pool = psycopg_pool.ConnectionPool(
            conninfo,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=connect_timeout,
            # A daemon must not stall forever on a dead server: libpq gives up connecting
            # after this, and a query on a dead TCP peer fails once keepalives notice.
            kwargs={
                "connect_timeout": max(1, int(connect_timeout)),
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "application_name": "kmipd",
            },
            name="kmipd-store",
        )
        self._limiter = trio.CapacityLimiter(pool_size)
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except psycopg_pool.PoolTimeout:
            problem = self._why_not_connected()
            self._pool.close()
            raise StoreError(f"cannot connect to PostgreSQL at {self.where}: {problem}") from None
        try:
            with self._pool.connection() as db:
                _migrate(db, self.where)
            with self._pool.connection() as db:
                self.store_id, self._keks, self._transport, self._feed_seq = _load_all(db)
        except psycopg.Error as exc:
            self._pool.close()
            raise StoreError(f"store {self.where}: {_error_text(exc)}") from None
        except BaseException:
            self._pool.close()
            raise
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = threading.Event()
        self._listener_up = threading.Event()
        self._listener = threading.Thread(
            target=self._listen_forever, name="kmipd-store-listener", daemon=True
        )
        self._listener.start()
        # Serve from memory from the first request on: wait (bounded) for the listener.
        # If it does not come up, the store still works, on round trips, until it does.
        self._listener_up.wait(connect_timeout)

    @classmethod
    def open(
        cls,
        conninfo: str,
        *,
        cache_size: int = 10_000,
        pool_size: int = 8,
        connect_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> PostgresStore:
        return cls(
            conninfo,
            cache_size=cache_size,
            pool_size=pool_size,
            connect_timeout=connect_timeout,
            clock=clock,
        )

    def _why_not_connected(self) -> str:
        try:
            psycopg.connect(self._conninfo, connect_timeout=2).close()
        except psycopg.Error as exc:
            return _error_text(exc)
        return "timed out"

    def __repr__(self) -> str:
        return f"PostgresStore({self.where!r})"

    def close(self) -> None:
        self._stopping.set()
        os.write(self._wake_w, b"x")
        self._listener.join(10)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._maintenance is not None:
            self._maintenance.close()
        self._pool.close()

    # -- running queries -------------------------------------------------------------

    def _run(self, fn: Callable[[Db], T], *, feed: bool, write: bool) -> T:
        """One transaction on a pooled connection (on a worker thread).

        Raises _DatabaseFaultError for the database's own condition: before COMMIT the
        transaction is rolled back (not applied); a connection that breaks during
        COMMIT leaves the outcome unknown, and says so.
        """
        for attempt in range(_ATTEMPTS):
            committing = False
            try:
                with self._pool.connection() as db:
                    if feed:
                        # First, always: a transaction that holds a row lock and then
                        # waits for the feed counter could deadlock against one that
                        # holds the counter and waits for the row.
                        db.execute("SELECT seq FROM feed_position FOR UPDATE")
                    result = fn(db)
                    committing = True
                    db.commit()
                    return result
            except _RETRIED:
                # Refused by the server (also at COMMIT): rolled back, so retried.
                if attempt == _ATTEMPTS - 1:
                    raise _DatabaseFaultError(
                        "transaction kept conflicting with other daemons'",
                        f"{_ATTEMPTS} attempts",
                        fault=False,
                    ) from None
            except psycopg_pool.PoolTimeout as exc:
                raise _DatabaseFaultError(_UNREACHABLE, _error_text(exc)) from None
            except StoreError:
                raise
            except psycopg.Error as exc:
                cause = _cause(exc)
                if cause is None:
                    raise StoreError(f"store {self.where}: {_error_text(exc)}") from None
                if cause == _UNREACHABLE:
                    self._pool.check()  # drop every connection the same failure broke
                    if committing and write:
                        raise _DatabaseFaultError(cause, _error_text(exc), unknown=True) from None
                    if not write and attempt == 0:
                        # A read is retried once on a fresh connection: after a restart
                        # or a failover the pool's idle connections are dead, the server
                        # is not.
                        continue
                raise _DatabaseFaultError(cause, _error_text(exc)) from None
        raise AssertionError("unreachable")

    async def _write(self, fn: Callable[[Db], T], *, feed: bool = False) -> T:
        if not self.health.ok:
            self.health.count_refused()
            raise StoreUnavailableError(self.health.cause or "cannot write")
        point_of_no_return()  # a request that writes is never cut off (and reported unapplied)
        result = await self._timed("write", lambda: self._run(fn, feed=feed, write=True))
        self.health.succeeded()
        return result

    async def _read(self, fn: Callable[[Db], T]) -> T:
        if self._unreachable:
            self.health.count_refused()
            raise StoreUnavailableError(self.health.cause or _UNREACHABLE)
        return await self._timed("read", lambda: self._run(fn, feed=False, write=False))

    async def _timed(self, kind: str, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return await self._on_thread(call)
        finally:
            if self.observer is not None:
                self.observer(kind, time.perf_counter() - started)

    async def _on_thread(self, call: Callable[[], T]) -> T:
        try:
            return await trio.to_thread.run_sync(call, limiter=self._limiter)
        except _DatabaseFaultError as exc:
            if exc.fault:
                self._unreachable = exc.cause == _UNREACHABLE
                self.health.failed(exc.cause, exc.detail)
            if exc.unknown:
                raise StoreOutcomeUnknownError(exc.cause, exc.detail) from None
            raise StoreUnavailableError(exc.cause, exc.detail) from None

    def _on_health_change(self) -> None:
        if not self.health.ok:
            self._faulted.set()
        else:
            self._unreachable = False

    async def probe_write(self) -> bool:
        """One tiny write on a fresh connection (the pool's may be dead); True if it
        went through, and then the pool's broken connections are replaced."""

        def touch() -> None:
            try:
                with psycopg.connect(
                    self._conninfo, connect_timeout=max(1, int(self._connect_timeout))
                ) as db:
                    _touch_probe(db, int(self._clock()))
            except psycopg.Error as exc:
                cause = _cause(exc)
                if cause is None:
                    raise StoreError(f"store {self.where}: {_error_text(exc)}") from None
                raise _DatabaseFaultError(cause, _error_text(exc)) from None
            self._pool.check()

        try:
            await trio.to_thread.run_sync(touch, limiter=self._limiter)
        except _DatabaseFaultError as exc:
            self._unreachable = exc.cause == _UNREACHABLE
            self.health.failed(exc.cause, exc.detail, refused=False)
            return False
        self.health.succeeded()
        return True

    async def watch_writes(self, interval: float = 1.0) -> None:
        """While the store is faulted, probe once per ``interval``; runs forever.

        Also while the listener is disconnected: a database that went away while
        no request came shows in health, status and systemd within ``interval``.
        """
        while True:
            with trio.move_on_after(interval):
                await self._faulted.wait()
            if not self._faulted.is_set():
                if not self._listening:
                    await self._probe_logged()
                continue
            while not self.health.ok:
                await trio.sleep(interval)  # a bounded probe rate, not a wait for an event
                await self._probe_logged()
                self.health.tick()
            self._faulted = trio.Event()

    async def _probe_logged(self) -> None:
        try:
            await self.probe_write()
        except StoreError as exc:
            log.error("store write probe failed unexpectedly: %s", exc)

    def pool_stats(self) -> dict[str, int]:
        """The pool's counters (pool_size, pool_available, requests_waiting, ...): metrics."""
        return dict(self._pool.get_stats())

    # -- the listener: notifications evict what other daemons changed --------------------

    def _listen_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self._conninfo, autocommit=True, connect_timeout=5, application_name="kmipd"
                ) as db:
                    db.execute(f"LISTEN {CHANNEL}")
                    # Listening from here on: whatever changed before is reloaded now.
                    self._reload_everything(db)
                    with self._lock:
                        self._listening = True
                    self._listener_up.set()
                    self._drain(db)
            except psycopg.Error:
                pass  # the server is down or failing over: retried below
            finally:
                with self._lock:
                    self._listening = False
                    self._epoch += 1
            # Not a wait for readiness: a reconnect pace, cut short by close().
            select.select([self._wake_r], [], [], 0.5)

    def _drain(self, db: Db) -> None:
        while not self._stopping.is_set():
            readable, _, _ = select.select([db.fileno(), self._wake_r], [], [], 5.0)
            if self._wake_r in readable:
                return
            if not readable:
                db.execute("SELECT 1")  # a dead connection shows itself here
                continue
            reload_keks = reload_certs = False
            for note in db.notifies(timeout=0):
                payload, _, origin = note.payload.rpartition("@")
                if payload.startswith("d:"):
                    # Our own writes replaced or evicted the row when they committed.
                    if origin != self._origin:
                        self._forget(payload[2:])
                elif payload == "k":
                    reload_keks = True
                elif payload == "t":
                    reload_certs = True
                elif payload.startswith("h:"):
                    self._keyring_changed(payload[2:])
            if reload_keks or reload_certs:
                self._reload_metadata(db)

    def _reload_metadata(self, db: Db, *, clear_cache: bool = False) -> None:
        """Load KEKs and certificates; install them unless a local patch raced the load
        (then load again: it may predate the patch's write)."""
        with self._load_lock:
            while True:
                generation = self._metadata_generation
                _, keks, certs, _ = _load_all(db)
                with self._lock:
                    if generation != self._metadata_generation:
                        continue
                    self._keks = keks
                    self._transport = certs
                    if clear_cache:
                        self._cache.clear()
                        self._objects.clear()
                        self._epoch += 1
                    return

    async def _reload_after_write(self, patch: Callable[[], object]) -> None:
        """After our own committed KEK or certificate write: memory from a load begun
        after the commit, so it holds this write and never an older copy than the
        listener installed (patching memory instead raced the listener's reload of our
        own notification: a version appended twice). If the database cannot be read
        right now, ``patch`` applies the write (idempotently) and the next request reloads."""
        try:
            await self._read(self._reload_metadata)
        except (StoreUnavailableError, StoreError):
            with self._lock:
                patch()
                self._metadata_generation += 1
            self._reload_wanted = True

    def _reload_everything(self, db: Db) -> None:
        self._reload_metadata(db, clear_cache=True)
        self._keyring_changed(None)

    def _keyring_changed(self, handle: str | None) -> None:
        for listener in self.keyring_listeners:
            listener(handle)

    def _notify(self, db: Db, payload: str) -> None:
        """Sent when the transaction commits, and only then."""
        db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{payload}@{self._origin}"))

    # -- the software HSM's keyring: sealed entries, opened only by the HSM backend --------

    async def keyring_entries(self, kind: str) -> dict[str, bytes]:
        """Every sealed entry of one kind ("kek", "signing", "check"), by handle."""

        def select_all(db: Db) -> dict[str, bytes]:
            rows = db.execute("SELECT handle, sealed FROM hsm_keyring WHERE kind = %s", (kind,))
            return {handle: bytes(sealed) for handle, sealed in rows}

        return await self._read(select_all)

    async def keyring_entry(self, kind: str, handle: str) -> bytes | None:
        def select_one(db: Db) -> bytes | None:
            row = db.execute(
                "SELECT sealed FROM hsm_keyring WHERE kind = %s AND handle = %s", (kind, handle)
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._read(select_one)

    async def add_keyring_entry(self, kind: str, handle: str, label: str, sealed: bytes) -> bool:
        """Insert an entry; False (and nothing changed) if the handle is taken."""

        def insert(db: Db) -> bool:
            cursor = db.execute(
                "INSERT INTO hsm_keyring (handle, kind, label, created_at, sealed)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (handle) DO NOTHING",
                (handle, kind, label, int(self._clock()), sealed),
            )
            return cursor.rowcount == 1

        return await self._write(insert)

    async def remove_keyring_entry(self, kind: str, handle: str) -> bool:
        """Delete an entry; every daemon's listener hears of it when it commits."""

        def delete(db: Db) -> bool:
            cursor = db.execute(
                "DELETE FROM hsm_keyring WHERE kind = %s AND handle = %s", (kind, handle)
            )
            if cursor.rowcount:
                self._notify(db, f"h:{handle}")
            return cursor.rowcount == 1

        return await self._write(delete)

    # -- KEKs --------------------------------------------------------------------

    def get_kek(self, name: str) -> KekRecord | None:
        return self._keks.get(name)

    def list_keks(self, prefix: str | None = None) -> list[KekRecord]:
        return sorted(
            (kek for kek in self._keks.values() if prefix is None or kek.name.startswith(prefix)),
            key=lambda kek: kek.name,
        )

    async def create_kek(self, name: str, first_version: KekVersion, created_by: str) -> KekRecord:
        record = KekRecord(name, first_version.created_at, created_by, (first_version,))

        def insert(db: Db) -> None:
            try:
                db.execute(
                    "INSERT INTO keks (name, created_at, created_by) VALUES (%s, %s, %s)",
                    (name, record.created_at, created_by),
                )
            except pg_errors.UniqueViolation:
                self._reload_wanted = True  # another daemon made it: refresh_if_changed loads it
                raise AlreadyExistsError(f"KEK {name!r} already exists") from None
            _insert_kek_version(db, first_version)
            self._notify(db, "k")

        await self._write(insert)
        await self._reload_after_write(lambda: self._keks.setdefault(name, record))
        return self._keks.get(name, record)

    async def add_kek_version(self, version: KekVersion) -> KekRecord:
        def insert(db: Db) -> None:
            try:
                _insert_kek_version(db, version)
            except pg_errors.UniqueViolation:
                self._reload_wanted = True
                raise AlreadyExistsError(
                    f"KEK {version.kek!r} already has a version {version.version}"
                ) from None
            self._notify(db, "k")

        await self._write(insert)
        await self._reload_after_write(lambda: self._patch_version(version))
        return self._keks[version.kek]

    async def set_kek_version_lifecycle(self, version: KekVersion, lifecycle: Lifecycle) -> None:
        def update(db: Db) -> None:
            row = db.execute(
                "SELECT state, lifecycle, created_at FROM kek_versions"
                " WHERE kek = %s AND version = %s FOR UPDATE",
                (version.kek, version.version),
            ).fetchone()
            if row is None or _lifecycle(row, KEK_USAGES) != version.lifecycle:
                self._reload_wanted = True
                raise StaleRecordError(
                    f"KEK {version.kek!r} version {version.version} changed meanwhile"
                )
            db.execute(
                "UPDATE kek_versions SET state = %s, purge_at = %s, lifecycle = %s"
                " WHERE kek = %s AND version = %s",
                (
                    lifecycle.state.value,
                    lifecycle.purge_at,
                    json.dumps(lifecycle.to_json()),
                    version.kek,
                    version.version,
                ),
            )
            self._record_change(db, version.kek, None, version.version, lifecycle.state)
            self._notify(db, "k")

        await self._write(update, feed=True)
        changed = attrs.evolve(version, lifecycle=lifecycle)
        await self._reload_after_write(lambda: self._patch_version(changed))

    def _patch_version(self, version: KekVersion) -> None:
        """Put a version into the in-memory KEK, replacing the one of its number (under
        the lock)."""
        kek = self._keks[version.kek]
        others = [v for v in kek.versions if v.version != version.version]
        versions = tuple(sorted((*others, version), key=lambda v: v.version))
        self._keks[version.kek] = attrs.evolve(kek, versions=versions)

    # -- key-transport certificates ----------------------------------------------

    def get_transport_cert(self, identity: str) -> TransportCertRecord | None:
        return self._transport.get(identity)

    async def put_transport_cert(self, record: TransportCertRecord) -> None:
        def upsert(db: Db) -> None:
            db.execute(
                "INSERT INTO transport_certificates (identity, certificate, fingerprint,"
                " registered_at) VALUES (%s, %s, %s, %s) ON CONFLICT (identity) DO UPDATE SET"
                " certificate = excluded.certificate, fingerprint = excluded.fingerprint,"
                " registered_at = excluded.registered_at",
                (record.identity, record.certificate, record.fingerprint, record.registered_at),
            )
            self._notify(db, "t")

        await self._write(upsert)
        await self._reload_after_write(lambda: self._transport.update({record.identity: record}))

    # -- DEKs --------------------------------------------------------------------

    async def put_dek(
        self,
        record: DekRecord,
        *,
        idempotency_key: bytes | None = None,
        kmip: ObjectRecord | None = None,
    ) -> None:
        """Insert a DEK; when this returns, PostgreSQL has committed it.

        With an idempotency key, a concurrent create with the same key (on
        any daemon) waits on the key's unique index until the first
        commits, then raises IdempotencyKeyUsedError and inserts nothing.
        """

        def insert(db: Db) -> None:
            try:
                db.execute(_INSERT_DEK, _dek_row(record))
            except pg_errors.UniqueViolation:
                raise AlreadyExistsError(f"DEK {record.dek_id!r} already exists") from None
            if kmip is not None:
                _write_object(db, kmip)
            if idempotency_key is None:
                return
            db.execute(
                "DELETE FROM idempotency_keys WHERE created_at < %s",
                (record.created_at - IDEMPOTENCY_RETENTION,),
            )
            try:
                db.execute(
                    "INSERT INTO idempotency_keys (identity, key, dek_id, created_at)"
                    " VALUES (%s, %s, %s, %s)",
                    (record.created_by, idempotency_key, record.dek_id, record.created_at),
                )
            except pg_errors.UniqueViolation:
                # Raising rolls the whole transaction back, the DEK insert with it.
                raise IdempotencyKeyUsedError from None

        epoch = self._epoch
        await self._write(insert)
        self._remember(record, epoch)
        self._remember_object(record.dek_id, kmip, epoch)

    async def put_deks(self, records: Sequence[DekRecord]) -> None:
        """Insert many DEKs in one transaction (a bulk import, or a benchmark filling
        the store): all are committed when this returns, or none is inserted.

        No idempotency keys, no KMIP attributes, not cached: rows to be read later.
        """

        def insert(db: Db) -> None:
            try:
                with db.cursor() as cursor:
                    cursor.executemany(_INSERT_DEK, [_dek_row(record) for record in records])
            except pg_errors.UniqueViolation as exc:
                raise AlreadyExistsError(
                    f"a DEK in the batch already exists ({_error_text(exc)})"
                ) from None

        await self._write(insert)

    def cached_dek(self, dek_id: str) -> DekRecord | None:
        """The wrapped row if it is in memory and the listener vouches for it."""
        if not self._listening:
            return None
        with self._lock:
            record = self._cache.get(dek_id)
            if record is not None:
                self._cache.move_to_end(dek_id)
            return record

    async def find_idempotent(self, identity: str, key: bytes) -> str | None:
        def select_one(db: Db) -> str | None:
            row = db.execute(
                "SELECT dek_id FROM idempotency_keys WHERE identity = %s AND key = %s",
                (identity, key),
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._read(select_one)

    async def get_dek(self, dek_id: str) -> DekRecord | None:
        record = self.cached_dek(dek_id)
        if record is not None:
            return record
        epoch = self._epoch

        def select_one(db: Db) -> DekRecord | None:
            row = db.execute(f"SELECT {_DEK_COLUMNS} FROM deks WHERE id = %s", (dek_id,)).fetchone()
            if row is None:
                return None
            found = _dek_from_row(row)
            kek = self._keks.get(found.namespace)
            if kek is None or kek.version(found.kek_version) is None:
                # Made under a KEK version created since our last notification.
                self._reload_metadata(db)
            return found

        record = await self._read(select_one)
        if record is not None:
            self._remember(record, epoch)
        return record

    async def set_dek_lifecycle(self, record: DekRecord, lifecycle: Lifecycle) -> DekRecord:
        # Evicted before, and cached after only if no notification came in between:
        # another daemon's change committed after ours may be heard before we return.
        self._forget(record.dek_id)
        epoch = self._epoch

        def update(db: Db) -> None:
            row = db.execute(
                "SELECT state, lifecycle, created_at FROM deks WHERE id = %s FOR UPDATE",
                (record.dek_id,),
            ).fetchone()
            if row is None or _lifecycle(row, DEK_USAGES) != record.lifecycle:
                self._forget(record.dek_id)
                raise StaleRecordError(f"DEK {record.dek_id} changed meanwhile")
            db.execute(
                "UPDATE deks SET state = %s, purge_at = %s, lifecycle = %s WHERE id = %s",
                (
                    lifecycle.state.value,
                    lifecycle.purge_at,
                    json.dumps(lifecycle.to_json()),
                    record.dek_id,
                ),
            )
            self._record_change(db, record.namespace, record.dek_id, None, lifecycle.state)
            self._notify(db, f"d:{record.dek_id}")

        await self._write(update, feed=True)
        updated = attrs.evolve(record, lifecycle=lifecycle)
        self._replace(updated, epoch)
        return updated

    async def rewrap_dek(self, record: DekRecord, version: int, wrapped: bytes) -> bool:
        def update(db: Db) -> bool:
            cursor = db.execute(
                "UPDATE deks SET kek_version = %s, wrapped = %s WHERE id = %s AND kek_version = %s",
                (version, wrapped, record.dek_id, record.kek_version),
            )
            self._notify(db, f"d:{record.dek_id}")
            return cursor.rowcount == 1

        changed = await self._write(update)
        self._forget(record.dek_id)
        return changed

    def _remember(self, record: DekRecord, epoch: int | None = None) -> None:
        """Cache a row; one read from the database only if ``epoch`` is still current
        and the listener is up (a notification it never heard cannot evict it)."""
        with self._lock:
            if epoch is not None and (epoch != self._epoch or not self._listening):
                return
            self._cache[record.dek_id] = record
            self._cache.move_to_end(record.dek_id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _replace(self, record: DekRecord, epoch: int) -> None:
        """After our own committed write: cache the new row if nothing was evicted since
        ``epoch``, and bump the epoch so no read that began before the commit caches
        the old one."""
        with self._lock:
            if epoch == self._epoch and self._listening:
                self._cache[record.dek_id] = record
                self._cache.move_to_end(record.dek_id)
            else:
                self._cache.pop(record.dek_id, None)
            self._objects.pop(record.dek_id, None)
            self._epoch += 1

    def _forget(self, dek_id: str) -> None:
        with self._lock:
            self._cache.pop(dek_id, None)
            self._objects.pop(dek_id, None)
            self._epoch += 1

    def _remember_object(self, dek_id: str, kmip: ObjectRecord | None, epoch: int) -> None:
        """Cache a key's attributes as read or written while ``epoch`` was current."""
        with self._lock:
            if epoch != self._epoch or not self._listening:
                return
            self._objects[dek_id] = kmip
            self._objects.move_to_end(dek_id)
            while len(self._objects) > self._cache_size:
                self._objects.popitem(last=False)

    # -- KMIP attributes -------------------------------------------------------------

    def cached_object(self, dek_id: str) -> ObjectRecord | _Uncached | None:
        """The key's KMIP attributes if memory knows them and the listener vouches for
        them (None: it has none), else UNCACHED; never touches the database."""
        with self._lock:
            if not self._listening or dek_id not in self._objects:
                return UNCACHED
            self._objects.move_to_end(dek_id)
            return self._objects[dek_id]

    async def get_object(self, dek_id: str) -> ObjectRecord | None:
        """The key's KMIP attributes, or None for a key that never had any (a native DEK)."""
        cached = self.cached_object(dek_id)
        if cached is not UNCACHED:
            return cached
        epoch = self._epoch

        def select_one(db: Db) -> ObjectRecord | None:
            row = db.execute(
                f"SELECT {_OBJECT_COLUMNS} FROM object_attributes WHERE dek_id = %s", (dek_id,)
            ).fetchone()
            if row is None:
                return None
            names = db.execute(
                "SELECT name FROM object_names WHERE dek_id = %s ORDER BY position", (dek_id,)
            ).fetchall()
            return _object_from_row(row, tuple(name for (name,) in names))

        found = await self._read(select_one)
        self._remember_object(dek_id, found, epoch)
        return found

    async def put_object(self, kmip: ObjectRecord) -> None:
        """Insert or replace a key's KMIP attributes (its DEK row must exist); every
        daemon's cached copy is evicted by the notification."""
        self._forget(kmip.dek_id)  # whatever the write's fate, reread next time
        epoch = self._epoch

        def write(db: Db) -> None:
            _write_object(db, kmip)
            self._notify(db, f"d:{kmip.dek_id}")

        await self._write(write)
        with self._lock:  # as _replace: no read begun before the commit caches the old one
            if epoch == self._epoch and self._listening:
                self._objects[kmip.dek_id] = kmip
                self._objects.move_to_end(kmip.dek_id)
                while len(self._objects) > self._cache_size:
                    self._objects.popitem(last=False)
            self._epoch += 1

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
            "%s",
            name=name,
            object_type=object_type,
            object_group=object_group,
            algorithm=algorithm,
            length=length,
            state=state,
        )

        def select_all(db: Db) -> list[str]:
            rows = db.execute(
                "SELECT d.id FROM deks d LEFT JOIN object_attributes o ON o.dek_id = d.id"
                f" WHERE {' AND '.join(where)} ORDER BY d.created_at, d.created_seq LIMIT %s",
                (*args, limit),
            ).fetchall()
            return [str(dek_id) for (dek_id,) in rows]

        return await self._read(select_all)

    # -- queries ----------------------------------------------------------------------

    async def locate_deks(
        self, *, namespace: str | None, state: State | None, after: str, limit: int
    ) -> list[DekRecord]:
        where, args = ["id > %s"], [after]
        if namespace is not None:
            where.append("namespace ~ %s")
            args.append(glob_to_regex(namespace))
        if state is not None:
            where.append("state = %s")
            args.append(state.value)

        def select_all(db: Db) -> list[DekRecord]:
            rows = db.execute(
                f"SELECT {_DEK_COLUMNS} FROM deks WHERE {' AND '.join(where)} ORDER BY id LIMIT %s",
                (*args, limit),
            ).fetchall()
            return [_dek_from_row(row) for row in rows]

        return await self._read(select_all)

    async def dependents(self, kek: str, version: int, limit: int) -> tuple[int, list[str]]:
        def select_all(db: Db) -> tuple[int, list[str]]:
            condition = "namespace = %s AND kek_version = %s AND state NOT IN (%s, %s)"
            (count,) = db.execute(
                f"SELECT count(*) FROM deks WHERE {condition}", (kek, version, *_DESTROYED)
            ).fetchone() or (0,)
            ids = [
                row[0]
                for row in db.execute(
                    f"SELECT id FROM deks WHERE {condition} ORDER BY id LIMIT %s",
                    (kek, version, *_DESTROYED, limit),
                )
            ]
            return int(count), ids

        return await self._read(select_all)

    async def changes_since(self, seq: int, limit: int) -> tuple[list[Change], int, int]:
        def select_all(db: Db) -> tuple[list[Change], int, int]:
            rows = db.execute(
                "SELECT seq, at, namespace, dek_id, kek_version, state FROM changes"
                " WHERE seq > %s ORDER BY seq LIMIT %s",
                (seq, limit),
            ).fetchall()
            (newest,) = db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone() or (0,)
            pruned = db.execute(
                "SELECT value FROM store_meta WHERE name = 'changes_pruned_through'"
            ).fetchone()
            return [Change(*row) for row in rows], int(newest), int(pruned[0]) if pruned else 0

        return await self._read(select_all)

    def _record_change(
        self, db: Db, namespace: str, dek_id: str | None, version: int | None, state: State
    ) -> None:
        """Number a state change (the transaction holds the feed counter: see _run)."""
        (seq,) = db.execute("UPDATE feed_position SET seq = seq + 1 RETURNING seq").fetchone() or (
            0,
        )
        db.execute(
            "INSERT INTO changes (seq, at, namespace, dek_id, kek_version, state)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (seq, int(self._clock()), namespace, dek_id, version, state.value),
        )

    async def prune_changes(self, max_age: int) -> int:
        before = int(self._clock()) - max_age

        def prune(db: Db) -> int:
            (through,) = db.execute(
                "SELECT max(seq) FROM changes WHERE at < %s"
                " AND seq < (SELECT max(seq) FROM changes)",
                (before,),
            ).fetchone() or (None,)
            if through is None:
                return 0
            count = db.execute("DELETE FROM changes WHERE seq <= %s", (through,)).rowcount
            db.execute(
                "INSERT INTO store_meta (name, value) VALUES ('changes_pruned_through', %s)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (str(through),),
            )
            return int(count)

        return await self._write(prune, feed=True)

    # -- destruction --------------------------------------------------------------------

    async def due_for_purge(self, now: int) -> tuple[list[DekRecord], list[KekVersion]]:
        def select_all(db: Db) -> tuple[list[DekRecord], list[tuple[str, int]]]:
            deks = [
                _dek_from_row(row)
                for row in db.execute(
                    f"SELECT {_DEK_COLUMNS} FROM deks WHERE purge_at <= %s", (now,)
                )
            ]
            versions = db.execute(
                "SELECT kek, version FROM kek_versions WHERE purge_at <= %s", (now,)
            ).fetchall()
            return deks, [(str(k), int(v)) for k, v in versions]

        deks, refs = await self._read(select_all)
        versions = []
        for name, number in refs:
            kek = self._keks.get(name)
            found = kek.version(number) if kek is not None else None
            if found is not None:
                versions.append(found)
        return deks, versions

    async def purge_dek(self, record: DekRecord, lifecycle: Lifecycle) -> None:
        def erase(db: Db) -> None:
            db.execute(
                "UPDATE deks SET wrapped = ''::bytea, state = %s, purge_at = NULL,"
                " lifecycle = %s WHERE id = %s",
                (lifecycle.state.value, json.dumps(lifecycle.to_json()), record.dek_id),
            )
            db.execute("DELETE FROM idempotency_keys WHERE dek_id = %s", (record.dek_id,))
            self._record_change(db, record.namespace, record.dek_id, None, lifecycle.state)
            self._notify(db, f"d:{record.dek_id}")

        await self._write(erase, feed=True)
        self._forget(record.dek_id)

    async def purge_kek_version(self, version: KekVersion, lifecycle: Lifecycle) -> list[str]:
        now = int(time.time())

        def erase(db: Db) -> list[str]:
            db.execute(
                "UPDATE kek_versions SET hsm_handle = '', state = %s, purge_at = NULL,"
                " lifecycle = %s WHERE kek = %s AND version = %s",
                (
                    lifecycle.state.value,
                    json.dumps(lifecycle.to_json()),
                    version.kek,
                    version.version,
                ),
            )
            self._record_change(db, version.kek, None, version.version, lifecycle.state)
            self._notify(db, "k")
            # Secret values under it could never be unwrapped again either.
            db.execute(
                "DELETE FROM secret_versions WHERE namespace = %s AND kek_version = %s",
                (version.kek, version.version),
            )
            orphans = db.execute(
                "SELECT id, state, lifecycle, created_at FROM deks"
                " WHERE namespace = %s AND kek_version = %s AND wrapped != ''::bytea"
                " ORDER BY id FOR UPDATE",
                (version.kek, version.version),
            ).fetchall()
            for dek_id, state, document, created in orphans:
                old = _lifecycle((state, document, created), DEK_USAGES)
                shredded = (
                    State.DESTROYED_COMPROMISED
                    if state in ("compromised", "destroyed-compromised")
                    else State.DESTROYED
                )
                gone = attrs.evolve(
                    old, state=shredded, purge_at=None, destroy_date=old.destroy_date or now
                )
                db.execute(
                    "UPDATE deks SET wrapped = ''::bytea, state = %s, purge_at = NULL,"
                    " lifecycle = %s WHERE id = %s",
                    (shredded.value, json.dumps(gone.to_json()), dek_id),
                )
                self._record_change(db, version.kek, dek_id, None, shredded)
                self._notify(db, f"d:{dek_id}")
            return [str(row[0]) for row in orphans]

        orphans = await self._write(erase, feed=True)
        gone = attrs.evolve(version, hsm_handle="", lifecycle=lifecycle)
        await self._reload_after_write(lambda: self._patch_version(gone))
        for dek_id in orphans:
            self._forget(dek_id)
        return orphans

    async def checkpoint(self) -> None:
        """Nothing to do: PostgreSQL cannot erase old row versions on demand.

        What a purge guarantees here is crypto-shredding (the KEK version is
        gone from the HSM), not overwritten bytes: see the README.
        """

    # -- rewrap jobs ------------------------------------------------------------------------

    async def create_job(self, job: RewrapJob) -> None:
        def insert(db: Db) -> None:
            db.execute(
                "INSERT INTO rewrap_jobs (id, namespace, target, cursor, rewrapped, skipped,"
                " remaining, state, created_at, updated_at, created_by)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                attrs.astuple(job),
            )

        await self._write(insert)

    async def commit_rewrap_batch(
        self, job: RewrapJob, updates: list[tuple[DekRecord, bytes]]
    ) -> RewrapJob:
        def apply(db: Db) -> RewrapJob:
            changed = 0
            for record, wrapped in updates:
                cursor = db.execute(
                    "UPDATE deks SET kek_version = %s, wrapped = %s"
                    " WHERE id = %s AND kek_version = %s",
                    (job.target, wrapped, record.dek_id, record.kek_version),
                )
                changed += cursor.rowcount
                self._notify(db, f"d:{record.dek_id}")
            (remaining,) = db.execute(
                "SELECT count(*) FROM deks WHERE namespace = %s AND kek_version < %s"
                " AND wrapped != ''::bytea",
                (job.namespace, job.target),
            ).fetchone() or (0,)
            saved = attrs.evolve(job, rewrapped=job.rewrapped + changed, remaining=remaining)
            db.execute(
                "UPDATE rewrap_jobs SET cursor = %s, rewrapped = %s, skipped = %s,"
                " remaining = %s, state = %s, updated_at = %s WHERE id = %s",
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
        def select_one(db: Db) -> RewrapJob | None:
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM rewrap_jobs WHERE id = %s", (job_id,))
            found = row.fetchone()
            return None if found is None else RewrapJob(*found)

        return await self._read(select_one)

    async def list_jobs(self, state: str | None = None) -> list[RewrapJob]:
        def select_all(db: Db) -> list[RewrapJob]:
            rows = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM rewrap_jobs"
                " WHERE %s::text IS NULL OR state = %s ORDER BY created_at",
                (state, state),
            ).fetchall()
            return [RewrapJob(*row) for row in rows]

        return await self._read(select_all)

    async def deks_to_rewrap(
        self, namespace: str, target: int, after: str, limit: int
    ) -> list[DekRecord]:
        def select_all(db: Db) -> list[DekRecord]:
            rows = db.execute(
                f"SELECT {_DEK_COLUMNS} FROM deks WHERE namespace = %s AND kek_version < %s"
                " AND id > %s AND wrapped != ''::bytea"
                " ORDER BY id LIMIT %s",
                (namespace, target, after, limit),
            ).fetchall()
            return [_dek_from_row(row) for row in rows]

        return await self._read(select_all)

    async def count_to_rewrap(self, namespace: str, target: int) -> int:
        def select_one(db: Db) -> int:
            (count,) = db.execute(
                "SELECT count(*) FROM deks WHERE namespace = %s AND kek_version < %s"
                " AND wrapped != ''::bytea",
                (namespace, target),
            ).fetchone() or (0,)
            return int(count)

        return await self._read(select_one)

    # -- secrets ---------------------------------------------------------------------

    async def add_secret_version(self, version: SecretVersion) -> SecretRecord:
        """Add a version (creating the secret at version 1); as SQLite's.

        The secret's row is locked first, so a set waits for a concurrent
        delete, recover or purge of the same secret and then sees its outcome;
        two sets taking one number meet on the primary key (AlreadyExistsError).
        """

        def insert(db: Db) -> SecretRecord:
            db.execute(
                "INSERT INTO secrets (namespace, name, created_at, created_by)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (version.namespace, version.name, version.created_at, version.created_by),
            )
            row = db.execute(
                "SELECT deleted_at FROM secrets WHERE namespace = %s AND name = %s FOR UPDATE",
                (version.namespace, version.name),
            ).fetchone()
            if row is not None and row[0] is not None:
                raise SecretDeletedError(
                    f"secret {version.name!r} in {version.namespace!r} is deleted"
                )
            try:
                db.execute(
                    f"INSERT INTO secret_versions ({_VALUE_VERSION_COLUMNS})"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    _secret_version_row(version),
                )
            except pg_errors.UniqueViolation:
                raise AlreadyExistsError(
                    f"secret {version.name!r} already has a version {version.version}"
                ) from None
            found = _load_secret(db, version.namespace, version.name)
            assert found is not None
            return found

        return await self._write(insert)

    async def get_secret(self, namespace: str, name: str) -> SecretRecord | None:
        return await self._read(lambda db: _load_secret(db, namespace, name))

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
        where, args = ["(namespace, name) > (%s, %s)"], [after[0], after[1]]
        if namespace is not None:
            where.append("namespace ~ %s")
            args.append(glob_to_regex(namespace))
        if name is not None:
            where.append("name = %s")
            args.append(name)
        if deleted is not None:
            where.append("deleted_at IS NOT NULL" if deleted else "deleted_at IS NULL")

        def select_all(db: Db) -> list[SecretRecord]:
            keys = db.execute(
                f"SELECT namespace, name FROM secrets WHERE {' AND '.join(where)}"
                " ORDER BY namespace, name LIMIT %s",
                (*args, limit),
            ).fetchall()
            found = [_load_secret(db, ns, key) for ns, key in keys]
            return [record for record in found if record is not None]

        return await self._read(select_all)

    async def update_secret_version(self, version: SecretVersion) -> SecretRecord:
        """Replace a version's attributes (never its value or wrapping)."""

        def update(db: Db) -> SecretRecord:
            cursor = db.execute(
                "UPDATE secret_versions SET content_type = %s, tags = %s, enabled = %s,"
                " not_before = %s, expires = %s, updated_at = %s"
                " WHERE namespace = %s AND name = %s AND version = %s",
                (
                    version.content_type,
                    json.dumps(version.tags, sort_keys=True),
                    version.enabled,
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

        return await self._write(update)

    async def set_secret_deleted(
        self, namespace: str, name: str, deleted_at: int | None, purge_at: int | None
    ) -> bool:
        """Soft-delete (both set) or recover (both None) a secret; False if it is gone."""

        def update(db: Db) -> bool:
            cursor = db.execute(
                "UPDATE secrets SET deleted_at = %s, purge_at = %s"
                " WHERE namespace = %s AND name = %s",
                (deleted_at, purge_at, namespace, name),
            )
            return cursor.rowcount == 1

        return await self._write(update)

    async def purge_secret(self, namespace: str, name: str) -> int:
        """Erase a secret and every version; how many versions went.

        Under the secret's row lock, and only while it is still deleted: a
        recover on another daemon after the caller read it wins
        (StaleRecordError, nothing erased). The values are blanked before the
        rows go; PostgreSQL keeps dead row versions until VACUUM (see checkpoint).
        """

        def erase(db: Db) -> int:
            row = db.execute(
                "SELECT deleted_at FROM secrets WHERE namespace = %s AND name = %s FOR UPDATE",
                (namespace, name),
            ).fetchone()
            if row is None:
                return 0
            if row[0] is None:
                raise StaleRecordError(f"secret {name!r} in {namespace!r} was recovered meanwhile")
            db.execute(
                "UPDATE secret_versions SET wrapped = ''::bytea WHERE namespace = %s AND name = %s",
                (namespace, name),
            )
            count = db.execute(
                "DELETE FROM secret_versions WHERE namespace = %s AND name = %s", (namespace, name)
            ).rowcount
            db.execute("DELETE FROM secrets WHERE namespace = %s AND name = %s", (namespace, name))
            return int(count)

        return await self._write(erase)

    async def secrets_due_for_purge(self, now: int) -> list[tuple[str, str]]:
        def select_all(db: Db) -> list[tuple[str, str]]:
            rows = db.execute(
                "SELECT namespace, name FROM secrets WHERE purge_at <= %s ORDER BY namespace, name",
                (now,),
            ).fetchall()
            return [(str(ns), str(name)) for ns, name in rows]

        return await self._read(select_all)

    async def secret_versions_to_rewrap(
        self, namespace: str, target: int, limit: int
    ) -> list[SecretVersion]:
        """The next batch of a namespace's secret versions under an older KEK version."""

        def select_all(db: Db) -> list[SecretVersion]:
            rows = db.execute(
                f"SELECT {_VALUE_VERSION_COLUMNS} FROM secret_versions"
                " WHERE namespace = %s AND kek_version < %s ORDER BY name, version LIMIT %s",
                (namespace, target, limit),
            ).fetchall()
            return [_secret_version_from_row(row) for row in rows]

        return await self._read(select_all)

    async def rewrap_secret_versions(
        self, target: int, updates: list[tuple[SecretVersion, bytes]]
    ) -> int:
        """Replace wrappings in one transaction, each only if still under the version read."""

        def apply(db: Db) -> int:
            changed = 0
            for version, wrapped in updates:
                changed += db.execute(
                    "UPDATE secret_versions SET kek_version = %s, wrapped = %s"
                    " WHERE namespace = %s AND name = %s AND version = %s AND kek_version = %s",
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

        return await self._write(apply)

    async def count_secret_versions_under(self, namespace: str, kek_version: int) -> int:
        """Secret versions wrapped under this KEK version: they depend on it."""

        def select_one(db: Db) -> int:
            (count,) = db.execute(
                "SELECT count(*) FROM secret_versions WHERE namespace = %s AND kek_version = %s",
                (namespace, kek_version),
            ).fetchone() or (0,)
            return int(count)

        return await self._read(select_one)

    # -- issued certificates (the online CA) --------------------------------------------

    async def put_issued_certificate(self, record: IssuedCertificateRecord) -> None:
        await self._certificates.put_issued_certificate(record)

    async def get_issued_certificate(self, serial: str) -> IssuedCertificateRecord | None:
        return await self._certificates.get_issued_certificate(serial)

    async def list_issued_certificates(
        self, *, subject: str | None, after: str, limit: int
    ) -> list[IssuedCertificateRecord]:
        return await self._certificates.list_issued_certificates(
            subject=subject, after=after, limit=limit
        )

    async def revoke_issued_certificate(self, serial: str, at: int, reason: str) -> bool:
        return await self._certificates.revoke_issued_certificate(serial, at, reason)

    async def revoked_certificates(self, now: int) -> list[tuple[str, int, str]]:
        return await self._certificates.revoked_certificates(now)

    async def issued_expiry_by_subject(self, now: int) -> dict[tuple[str, str], int]:
        return await self._certificates.issued_expiry_by_subject(now)

    # -- managed signing keys (kmipd.store._signing) -------------------------------------

    async def add_signing_key_version(self, version: SigningKeyVersion) -> bool:
        return await self._certificates.add_signing_key_version(version)

    async def signing_key_versions(self, namespace: str, name: str) -> list[SigningKeyVersion]:
        return await self._certificates.signing_key_versions(namespace, name)

    async def list_signing_keys(self) -> list[SigningKeyVersion]:
        return await self._certificates.list_signing_keys()

    async def update_signing_key_version(self, version: SigningKeyVersion) -> bool:
        return await self._certificates.update_signing_key_version(version)

    async def signing_keys_due_for_destruction(self, now: int) -> list[SigningKeyVersion]:
        return await self._certificates.signing_keys_due_for_destruction(now)

    # -- managed certificates (kmipd.store._managed) -------------------------------------

    async def add_managed_certificate_version(
        self, version: ManagedCertificateVersion, *, policy: str | None, create: bool
    ) -> AddOutcome:
        return await self._managed.add_managed_certificate_version(
            version, policy=policy, create=create
        )

    async def get_managed_certificate(
        self, namespace: str, name: str
    ) -> ManagedCertificateRecord | None:
        return await self._managed.get_managed_certificate(namespace, name)

    async def list_managed_certificates(
        self, *, namespace: str | None, deleted: bool, after: tuple[str, str], limit: int
    ) -> list[ManagedCertificateRecord]:
        return await self._managed.list_managed_certificates(
            namespace=namespace, deleted=deleted, after=after, limit=limit
        )

    async def set_managed_certificate_deleted(
        self, namespace: str, name: str, deleted_at: int | None, purge_at: int | None
    ) -> bool:
        return await self._managed.set_managed_certificate_deleted(
            namespace, name, deleted_at, purge_at
        )

    async def purge_managed_certificate(self, namespace: str, name: str) -> int:
        return await self._managed.purge_managed_certificate(namespace, name)

    async def managed_certificates_due_for_purge(self, now: int) -> list[tuple[str, str]]:
        return await self._managed.managed_certificates_due_for_purge(now)

    async def revoke_managed_certificate_version(
        self, namespace: str, name: str, version: int, at: int, reason: str
    ) -> bool:
        return await self._managed.revoke_managed_certificate_version(
            namespace, name, version, at, reason
        )

    async def managed_certificate_expiry(self) -> list[tuple[str, str, int, int]]:
        return await self._managed.managed_certificate_expiry()

    async def count_managed_keys_under(self, namespace: str, kek_version: int) -> int:
        return await self._managed.count_managed_keys_under(namespace, kek_version)

    async def managed_keys_to_rewrap(
        self, namespace: str, target: int, limit: int
    ) -> list[ManagedCertificateVersion]:
        return await self._managed.managed_keys_to_rewrap(namespace, target, limit)

    async def rewrap_managed_keys(
        self, target: int, updates: list[tuple[ManagedCertificateVersion, bytes]]
    ) -> int:
        return await self._managed.rewrap_managed_keys(target, updates)

    # -- health, sharing, maintenance ----------------------------------------------------------

    async def refresh_if_changed(self) -> None:
        """Reload KEK metadata if a write found another daemon got there first.

        Everything else another daemon changes arrives through the listener,
        so the request path pays nothing here.
        """
        if not self._reload_wanted and self._listening:
            return
        self._reload_wanted = False
        try:
            await self._read(self._reload_metadata)
        except StoreUnavailableError:
            # The request itself answers store-unavailable if it needs the database;
            # one that does not (status) still runs on the metadata we have.
            self._reload_wanted = True

    async def maintenance_turn(self) -> bool:
        """Whether this daemon runs maintenance now: it holds the advisory lock.

        The lock is held by a dedicated session: if this daemon dies, its
        session ends, PostgreSQL releases the lock, and the next daemon to
        ask takes over.
        """

        def take() -> bool:
            db = self._maintenance
            if db is not None and not db.closed and not db.broken:
                try:
                    db.execute("SELECT 1")
                except psycopg.Error:
                    db.close()
                else:
                    return True
            self._maintenance = None
            try:
                db = psycopg.connect(
                    self._conninfo, autocommit=True, connect_timeout=5, application_name="kmipd"
                )
            except psycopg.Error:
                return False
            try:
                row = db.execute("SELECT pg_try_advisory_lock(%s)", (MAINTENANCE_LOCK,)).fetchone()
            except psycopg.Error:
                row = None  # the server went away meanwhile: not our turn, ask again later
            if row is None or not row[0]:
                db.close()
                return False
            self._maintenance = db
            return True

        return await trio.to_thread.run_sync(take, limiter=self._limiter)

    async def count_deks(self) -> int:
        def select_one(db: Db) -> int:
            (count,) = db.execute("SELECT count(*) FROM deks").fetchone() or (0,)
            return int(count)

        return await self._read(select_one)

    async def count_by_state(self) -> dict[tuple[str, str], int]:
        def select_all(db: Db) -> dict[tuple[str, str], int]:
            counts = {}
            for kind, table in (("dek", "deks"), ("kek-version", "kek_versions")):
                for state, count in db.execute(
                    f"SELECT state, count(*) FROM {table} GROUP BY state"
                ):
                    counts[(kind, str(state))] = int(count)
            return counts

        return await self._read(select_all)

    async def check(self) -> None:
        """Raise StoreUnavailableError unless the database answers, writable (not a
        standby), and no write fault is in progress."""
        if not self.health.ok:
            raise StoreUnavailableError(self.health.cause or "cannot write")

        def probe(db: Db) -> None:
            row = db.execute("SELECT pg_is_in_recovery()").fetchone()
            # Which of several hosts libpq chose (target_session_attrs): status names it.
            host = db.info.host
            self.server = f"{host}:{db.info.port}" if not host.startswith("/") else host
            if row is not None and row[0]:
                # The cause first and short: status shows it in 64 characters.
                raise StoreUnavailableError(
                    "PostgreSQL is a standby (read-only)",
                    f"{self.server}; point kmipd at the primary (target_session_attrs=read-write)",
                )

        await self._read(probe)

    async def is_primary(self) -> bool:
        def probe(db: Db) -> bool:
            row = db.execute("SELECT NOT pg_is_in_recovery()").fetchone()
            return bool(row and row[0])

        return await self._read(probe)


_JOB_COLUMNS = (
    "id, namespace, target, cursor, rewrapped, skipped, remaining, state,"
    " created_at, updated_at, created_by"
)


class _QmarkConnection:
    """A psycopg connection that takes sqlite3's "?" parameters: kmipd.store._certs'
    statements are plain SQL both engines run, written once, for sqlite3."""

    def __init__(self, db: Db) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self._db.execute(sql.replace("?", "%s"), params)


class _PostgresCertificates(CertificateStore, SigningKeyStore):
    """The issued-certificate and signing-key methods (kmipd.store._certs, _signing),
    written once for sqlite3, run on the PostgreSQL store."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._store._write(lambda db: fn(_as_sqlite(db)))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._store._read(lambda db: fn(_as_sqlite(db)))


class _PostgresManaged(ManagedCertificateStore):
    """The managed-certificate methods of kmipd.store._managed, run on the PostgreSQL store."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._store._write(lambda db: fn(_as_sqlite(db)))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._store._read(lambda db: fn(_as_sqlite(db)))


def _as_sqlite(db: Db) -> sqlite3.Connection:
    # Only execute() and what its cursor answers (fetchone, fetchall, rowcount) are used.
    return cast(sqlite3.Connection, _QmarkConnection(db))


def glob_to_regex(pattern: str) -> str:
    """SQLite's GLOB (``*``, ``?``, ``[...]``, case-sensitive) as an anchored POSIX regex."""
    out, i = ["^"], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[" and (end := _bracket_end(pattern, i)) != -1:
            negate = pattern[i + 1] == "^"
            body = pattern[i + (2 if negate else 1) : end]
            # A leading "]" is a member, in both; everything else is literal here.
            members = "".join("\\" + c if not c.isalnum() and c != "-" else c for c in body)
            out.append(f"[{'^' if negate else ''}{members}]")
            i = end
        else:
            out.append("\\" + char if not char.isalnum() else char)
        i += 1
    out.append("$")
    return "".join(out)


def _bracket_end(pattern: str, start: int) -> int:
    """Where the set opened at ``start`` closes (a "]" first in it is a member), or -1."""
    first = start + 1
    if pattern[first : first + 1] == "^":
        first += 1
    return pattern.find("]", first + 1)


def _migrate(db: Db, where: str) -> None:
    """Apply the missing migrations, in one transaction, under the migration lock."""
    if schema_version(db) == SCHEMA_VERSION:
        return  # the usual case; needs no lock, and no privilege beyond reading
    # A session lock, taken in a transaction of its own: the migration's transaction
    # then starts after the lock is held, so it sees the catalog as another daemon's
    # migration (committed while we waited) left it.
    db.commit()
    db.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    db.commit()
    try:
        _migrate_locked(db, where)
        db.commit()
    finally:
        db.rollback()
        db.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        db.commit()


def _migrate_locked(db: Db, where: str) -> None:
    found = schema_version(db)
    if found is None:
        db.execute("CREATE TABLE kmipd_schema (version INTEGER NOT NULL)")
    row = None if found is None else (found,)
    version = found or 0
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store {where} has schema version {version}, newer than this kmipd "
            f"({SCHEMA_VERSION}); upgrade kmipd"
        )
    if version == SCHEMA_VERSION:
        return
    for migration in MIGRATIONS[version:]:
        db.execute(migration.encode())
    if row is None:
        db.execute("INSERT INTO kmipd_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
    else:
        db.execute("UPDATE kmipd_schema SET version = %s", (SCHEMA_VERSION,))


def schema_version(db: Db) -> int | None:
    """The store's schema version, None if kmipd never migrated this database."""
    row = db.execute("SELECT to_regclass('kmipd_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return None
    found = db.execute("SELECT version FROM kmipd_schema").fetchone()
    return None if found is None else int(found[0])


def _lifecycle(row: tuple[Any, ...], usages: frozenset[Any]) -> Lifecycle:
    state, document, created_at = row
    return Lifecycle.from_json(
        state, json.loads(document), default_usage=usages, created_at=created_at
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
        version.enabled,
        version.not_before,
        version.expires,
        version.created_at,
        version.created_by,
        version.updated_at,
    )


def _load_secret(db: Db, namespace: str, name: str) -> SecretRecord | None:
    row = db.execute(
        "SELECT created_at, created_by, deleted_at, purge_at FROM secrets"
        " WHERE namespace = %s AND name = %s",
        (namespace, name),
    ).fetchone()
    if row is None:
        return None
    versions = tuple(
        _secret_version_from_row(r)
        for r in db.execute(
            f"SELECT {_VALUE_VERSION_COLUMNS} FROM secret_versions"
            " WHERE namespace = %s AND name = %s ORDER BY version",
            (namespace, name),
        ).fetchall()
    )
    created_at, created_by, deleted_at, purge_at = row
    return SecretRecord(namespace, name, created_at, created_by, deleted_at, purge_at, versions)


def _dek_from_row(row: tuple[Any, ...]) -> DekRecord:
    dek_id, namespace, version, wrapped, created_at, created_by, state, document = row
    lifecycle = Lifecycle.from_json(
        state, json.loads(document), default_usage=DEK_USAGES, created_at=created_at
    )
    return DekRecord(dek_id, namespace, version, bytes(wrapped), created_at, created_by, lifecycle)


_OBJECT_COLUMNS = "dek_id, object_type, algorithm, length, usage_mask, object_group, attributes"


def _write_object(db: Db, kmip: ObjectRecord) -> None:
    db.execute(
        f"INSERT INTO object_attributes ({_OBJECT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (dek_id) DO UPDATE SET object_type = excluded.object_type,"
        " algorithm = excluded.algorithm, length = excluded.length,"
        " usage_mask = excluded.usage_mask, object_group = excluded.object_group,"
        " attributes = excluded.attributes",
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
    db.execute("DELETE FROM object_names WHERE dek_id = %s", (kmip.dek_id,))
    with db.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO object_names (name, dek_id, position) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            [(name, kmip.dek_id, n) for n, name in enumerate(kmip.names)],
        )


def _touch_probe(db: Db, now: int) -> None:
    """The smallest real write: one row of store_meta (refused on a standby too)."""
    db.execute(
        "INSERT INTO store_meta (name, value) VALUES ('write_probe', %s)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (str(now),),
    )


def _insert_kek_version(db: Db, version: KekVersion) -> None:
    db.execute(
        "INSERT INTO kek_versions (kek, version, hsm_handle, created_at, state, purge_at,"
        " lifecycle) VALUES (%s, %s, %s, %s, %s, %s, %s)",
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


def _load_all(
    db: Db,
) -> tuple[str, dict[str, KekRecord], dict[str, TransportCertRecord], int]:
    row = db.execute("SELECT value FROM store_meta WHERE name = 'store_id'").fetchone()
    store_id = "" if row is None else str(row[0])
    keks = {kek.name: kek for kek in _load_keks(db)}
    certs = {record.identity: record for record in _load_transport_certs(db)}
    (seq,) = db.execute("SELECT seq FROM feed_position").fetchone() or (0,)
    return store_id, keks, certs, int(seq)


def _load_transport_certs(db: Db) -> list[TransportCertRecord]:
    return [
        TransportCertRecord(identity, bytes(certificate), bytes(fingerprint), registered_at)
        for identity, certificate, fingerprint, registered_at in db.execute(
            "SELECT identity, certificate, fingerprint, registered_at FROM transport_certificates"
        )
    ]


def _load_keks(db: Db) -> list[KekRecord]:
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


#: Every table the migrations make: check-config checks this user's privileges on each.
MIGRATION_TABLES = tuple(re.findall(r"CREATE TABLE (\w+)", "".join(MIGRATIONS)))


def read_managed_expiry(conninfo: str) -> list[tuple[str, str, int, int]]:
    """kmipd.store._managed.expiry_rows on a PostgreSQL store (check-config)."""
    with psycopg.connect(conninfo, connect_timeout=5, autocommit=True) as db:
        if schema_version(db) is None:
            return []
        found = db.execute("SELECT to_regclass('managed_certificate_versions')").fetchone()
        return expiry_rows(_as_sqlite(db)) if found and found[0] else []


def _missing_privileges(db: Db, user: str, tables: Sequence[str]) -> list[str]:
    """One line per set of privileges ``user`` lacks, naming its tables and the GRANT
    that gives them (a read-only user: one line, not one per table and privilege)."""
    privileges = ("SELECT", "INSERT", "UPDATE", "DELETE")
    lacking: dict[tuple[str, ...], list[str]] = {}
    for table in tables:
        missing = []
        for privilege in privileges:
            allowed = db.execute(
                "SELECT to_regclass(%s) IS NULL OR has_table_privilege(%s, %s)",
                (table, table, privilege),
            ).fetchone()
            if not (allowed and allowed[0]):
                missing.append(privilege)
        if missing:
            lacking.setdefault(tuple(missing), []).append(table)
    problems = []
    for denied, names in lacking.items():
        which = (
            ", ".join(names)
            if len(names) <= 3
            else f"{len(names)} tables ({', '.join(names[:3])}, ...)"
        )
        reads = ": it may read but not write" if denied == privileges[1:] else ""
        problems.append(
            f"store.conninfo: {user} lacks {', '.join(denied)} on {which}{reads}"
            f" (GRANT {', '.join(privileges)} ON ALL TABLES IN SCHEMA public TO {user})"
        )
    return problems


def read_keyring_check(conninfo: str) -> bytes | None:
    """The shared keyring's master key check (sealed), or None if there is none yet."""
    try:
        with psycopg.connect(conninfo, connect_timeout=5, autocommit=True) as db:
            found = db.execute("SELECT to_regclass('hsm_keyring')").fetchone()
            if not (found and found[0]):
                return None
            row = db.execute(
                "SELECT sealed FROM hsm_keyring WHERE kind = 'check' AND handle = %s",
                ("master-key-check",),  # kmipd.hsm._software's _CHECK_HANDLE
            ).fetchone()
    except psycopg.Error as exc:
        raise StoreError(f"cannot read the keyring at {describe_conninfo(conninfo)}") from exc
    return None if row is None else bytes(row[0])


def reseal_keyring(conninfo: str, reseal: Callable[[str, str, bytes], bytes]) -> int:
    """Every keyring entry replaced by ``reseal(kind, handle, sealed)``, in one transaction
    (``kmipd hsm rekey``); refused while a daemon is connected to the database, since it
    would go on sealing under the old master key. Returns how many entries."""
    where = describe_conninfo(conninfo)
    try:
        with psycopg.connect(conninfo, connect_timeout=5, application_name="kmipd-rekey") as db:
            # Readers wait too: a daemon starting meanwhile then reads the new check entry.
            db.execute("LOCK TABLE hsm_keyring IN ACCESS EXCLUSIVE MODE")
            (daemons,) = db.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'kmipd'"
            ).fetchone() or (0,)
            if daemons:
                raise StoreError(
                    f"{daemons} kmipd connection(s) to {where} are open: stop every daemon "
                    "on this store first"
                )
            rows = db.execute("SELECT handle, kind, sealed FROM hsm_keyring").fetchall()
            for handle, kind, sealed in rows:
                db.execute(
                    "UPDATE hsm_keyring SET sealed = %s WHERE handle = %s",
                    (reseal(str(kind), str(handle), bytes(sealed)), handle),
                )
    except psycopg.Error as exc:
        raise StoreError(f"store {where}: {_error_text(exc)}") from None
    return len(rows)


def check_database(conninfo: str) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a database as a daemon's store: for ``check-config``.

    Connects once: the server answers, is a primary, holds a schema this
    kmipd can use, and lets this user read and write every table.
    """
    where = describe_conninfo(conninfo)
    problems: list[str] = []
    warnings: list[str] = []
    try:
        db = psycopg.connect(conninfo, connect_timeout=5, autocommit=True)
    except psycopg.Error as exc:
        return [f"store.conninfo: cannot connect to PostgreSQL at {where}: {_error_text(exc)}"], []
    with db:
        row = db.execute("SELECT pg_is_in_recovery(), current_user").fetchone()
        standby, user = (bool(row[0]), str(row[1])) if row else (False, "?")
        if standby:
            problems.append(
                f"store.conninfo: {where} is a standby (read-only); point kmipd at the "
                "primary, e.g. several hosts with target_session_attrs=read-write"
            )
        version = schema_version(db)
        if version is None:
            created = db.execute("SELECT has_schema_privilege('public', 'CREATE')").fetchone()
            if not (created and created[0]):
                problems.append(
                    f"store.conninfo: the database has no kmipd schema yet and {user} may not "
                    "create tables in schema public (GRANT CREATE ON SCHEMA public TO ...)"
                )
            else:
                warnings.append(
                    f"store.conninfo: the database has no kmipd schema yet; the first daemon "
                    f"creates it (schema version {SCHEMA_VERSION})"
                )
        elif version > SCHEMA_VERSION:
            problems.append(
                f"store.conninfo: the store has schema version {version}, newer than this "
                f"kmipd ({SCHEMA_VERSION}); upgrade kmipd"
            )
        else:
            if version < SCHEMA_VERSION:
                warnings.append(
                    f"store.conninfo: schema version {version}; the next daemon to start "
                    f"migrates it to {SCHEMA_VERSION}"
                )
            tables = MIGRATION_TABLES if version == SCHEMA_VERSION else ("deks", "keks")
            problems.extend(_missing_privileges(db, user, tables))
        parts = psycopg.conninfo.conninfo_to_dict(conninfo)
        host = str(parts.get("host", ""))
        tcp = any(h and not h.startswith("/") for h in host.split(","))
        if tcp and parts.get("sslmode") != "verify-full":
            warnings.append(
                "store.conninfo: PostgreSQL over TCP without sslmode=verify-full: wrapped "
                "keys and the password cross the network unauthenticated"
            )
    return problems, warnings
