"""Managed certificates: named, versioned certificates whose keys the daemon keeps wrapped.

One row per certificate (its policy, its soft-delete dates) and one per
version: the certificate and chain (DER), public facts for listings, and the
private key only as AES-GCM under a KEK version of its namespace, bound to
namespace, name, version and KEK version (kmipd.service._managed). The
statements are plain SQL both engines run (written for sqlite3's ``?``; the
PostgreSQL store runs them through its qmark adapter).
"""

# ruff: noqa: S608 - queries interpolate only the constant column list.
from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import attrs

T = TypeVar("T")

#: Migration 8, SQLite's spelling.
MANAGED_CERTIFICATES_MIGRATION = """
CREATE TABLE managed_certificates (
    namespace   TEXT NOT NULL REFERENCES keks(name),
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    policy      TEXT,               -- JSON of the wire policy; NULL: imported
    deleted_at  INTEGER,
    purge_at    INTEGER,
    PRIMARY KEY (namespace, name)
) STRICT;
CREATE INDEX managed_certificates_to_purge ON managed_certificates(purge_at)
    WHERE purge_at IS NOT NULL;
CREATE TABLE managed_certificate_versions (
    namespace    TEXT NOT NULL,
    name         TEXT NOT NULL,
    version      INTEGER NOT NULL,
    kek_version  INTEGER NOT NULL,
    wrapped_key  BLOB NOT NULL,     -- PKCS#8 DER under AES-GCM, never in clear
    key_type     TEXT NOT NULL,
    exportable   INTEGER NOT NULL,
    serial       TEXT NOT NULL,     -- lowercase hex
    issuer       TEXT NOT NULL,     -- 'online-ca' or 'imported'
    subject      TEXT NOT NULL,
    names        TEXT NOT NULL,     -- JSON list of the subjectAltName values
    not_before   INTEGER NOT NULL,
    not_after    INTEGER NOT NULL,
    certificate  BLOB NOT NULL,     -- DER
    chain        TEXT NOT NULL,     -- JSON list of hex DER, nearest issuer first
    created_at   INTEGER NOT NULL,
    created_by   TEXT NOT NULL,
    revoked_at   INTEGER,
    revocation_reason TEXT,
    PRIMARY KEY (namespace, name, version),
    FOREIGN KEY (namespace, name) REFERENCES managed_certificates(namespace, name)
        ON DELETE CASCADE,
    FOREIGN KEY (namespace, kek_version) REFERENCES kek_versions(kek, version)
) STRICT;
CREATE INDEX managed_certificate_versions_by_kek_version
    ON managed_certificate_versions(namespace, kek_version);
"""

_VERSION_COLUMNS = (
    "namespace, name, version, kek_version, wrapped_key, key_type, exportable, serial,"
    " issuer, subject, names, not_before, not_after, certificate, chain, created_at,"
    " created_by, revoked_at, revocation_reason"
)

AddOutcome = Literal["added", "exists", "version-exists", "deleted", "missing"]


@attrs.frozen
class ManagedCertificateVersion:
    namespace: str
    name: str
    version: int
    kek_version: int
    #: The PKCS#8 key under AES-GCM with its associated data; never in clear here.
    wrapped_key: bytes = attrs.field(repr=False)
    key_type: str = ""
    exportable: bool = False
    serial: str = ""
    issuer: str = "online-ca"
    subject: str = ""
    names: tuple[str, ...] = ()
    not_before: int = 0
    not_after: int = 0
    certificate: bytes = attrs.field(default=b"", repr=False)
    chain: tuple[bytes, ...] = attrs.field(default=(), repr=False)
    created_at: int = 0
    created_by: str = ""
    revoked_at: int | None = None
    revocation_reason: str | None = None


@attrs.frozen
class ManagedCertificateRecord:
    """A managed certificate and its versions, oldest first (keys stay wrapped)."""

    namespace: str
    name: str
    created_at: int
    created_by: str
    #: JSON of the wire CertificatePolicy; None for an imported certificate.
    policy: str | None
    deleted_at: int | None = None
    purge_at: int | None = None
    versions: tuple[ManagedCertificateVersion, ...] = ()

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None

    @property
    def latest(self) -> ManagedCertificateVersion | None:
        return self.versions[-1] if self.versions else None

    def version(self, number: int) -> ManagedCertificateVersion | None:
        if 1 <= number <= len(self.versions) and self.versions[number - 1].version == number:
            return self.versions[number - 1]
        return next((v for v in self.versions if v.version == number), None)


