"""TLS probes: hand-built ClientHellos, and pyOpenSSL as an independent TLS client.

A ClientHello written byte by byte offers exactly the versions and suites a
probe needs, whatever the local OpenSSL's policy would allow (Debian's
refuses to offer TLS 1.0); the server's first record says whether it would
go on (ServerHello) or refuses (alert, or a close). pyOpenSSL runs the full
handshakes with the certificates the probes present, and reports the alert
the server sent when it refuses one.
"""

from __future__ import annotations

import ipaddress
import os
import re
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import TypeVar

import attrs
from OpenSSL import SSL

from conformance._certs import Credentials
from conformance._wire import HEADER

TLS10, TLS11, TLS12 = 0x0301, 0x0302, 0x0303

#: TLS 1.2 suites the protocol allows: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305.
ALLOWED_TLS12_SUITES = {
    0xC02B: "ECDHE-ECDSA-AES128-GCM-SHA256",
    0xC02C: "ECDHE-ECDSA-AES256-GCM-SHA384",
    0xC02F: "ECDHE-RSA-AES128-GCM-SHA256",
    0xC030: "ECDHE-RSA-AES256-GCM-SHA384",
    0xCCA8: "ECDHE-RSA-CHACHA20-POLY1305",
    0xCCA9: "ECDHE-ECDSA-CHACHA20-POLY1305",
}
#: Everything a TLS 1.2 (or older) server might still pick and the protocol forbids:
#: no forward secrecy, CBC, CCM, RC4, 3DES, NULL, anonymous and PSK suites.
FORBIDDEN_SUITES = {
    0x009C: "AES128-GCM-SHA256",
    0x009D: "AES256-GCM-SHA384",
    0x009E: "DHE-RSA-AES128-GCM-SHA256",
    0x009F: "DHE-RSA-AES256-GCM-SHA384",
    0xCCAA: "DHE-RSA-CHACHA20-POLY1305",
    0xC023: "ECDHE-ECDSA-AES128-SHA256",
    0xC024: "ECDHE-ECDSA-AES256-SHA384",
    0xC027: "ECDHE-RSA-AES128-SHA256",
    0xC028: "ECDHE-RSA-AES256-SHA384",
    0xC009: "ECDHE-ECDSA-AES128-SHA",
    0xC00A: "ECDHE-ECDSA-AES256-SHA",
    0xC013: "ECDHE-RSA-AES128-SHA",
    0xC014: "ECDHE-RSA-AES256-SHA",
    0xC0AC: "ECDHE-ECDSA-AES128-CCM",
    0xC0AD: "ECDHE-ECDSA-AES256-CCM",
    0x002F: "AES128-SHA",
    0x0035: "AES256-SHA",
    0x003C: "AES128-SHA256",
    0x003D: "AES256-SHA256",
    0x0033: "DHE-RSA-AES128-SHA",
    0x0067: "DHE-RSA-AES128-SHA256",
    0x000A: "DES-CBC3-SHA",
    0x0005: "RC4-SHA",
    0x0004: "RC4-MD5",
    0x0001: "NULL-MD5",
    0x0002: "NULL-SHA",
    0x003B: "NULL-SHA256",
    0xC006: "ECDHE-ECDSA-NULL-SHA",
    0xC010: "ECDHE-RSA-NULL-SHA",
    0x0034: "ADH-AES128-SHA",
    0x00A6: "ADH-AES128-GCM-SHA256",
    0xC018: "AECDH-AES128-SHA",
    0x00A8: "PSK-AES128-GCM-SHA256",
}
ALERTS = {
    0: "close_notify",
    10: "unexpected_message",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    47: "illegal_parameter",
    48: "unknown_ca",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    116: "certificate_required",
}


@attrs.frozen
class HelloAnswer:
    """The server's first answer to a ClientHello."""

    #: "server-hello", "alert" or "closed".
    kind: str
    version: int | None = None
    suite: int | None = None
    alert: str | None = None

    def describe(self) -> str:
        if self.kind == "server-hello":
            suite = {**ALLOWED_TLS12_SUITES, **FORBIDDEN_SUITES}.get(
                self.suite or 0, hex(self.suite or 0)
            )
            return f"ServerHello version {self.version:#06x}, suite {suite}"
        if self.kind == "alert":
            return f"alert {self.alert}"
        return "connection closed without an answer"


