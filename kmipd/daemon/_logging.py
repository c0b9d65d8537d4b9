"""Daemon logging: one line per event, for journald or a terminal, never key material.

Where the lines go depends on what stderr is:

* the journal itself (``$JOURNAL_STREAM`` names stderr's device and inode,
  as systemd sets it for ``StandardError=journal``): records are sent over
  the journal's native protocol, so each one keeps its priority, logger
  and structured fields as journal fields (``journalctl -o verbose``);
* a terminal: ``time LEVEL logger: message key=value``;
* anything else (a pipe to a supervisor, a file): ``<N>logger: message
  key=value`` with the syslog priority prefix journald and most log
  collectors understand.

Structured fields come from ``extra={"fields": {...}}`` on a log call. A
record never spans lines: a traceback is folded into its line with ``\\n``.
Messages are written by kmipd's own code, which never puts a key, a PIN or
a blob into one; fields must follow the same rule.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping
from typing import Any, TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "kmipd"

#: logging level -> syslog priority (sd-daemon(3): <3> error ... <7> debug).
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)


def syslog_priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7


def configure_logging(
    level: str = "info",
    *,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> None:
    stream = stream or sys.stderr
    env = os.environ if environ is None else environ
    line_handler = logging.StreamHandler(stream)
    handler: logging.Handler
    if journal_stream_is(stream, env.get("JOURNAL_STREAM")):
        line_handler.setFormatter(EventFormatter(priority_prefix=True))
        handler = JournalHandler(journal_socket, fallback=line_handler)
    elif _isatty(stream):
        line_handler.setFormatter(EventFormatter(timestamp=True))
        handler = line_handler
    else:
        line_handler.setFormatter(EventFormatter(priority_prefix=True))
        handler = line_handler
    root = logging.getLogger("kmipd")
    for replaced in root.handlers:
        replaced.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def set_level(level: str) -> None:
    logging.getLogger("kmipd").setLevel(level.upper())


def journal_stream_is(stream: TextIO, journal_stream: str | None) -> bool:
    """True if ``$JOURNAL_STREAM`` ("device:inode") is this very stream."""
    if not journal_stream:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return journal_stream == f"{info.st_dev}:{info.st_ino}"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except ValueError:
        return False


def record_fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


class EventFormatter(logging.Formatter):
    """One line per record: ``[<N>|time LEVEL ]logger: message key=value ...``."""

    def __init__(self, *, priority_prefix: bool = False, timestamp: bool = False) -> None:
        super().__init__()
        self._priority_prefix = priority_prefix
        self._timestamp = timestamp

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name}: {record.getMessage()}"
        fields = record_fields(record)
        if fields:
            text += " " + " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        text = text.replace("\r", "\\r").replace("\n", "\\n")
        if self._priority_prefix:
            return f"<{syslog_priority(record.levelno)}>{text}"
        if self._timestamp:
            return f"{self.formatTime(record, '%Y-%m-%d %H:%M:%S')} {record.levelname} {text}"
        return text


def full_message(record: logging.LogRecord, formatter: logging.Formatter) -> str:
    message = record.getMessage()
    if record.exc_info:
        message += "\n" + formatter.formatException(record.exc_info)
    return message


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class JournalHandler(logging.Handler):
    """systemd-journald's native protocol: one datagram of fields per record.

    If the journal cannot take a datagram (gone, full, or a record too
    large for one datagram) the record is written by ``fallback`` instead,
    which goes to the same journal through stderr.
    """

    def __init__(self, path: str, *, fallback: logging.Handler) -> None:
        super().__init__()
        self.path = path
        self.fallback = fallback
        self._formatter = logging.Formatter()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)  # never stall the event loop on a slow journald

    def emit(self, record: logging.LogRecord) -> None:
        try:
            datagram = encode_journal_fields(self.journal_fields(record))
            self._socket.sendto(datagram, self.path)
        except OSError:
            self.fallback.handle(record)
        except Exception:
            self.handleError(record)

    def journal_fields(self, record: logging.LogRecord) -> dict[str, str]:
        fields = {
            "MESSAGE": f"{record.name}: {full_message(record, self._formatter)}",
            "PRIORITY": str(syslog_priority(record.levelno)),
            "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
        }
        for key, value in record_fields(record).items():
            fields[journal_field_name(key)] = str(value)
        return fields

    def close(self) -> None:
        self._socket.close()
        super().close()


def journal_field_name(key: str) -> str:
    """``peer`` -> ``KMIPD_PEER``: upper case, letters, digits and underscores only."""
    cleaned = "".join(c if c.isascii() and c.isalnum() else "_" for c in key.upper())
    return f"KMIPD_{cleaned}"[:64]


def encode_journal_fields(fields: Mapping[str, str]) -> bytes:
    """The native protocol: ``NAME=value\\n``, or ``NAME\\n<u64 le size>value\\n`` for values
    containing a newline."""
    out = bytearray()
    for name, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def decode_journal_fields(datagram: bytes) -> dict[str, str]:
    """The inverse of encode_journal_fields (for tests and tools)."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(datagram):
        end = datagram.index(b"\n", position)
        line = datagram[position:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields[name.decode()] = value.decode()
            position = end + 1
        else:
            (size,) = struct.unpack_from("<Q", datagram, end + 1)
            start = end + 1 + 8
            fields[line.decode()] = datagram[start : start + size].decode()
            position = start + size + 1
    return fields
