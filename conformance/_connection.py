"""A blocking TLS connection that speaks frames, and records what it saw.

Each case gets a transcript; every frame sent and received on its
connections goes into it, so a failure can show what was sent and what came
back (hex of the first bytes and the decoded CBOR). Every response is held
to the protocol on arrival: one well-formed CBOR item in the protocol's
profile, valid against the CDDL ``response`` rule, with an error name that
matches its code.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
import cbor2

from conformance._case import CaseFailed
from conformance._schema import Schema
from conformance._wire import (
    HEADER,
    MAX_RESPONSE_FRAME,
    MalformedCbor,
    decode_strict,
    describe,
    encode,
    frame,
    hex_preview,
    scan_item,
)

RECEIVE_SIZE = 65536


class ConnectionClosed(Exception):  # noqa: N818 (an event, reported as such)
    """The server closed the connection (EOF, close_notify, reset or a TLS alert)."""

    def __init__(self, how: str, alert: str | None = None) -> None:
        super().__init__(how)
        self.how = how
        #: The TLS alert's reason when the close came with one (e.g. CERTIFICATE_REQUIRED).
        self.alert = alert


class NoResponse(Exception):  # noqa: N818 (an event, reported as such)
    """Nothing arrived within the time allowed."""


class Transcript:
    """The case's record of frames in both directions (thread-safe, bounded)."""

    LIMIT = 400

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._dropped = 0
        self._lock = threading.Lock()

    def add(self, line: str) -> None:
        with self._lock:
            if len(self._lines) >= self.LIMIT:
                del self._lines[0]
                self._dropped += 1
            self._lines.append(line)

    def tail(self, count: int = 12) -> list[str]:
        with self._lock:
            lines = self._lines[-count:]
            skipped = len(self._lines) - len(lines) + self._dropped
        return ([f"... {skipped} earlier line(s)"] if skipped else []) + lines


@attrs.frozen
class Message:
    """A response as received: its payload bytes and the decoded item."""

    payload: bytes
    item: dict[str, Any]
    #: Integers or lengths not in their shortest form (the spec's "should").
    non_preferred: bool = False

    @property
    def id(self) -> int | None:
        value = self.item.get("id")
        return value if isinstance(value, int) else None

    @property
    def is_error(self) -> bool:
        return "error" in self.item

    @property
    def error_name(self) -> str | None:
        return self.item["error"]["name"] if self.is_error else None

    @property
    def error_message(self) -> str:
        return str(self.item["error"]["message"]) if self.is_error else ""

    @property
    def result(self) -> dict[str, Any]:
        value = self.item.get("result")
        return value if isinstance(value, dict) else {}

    def summary(self) -> str:
        if self.is_error:
            return (
                f"id={self.id} error {self.item['error']['code']} {self.error_name}: "
                f"{self.error_message[:120]!r}"
            )
        return f"id={self.id} result"


