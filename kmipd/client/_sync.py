"""The blocking client: plain ``socket`` + ``ssl``, for programs that do not use trio.

Only I/O lives here: the operations are the core's (``_core``), run by
``Client._drive``. It drives the same sans-IO ClientConnection as the trio
client. Long-lived connections are reused across calls (a mutual-TLS
handshake costs milliseconds of CPU); a call borrows one for its whole
exchange, so calls from several threads share the pool. ``get_deks``
pipelines a batch of ids in one round trip.

After the handshake a connection's socket is non-blocking and every wait
is one ``poll`` bounded by the call's deadline: a get is four system calls
(the idle check, one write, one poll, one read). A socket timeout instead
would cost a failed read and a poll per receive, and ``settimeout`` an
ioctl per call.
"""

from __future__ import annotations

import collections
import contextlib
import math
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import outcome

from kmipd.client._common import (
    ConnectionInfo,
    Endpoint,
    responses,
    send_request,
    unwrap_outcome,
)
from kmipd.client._core import ClientCore, Offload, Run, Send, Steps, operation
from kmipd.client._errors import (
    CertificateRejectedError,
    DeadlineExceededError,
    KmipdError,
    ServerCertificateError,
    ServerTimeoutError,
    UnavailableError,
    remote_error,
    tls_failure,
)
from kmipd.client._failover import FailoverCall, ServerState
from kmipd.protocol import ClientConnection, ConnectionFailed

R = TypeVar("R")
_RECEIVE_SIZE = 65536


