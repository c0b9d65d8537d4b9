"""Managed signing keys: one row per version, the private half only as an HSM handle.

A signing key lives in a namespace under a name; rotating adds a version (a
new key pair in the HSM backend). A row holds the backend's handle, the
public half (SPKI DER, public) and the version's lifecycle; never private key
material, which stays in the backend (sealed under the master key by the
software keyring, a non-extractable object on a PKCS#11 token).

The statements are plain SQL both engines run, written once for sqlite3's
``?`` parameters (the PostgreSQL store runs them through its qmark adapter).
"""

# ruff: noqa: S608 - queries interpolate only the constant column list.
from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from kmipd.lifecycle import SIGNING_USAGES, Lifecycle

T = TypeVar("T")

#: Migration 9 of the SQLite store.
SIGNING_KEYS_MIGRATION = """
CREATE TABLE signing_keys (
    namespace   TEXT NOT NULL,
    name        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    key_id      TEXT NOT NULL,      -- sig_...: the key's id (every version's), beside DEK ids
    key_type    TEXT NOT NULL,      -- p256, p384, rsa3072, rsa4096
    handle      TEXT NOT NULL,      -- the HSM backend's handle of the key pair
    public_key  BLOB NOT NULL,      -- SubjectPublicKeyInfo DER
    state       TEXT NOT NULL,
    lifecycle   TEXT NOT NULL,      -- JSON (kmipd.lifecycle.Lifecycle.to_json)
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    PRIMARY KEY (namespace, name, version)
) STRICT;
"""

#: The same table on PostgreSQL (names compare bytewise, as in SQLite).
SIGNING_KEYS_MIGRATION_POSTGRES = """
CREATE TABLE signing_keys (
    namespace   TEXT COLLATE "C" NOT NULL,
    name        TEXT COLLATE "C" NOT NULL,
    version     BIGINT NOT NULL,
    key_id      TEXT NOT NULL,
    key_type    TEXT NOT NULL,
    handle      TEXT NOT NULL,
    public_key  BYTEA NOT NULL,
    state       TEXT NOT NULL,
    lifecycle   TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    PRIMARY KEY (namespace, name, version)
);
"""

_COLUMNS = (
    "namespace, name, version, key_id, key_type, handle, public_key, state, lifecycle,"
    " created_at, created_by"
)


@attrs.frozen
class SigningKeyVersion:
    namespace: str
    name: str
    version: int
    #: ``sig_`` + 128 random bits: names the key (all its versions) where DEK ids go.
    key_id: str
    key_type: str
    #: The HSM backend's handle: names the key pair, holds none of it.
    handle: str
    public_key: bytes = attrs.field(repr=False)
    lifecycle: Lifecycle
    created_at: int
    created_by: str


def _row(version: SigningKeyVersion) -> tuple[Any, ...]:
    return (
        version.namespace,
        version.name,
        version.version,
        version.key_id,
        version.key_type,
        version.handle,
        version.public_key,
        version.lifecycle.state.value,
        json.dumps(version.lifecycle.to_json(), sort_keys=True),
        version.created_at,
        version.created_by,
    )


def _version(row: tuple[Any, ...]) -> SigningKeyVersion:
    namespace, name, number, key_id, key_type, handle, public, state, doc, created, by = row
    return SigningKeyVersion(
        namespace=str(namespace),
        name=str(name),
        version=int(number),
        key_id=str(key_id),
        key_type=str(key_type),
        handle=str(handle),
        public_key=bytes(public),
        lifecycle=Lifecycle.from_json(
            state, json.loads(doc), default_usage=SIGNING_USAGES, created_at=int(created)
        ),
        created_at=int(created),
        created_by=str(by),
    )


class SigningKeyStore:
    """The store's signing-key methods (the store supplies ``_read``/``_write``)."""

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def add_signing_key_version(self, version: SigningKeyVersion) -> bool:
        """Durable when this returns; False (nothing written) if that version exists."""

        def insert(db: sqlite3.Connection) -> bool:
            taken = db.execute(
                "SELECT 1 FROM signing_keys WHERE namespace = ? AND name = ? AND version = ?",
                (version.namespace, version.name, version.version),
            ).fetchone()
            if taken is not None:
                return False
            db.execute(
                f"INSERT INTO signing_keys ({_COLUMNS}) VALUES ({', '.join('?' * 11)})",
                _row(version),
            )
            return True

        return await self._write(insert)

    async def signing_key_versions(self, namespace: str, name: str) -> list[SigningKeyVersion]:
        """A key's versions, oldest first; empty if there is no such key."""
        rows = await self._read(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM signing_keys WHERE namespace = ? AND name = ?"
                " ORDER BY version",
                (namespace, name),
            ).fetchall()
        )
        return [_version(row) for row in rows]

    async def list_signing_keys(self) -> list[SigningKeyVersion]:
        """Every key's newest version, by namespace and name."""
        rows = await self._read(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM signing_keys AS k WHERE version = (SELECT max(version)"
                " FROM signing_keys WHERE namespace = k.namespace AND name = k.name)"
                " ORDER BY namespace, name"
            ).fetchall()
        )
        return [_version(row) for row in rows]

    async def update_signing_key_version(self, version: SigningKeyVersion) -> bool:
        """Store a version's new lifecycle; False if the version is gone."""

        def update(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE signing_keys SET state = ?, lifecycle = ?"
                " WHERE namespace = ? AND name = ? AND version = ?",
                (*_row(version)[7:9], version.namespace, version.name, version.version),
            )
            return cursor.rowcount == 1

        return await self._write(update)

    async def signing_keys_due_for_destruction(self, now: int) -> list[SigningKeyVersion]:
        """Versions whose soft-delete window ended (their destroy is pending, purge_at past)."""
        rows = await self._read(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM signing_keys WHERE state NOT IN"
                " ('destroyed', 'destroyed-compromised')"
            ).fetchall()
        )
        due = [_version(row) for row in rows]
        return [v for v in due if v.lifecycle.purge_at is not None and v.lifecycle.purge_at <= now]
