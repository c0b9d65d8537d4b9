"""Certificates the online CA issued: one row each, with its revocation.

Only certificates and public facts are kept here (no private key: the
requester made its own). The CRL the online CA signs lists every revoked row
whose certificate has not expired yet.
"""

# ruff: noqa: S608 - queries interpolate only the constant column list.
from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

T = TypeVar("T")

#: Migration 7: the online CA's issued certificates.
CERTIFICATES_MIGRATION = """
CREATE TABLE issued_certificates (
    serial        TEXT PRIMARY KEY,   -- lowercase hex: serials are up to 159 bits
    requested_by  TEXT NOT NULL,      -- the SPIFFE ID that asked (issue or renew)
    subject       TEXT NOT NULL,      -- the SPIFFE ID (client) or first DNS name (server)
    profile       TEXT NOT NULL,      -- 'client' (clientAuth) or 'server' (serverAuth)
    names         TEXT NOT NULL,      -- JSON list of the subjectAltName values
    key_type      TEXT NOT NULL,
    spki_sha256   BLOB NOT NULL,
    not_before    INTEGER NOT NULL,
    not_after     INTEGER NOT NULL,
    issued_at     INTEGER NOT NULL,
    renewed_from  TEXT,
    certificate   BLOB NOT NULL,      -- DER
    revoked_at    INTEGER,
    revocation_reason TEXT
) STRICT;
CREATE INDEX issued_by_subject ON issued_certificates(subject, not_after);
CREATE INDEX issued_revoked ON issued_certificates(not_after) WHERE revoked_at IS NOT NULL;
"""

_COLUMNS = (
    "serial, requested_by, subject, profile, names, key_type, spki_sha256, not_before,"
    " not_after, issued_at, renewed_from, certificate, revoked_at, revocation_reason"
)


@attrs.frozen
class IssuedCertificateRecord:
    serial: str
    requested_by: str
    subject: str
    profile: str
    names: tuple[str, ...]
    key_type: str
    spki_sha256: bytes
    not_before: int
    not_after: int
    issued_at: int
    renewed_from: str | None
    certificate: bytes = attrs.field(repr=False)
    revoked_at: int | None = None
    revocation_reason: str | None = None


def _row(record: IssuedCertificateRecord) -> tuple[Any, ...]:
    return (
        record.serial,
        record.requested_by,
        record.subject,
        record.profile,
        json.dumps(list(record.names)),
        record.key_type,
        record.spki_sha256,
        record.not_before,
        record.not_after,
        record.issued_at,
        record.renewed_from,
        record.certificate,
        record.revoked_at,
        record.revocation_reason,
    )


def _record(row: tuple[Any, ...]) -> IssuedCertificateRecord:
    fields = list(row)
    fields[4] = tuple(json.loads(fields[4]))
    return IssuedCertificateRecord(*fields)


class CertificateStore:
    """KeyStore's issued-certificate methods (KeyStore supplies ``_read``/``_write``)."""

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def put_issued_certificate(self, record: IssuedCertificateRecord) -> None:
        """Durable when this returns: the certificate is handed out only after."""
        await self._write(
            lambda db: db.execute(
                f"INSERT INTO issued_certificates ({_COLUMNS}) VALUES ({', '.join('?' * 14)})",
                _row(record),
            )
        )

    async def get_issued_certificate(self, serial: str) -> IssuedCertificateRecord | None:
        row = await self._read(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM issued_certificates WHERE serial = ?", (serial,)
            ).fetchone()
        )
        return None if row is None else _record(row)

    async def list_issued_certificates(
        self, *, subject: str | None, after: str, limit: int
    ) -> list[IssuedCertificateRecord]:
        """By serial, after ``after``; only ``subject``'s when given."""

        def select(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            if subject is None:
                return db.execute(
                    f"SELECT {_COLUMNS} FROM issued_certificates WHERE serial > ?"
                    " ORDER BY serial LIMIT ?",
                    (after, limit),
                ).fetchall()
            return db.execute(
                f"SELECT {_COLUMNS} FROM issued_certificates WHERE subject = ? AND serial > ?"
                " ORDER BY serial LIMIT ?",
                (subject, after, limit),
            ).fetchall()

        return [_record(row) for row in await self._read(select)]

    async def revoke_issued_certificate(self, serial: str, at: int, reason: str) -> bool:
        """Mark it revoked; False if it already was (the first revocation stands)."""

        def update(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE issued_certificates SET revoked_at = ?, revocation_reason = ?"
                " WHERE serial = ? AND revoked_at IS NULL",
                (at, reason, serial),
            )
            return cursor.rowcount == 1

        return await self._write(update)

    async def revoked_certificates(self, now: int) -> list[tuple[str, int, str]]:
        """(serial, revoked at, reason) of every revoked certificate not yet expired."""
        rows = await self._read(
            lambda db: db.execute(
                "SELECT serial, revoked_at, revocation_reason FROM issued_certificates"
                " WHERE revoked_at IS NOT NULL AND not_after >= ? ORDER BY serial",
                (now,),
            ).fetchall()
        )
        return [(str(s), int(t), str(r)) for s, t, r in rows]

    async def issued_expiry_by_subject(self, now: int) -> dict[tuple[str, str], int]:
        """(subject, profile) -> the latest notAfter of its unrevoked, unexpired
        certificates: when that subject runs out of certificates (for metrics)."""
        rows = await self._read(
            lambda db: db.execute(
                "SELECT subject, profile, max(not_after) FROM issued_certificates"
                " WHERE revoked_at IS NULL AND not_after >= ? GROUP BY subject, profile",
                (now,),
            ).fetchall()
        )
        return {(str(s), str(p)): int(t) for s, p, t in rows}