class _Connection:
    """One TLS connection with its protocol state; not thread-safe on its own."""

    def __init__(
        self, endpoint: Endpoint, deadline: float, session: ssl.SSLSession | None = None
    ) -> None:
        self.endpoint = endpoint
        self.server = endpoint.address
        #: The pool's certificate generation when this connection was made.
        self.generation = 0
        try:
            raw = socket.create_connection(
                (endpoint.host, endpoint.port), max(0.001, deadline - time.monotonic())
            )
        except OSError as exc:
            raise UnavailableError(
                f"cannot connect: {exc.strerror or exc}", server=self.server
            ) from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = endpoint.context.wrap_socket(
            raw,
            server_hostname=endpoint.server_hostname,
            do_handshake_on_connect=False,
            session=session,
        )
        try:
            self.sock.do_handshake()
        except ssl.SSLError as exc:
            self.sock.close()
            raise tls_failure(exc, server=self.server) from None
        except OSError as exc:
            self.sock.close()
            raise UnavailableError(f"TLS handshake failed: {exc}", server=self.server) from None
        self.sock.setblocking(False)  # waits are our polls, bounded by each call's deadline
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN)
        self._polling_for = select.POLLIN
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
                    self._send(batch, deadline)
                # Take every response already received before sending more,
                # so the window refills in one write, not one per response.
                for event in responses(self.protocol, server=self.server):
                    outstanding -= 1
                    outcomes[event.request_id] = event.outcome
                if outstanding and not (unsent and outstanding < window):
                    self.protocol.receive_data(self._receive(deadline))
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
        return self._ready(select.POLLIN, 0)

    def _send(self, data: bytearray, deadline: float) -> None:
        """All of ``data``, or TimeoutError at the deadline."""
        view = memoryview(data)
        while view:
            try:
                # Whole or nothing (OpenSSL without partial writes); after a
                # want-write the same bytes are offered again, as OpenSSL needs.
                view = view[self.sock.send(view) :]
            except ssl.SSLWantWriteError:
                self._wait(select.POLLOUT, deadline)
            except ssl.SSLWantReadError:
                self._wait(select.POLLIN, deadline)

    def _receive(self, deadline: float) -> bytes:
        """Decrypted bytes (at least one), or TimeoutError at the deadline."""
        while True:
            if not self.sock.pending():
                # Asked after a send: the answer is rarely there already, so
                # wait first instead of a read that fails.
                self._wait(select.POLLIN, deadline)
            try:
                data = self.sock.recv(_RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                continue  # a record not yet whole, or only a session ticket
            except ssl.SSLWantWriteError:
                self._wait(select.POLLOUT, deadline)
                continue
            if not data:
                raise UnavailableError("the server closed the connection", server=self.server)
            return data

    def _wait(self, events: int, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._ready(events, remaining):
            raise TimeoutError

    def _ready(self, events: int, seconds: float) -> bool:
        if events != self._polling_for:
            self._poll.modify(self.sock, events)
            self._polling_for = events
        # poll takes milliseconds: round up, so a wait never ends before its deadline.
        return bool(self._poll.poll(math.ceil(seconds * 1000)))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def notice(self) -> KmipdError | None:
        """What the server said before closing this stale connection, if it said anything.

        A connection-level error (certificate-revoked, timeout) waits there while
        the connection sits in the pool; a revoked client must get that error,
        not a fresh handshake on another connection.
        """
        try:
            # The data is already there, or arriving.
            data = self._receive(time.monotonic() + 1.0)
        except (OSError, ssl.SSLError, KmipdError):
            return None
        if not data:
            return None
        self.protocol.receive_data(data)
        event = self.protocol.next_event()
        if isinstance(event, ConnectionFailed):
            return remote_error(event.error, server=self.server, request_id=None)
        return None


class _Pool:
    """Long-lived connections to one daemon, shared by the client's threads."""

    def __init__(self, server: ServerState, size: int) -> None:
        self.server = server
        self._size = size
        self._idle: list[_Connection] = []
        self._open = 0
        self._closed = False
        #: A TLS 1.3 session with a ticket, to resume the next connection with.
        self._session: ssl.SSLSession | None = None
        #: Bumped when the client's certificate changes: a session from before would
        #: resume with the old certificate (and keep it, ticket after ticket).
        self._generation = 0
        self._cond = threading.Condition()

    def borrow(self, deadline: float) -> _Connection:
        with self._cond:
            while True:
                if self._closed:
                    raise KmipdError("the client is closed", server=self.server.address)
                while self._idle:
                    connection = self._idle.pop()
                    if not connection.is_stale():
                        return connection
                    notice = connection.notice()
                    self._keep_session(connection)  # the new connection may resume it
                    connection.close()  # the server closed it while idle
                    self._open -= 1
                    if isinstance(notice, CertificateRejectedError):
                        raise notice  # revoked or expired: no new connection will do
                if self._open < self._size:
                    self._open += 1
                    generation, session = self._generation, self._session
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceededError(
                        "no connection became free in time", server=self.server.address
                    )
                self._cond.wait(remaining)
        try:
            connection = _Connection(self.server.endpoint, deadline, session)
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise
        connection.generation = generation
        return connection

    def _keep_session(self, connection: _Connection) -> None:
        """Keep the session of a connection about to close, if it can be resumed.

        Resumption skips most of a full handshake; only a daemon that issues
        tickets offers it (``tls.session_tickets``), and kmipd re-checks
        revocation on each one. The session is read here, from a connection
        that answered and so has its tickets, not after every handshake: the
        read copies the session (its certificates decoded again, ~0.2 ms), a
        cost worth paying only when a new connection is about to be made.
        """
        if connection.generation != self._generation:
            return
        with contextlib.suppress(OSError, ValueError):
            session = connection.sock.session
            if session is not None and session.has_ticket:
                self._session = session

    def new_certificate(self) -> None:
        """The client's certificate changed: new connections present it, none resumes."""
        with self._cond:
            self._generation += 1
            self._session = None

    def give_back(self, connection: _Connection, *, reusable: bool) -> None:
        with self._cond:
            if reusable and not self._closed and connection.protocol.failed is None:
                self._idle.append(connection)
            else:
                connection.close()
                self._open -= 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for connection in self._idle:
                connection.close()
            self._open -= len(self._idle)
            self._idle.clear()
            self._cond.notify_all()


class Client(ClientCore, pool_size=4):
    """A blocking kmipd client: thread-safe, pooled, failing over between daemons.

    >>> with Client(["kms1:5696", "kms2:5696"], ca="ca.pem", cert="me.pem", key="me-key.pem",
    ...             cache=DekCache(ttl=60)) as kms:
    ...     with kms.create_dek("orders") as dek:
    ...         ...
    """

    def _open_pools(self, size: int) -> None:
        self._pools = {s.address: _Pool(s, size) for s in self._servers.servers}

    def _clock(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return f"Client({self.addresses!r})"

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
        """Connect to the first daemon that answers (otherwise the first call does)."""
        info: list[ConnectionInfo] = []

        def describe(connection: _Connection) -> None:
            assert connection.protocol.hello is not None
            info.append(ConnectionInfo.describe(connection.sock, connection.protocol.hello))

        self._drive(self._reach(describe))
        return info[0]

    def close(self) -> None:
        """Close every connection and zero every cached key."""
        for pool in self._pools.values():
            pool.close()
        self._forget_keys()

    def _certificate_changed(self) -> None:
        for pool in self._pools.values():
            pool.new_certificate()

    #: Only the blocking client has these (the trio one would block its thread).
    get_deks = operation(ClientCore._get_deks_batch)
    encrypt_stream = operation(ClientCore._encrypt_stream)
    decrypt_stream = operation(ClientCore._decrypt_stream)

    # -- running an operation's steps: sending, failing over ----------------------------

    @staticmethod
    def _method(steps: Callable[..., Steps[Any]]) -> Callable[..., Any]:
        def method(self: Client, *args: Any, **kwargs: Any) -> Any:
            return self._drive(steps(self, *args, **kwargs))

        return method

    def _drive(self, steps: Steps[R]) -> R:
        """Run steps: each Send through ``_run``, each Offload here; failures go back in."""
        run = Run(self._guarded(steps))
        while run.effect is not None:
            run.resume(outcome.capture(self._perform, run.effect))
        return run.result

    def _perform(self, effect: Send | Offload) -> Any:
        if isinstance(effect, Offload):
            return effect.work()
        return self._run(effect.requests, inspect=effect.inspect)

    def _run(
        self, requests: Sequence[Any], *, inspect: Callable[[_Connection], None] | None = None
    ) -> list[tuple[Any, str, int]]:
        """Send ``requests`` to a daemon, failing over as FailoverCall decides.

        Returns (outcome, server address, request id) per request.
        """
        call = FailoverCall(self._servers, requests, self._timeout)
        while True:
            server, wait = call.next_server()
            if wait:
                time.sleep(wait)  # every daemon is backing off: wait for the soonest
            pool = self._pools[server.address]
            try:
                connection = pool.borrow(call.deadline)
            except (UnavailableError, ServerCertificateError) as exc:
                call.not_sent(server, exc)
                continue
            hello = connection.protocol.hello
            if not call.accepts(server, hello.store_id if hello else None):
                pool.give_back(connection, reusable=True)
                continue
            try:
                if inspect is not None:
                    inspect(connection)
                frames = [
                    send_request(connection.protocol, r, server=server.address) for r in requests
                ]
                outcomes = connection.exchange(frames, call.deadline) if frames else []
            except ServerTimeoutError:
                # The daemon closed this idle connection and processed nothing
                # after its notice: any request may be sent again, at once.
                pool.give_back(connection, reusable=False)
                continue
            except (UnavailableError, DeadlineExceededError) as exc:
                pool.give_back(connection, reusable=False)
                call.lost(server, exc)
                continue
            except BaseException:
                pool.give_back(connection, reusable=False)
                raise
            pool.give_back(connection, reusable=True)
            if call.answered(server, hello.store_id if hello else None, outcomes):
                return [
                    (outcome, server.address, request_id)
                    for outcome, (request_id, _) in zip(outcomes, frames, strict=True)
                ]