class Connection:
    """One client connection. Not thread-safe: one thread per connection."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        schema: Schema,
        transcript: Transcript,
        label: str,
        observe: Callable[[Message], None] = lambda message: None,
    ) -> None:
        self.sock = sock
        self.schema = schema
        self.observe = observe
        self.transcript = transcript
        self.label = label
        self._buffer = bytearray()
        self.closed_by_peer: ConnectionClosed | None = None

    # -- sending -------------------------------------------------------------------------

    def send(self, message: object) -> None:
        payload = encode(message)
        self.transcript.add(f"-> {self.label} {hex_preview(frame(payload))}  = {describe(message)}")
        self._write(frame(payload))

    def send_raw(self, data: bytes, note: str = "") -> None:
        self.transcript.add(
            f"-> {self.label} {hex_preview(data)}" + (f"  ({note})" if note else "")
        )
        self._write(data)

    def send_quietly(self, data: bytes, note: str) -> None:
        """Send many frames at once, recorded as one line (``note`` says what)."""
        self.transcript.add(f"-> {self.label} {len(data)} bytes: {note}")
        self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (ssl.SSLError, OSError) as exc:
            raise ConnectionClosed(f"send failed: {_reason(exc)}", _alert(exc)) from None

    # -- receiving -----------------------------------------------------------------------

    def receive(self, timeout: float = 10.0, *, quiet: bool = False) -> Message:
        """The next response; raises ConnectionClosed or NoResponse."""
        deadline = time.monotonic() + timeout
        while True:
            payload = self._next_payload()
            if payload is not None:
                return self._accept(payload, quiet=quiet)
            self._fill(deadline)

    def request(
        self, request_id: int, op: str, args: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> Message:
        """Send one request and return the response to it (the next message must be it)."""
        message: dict[str, Any] = {"id": request_id, "op": op}
        if args is not None:
            message["args"] = args
        self.send(message)
        reply = self.receive(timeout)
        if reply.id != request_id:
            raise CaseFailed(
                f"expected the response to request {request_id}, got {reply.summary()}"
            )
        return reply

    def receive_until_closed(self, timeout: float) -> list[Message]:
        """Messages until the server closes; NoResponse if it has not closed by then."""
        messages = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                messages.append(self.receive(max(0.0, deadline - time.monotonic())))
        except ConnectionClosed:
            return messages

    def receive_many(self, count: int, timeout: float) -> list[Message]:
        deadline = time.monotonic() + timeout
        return [
            self.receive(max(0.0, deadline - time.monotonic()), quiet=True) for _ in range(count)
        ]

    def _next_payload(self) -> bytes | None:
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length > MAX_RESPONSE_FRAME:
            raise CaseFailed(f"the server sent a frame header announcing {length} bytes")
        if len(self._buffer) < HEADER.size + length:
            return None
        payload = bytes(self._buffer[HEADER.size : HEADER.size + length])
        del self._buffer[: HEADER.size + length]
        return payload

    def _fill(self, deadline: float) -> None:
        if self.closed_by_peer is not None:
            raise self.closed_by_peer
        remaining = deadline - time.monotonic()
        pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
        if not pending:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, remaining))
            if not ready:
                raise NoResponse("no response within the time allowed")
        try:
            data = self.sock.recv(RECEIVE_SIZE)
        except ssl.SSLWantReadError:
            return  # a TLS record without application data (e.g. a session ticket)
        except (ssl.SSLError, OSError) as exc:
            self.closed_by_peer = ConnectionClosed(_reason(exc), _alert(exc))
            self.transcript.add(f"<- {self.label} closed: {self.closed_by_peer.how}")
            raise self.closed_by_peer from None
        if not data:
            self.closed_by_peer = ConnectionClosed("end of stream")
            self.transcript.add(f"<- {self.label} closed (end of stream)")
            raise self.closed_by_peer
        self._buffer += data

    def _accept(self, payload: bytes, *, quiet: bool) -> Message:
        try:
            message = parse_response(payload, self.schema)
        except CaseFailed:
            self.transcript.add(
                f"<- {self.label} {hex_preview(frame(payload))}  = {_best_effort(payload)}"
            )
            raise
        self.observe(message)
        if not quiet:
            self.transcript.add(
                f"<- {self.label} {hex_preview(frame(payload))}  = {describe(message.item)}"
            )
        return message

    def close(self) -> None:
        try:
            if isinstance(self.sock, ssl.SSLSocket):
                self.sock.settimeout(1.0)
                self.sock.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def parse_response(payload: bytes, schema: Schema) -> Message:
    """Hold one response frame to the protocol, or raise CaseFailed saying how it breaks it."""
    shown = f"{hex_preview(payload)}"
    try:
        scan = scan_item(payload)
    except MalformedCbor as exc:
        raise CaseFailed(f"the server sent malformed CBOR ({exc}): {shown}") from None
    if scan.end != len(payload):
        raise CaseFailed(f"the server's frame has bytes after its CBOR item: {shown}")
    if scan.profile_violations:
        raise CaseFailed(
            f"the server's response breaks the CBOR profile "
            f"({', '.join(scan.profile_violations)}): {shown}"
        )
    try:
        item = decode_strict(payload)
    except MalformedCbor as exc:
        raise CaseFailed(f"the server's response does not decode ({exc}): {shown}") from None
    problem = schema.validate("response", payload)
    if problem is not None:
        raise CaseFailed(
            f"the server's response does not match the CDDL response rule: {problem}; "
            f"got {describe(item)}"
        )
    assert isinstance(item, dict)  # the CDDL says so
    if "error" in item:
        code, name = item["error"]["code"], item["error"]["name"]
        if schema.error_codes.get(code) != name:
            raise CaseFailed(
                f"error code {code} is named {name!r}; protocol.cddl names it "
                f"{schema.error_codes.get(code)!r}"
            )
    return Message(payload, item, scan.non_preferred)


def _best_effort(payload: bytes) -> str:
    """The decoded item for a report, however broken (cbor2 is lenient by default)."""
    try:
        return describe(cbor2.loads(payload))
    except Exception as exc:
        return f"(does not decode: {exc})"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS {exc.reason}"
    return str(exc) or type(exc).__name__


def _alert(exc: BaseException) -> str | None:
    """The alert named by an OpenSSL error reason, e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED."""
    if isinstance(exc, ssl.SSLError) and exc.reason and "_ALERT_" in exc.reason:
        return exc.reason.split("_ALERT_", 1)[1].lower()
    return None