def client_hello(version: int, suites: list[int], host: str) -> bytes:
    """A ClientHello record offering only ``version`` (no supported_versions extension)."""
    extensions = b"".join(
        (
            _extension(0x000A, _vector(2, struct.pack(">3H", 0x001D, 0x0017, 0x0018))),
            _extension(0x000B, b"\x01\x00"),
            _extension(
                0x000D,
                _vector(
                    2,
                    struct.pack(
                        ">10H",
                        0x0403,
                        0x0503,
                        0x0804,
                        0x0805,
                        0x0806,
                        0x0401,
                        0x0501,
                        0x0601,
                        0x0201,
                        0x0203,
                    ),
                ),
            ),
            _extension(0xFF01, b"\x00"),
        )
    )
    if not _is_ip(host):
        name = host.encode()
        extensions += _extension(0x0000, _vector(2, b"\x00" + _vector(2, name)))
    body = (
        struct.pack(">H", version)
        + os.urandom(32)
        + _vector(1, os.urandom(32))
        + _vector(2, b"".join(struct.pack(">H", s) for s in suites))
        + b"\x01\x00"
        + _vector(2, extensions)
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16" + struct.pack(">HH", TLS10, len(handshake)) + handshake


def _vector(length_bytes: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def _extension(kind: int, data: bytes) -> bytes:
    return struct.pack(">H", kind) + _vector(2, data)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def offer_hello(sock: socket.socket, hello: bytes, timeout: float) -> HelloAnswer:
    """Send ``hello`` and read the server's first record; closes ``sock``."""
    with sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(hello)
            header = _read_exactly(sock, 5)
            if header is None:
                return HelloAnswer("closed")
            content_type, _, length = struct.unpack(">BHH", header)
            record = _read_exactly(sock, length)
        except OSError:  # reset, timeout
            return HelloAnswer("closed")
    if record is None:
        return HelloAnswer("closed")
    if content_type == 0x15 and len(record) >= 2:
        return HelloAnswer("alert", alert=ALERTS.get(record[1], f"alert {record[1]}"))
    if content_type == 0x16 and record[:1] == b"\x02" and len(record) >= 39:
        version = struct.unpack_from(">H", record, 4)[0]
        session_id_length = record[38]
        suite = struct.unpack_from(">H", record, 39 + session_id_length)[0]
        return HelloAnswer("server-hello", version=version, suite=suite)
    return HelloAnswer("closed")


def _read_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# -- full handshakes with pyOpenSSL ---------------------------------------------------------------


@attrs.frozen
class HandshakeOutcome:
    """What a pyOpenSSL client saw: refused (and how), or a first response frame."""

    completed: bool
    #: The alert the server sent, e.g. "certificate_required"; None if it sent none.
    alert: str | None = None
    #: How the connection ended when it did ("alert", "eof", "close_notify").
    ended: str | None = None
    #: The payload of the first frame received after the handshake, if any.
    first_frame: bytes | None = None
    version: str | None = None
    cipher: str | None = None

    def describe(self) -> str:
        if not self.completed:
            return f"handshake refused ({self.ended}{': ' + self.alert if self.alert else ''})"
        if self.first_frame is not None:
            return f"handshake completed ({self.version}, {self.cipher}); the server answered"
        return f"handshake completed ({self.version}); then {self.ended}" + (
            f": {self.alert}" if self.alert else ""
        )


T = TypeVar("T")
_ALERT_REASON = re.compile(r"alert (.+)$")


def handshake_probe(
    sock: socket.socket,
    *,
    ca: os.PathLike[str] | str,
    host: str,
    creds: Credentials | None,
    first_request: bytes,
    timeout: float,
    max_version: int = SSL.TLS1_3_VERSION,
    min_version: int = SSL.TLS1_2_VERSION,
) -> HandshakeOutcome:
    """Handshake presenting ``creds``, send ``first_request``, and report what happened.

    With TLS 1.3 the client's handshake completes before the server has
    judged the client's certificate; the server's refusal arrives as an
    alert on the first read, which is why a request is sent.
    """
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(min_version)
    context.set_max_proto_version(max_version)
    context.load_verify_locations(str(ca))
    context.set_verify(SSL.VERIFY_PEER, lambda _conn, _cert, _errno, _depth, ok: bool(ok))
    if creds is not None:
        context.use_certificate_chain_file(str(creds.cert))
        context.use_privatekey_file(str(creds.key))
    connection = SSL.Connection(context, sock)
    connection.set_connect_state()
    if not _is_ip(host):
        connection.set_tlsext_host_name(host.encode())
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    try:
        try:
            _pump(sock, deadline, connection.do_handshake)
        except SSL.Error as exc:
            return HandshakeOutcome(False, *_ending(exc))
        version, cipher = connection.get_protocol_version_name(), connection.get_cipher_name()
        try:
            _pump(sock, deadline, lambda: connection.sendall(first_request))
            data = b""
            while True:
                chunk = _pump(sock, deadline, lambda: connection.recv(65536))
                data += chunk
                if len(data) >= HEADER.size:
                    (length,) = HEADER.unpack_from(data)
                    if len(data) >= HEADER.size + length:
                        return HandshakeOutcome(
                            True,
                            first_frame=data[HEADER.size : HEADER.size + length],
                            version=version,
                            cipher=cipher,
                        )
        except SSL.Error as exc:
            alert, ended = _ending(exc)
            return HandshakeOutcome(True, alert, ended, version=version, cipher=cipher)
        except TimeoutError:
            return HandshakeOutcome(True, None, "no answer in time", version=version, cipher=cipher)
    finally:
        sock.close()


def _pump(sock: socket.socket, deadline: float, step: Callable[[], T]) -> T:
    while True:
        try:
            return step()
        except SSL.WantReadError:
            readable = True
        except SSL.WantWriteError:
            readable = False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the TLS peer did not answer in time")
        if readable:
            select.select([sock], [], [], remaining)
        else:
            select.select([], [sock], [], remaining)


def _ending(exc: SSL.Error) -> tuple[str | None, str]:
    if isinstance(exc, SSL.ZeroReturnError):
        return None, "close_notify"
    if isinstance(exc, SSL.SysCallError):
        return None, "eof"
    for entry in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        match = _ALERT_REASON.search(str(entry[-1]))
        if match:
            return match.group(1).replace(" ", "_"), "alert"
    return None, f"error {exc}"
