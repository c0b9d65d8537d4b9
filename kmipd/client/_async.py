"""The trio client: concurrent calls pipelined over one connection.

There is no background task: whichever caller is waiting takes the receive
lock, reads, and hands every response it finds to the caller it belongs
to, until its own has arrived. A caller cancelled while waiting simply
stops waiting; its response is read and dropped later.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import trio

from kmipd._trio_tls import TlsChannel, TlsHandshakeError
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

T = TypeVar("T")
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Waiter:
    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.outcome: Any = None


class _Connection:
    def __init__(self, endpoint: Endpoint, channel: TlsChannel) -> None:
        self.server = endpoint.address
        self.channel = channel
        self.protocol = ClientConnection(client_name=endpoint.client_name)
        self.failure: KmipdError | None = None
        self._waiters: dict[int, _Waiter] = {}
        self._receive_lock = trio.Lock()
        self._in_flight = trio.Semaphore(1)  # widened once hello says how far we may go

    @classmethod
    async def open(cls, endpoint: Endpoint) -> _Connection:
        server = endpoint.address
        try:
            stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except OSError as exc:
            raise UnavailableError(
                f"cannot connect: {exc.strerror or exc}", server=server
            ) from None
        channel = TlsChannel(
            stream, endpoint.context, server_side=False, server_hostname=endpoint.server_hostname
        )
        try:
            await channel.handshake()
        except TlsHandshakeError as exc:
            await stream.aclose()
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLError):
                raise tls_failure(cause, server=server) from None
            raise UnavailableError(f"TLS handshake failed: {exc}", server=server) from None
        except _BROKEN as exc:
            await stream.aclose()
            raise UnavailableError(f"TLS handshake failed: {exc}", server=server) from None
        connection = cls(endpoint, channel)
        hello_id, frame = connection.protocol.start()
        try:
            outcome = await connection.exchange(hello_id, frame)
            unwrap_outcome(outcome, server=server, request_id=hello_id)
        except BaseException:
            with trio.CancelScope(shield=True):
                await connection.aclose()
            raise
        assert connection.protocol.hello is not None
        connection._in_flight = trio.Semaphore(connection.protocol.hello.max_in_flight)
        return connection

    async def call(self, request: Any) -> Any:
        async with self._in_flight:
            if self.failure is not None:
                raise self.failure
            request_id, frame = self.protocol.send_request(request)
            outcome = await self.exchange(request_id, frame)
        return unwrap_outcome(outcome, server=self.server, request_id=request_id)

    async def exchange(self, request_id: int, frame: bytes) -> Any:
        waiter = self._waiters[request_id] = _Waiter()
        try:
            try:
                await self.channel.send_all(frame)
            except BaseException as exc:
                # A cancelled send may have left half a frame behind: unusable.
                self._fail(UnavailableError(f"connection lost: {exc!r}", server=self.server))
                raise
            while not waiter.done.is_set():
                async with self._receive_lock:
                    if not waiter.done.is_set():
                        await self._receive_once()
            if isinstance(waiter.outcome, KmipdError):
                raise waiter.outcome
            return waiter.outcome
        finally:
            self._waiters.pop(request_id, None)

    async def _receive_once(self) -> None:
        try:
            data = await self.channel.receive_some()
        except ssl.SSLError as exc:
            self._fail(tls_failure(exc, server=self.server))
            return
        except _BROKEN as exc:
            self._fail(UnavailableError(f"connection lost: {exc!r}", server=self.server))
            return
        if not data:
            self._fail(UnavailableError("the server closed the connection", server=self.server))
            return
        self.protocol.receive_data(data)
        while True:
            event = self.protocol.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, ConnectionFailed):
                self._fail(remote_error(event.error, server=self.server, request_id=None))
                return
            assert isinstance(event, ResponseReceived)
            waiter = self._waiters.get(event.request_id)
            if waiter is not None:  # None: its caller was cancelled
                waiter.outcome = event.outcome
                waiter.done.set()

    def _fail(self, error: KmipdError) -> None:
        if self.failure is None:
            self.failure = error
        for waiter in self._waiters.values():
            if not waiter.done.is_set():
                waiter.outcome = self.failure
                waiter.done.set()

    async def aclose(self) -> None:
        self._fail(UnavailableError("the client closed the connection", server=self.server))
        await self.channel.aclose()


class AsyncClient:
    """A trio kmipd client; concurrent calls share one pipelined connection.

    >>> async with AsyncClient("127.0.0.1:5696", ca=..., cert=..., key=...) as kms:
    ...     dek = await kms.create_dek("orders")
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
        self._connection: _Connection | None = None
        self._connect_lock = trio.Lock()
        self._closed = False

    @property
    def address(self) -> str:
        return self._endpoint.address

    def __repr__(self) -> str:
        return f"AsyncClient({self.address!r})"

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def connect(self) -> ConnectionInfo:
        """Open the connection now (otherwise the first call does) and describe it."""
        connection = await self._connected()
        assert connection.protocol.hello is not None
        return ConnectionInfo.describe(connection.channel.ssl_object, connection.protocol.hello)

    async def aclose(self) -> None:
        self._closed = True
        if self._connection is not None:
            connection, self._connection = self._connection, None
            with trio.CancelScope(shield=True):
                await connection.aclose()

    async def _connected(self) -> _Connection:
        if self._closed:
            raise KmipdError("the client is closed", server=self.address)
        async with self._connect_lock:
            if self._connection is not None and self._connection.failure is not None:
                stale, self._connection = self._connection, None
                await stale.aclose()
            if self._connection is None:
                self._connection = await self._within_deadline(_Connection.open(self._endpoint))
            return self._connection

    async def _within_deadline(self, call: Awaitable[T]) -> T:
        try:
            with trio.fail_after(self._endpoint.timeout):
                return await call
        except trio.TooSlowError:
            raise DeadlineExceededError(
                f"no answer within {self._endpoint.timeout:g} s", server=self.address
            ) from None

    async def _call(self, request: Any) -> Any:
        reused = self._connection is not None and self._connection.failure is None
        connection = await self._connected()
        try:
            return await self._within_deadline(connection.call(request))
        except ServerTimeoutError:
            # The server closed the idle connection and processed nothing
            # after its notice: any request may be sent again.
            if not reused:
                raise
        except UnavailableError:
            # The connection broke under us: only an idempotent request is
            # safe to send again, since the first may have been applied.
            if not (reused and is_idempotent(request)):
                raise
        connection = await self._connected()
        return await self._within_deadline(connection.call(request))

    # -- operations ----------------------------------------------------------------

    async def create_dek(self, namespace: str) -> DekResult:
        result: DekResult = await self._call(CreateDek(namespace=namespace))
        return result

    async def get_dek(self, dek_id: str) -> DekResult:
        result: DekResult = await self._call(GetDek(dek_id=dek_id))
        return result

    async def get_deks(self, dek_ids: Iterable[str]) -> list[DekResult]:
        """Fetch many DEKs concurrently over the one connection; raises the first error."""
        ids = list(dek_ids)
        results: list[Any] = [None] * len(ids)

        async def fetch(index: int, dek_id: str) -> None:
            results[index] = await self.get_dek(dek_id)

        async with trio.open_nursery() as nursery:
            for index, dek_id in enumerate(ids):
                nursery.start_soon(fetch, index, dek_id)
        return results

    async def generate_data_key(
        self, kek: str, context: dict[str, str] | None = None
    ) -> DataKeyResult:
        result: DataKeyResult = await self._call(
            GenerateDataKey(kek=kek, context=dict(context or {}))
        )
        return result

    async def unwrap(self, blob: bytes, context: dict[str, str] | None = None) -> UnwrapResult:
        result: UnwrapResult = await self._call(
            Unwrap(blob=bytes(blob), context=dict(context or {}))
        )
        return result

    async def create_kek(self, name: str) -> KekInfo:
        result: KekInfo = await self._call(CreateKek(name=name))
        return result

    async def list_keks(self, prefix: str | None = None) -> list[KekInfo]:
        return list((await self._call(ListKeks(prefix=prefix))).keks)

    async def status(self) -> StatusResult:
        result: StatusResult = await self._call(Status())
        return result
