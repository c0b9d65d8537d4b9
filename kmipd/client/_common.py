"""What both clients share: where to connect, and turning outcomes into results."""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from kmipd.client._errors import KmipdError, remote_error
from kmipd.client._tls import client_context, shared_client_context
from kmipd.net._address import format_address, parse_address
from kmipd.protocol import (
    NEED_DATA,
    OPERATIONS,
    ClientConnection,
    ConnectionFailed,
    ErrorInfo,
    HelloResult,
    KeyRef,
    ProtocolError,
    ResponseReceived,
)

DEFAULT_PORT = 5696
DEFAULT_TIMEOUT = 10.0


@attrs.frozen
class Endpoint:
    """Where to connect and how to authenticate, resolved once per client."""

    host: str
    port: int
    context: ssl.SSLContext
    server_hostname: str
    timeout: float
    client_name: str

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


def make_endpoints(
    addresses: str | Sequence[str],
    *,
    ca: str | Path | None,
    cert: str | Path | None,
    key: str | Path | None,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    timeout: float,
    client_name: str,
    private_context: bool = False,
) -> list[Endpoint]:
    """One Endpoint per daemon address, sharing one TLS context."""
    if isinstance(addresses, str):
        addresses = [addresses]
    if not addresses:
        raise KmipdError("give at least one server address")
    if ssl_context is None:
        if ca is None or cert is None or key is None:
            raise KmipdError("give ca, cert and key paths, or an ssl_context")
        # A renewing client loads its new certificate into its context: its own.
        make_context = client_context if private_context else shared_client_context
        ssl_context = make_context(ca=ca, cert=cert, key=key)
    return [
        make_endpoint(
            address,
            ca=None,
            cert=None,
            key=None,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            timeout=timeout,
            client_name=client_name,
        )
        for address in addresses
    ]


def make_endpoint(
    address: str,
    *,
    ca: str | Path | None,
    cert: str | Path | None,
    key: str | Path | None,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    timeout: float,
    client_name: str,
) -> Endpoint:
    try:
        host, port = parse_address(address, default_port=DEFAULT_PORT)
    except ValueError as exc:
        raise KmipdError(str(exc)) from None
    if ssl_context is None:
        if ca is None or cert is None or key is None:
            raise KmipdError("give ca, cert and key paths, or an ssl_context")
        ssl_context = client_context(ca=ca, cert=cert, key=key)
    if timeout <= 0:
        raise KmipdError("timeout must be positive")
    return Endpoint(host, port, ssl_context, server_hostname or host, timeout, client_name)


@attrs.frozen
class ConnectionInfo:
    """What was negotiated and verified on a connection, for logs and diagnostics."""

    tls_version: str
    cipher: str
    server_subject: str
    identity: str
    protocol_version: int
    max_frame_size: int
    max_in_flight: int
    store_id: str
    #: Whether the TLS session was resumed from a ticket (no full handshake).
    resumed: bool = False

    @classmethod
    def describe(cls, tls: ssl.SSLSocket | ssl.SSLObject, hello: HelloResult) -> ConnectionInfo:
        peer: dict[str, Any] = dict(tls.getpeercert() or {})
        subject = ", ".join(
            f"{name}={value}" for rdn in peer.get("subject", ()) for name, value in rdn
        )
        cipher = tls.cipher()
        return cls(
            tls_version=tls.version() or "?",
            cipher=cipher[0] if cipher else "?",
            server_subject=subject,
            identity=hello.identity,
            protocol_version=hello.version,
            max_frame_size=hello.max_frame_size,
            max_in_flight=hello.max_in_flight,
            store_id=hello.store_id,
            resumed=bool(tls.session_reused),
        )


def unwrap_outcome(outcome: Any, *, server: str, request_id: int) -> Any:
    """The typed result, or raise the exception named after the wire error."""
    if isinstance(outcome, ErrorInfo):
        raise remote_error(outcome, server=server, request_id=request_id)
    return outcome


def send_request(protocol: ClientConnection, request: Any, *, server: str) -> tuple[int, bytes]:
    """The request's id and frame; one the server could not read raises FrameTooLargeError.

    Nothing is sent then and the connection stays usable.
    """
    try:
        return protocol.send_request(request)
    except ProtocolError as exc:
        error = ErrorInfo(exc.code, exc.message)
        raise remote_error(error, server=server, request_id=None) from None


def responses(protocol: ClientConnection, *, server: str) -> Iterator[ResponseReceived]:
    """The responses complete in what was received so far; broken framing raises its error."""
    while (event := protocol.next_event()) is not NEED_DATA:
        if isinstance(event, ConnectionFailed):
            raise remote_error(event.error, server=server, request_id=None)
        assert isinstance(event, ResponseReceived)
        yield event


def is_idempotent(request: Any) -> bool:
    return OPERATIONS[request.OPERATION].idempotent


def key_ref(dek_id: str | None, kek: str | None, version: int | None) -> KeyRef:
    """A DEK (``dek_id``) or a KEK version (``kek`` and ``version``), checked early."""
    if (dek_id is None) == (kek is None) or (kek is None) != (version is None):
        raise KmipdError("name a DEK (dek_id=...) or a KEK version (kek=..., version=...)")
    return KeyRef(dek_id=dek_id, kek=kek, version=version)


def new_idempotency_key() -> bytes:
    """128 random bits naming one logical create, however often it is retried."""
    return secrets.token_bytes(16)
