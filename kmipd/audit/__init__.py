"""The audit trail: one hash-chained, HMAC'd JSON line per operation, never key material."""

from kmipd.audit._trail import (
    AUDIT_KEY_SIZE,
    GENESIS,
    KEY_DELIVERING,
    AuditError,
    AuditEvent,
    AuditLog,
    VerifyReport,
    query,
    read_audit_key,
    records,
    verify,
)
from kmipd.audit._workers import worker_trail, worker_trails

__all__ = [
    "AUDIT_KEY_SIZE",
    "GENESIS",
    "KEY_DELIVERING",
    "AuditError",
    "AuditEvent",
    "AuditLog",
    "VerifyReport",
    "query",
    "read_audit_key",
    "records",
    "verify",
    "worker_trail",
    "worker_trails",
]
