"""Faults of the machine under a writer: which ones we understand, and what is said of them.

A write that fails because the disk is full, the filesystem is read-only,
the database stays locked beyond the busy timeout, or the file is damaged is
not a bug in kmipd: the request is refused with ``store-unavailable`` (the
transaction was rolled back, so the refusal promises "not applied"), and the
fault is logged once, summarised while it lasts, and its end logged once.
Everything else stays an unexpected error (``internal``, with a traceback).

``WriteHealth`` is that state for one writer (the store, the audit trail):
health checks, metrics and systemd's status line read it, and while it is
faulted the writer refuses at once and a cheap probe decides when it ends.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("kmipd.store")

#: SQLite primary result codes (sqlite3.h) and what they mean to an operator.
_SQLITE_CAUSES = {
    13: "disk full",  # SQLITE_FULL
    8: "read-only",  # SQLITE_READONLY
    5: "database locked beyond the busy timeout",  # SQLITE_BUSY
    6: "database locked beyond the busy timeout",  # SQLITE_LOCKED
    11: "database file damaged",  # SQLITE_CORRUPT
    26: "not a database file (damaged)",  # SQLITE_NOTADB
    14: "database file cannot be opened",  # SQLITE_CANTOPEN
}
_SQLITE_IOERR = 10
_OS_CAUSES = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only filesystem",
}

#: Seconds between the summary lines of a fault that lasts.
SUMMARY_INTERVAL = 60.0


class StoreUnavailableError(Exception):
    """The store cannot write now (``cause`` says why); the write was not applied."""

    def __init__(self, cause: str, detail: str = "") -> None:
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.cause = cause
        self.detail = detail


def os_cause(exc: OSError) -> str | None:
    """The understood cause of a failed write(2)/fsync(2), or None."""
    return _OS_CAUSES.get(exc.errno or 0)


def sqlite_cause(exc: sqlite3.Error, directory: Path) -> str | None:
    """The understood cause of a failed SQLite call, or None for anything else.

    SQLite reports a write refused by a read-only (or emergency read-only)
    filesystem as a plain I/O error, without errno: creating a file beside
    the database tells whether the filesystem refuses writes, and why.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(code, int):
        return None
    primary = code & 0xFF
    if primary != _SQLITE_IOERR:
        return _SQLITE_CAUSES.get(primary)
    return directory_cause(directory)


def directory_cause(directory: Path) -> str | None:
    """Why nothing can be written in ``directory`` (full, read-only), or None if it can."""
    probe = directory / f".kmipd-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        return os_cause(exc)
    try:
        os.write(fd, b"x")
    except OSError as exc:
        return os_cause(exc)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    return None


class WriteHealth:
    """Whether one writer (``what`` at ``where``) can write, and the log lines saying so."""

    def __init__(
        self,
        what: str,
        where: Path | str,
        *,
        summary_interval: float = SUMMARY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.where = where
        self.summary_interval = summary_interval
        self._clock = clock
        #: The cause of the fault in progress ("disk full", ...), None while healthy.
        self.cause: str | None = None
        self.detail = ""
        #: Wall-clock start of the fault in progress.
        self.since: float | None = None
        #: Requests refused during the fault in progress, and since start.
        self.refused = 0
        self.refused_total = 0
        self.faults_total = 0
        self._started = 0.0
        self._summarised = 0.0
        self._summarised_count = 0
        #: Called on every change between healthy and faulted (systemd status, say).
        self.listeners: list[Callable[[], None]] = []

    @property
    def ok(self) -> bool:
        return self.cause is None

    def describe(self) -> str:
        """``ok``, or what cannot be written and why, for status lines."""
        if self.cause is None:
            return "ok"
        return f"cannot write: {self.cause}"

    def failed(self, cause: str, detail: str = "", *, refused: bool = True) -> None:
        """A write failed for an understood cause (a request was refused unless not)."""
        if self.cause is None:
            self.cause, self.detail = cause, detail
            self.since = time.time()
            self._started = self._summarised = self._clock()
            self.refused = self._summarised_count = 0
            self.faults_total += 1
            log.error(
                "%s %s cannot be written: %s%s; refusing what needs a write until a probe "
                "write succeeds",
                self.what,
                self.where,
                cause,
                f" ({detail})" if detail and detail != cause else "",
            )
            self._changed()
        if refused:
            self.count_refused()

    def count_refused(self) -> None:
        self.refused += 1
        self.refused_total += 1
        self.tick()

    def tick(self) -> None:
        """Log the summary line if one is due (the probe calls this while faulted)."""
        if self.cause is None:
            return
        now = self._clock()
        if now - self._summarised < self.summary_interval:
            return
        log.warning(
            "%s %s still cannot be written (%s) after %.0f s: %d request(s) refused, "
            "%d in the last %.0f s",
            self.what,
            self.where,
            self.cause,
            now - self._started,
            self.refused,
            self.refused - self._summarised_count,
            now - self._summarised,
        )
        self._summarised, self._summarised_count = now, self.refused

    def succeeded(self) -> None:
        """A write went through: the fault, if any, is over."""
        if self.cause is None:
            return
        log.warning(
            "%s %s can be written again (was: %s) after %.1f s; %d request(s) were refused",
            self.what,
            self.where,
            self.cause,
            self._clock() - self._started,
            self.refused,
        )
        self.cause, self.detail, self.since = None, "", None
        self._changed()

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()
