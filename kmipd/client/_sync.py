"""The blocking client: plain ``socket`` + ``ssl``, for programs that do not use trio.

It drives the same sans-IO ClientConnection as the trio client. One
long-lived connection is reused across calls (a mutual-TLS handshake
costs milliseconds of CPU); calls from several threads are serialised on
it. ``get_deks`` pipelines a batch of ids in one round trip.
"""

from __future__ import annotations

import collections
import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from kmipd.client._common import (
    DEFAULT_TIMEOUT,
    ConnectionInfo,
    Endpoint,
    is_idempotent,
    make_endpoint,
    unwrap_outcome,
)
from kmipd.client._errors import (
    DeadlineExceededError,
    KmipdError,
    ServerTimeoutError,
    UnavailableError,
    remote_error,
    tls_failure,
)
from kmipd.protocol import (
    NEED_DATA,
    ClientConnection,
    ConnectionFailed,
    CreateDek,
    CreateKek,
    DataKeyResult,
    DekResult,
    GenerateDataKey,
    GetDek,
    KekInfo,
    ListKeks,
    ResponseReceived,
    Status,
    StatusResult,
    Unwrap,
    UnwrapResult,
)

_RECEIVE_SIZE = 65536


class _Connection:
    """One TLS connection with its protocol state; not thread-safe on its own."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.server = endpoint.address
        deadline = time.monotonic() + endpoint.timeout
        try:
            raw = socket.create_connection((endpoint.host, endpoint.port), endpoint.timeout)
        except OSError as exc:
            raise UnavailableError(
                f"cannot connect: {exc.strerror or exc}", server=self.server
            ) from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = endpoint.context.wrap_socket(
            raw, server_hostname=endpoint.server_hostname, do_handshake_on_connect=False
        )
        try:
            self.sock.do_handshake()
        except ssl.SSLError as exc:
            self.sock.close()
            raise tls_failure(exc, server=self.server) from None
        except OSError as exc:
            self.sock.close()
            raise UnavailableError(f"TLS handshake failed: {exc}", server=self.server) from None
        self.protocol = ClientConnection(client_name=endpoint.client_name)
        hello_id, frame = self.protocol.start()
        try:
            (outcome,) = self.exchange([(hello_id, frame)], deadline)
        except KmipdError:
            self.close()
            raise
        unwrap_outcome(outcome, server=self.server, request_id=hello_id)

    def exchange(self, frames: list[tuple[int, bytes]], deadline: float) -> list[Any]:
        """Send pipelined requests and read until every one is answered.

        At most the server's max_in_flight requests are outstanding at once:
        the server stops reading past that, and if we kept writing while not
        reading, both ends could block on full socket buffers.
        """
        window = self.protocol.hello.max_in_flight if self.protocol.hello else 1
        unsent = collections.deque(frames)
        outcomes: dict[int, Any] = {}
        outstanding = 0
        try:
            while unsent or outstanding:
                batch = bytearray()
                while unsent and outstanding < window:
                    batch += unsent.popleft()[1]
                    outstanding += 1
                if batch:
                    self._settimeout(deadline)
                    self.sock.sendall(batch)
                # Take every response already received before sending more,
                # so the window refills in one write, not one per response.
                while (event := self.protocol.next_event()) is not NEED_DATA:
                    if isinstance(event, ConnectionFailed):
                        raise remote_error(event.error, server=self.server, request_id=None)
                    assert isinstance(event, ResponseReceived)
                    outstanding -= 1
                    outcomes[event.request_id] = event.outcome
                if outstanding and not (unsent and outstanding < window):
                    self._settimeout(deadline)
                    data = self.sock.recv(_RECEIVE_SIZE)
                    if not data:
                        raise UnavailableError(
                            "the server closed the connection", server=self.server
                        )
                    self.protocol.receive_data(data)
        except TimeoutError:
            raise DeadlineExceededError(
                f"no answer within {self.endpoint.timeout:g} s", server=self.server
            ) from None
        except ssl.SSLError as exc:
            raise tls_failure(exc, server=self.server) from None
        except OSError as exc:
            raise UnavailableError(
                f"connection lost: {exc.strerror or exc}", server=self.server
            ) from None
        return [outcomes[request_id] for request_id, _ in frames]

    def is_stale(self) -> bool:
        """Whether the server closed (or is closing) this idle connection.

        With nothing in flight the server has no reason to send anything; if
        the socket is readable, what waits there is its idle-timeout notice
        or EOF, so the connection must not carry a new request.
        """
        if self.sock.pending():
            return True
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def _settimeout(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Client:
    """A blocking kmipd client; thread-safe, usable as a context manager.

    >>> with Client("127.0.0.1:5696", ca="ca.pem", cert="me.pem", key="me-key.pem") as kms:
    ...     dek = kms.create_dek("orders")
    """

    def __init__(
        self,
        address: str,
        *,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        client_name: str = "kmipd-python",
    ) -> None:
        self._endpoint = make_endpoint(
            address,
            ca=ca,
            cert=cert,
            key=key,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            timeout=timeout,
            client_name=client_name,
        )
        self._lock = threading.Lock()
        self._connection: _Connection | None = None
        self._closed = False

    @property
    def address(self) -> str:
        return self._endpoint.address

    def __repr__(self) -> str:
        return f"Client({self.address!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self) -> ConnectionInfo:
        """Open the connection now (otherwise the first call does) and describe it."""
        with self._lock:
            connection = self._connected()
            assert connection.protocol.hello is not None
            return ConnectionInfo.describe(connection.sock, connection.protocol.hello)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()

    def _connected(self) -> _Connection:
        if self._closed:
            raise KmipdError("the client is closed", server=self.address)
        if self._connection is not None and self._connection.is_stale():
            self._drop()
        if self._connection is None:
            self._connection = _Connection(self._endpoint)
        return self._connection

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _call_many(self, requests: Sequence[Any]) -> list[Any]:
        with self._lock:
            reused = self._connection is not None
            try:
                return self._exchange(requests)
            except ServerTimeoutError:
                # The server closed the idle connection and processed nothing
                # after its notice: any request may be sent again, once.
                self._drop()
                if not reused:
                    raise
            except (UnavailableError, DeadlineExceededError):
                self._drop()
                # The connection broke under us: only idempotent requests are
                # safe to send again, since the first attempt may have applied.
                if not (reused and all(is_idempotent(r) for r in requests)):
                    raise
            except KmipdError:
                if self._connection is not None and self._connection.protocol.failed:
                    self._drop()
                raise
            return self._exchange(requests)

    def _exchange(self, requests: Sequence[Any]) -> list[Any]:
        connection = self._connected()
        deadline = time.monotonic() + self._endpoint.timeout
        frames = [connection.protocol.send_request(request) for request in requests]
        outcomes = connection.exchange(frames, deadline)
        return [
            unwrap_outcome(outcome, server=self.address, request_id=request_id)
            for (request_id, _), outcome in zip(frames, outcomes, strict=True)
        ]

    def _call(self, request: Any) -> Any:
        return self._call_many([request])[0]

    # -- operations ----------------------------------------------------------------

    def create_dek(self, namespace: str) -> DekResult:
        """Have the daemon generate, wrap and store a new 256-bit DEK; returns it and its id."""
        result: DekResult = self._call(CreateDek(namespace=namespace))
        return result

    def get_dek(self, dek_id: str) -> DekResult:
        result: DekResult = self._call(GetDek(dek_id=dek_id))
        return result

    def get_deks(self, dek_ids: Iterable[str]) -> list[DekResult]:
        """Fetch many DEKs in one pipelined round trip; raises the first error, if any."""
        return self._call_many([GetDek(dek_id=dek_id) for dek_id in dek_ids])

    def generate_data_key(self, kek: str, context: dict[str, str] | None = None) -> DataKeyResult:
        """A fresh key plus its wrapped blob, bound to ``context``; store the blob yourself."""
        result: DataKeyResult = self._call(GenerateDataKey(kek=kek, context=dict(context or {})))
        return result

    def unwrap(self, blob: bytes, context: dict[str, str] | None = None) -> UnwrapResult:
        """Recover the key from a blob; the context must equal the one it was generated with."""
        result: UnwrapResult = self._call(Unwrap(blob=bytes(blob), context=dict(context or {})))
        return result

    def create_kek(self, name: str) -> KekInfo:
        result: KekInfo = self._call(CreateKek(name=name))
        return result

    def list_keks(self, prefix: str | None = None) -> list[KekInfo]:
        return list(self._call(ListKeks(prefix=prefix)).keks)

    def status(self) -> StatusResult:
        result: StatusResult = self._call(Status())
        return result