def _version_row(v: ManagedCertificateVersion) -> tuple[Any, ...]:
    return (
        v.namespace,
        v.name,
        v.version,
        v.kek_version,
        v.wrapped_key,
        v.key_type,
        int(v.exportable),
        v.serial,
        v.issuer,
        v.subject,
        json.dumps(list(v.names)),
        v.not_before,
        v.not_after,
        v.certificate,
        json.dumps([der.hex() for der in v.chain]),
        v.created_at,
        v.created_by,
        v.revoked_at,
        v.revocation_reason,
    )


def _version_from_row(row: tuple[Any, ...]) -> ManagedCertificateVersion:
    fields = list(row)
    fields[4] = bytes(fields[4])
    fields[6] = bool(fields[6])
    fields[10] = tuple(json.loads(fields[10]))
    fields[13] = bytes(fields[13])
    fields[14] = tuple(bytes.fromhex(h) for h in json.loads(fields[14]))
    return ManagedCertificateVersion(*fields)


def _load(db: sqlite3.Connection, namespace: str, name: str) -> ManagedCertificateRecord | None:
    head = db.execute(
        "SELECT created_at, created_by, policy, deleted_at, purge_at FROM managed_certificates"
        " WHERE namespace = ? AND name = ?",
        (namespace, name),
    ).fetchone()
    if head is None:
        return None
    rows = db.execute(
        f"SELECT {_VERSION_COLUMNS} FROM managed_certificate_versions"
        " WHERE namespace = ? AND name = ? ORDER BY version",
        (namespace, name),
    ).fetchall()
    return ManagedCertificateRecord(
        namespace,
        name,
        int(head[0]),
        str(head[1]),
        head[2],
        head[3],
        head[4],
        tuple(_version_from_row(r) for r in rows),
    )


def expiry_rows(db: sqlite3.Connection) -> list[tuple[str, str, int, int]]:
    """(namespace, name, newest version, its notAfter) of every live managed certificate."""
    rows = db.execute(
        "SELECT v.namespace, v.name, v.version, v.not_after"
        " FROM managed_certificate_versions v JOIN managed_certificates c"
        " ON c.namespace = v.namespace AND c.name = v.name"
        " WHERE c.deleted_at IS NULL AND v.version = (SELECT max(version) FROM"
        " managed_certificate_versions w WHERE w.namespace = v.namespace"
        " AND w.name = v.name) ORDER BY v.namespace, v.name"
    ).fetchall()
    return [(str(ns), str(n), int(v), int(t)) for ns, n, v, t in rows]


def read_sqlite_expiry(path: str) -> list[tuple[str, str, int, int]]:
    """The same, read from a store file without opening it as a store (check-config).

    A store from before managed certificates has none.
    """
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        found = db.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'managed_certificate_versions'"
        ).fetchone()
        return expiry_rows(db) if found else []
    finally:
        db.close()


