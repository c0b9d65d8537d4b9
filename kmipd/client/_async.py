"""The trio client: concurrent calls pipelined over a few connections per daemon.

There is no background task: whichever caller is waiting reads, and hands
every response it finds to the caller it belongs to; the others wait for
their own to be handed over, or for the reader to leave so one of them can
take over. A caller cancelled while waiting simply stops waiting; its
response is read and dropped later. Only I/O lives here: the operations are
the core's (``_core``), run by ``AsyncClient._drive``.
"""

from __future__ import annotations

import select
import ssl
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

import outcome
import trio

from kmipd.client._common import (
    ConnectionInfo,
    Endpoint,
    responses,
    send_request,
    unwrap_outcome,
)
from kmipd.client._core import ClientCore, Offload, Run, Send, Steps
from kmipd.client._errors import (
    DeadlineExceededError,
    KmipdError,
    ServerCertificateError,
    ServerTimeoutError,
    UnavailableError,
    tls_failure,
)
from kmipd.client._failover import FailoverCall, ServerState
from kmipd.client._keys import Dek
from kmipd.net._trio_tls import TlsChannel, TlsHandshakeError
from kmipd.protocol import ClientConnection

R = TypeVar("R")
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Waiter:
    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = False
        self.outcome: Any = None


class _Connection:
    def __init__(self, endpoint: Endpoint, channel: TlsChannel) -> None:
        self.server = endpoint.address
        self.channel = channel
        self.protocol = ClientConnection(client_name=endpoint.client_name)
        self.failure: KmipdError | None = None
        self._waiters: dict[int, _Waiter] = {}
        self._reading = False
        #: Set (and replaced) whenever the reader hands responses over or leaves.
        self._progress = trio.Event()
        self._in_flight = trio.Semaphore(1)  # widened once hello says how far we may go

    @property
    def usable(self) -> bool:
        return self.failure is None

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

    @property
    def load(self) -> int:
        """Requests in flight on this connection."""
        return len(self._waiters)

    async def call(self, request: Any) -> tuple[Any, int]:
        """The raw outcome (result or ErrorInfo) and the request id."""
        async with self._in_flight:
            await self._take_notice()
            if self.failure is not None:
                raise self.failure
            request_id, frame = send_request(self.protocol, request, server=self.server)
            return await self.exchange(request_id, frame), request_id

    async def exchange(self, request_id: int, frame: bytes) -> Any:
        waiter = self._waiters[request_id] = _Waiter()
        try:
            try:
                await self.channel.send_all(frame)
            except BaseException as exc:
                # A cancelled send may have left half a frame behind: unusable.
                self._fail(UnavailableError(f"connection lost: {exc!r}", server=self.server))
                raise
            while not waiter.done:
                if self._reading:
                    await self._progress.wait()
                    continue
                self._reading = True
                try:
                    await self._receive_once()
                finally:
                    self._reading = False
                    self._progress.set()
                    self._progress = trio.Event()
            if isinstance(waiter.outcome, KmipdError):
                raise waiter.outcome
            return waiter.outcome
        finally:
            self._waiters.pop(request_id, None)

    async def _take_notice(self) -> None:
        """On an idle connection, read what the server sent unasked before using it.

        A connection-level error (certificate-revoked, timeout) waits there while
        the connection sits in the pool; read it first, so a revoked client gets
        its error instead of a write into a closed connection.
        """
        if self._reading or self._waiters or self.failure is not None:
            return
        transport = self.channel.transport
        if not isinstance(transport, trio.SocketStream):
            return
        try:
            readable, _, _ = select.select([transport.socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return
        if not readable:
            return
        self._reading = True
        try:
            with trio.move_on_after(1.0) as scope:
                await self._receive_once()
            if scope.cancelled_caught:
                self._fail(UnavailableError("connection stalled", server=self.server))
        finally:
            self._reading = False
            self._progress.set()
            self._progress = trio.Event()

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
        try:
            for event in responses(self.protocol, server=self.server):
                waiter = self._waiters.get(event.request_id)
                if waiter is not None:  # None: its caller was cancelled
                    waiter.outcome = event.outcome
                    waiter.done = True
        except KmipdError as exc:  # the framing broke: every waiter gets the error
            self._fail(exc)

    def _fail(self, error: KmipdError) -> None:
        if self.failure is None:
            self.failure = error
        for waiter in self._waiters.values():
            if not waiter.done:
                waiter.outcome = self.failure
                waiter.done = True
        self._progress.set()
        self._progress = trio.Event()

    async def aclose(self) -> None:
        self._fail(UnavailableError("the client closed the connection", server=self.server))
        await self.channel.aclose()


class _Pool:
    """Connections to one daemon; calls go to the least loaded, new ones open as load grows."""

    def __init__(self, server: ServerState, size: int) -> None:
        self.server = server
        self._size = size
        self._connections: list[_Connection] = []
        self._opening = 0
        self._open_lock = trio.Lock()

    async def connection(self) -> _Connection:
        await self._drop_failed()
        best = min(self._connections, key=lambda c: c.load, default=None)
        if best is not None and (best.load == 0 or len(self._connections) >= self._size):
            return best
        async with self._open_lock:
            await self._drop_failed()
            if len(self._connections) >= self._size:
                return min(self._connections, key=lambda c: c.load)
            connection = await _Connection.open(self.server.endpoint)
            self._connections.append(connection)
            return connection

    async def _drop_failed(self) -> None:
        failed = [c for c in self._connections if not c.usable]
        if failed:
            self._connections = [c for c in self._connections if c.usable]
            for connection in failed:
                await connection.aclose()

    async def aclose(self) -> None:
        connections, self._connections = self._connections, []
        for connection in connections:
            await connection.aclose()


class AsyncClient(ClientCore, pool_size=2):
    """A trio kmipd client: pipelined, pooled, failing over between daemons.

    >>> async with AsyncClient(["kms1:5696", "kms2:5696"], ca=..., cert=..., key=...) as kms:
    ...     async with await kms.create_dek("orders") as dek:
    ...         ...
    """

    def _open_pools(self, size: int) -> None:
        self._pools = {s.address: _Pool(s, size) for s in self._servers.servers}
        self._closed = False

    def _clock(self) -> float:
        return trio.current_time()  # only called from inside trio

    def __repr__(self) -> str:
        return f"AsyncClient({self.addresses!r})"

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
        """Connect to the first daemon that answers (otherwise the first call does)."""
        info: list[ConnectionInfo] = []

        def describe(connection: _Connection) -> None:
            assert connection.protocol.hello is not None
            info.append(
                ConnectionInfo.describe(connection.channel.ssl_object, connection.protocol.hello)
            )

        await self._drive(self._reach(describe))
        return info[0]

    async def aclose(self) -> None:
        """Close every connection and zero every cached key."""
        self._closed = True
        with trio.CancelScope(shield=True):
            for pool in self._pools.values():
                await pool.aclose()
        self._forget_keys()

    async def get_deks(self, dek_ids: Iterable[str]) -> list[Dek]:
        """Many DEKs concurrently (pipelined); raises the first error."""
        await self._drive(self._follow_revocations())
        ids = list(dek_ids)
        found: dict[str, Dek] = {}

        async def fetch(dek_id: str) -> None:
            found[dek_id] = await self.get_dek(dek_id)

        async with trio.open_nursery() as nursery:
            for dek_id in set(ids):
                nursery.start_soon(fetch, dek_id)
        return self._keys.hand_out(ids, found)

    # -- running an operation's steps: sending, failing over ----------------------------

    @staticmethod
    def _method(steps: Callable[..., Steps[Any]]) -> Callable[..., Any]:
        async def method(self: AsyncClient, *args: Any, **kwargs: Any) -> Any:
            return await self._drive(steps(self, *args, **kwargs))

        return method

    async def _drive(self, steps: Steps[R]) -> R:
        """Run steps: each Send through ``_send``, each Offload on a worker thread;
        failures (cancellation too) go back in."""
        run = Run(self._guarded(steps))
        while run.effect is not None:
            run.resume(await outcome.acapture(self._perform, run.effect))
        return run.result

    async def _perform(self, effect: Send | Offload) -> Any:
        if isinstance(effect, Offload):
            return await trio.to_thread.run_sync(effect.work)
        return await self._send(effect)

    async def _send(self, send: Send) -> list[tuple[Any, str, int]]:
        """One answer per request; several go concurrently, each failing over on its own."""
        requests = send.requests
        if not requests:
            await self._run(None, inspect=send.inspect)
            return []
        if len(requests) == 1:
            return [await self._run(requests[0], inspect=send.inspect)]
        answers: list[Any] = [None] * len(requests)

        async def one(index: int) -> None:
            answers[index] = await self._run(requests[index])

        async with trio.open_nursery() as nursery:
            for index in range(len(requests)):
                nursery.start_soon(one, index)
        return answers

    async def _run(
        self, request: Any | None, *, inspect: Callable[[_Connection], None] | None = None
    ) -> tuple[Any, str, int]:
        """Send one request to a daemon, failing over as FailoverCall decides."""
        if self._closed:
            raise KmipdError("the client is closed", server=self.address)
        requests = [] if request is None else [request]
        call = FailoverCall(self._servers, requests, self._timeout, clock=trio.current_time)
        while True:
            server, wait = call.next_server()
            if wait:
                await trio.sleep(wait)  # every daemon is backing off: wait for the soonest
            pool = self._pools[server.address]
            with trio.move_on_at(call.deadline):
                try:
                    connection = await pool.connection()
                except (UnavailableError, ServerCertificateError) as exc:
                    call.not_sent(server, exc)
                    continue
                if not call.accepts(server, _store_id(connection)):
                    continue
                if inspect is not None:
                    inspect(connection)
                if request is None:
                    call.answered(server, _store_id(connection), [])
                    return None, server.address, 0
                try:
                    outcome, request_id = await connection.call(request)
                except ServerTimeoutError:
                    continue  # the daemon closed an idle connection and applied nothing
                except UnavailableError as exc:
                    call.lost(server, exc)
                    continue
                if call.answered(server, _store_id(connection), [outcome]):
                    return outcome, server.address, request_id
                continue
            call.lost(
                server,
                DeadlineExceededError(
                    f"no answer within {self._timeout:g} s", server=server.address
                ),
            )


def _store_id(connection: _Connection) -> str | None:
    hello = connection.protocol.hello
    return hello.store_id if hello is not None else None
