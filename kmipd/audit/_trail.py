"""The audit trail: one JSON line per key operation, hash-chained, never key material.

Every key operation, successful or refused, appends a record: time, client
identity, operation, key (DEK id, KEK and version), namespace, result and
request id. Values that are sensitive yet must be correlatable (a data-key
blob) are recorded as an HMAC under the audit key, as Vault's audit
devices do: the same blob always gives the same MAC, and the MAC reveals
nothing of the blob.

Tamper evidence: each record carries ``prev``, the previous record's
``hash``, and its own ``hash`` = SHA-256(prev || the record's canonical JSON
without ``hash``); ``seq`` counts up from 1. ``verify`` walks the chain and
names the first record that was edited, removed or moved. (A chain cannot
show that records were cut off the *end*; keep the last hash elsewhere,
e.g. in your log shipping, to detect that.)

Durability: a state-changing operation is answered only once its record is
on disk (``write(2)`` then ``fsync``, committed in groups so concurrent
requests share one). Read records (get-dek and the like) are on the hot
path, so with ``batch_window`` > 0 they are kept in memory and written and
fsynced together at most ``batch_window`` seconds later (10 ms in the
daemon, ``audit.read_batch_ms``), or at once with the next state-change
record, a rotation, or ``close`` (drain, SIGTERM). None is ever dropped:
a ``kill -9`` loses at most the reads of the last window, never a state
change, and the chain stays whole. A write that fails is remembered, and
every later record is refused until the file takes writes again, so
reads are not served unaudited for longer than one window. With
``batch_window`` = 0 every record is written before its answer.

Torn records: a write cut short (a full disk, a crash) leaves part of a
line. A batched write keeps the rest and completes the line once the disk
takes it; a single record's failed write is cut back off the file where the
filesystem allows. What remains (or what a crash left) is never appended
to: the next record starts on a fresh line and continues the chain from the
last whole record, and ``verify`` names the torn line instead of calling it
tampering.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import trio

from kmipd.crypto._private_files import PrivateFileError, read_private_file
from kmipd.store._faults import WriteHealth, os_cause
from pki import write_private_file

GENESIS = "0" * 64
AUDIT_KEY_SIZE = 32
#: Read records held in memory before they are written whatever the window.
MAX_BATCH_BYTES = 1 << 20

log = logging.getLogger("kmipd.audit")


class AuditError(Exception):
    """The audit trail cannot be written (or read): the message names the file."""


@attrs.frozen
class AuditEvent:
    identity: str
    operation: str
    #: "ok", or the wire error name of the refusal.
    result: str
    request_id: int | None = None
    namespace: str | None = None
    dek_id: str | None = None
    kek: str | None = None
    kek_version: int | None = None
    #: HMAC of a data-key blob under the audit key (never the blob itself).
    blob_mac: str | None = None
    #: A short note, e.g. a revocation reason. Never key material.
    detail: str | None = None
    #: "kmip" for a KMIP request; absent for the native protocol.
    protocol: str | None = None


_EVENT_FIELDS = tuple(field.name for field in attrs.fields(AuditEvent))


#: Made once: json.dumps with these options builds a new encoder on every call,
#: a third of what serialising a get-dek record costs.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _canonical(record: dict[str, Any]) -> bytes:
    return _CANONICAL.encode(record).encode()


def _chain_hash(prev: str, record: dict[str, Any]) -> str:
    return hashlib.sha256(bytes.fromhex(prev) + _canonical(record)).hexdigest()


def read_audit_key(path: Path, *, create: bool) -> bytes:
    if not path.exists():
        if not create:
            raise AuditError(f"audit key {path} does not exist")
        write_private_file(path, secrets.token_bytes(AUDIT_KEY_SIZE))
    try:
        data = read_private_file(path, "audit key")
    except PrivateFileError as exc:
        raise AuditError(str(exc)) from None
    if len(data) != AUDIT_KEY_SIZE:
        raise AuditError(f"audit key {path} must hold exactly {AUDIT_KEY_SIZE} bytes")
    return data


class AuditLog:
    def __init__(
        self,
        path: Path,
        key: bytes,
        *,
        fail_open_reads: bool = False,
        batch_window: float = 0.0,
    ) -> None:
        self.path = path
        self.fail_open_reads = fail_open_reads
        self._key = key
        self._fd = _open_appending(path)
        _lock_exclusively(self._fd, path)
        self._seq, self._prev, self._start_line, torn = _tail(path)
        # _start_line: the file lacks its final newline, so the next record starts one.
        if torn is not None:
            log.warning(
                "audit log %s ends in a torn record (at byte %d: a write cut off by a crash "
                "or a full disk); the chain continues on a new line after it from seq %d",
                path,
                torn,
                self._seq,
            )
        #: Whether records can be written; its faults are logged once, like the store's.
        self.health = WriteHealth("audit trail", path)
        self._synced = self._seq
        self._syncing: trio.Event | None = None
        #: Seconds a read record may wait in memory; 0 writes each one at once.
        #: Whoever sets it > 0 also runs ``flush_periodically``.
        self._batch_window = batch_window
        self._unwritten: list[bytes] = []
        self._unwritten_bytes = 0
        #: The last write that failed: later records are refused until one succeeds.
        self._write_failure: AuditError | None = None
        self._batch_started = trio.Event()

    @classmethod
    def open(
        cls,
        path: Path,
        key_path: Path,
        *,
        fail_open_reads: bool = False,
        batch_window: float = 0.0,
    ) -> AuditLog:
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(
            path,
            read_audit_key(key_path, create=True),
            fail_open_reads=fail_open_reads,
            batch_window=batch_window,
        )

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r}, seq={self._seq})"

    def mac(self, data: bytes) -> str:
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def append(self, event: AuditEvent, now: float) -> int:
        """Add one record to the chain; its sequence number. Raises AuditError.

        The record is written at once, or with ``batch_window`` > 0 within that
        window; ``sync(seq)`` makes it durable before it returns.
        """
        if self._write_failure is not None:
            self._write_unwritten()  # still failing: refuse before the record exists
        record: dict[str, Any] = {
            "seq": self._seq + 1,
            "time": datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(),
            "prev": self._prev,
        }
        for name in _EVENT_FIELDS:
            value = getattr(event, name)
            if value is not None:
                record[name] = value
        body = _canonical(record)
        digest = hashlib.sha256(bytes.fromhex(self._prev) + body).hexdigest()
        # The hash goes last; verify() recomputes it over the record without it.
        line = body[:-1] + b',"hash":"' + digest.encode() + b'"}\n'
        if self._start_line:  # never glued onto a torn record
            line = b"\n" + line
        if self._batch_window <= 0:
            self._write_record(line)
        else:
            self._unwritten.append(line)
            self._unwritten_bytes += len(line)
            if not self._batch_started.is_set():
                self._batch_started.set()
        self._start_line = False
        self._seq += 1
        self._prev = digest
        if self._unwritten_bytes > MAX_BATCH_BYTES:
            self._write_unwritten()
        return self._seq

    def _write(self, data: bytes) -> int:
        """Append bytes; how many were written before a failure (raised as AuditError)."""
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            self._failed(exc)
            raise AuditError(f"cannot write audit log {self.path}: {exc.strerror}") from None
        if written != len(data):
            # The next write(2) would say why: ENOSPC, on every filesystem we know.
            self._failed(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            raise _ShortWriteError(written, f"short write to audit log {self.path}")
        self.health.succeeded()
        return written

    def _write_record(self, line: bytes) -> None:
        """Write one record whole, or cut what was written of it back off the file."""
        size = os.fstat(self._fd).st_size
        try:
            self._write(line)
        except AuditError:
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                self._start_line = True  # the torn part stays: start the next on a new line
            raise

    def _failed(self, exc: OSError) -> None:
        cause = os_cause(exc)
        if cause is not None:
            self.health.failed(cause, exc.strerror or "")

    def _write_unwritten(self) -> None:
        """Write the batched records, in chain order; on failure keep what is left."""
        if not self._unwritten:
            self._write_failure = None
            return
        data = b"".join(self._unwritten)
        try:
            self._write(data)
        except AuditError as exc:
            written = exc.written if isinstance(exc, _ShortWriteError) else 0
            self._unwritten = [data[written:]]  # the rest follows once the disk takes it
            self._unwritten_bytes = len(data) - written
            self._write_failure = exc
            raise
        self._unwritten.clear()
        self._unwritten_bytes = 0
        self._write_failure = None

    async def flush_periodically(self) -> None:
        """Write and fsync batched read records at most ``batch_window`` after the first."""
        while True:
            await self._batch_started.wait()
            await trio.sleep(self._batch_window)
            self._batch_started = trio.Event()
            try:
                await self.sync(self._seq)
            except AuditError as exc:
                if self.health.ok:  # an understood fault is logged once by its WriteHealth
                    log.error("%s", exc)  # remembered: the next record is refused until then

    async def sync(self, seq: int) -> None:
        """Return once record ``seq`` is on disk; concurrent callers share one fsync."""
        while self._synced < seq:
            if self._syncing is not None:
                await self._syncing.wait()
                continue
            self._write_unwritten()
            self._syncing = event = trio.Event()
            target = self._seq
            try:
                await trio.to_thread.run_sync(os.fsync, self._fd)
            except OSError as exc:
                self._failed(exc)
                raise AuditError(f"cannot sync audit log {self.path}: {exc.strerror}") from None
            finally:
                self._syncing = None
                event.set()
            self._synced = max(self._synced, target)

    async def reopen(self) -> bool:
        """Continue the chain in a new, empty file at ``path`` once the trail was rotated
        (renamed away, as logrotate does before asking for a reload). False when the
        file at ``path`` is still the one being written: nothing to do."""
        while self._syncing is not None:  # its fsync must not outlive the old descriptor
            await self._syncing.wait()
        fd = _open_appending(self.path)
        if _same_file(fd, self._fd):
            os.close(fd)
            return False
        _lock_exclusively(fd, self.path)
        if os.fstat(fd).st_size:
            os.close(fd)
            raise AuditError(
                f"audit log {self.path} is not the file kmipd writes, and not empty: the "
                "trail continues only in a new, empty file; still writing the rotated one"
            )
        # No await from here on: the old file is complete on disk before the switch.
        try:
            self._write_unwritten()
        except AuditError:
            os.close(fd)
            raise
        os.fsync(self._fd)
        old, self._fd = self._fd, fd
        self._synced = self._seq
        os.close(old)
        return True

    def close(self) -> None:
        """Write and fsync what is batched, then close (the drain's last audit step)."""
        try:
            if self._unwritten:
                self._write_unwritten()
                os.fsync(self._fd)
        except (AuditError, OSError) as exc:
            log.error("audit records lost at close: %s", exc)
        finally:
            os.close(self._fd)


class _ShortWriteError(AuditError):
    def __init__(self, written: int, message: str) -> None:
        super().__init__(message)
        self.written = written


def _open_appending(path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise AuditError(f"cannot open audit log {path}: {exc.strerror}") from None


def _lock_exclusively(fd: int, path: Path) -> None:
    """One writer per trail: a second daemon appending to it (daemons sharing a store,
    say) would fork the hash chain, and verify would call it tampered."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise AuditError(
            f"audit log {path} is in use by another kmipd process; every daemon needs "
            "an audit trail of its own (audit.path), daemons sharing a store too"
        ) from None


def _same_file(a: int, b: int) -> bool:
    first, second = os.fstat(a), os.fstat(b)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def _tail(path: Path) -> tuple[int, str, bool, int | None]:
    """The last whole record's seq and hash, to continue the chain after a restart;
    whether the file lacks its final newline; the byte offset of a torn record there."""
    try:
        with path.open("rb") as trail:
            size = trail.seek(0, os.SEEK_END)
            start = trail.seek(max(0, size - 65536))
            data = trail.read()
    except FileNotFoundError:
        return 0, GENESIS, False, None
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from None
    if start > 0:
        data = data[data.find(b"\n") + 1 :]  # the window began mid-line
    lines = data.split(b"\n")
    # split leaves b"" after a final newline; anything else there lacks its newline.
    tail = lines.pop()
    torn = None
    if tail and _parses(tail):
        lines.append(tail)  # a whole record, only its newline missing
    elif tail:
        torn = size - len(tail)
    whole = [line for line in lines if line]
    if not whole:
        return 0, GENESIS, bool(tail), torn
    try:
        last = json.loads(whole[-1])
        return int(last["seq"]), str(last["hash"]), bool(tail), torn
    except (ValueError, KeyError, TypeError):
        raise AuditError(
            f"audit log {path} ends in a damaged record; run kmipd audit verify on it"
        ) from None


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _is_torn(line: bytes) -> bool:
    """A cut-off record: the start of one, not valid JSON, no closing brace."""
    return line.startswith(b'{"') and not line.rstrip(b"\n").endswith(b"}") and not _parses(line)


# -- reading the trail -------------------------------------------------------------------


@attrs.frozen
class VerifyReport:
    records: int
    last_hash: str
    #: None when the chain is intact, else what is wrong and where.
    problem: str | None = None
    #: The seq of the first record read (above 1 for a partial, rotated trail).
    first_seq: int | None = None
    #: Where torn records are ("line N" or "FILE line N"): writes cut off by a crash or a
    #: full disk, not part of the chain (the chain around them is checked as usual).
    torn: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.problem is None


def records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every line; AuditError for a line that is not JSON."""
    try:
        log = path.open("rb")
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from None
    with log:
        for number, line in enumerate(log, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                raise AuditError(f"line {number}: not a JSON record (edited?)") from None
            if not isinstance(record, dict):
                raise AuditError(f"line {number}: not a JSON record (edited?)")
            yield number, record


def verify(path: Path, *more: Path, partial: bool = False) -> VerifyReport:
    """Walk the chain through the files in order (a rotated trail: oldest first); report
    the first record that was edited, removed or reordered.

    The chain must start at seq 1 unless ``partial``: then the first file may begin
    mid-chain (the files before it are gone or not given), and only what follows
    its first record is proven.
    """
    paths = (path, *more)
    prev, expected_seq, count = GENESIS, 1, 0
    first_seq: int | None = None
    torn: list[str] = []
    try:
        for path_now in paths:
            where = f"{path_now.name} " if len(paths) > 1 else ""
            for line, record in _chain_records(path_now, torn, where):
                seq = record.get("seq")
                claimed = record.pop("hash", None)
                if first_seq is None:
                    first_seq = seq if isinstance(seq, int) else 1
                    if partial and isinstance(seq, int) and seq > 1:
                        # Nothing before it to check it against: take it as given.
                        prev, expected_seq = str(record.get("prev")), seq
                if record.get("prev") != prev:
                    what = "removed or reordered" if seq != expected_seq else "edited"
                    problem = (
                        f"{where}line {line} (seq {seq}): its prev does not match the record "
                        f"before it: a record was {what}"
                    )
                    if count == 0 and seq != 1:
                        problem += (
                            " (a rotated trail starts mid-chain: give the earlier files "
                            "first, or --partial)"
                        )
                    return VerifyReport(count, prev, problem, first_seq, tuple(torn))
                if seq != expected_seq:
                    problem = (
                        f"{where}line {line}: seq {seq} where {expected_seq} was expected: "
                        "a record was removed or reordered"
                    )
                    return VerifyReport(count, prev, problem, first_seq, tuple(torn))
                if claimed != _chain_hash(prev, record):
                    return VerifyReport(
                        count,
                        prev,
                        f"{where}line {line} (seq {seq}): hash mismatch: the record was edited",
                        first_seq,
                        tuple(torn),
                    )
                prev, expected_seq, count = str(claimed), expected_seq + 1, count + 1
    except AuditError as exc:
        return VerifyReport(count, prev, str(exc), first_seq, tuple(torn))
    return VerifyReport(count, prev, None, first_seq, tuple(torn))


def _chain_records(path: Path, torn: list[str], where: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Like ``records``, but a torn record is noted in ``torn`` and skipped, not an error."""
    try:
        trail = path.open("rb")
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from None
    with trail:
        for number, line in enumerate(trail, start=1):
            if _is_torn(line):
                torn.append(f"{where}line {number}")
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise AuditError(f"{where}line {number}: not a JSON record (edited?)") from None
            if not isinstance(record, dict):
                raise AuditError(f"{where}line {number}: not a JSON record (edited?)")
            yield number, record


#: Operations that hand a key to the caller.
KEY_DELIVERING = frozenset({"create-dek", "get-dek", "generate-data-key", "unwrap"})


def query(
    path: Path,
    *,
    identity: str | None = None,
    dek_id: str | None = None,
    since: datetime.datetime | None = None,
    until: datetime.datetime | None = None,
    delivered_only: bool = True,
) -> list[dict[str, Any]]:
    """Records matching every given filter; by default only successful key deliveries.

    Answers "which DEKs did identity X receive between T1 and T2" and "which
    clients received DEK Y".
    """
    found = []
    for _, record in records(path):
        if delivered_only and (
            record.get("operation") not in KEY_DELIVERING or record.get("result") != "ok"
        ):
            continue
        if identity is not None and record.get("identity") != identity:
            continue
        if dek_id is not None and record.get("dek_id") != dek_id:
            continue
        when = datetime.datetime.fromisoformat(str(record.get("time")))
        if (since is not None and when < since) or (until is not None and when > until):
            continue
        found.append(record)
    return found
