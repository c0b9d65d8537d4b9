"""The key store: wrapped DEKs and KEK metadata in one SQLite file.

Only wrapped key material ever reaches this file. SQLite runs in WAL mode
with ``synchronous=FULL``, so a DEK whose insert returned has reached the
disk and survives ``kill -9`` of the daemon; ``secure_delete`` overwrites
deleted rows instead of leaving them in free pages.

SQLite calls block, so they run on worker threads (one connection for
writes, one for reads: WAL lets the reader proceed while a write commits).
Reads of recently used DEKs are served from a bounded in-memory cache of
*wrapped* records, which spares the ~0.1 ms thread round trip on the hot
path; one daemon owns the file (an exclusive lock enforces it), so the
cache cannot go stale behind its back.
"""

from __future__ import annotations

import collections
import fcntl
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import attrs
import trio

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
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The store cannot be opened or used; the message names the file and the problem."""


class AlreadyExistsError(StoreError):
    pass


class IdempotencyKeyUsedError(StoreError):
    """A create with this idempotency key was already applied."""


#: How long an idempotency key is remembered: far longer than any retry.
IDEMPOTENCY_RETENTION = 24 * 3600


@attrs.frozen
class DekRecord:
    dek_id: str
    namespace: str
    kek_version: int
    wrapped: bytes = attrs.field(repr=False)
    created_at: int
    created_by: str


@attrs.frozen
class KekVersion:
    kek: str
    version: int
    hsm_handle: str
    created_at: int


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


T = TypeVar("T")


class KeyStore:
    """The store. One daemon owns it, or (``shared``) several on one host serve it together.

    Shared mode is for availability: each daemon takes a shared lock instead
    of an exclusive one, reads DEK rows from the database instead of its
    cache, and reloads KEK metadata whenever another connection committed
    (``refresh_if_changed``), so what one daemon creates the others serve.
    """

    def __init__(self, path: Path, *, cache_size: int = 10_000, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        self._lock_fd = _lock(path, shared=shared)
        try:
            self._writer = _connect(path)
            self._reader = _connect(path)
        except sqlite3.Error as exc:
            os.close(self._lock_fd)
            raise StoreError(f"cannot open store {path}: {exc}") from None
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(1)
        self._cache: collections.OrderedDict[str, DekRecord] = collections.OrderedDict()
        self._cache_size = cache_size
        self._keks = {kek.name: kek for kek in _load_keks(self._reader)}
        self._data_version = _data_version(self._reader)
        (self.store_id,) = self._reader.execute(
            "SELECT value FROM store_meta WHERE name = 'store_id'"
        ).fetchone()

    @classmethod
    def open(cls, path: Path, *, cache_size: int = 10_000, shared: bool = False) -> KeyStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path, cache_size=cache_size, shared=shared)

    def __repr__(self) -> str:
        return f"KeyStore({str(self.path)!r})"

    def close(self) -> None:
        self._writer.close()
        self._reader.close()
        os.close(self._lock_fd)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._writer:  # one transaction: commit on success, roll back on error
                return fn(self._writer)

        return await trio.to_thread.run_sync(run, limiter=self._write_limiter)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await trio.to_thread.run_sync(fn, self._reader, limiter=self._read_limiter)

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

    # -- DEKs --------------------------------------------------------------------

    async def put_dek(self, record: DekRecord, *, idempotency_key: bytes | None = None) -> None:
        """Insert a DEK; when this returns, the row is durable.

        With an idempotency key, the key is recorded in the same transaction
        (for the DEK's creator); a key already used raises
        IdempotencyKeyUsedError and inserts nothing.
        """

        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO deks (id, namespace, kek_version, wrapped, created_at, created_by)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        record.dek_id,
                        record.namespace,
                        record.kek_version,
                        record.wrapped,
                        record.created_at,
                        record.created_by,
                    ),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExistsError(f"DEK {record.dek_id!r} already exists") from None
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

    def cached_dek(self, dek_id: str) -> DekRecord | None:
        """The row if it is in the cache; never touches the database."""
        if self.shared:
            return None  # another daemon may have changed it
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
            row = db.execute(
                "SELECT id, namespace, kek_version, wrapped, created_at, created_by"
                " FROM deks WHERE id = ?",
                (dek_id,),
            ).fetchone()
            return None if row is None else DekRecord(*row)

        record = await self._read(select)
        if record is not None:
            self._remember(record)
        return record

    async def refresh_if_changed(self) -> None:
        """Shared mode: reload KEK metadata if any other connection committed since."""

        def check(db: sqlite3.Connection) -> list[KekRecord] | None:
            version = _data_version(db)
            if version == self._data_version:
                return None
            self._data_version = version
            return _load_keks(db)

        keks = await self._read(check)
        if keks is not None:
            self._keks = {kek.name: kek for kek in keks}

    def _remember(self, record: DekRecord) -> None:
        if self.shared:
            return
        self._cache[record.dek_id] = record
        self._cache.move_to_end(record.dek_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def count_deks(self) -> int:
        return await self._read(
            lambda db: int(db.execute("SELECT count(*) FROM deks").fetchone()[0])
        )

    async def check(self) -> None:
        """Raise StoreError unless the database answers a trivial query."""
        try:
            await self._read(lambda db: db.execute("SELECT 1").fetchone())
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path} does not answer: {exc}") from None


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


def _lock(path: Path, *, shared: bool) -> int:
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
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


def _data_version(db: sqlite3.Connection) -> int:
    """Changes whenever another connection commits (SQLite's PRAGMA data_version)."""
    return int(db.execute("PRAGMA data_version").fetchone()[0])


def _insert_kek_version(db: sqlite3.Connection, version: KekVersion) -> None:
    db.execute(
        "INSERT INTO kek_versions (kek, version, hsm_handle, created_at) VALUES (?, ?, ?, ?)",
        (version.kek, version.version, version.hsm_handle, version.created_at),
    )


def _load_keks(db: sqlite3.Connection) -> list[KekRecord]:
    versions: dict[str, list[KekVersion]] = collections.defaultdict(list)
    for row in db.execute(
        "SELECT kek, version, hsm_handle, created_at FROM kek_versions ORDER BY kek, version"
    ):
        versions[row[0]].append(KekVersion(*row))
    return [
        KekRecord(name, created_at, created_by, tuple(versions[name]))
        for name, created_at, created_by in db.execute(
            "SELECT name, created_at, created_by FROM keks"
        )
    ]