class ManagedCertificateStore:
    """The stores' managed-certificate methods (each store supplies ``_read``/``_write``)."""

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def add_managed_certificate_version(
        self, version: ManagedCertificateVersion, *, policy: str | None, create: bool
    ) -> AddOutcome:
        """Add a version; ``create`` makes the certificate (version 1) and refuses an
        existing name. Durable when it returns ``added``; anything else wrote nothing."""

        def insert(db: sqlite3.Connection) -> AddOutcome:
            head = db.execute(
                "SELECT deleted_at FROM managed_certificates WHERE namespace = ? AND name = ?",
                (version.namespace, version.name),
            ).fetchone()
            if create:
                if head is not None:
                    return "exists"
                cursor = db.execute(
                    "INSERT INTO managed_certificates (namespace, name, created_at, created_by,"
                    " policy) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (version.namespace, version.name, version.created_at, version.created_by,
                     policy),
                )  # fmt: skip
                if cursor.rowcount != 1:
                    return "exists"  # another daemon's create committed meanwhile
            elif head is None:
                return "missing"
            elif head[0] is not None:
                return "deleted"
            cursor = db.execute(
                f"INSERT INTO managed_certificate_versions ({_VERSION_COLUMNS})"
                f" VALUES ({', '.join('?' * 19)}) ON CONFLICT DO NOTHING",
                _version_row(version),
            )
            if cursor.rowcount != 1:
                return "version-exists"
            return "added"

        return await self._write(insert)

    async def get_managed_certificate(
        self, namespace: str, name: str
    ) -> ManagedCertificateRecord | None:
        return await self._read(lambda db: _load(db, namespace, name))

    async def list_managed_certificates(
        self, *, namespace: str | None, deleted: bool, after: tuple[str, str], limit: int
    ) -> list[ManagedCertificateRecord]:
        """By (namespace, name) after ``after``; live or deleted ones; one namespace or all."""

        def select(db: sqlite3.Connection) -> list[ManagedCertificateRecord]:
            where = [
                "(namespace > ? OR (namespace = ? AND name > ?))",
                "deleted_at IS NOT NULL" if deleted else "deleted_at IS NULL",
            ]
            params: list[Any] = [after[0], after[0], after[1]]
            if namespace is not None:
                where.append("namespace = ?")
                params.append(namespace)
            keys = db.execute(
                f"SELECT namespace, name FROM managed_certificates WHERE {' AND '.join(where)}"
                " ORDER BY namespace, name LIMIT ?",
                (*params, limit),
            ).fetchall()
            found = [_load(db, ns, n) for ns, n in keys]
            return [r for r in found if r is not None]

        return await self._read(select)

    async def set_managed_certificate_deleted(
        self, namespace: str, name: str, deleted_at: int | None, purge_at: int | None
    ) -> bool:
        """Soft-delete (both set) or recover (both None); False if it is gone."""

        def update(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE managed_certificates SET deleted_at = ?, purge_at = ?"
                " WHERE namespace = ? AND name = ?",
                (deleted_at, purge_at, namespace, name),
            )
            return cursor.rowcount == 1

        return await self._write(update)

    async def purge_managed_certificate(self, namespace: str, name: str) -> int:
        """Erase it, every version and wrapped key; returns how many versions went.

        SQLite's secure_delete overwrites the freed bytes (checkpoint() clears the
        WAL after); on PostgreSQL the dead rows stay until VACUUM, still wrapped.
        """

        def erase(db: sqlite3.Connection) -> int:
            count = db.execute(
                "DELETE FROM managed_certificate_versions WHERE namespace = ? AND name = ?",
                (namespace, name),
            ).rowcount
            db.execute(
                "DELETE FROM managed_certificates WHERE namespace = ? AND name = ?",
                (namespace, name),
            )
            return int(count)

        return await self._write(erase)

    async def managed_certificates_due_for_purge(self, now: int) -> list[tuple[str, str]]:
        rows = await self._read(
            lambda db: db.execute(
                "SELECT namespace, name FROM managed_certificates WHERE purge_at <= ?", (now,)
            ).fetchall()
        )
        return [(str(ns), str(n)) for ns, n in rows]

    async def revoke_managed_certificate_version(
        self, namespace: str, name: str, version: int, at: int, reason: str
    ) -> bool:
        """Mark a version revoked; False if it already was (the first revocation stands)."""

        def update(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE managed_certificate_versions SET revoked_at = ?, revocation_reason = ?"
                " WHERE namespace = ? AND name = ? AND version = ? AND revoked_at IS NULL",
                (at, reason, namespace, name, version),
            )
            return cursor.rowcount == 1

        return await self._write(update)

    async def managed_certificate_expiry(self) -> list[tuple[str, str, int, int]]:
        """(namespace, name, newest version, its notAfter) of every live managed
        certificate: what renewal, metrics and check-config look at."""
        return await self._read(expiry_rows)

    async def managed_keys_to_rewrap(
        self, namespace: str, target: int, limit: int
    ) -> list[ManagedCertificateVersion]:
        """The next batch of a namespace's managed keys under an older KEK version."""
        rows = await self._read(
            lambda db: db.execute(
                f"SELECT {_VERSION_COLUMNS} FROM managed_certificate_versions"
                " WHERE namespace = ? AND kek_version < ? ORDER BY name, version LIMIT ?",
                (namespace, target, limit),
            ).fetchall()
        )
        return [_version_from_row(row) for row in rows]

    async def rewrap_managed_keys(
        self, target: int, updates: list[tuple[ManagedCertificateVersion, bytes]]
    ) -> int:
        """Replace wrappings in one transaction, each only if still under the version read."""

        def apply(db: sqlite3.Connection) -> int:
            changed = 0
            for v, wrapped in updates:
                changed += db.execute(
                    "UPDATE managed_certificate_versions SET kek_version = ?, wrapped_key = ?"
                    " WHERE namespace = ? AND name = ? AND version = ? AND kek_version = ?",
                    (target, wrapped, v.namespace, v.name, v.version, v.kek_version),
                ).rowcount
            return changed

        return await self._write(apply)

    async def count_managed_keys_under(self, namespace: str, kek_version: int) -> int:
        """How many managed-certificate keys only this KEK version wraps."""
        (count,) = await self._read(
            lambda db: db.execute(
                "SELECT count(*) FROM managed_certificate_versions"
                " WHERE namespace = ? AND kek_version = ?",
                (namespace, kek_version),
            ).fetchone()
        )
        return int(count)
