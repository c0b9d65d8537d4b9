"""The trio shell around ServerConnection and KeyService.

Why it is long: a connection's deadlines, budgets and revocation cut-off are one state
machine around its socket; the protocols' own state lives in kmipd.protocol and _kmip_conn.

One task per connection reads frames; each request runs in its own task,
so a slow request never holds up the ones behind it, and responses go out
as they finish (out of order). A connection may have at most
``max_in_flight`` requests unanswered: past that its reader stops reading,
and TCP flow control pushes back on the client. Every wait on a peer has a
deadline (handshake, idle, partial frame, send), so no client can hold
resources another client needs.
"""

from __future__ import annotations

import collections
import datetime
import errno
import fnmatch
import logging
import math
import select
import ssl
import time

import attrs
import trio
from cryptography import x509

from kmipd.audit import AuditError, AuditEvent
from kmipd.kmip import FIRST_BYTE as KMIP_FIRST_BYTE
from kmipd.metrics._counters import ServerMetrics
from kmipd.net._address import format_address
from kmipd.net._trio_tls import TlsChannel, TlsHandshakeError
from kmipd.protocol import (
    ANSWERED,
    NEED_DATA,
    PAUSED,
    ConnectionEnded,
    ErrorCode,
    RequestReceived,
    ServerConnection,
    encode_frame,
    encode_item,
    error_to_wire,
)
from kmipd.server._kmip_conn import KmipSession, KmipSettings
from kmipd.server._tls import PeerRejectedError, ServerTls, TlsConfigError
from kmipd.service import NOT_NOW, Caller, KeyService, ServiceError

log = logging.getLogger("kmipd.server")

#: After a drain, how long a client still sending gets to see our close and stop,
#: before the socket is closed (on unread data, which makes the kernel reset it).
LINGER = 1.0

#: How often, at most, a new connection makes the server look for a new CRL.
CRL_CHECK_INTERVAL = 1.0

#: Frames one connection may have handled in a row before other connections get
#: a turn: trio is single-threaded, and a client's burst of bad or cached
#: requests is answered without an await, so without a checkpoint it would
#: hold up every other client until the whole burst is parsed.
FRAMES_PER_TURN = 4

#: accept() errors that mean "out of resources right now", not "listener broken".
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@attrs.frozen
class ServerLimits:
    max_frame_size: int = 64 * 1024
    max_in_flight: int = 64
    max_connections: int = 1024
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    frame_timeout: float = 30.0
    send_timeout: float = 30.0
    drain_timeout: float = 10.0
    #: Connections still in the TLS handshake (unauthenticated), in all and per
    #: source address; when full the oldest is shed, so a flood cannot lock clients out.
    max_handshaking: int = 128
    max_handshaking_per_address: int = 16
    #: Authenticated connections per identity with a grant, and per identity with none.
    max_connections_per_identity: int = 64
    max_connections_ungranted: int = 2


#: Above this share of max_handshaking in use, handshakes get a quarter of the
#: timeout (at least PRESSED_HANDSHAKE_FLOOR s), the ones under way included.
HANDSHAKE_PRESSURE = 0.5
PRESSED_HANDSHAKE_FLOOR = 1.0


class KmipServer:
    def __init__(
        self,
        service: KeyService,
        tls: ServerTls,
        limits: ServerLimits,
        *,
        crl_check_interval: float = CRL_CHECK_INTERVAL,
        metrics: ServerMetrics | None = None,
        kmip: KmipSettings | None = None,
    ) -> None:
        self.service = service
        #: KMIP on this listener (None or not enabled: native protocol only).
        self.kmip = kmip if kmip is not None and kmip.enabled else None
        self.metrics = metrics or ServerMetrics()
        self._connections: set[_Connection] = set()
        #: In the handshake, oldest first (a dict keeps insertion order).
        self._handshaking: dict[_Connection, None] = {}
        self._handshaking_by_address: collections.Counter[str] = collections.Counter()
        #: identity -> authenticated connections open.
        self._by_identity: collections.Counter[str] = collections.Counter()
        #: Replaced as a whole on reload; each handshake reads it once.
        self.tls = tls
        self.limits = limits
        self._shutdown = trio.Event()
        self._all_closed = trio.Event()
        self._all_closed.set()
        self._crl_checked_at = -math.inf
        self._crl_check_interval = crl_check_interval
        self._refused_crl_stamp: tuple[int, ...] | None = None

    @property
    def tls(self) -> ServerTls:
        return self._tls

    @tls.setter
    def tls(self, tls: ServerTls) -> None:
        """A new CRL or a reload: transport certificates are checked against it too,
        and so is every open connection's peer certificate (revoked ones are cut)."""
        self._tls = tls
        self.service.transport_trust = tls.transport_trust
        self.check_open_connections(full=True)

    def check_open_connections(self, *, full: bool = False) -> int:
        """Close every connection whose peer certificate no longer holds; how many."""
        now = datetime.datetime.now(datetime.UTC)
        cut = 0
        for connection in list(self._connections):
            problem = connection.certificate_problem(self._tls, now, full=full)
            if problem is not None:
                connection.end_for_certificate(*problem)
                cut += 1
        return cut

    async def _watch_certificates(self) -> None:
        """Once a second: take up a new CRL, cut connections revoked or expired meanwhile."""
        while True:
            self._pick_up_new_crl()
            self.check_open_connections()
            await trio.sleep(self._crl_check_interval)  # a periodic scan, not a wait for an event

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def wait_until_idle(self) -> None:
        """Return once no client connection is open (at once if none is)."""
        await self._all_closed.wait()

    def request_shutdown(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), then return from serve()."""
        self._shutdown.set()

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(self._accept_loop, listener, connections)
                acceptors.start_soon(self._watch_certificates)
                task_status.started()
                await self._shutdown.wait()
                acceptors.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            await self._drain()
            connections.cancel_scope.cancel()

    async def _drain(self) -> None:
        self.service.info.state = "draining"
        log.info("draining %d connection(s)", len(self._connections))
        for connection in list(self._connections):
            connection.start_draining()
        with trio.move_on_after(self.limits.drain_timeout):
            await self._all_closed.wait()
            return
        log.warning("drain timeout: cutting off requests still in flight")
        for connection in list(self._connections):
            connection.cut_off()
        with trio.move_on_after(1.0):
            await self._all_closed.wait()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                log.error("accept failed (%s); retrying shortly", errno.errorcode[exc.errno])
                await trio.sleep(0.1)  # back off until descriptors free up
                continue
            if len(self._connections) >= self.limits.max_connections:
                if not self._handshaking:
                    self.metrics.connections_refused += 1
                    log.warning(
                        "connection limit (%d) reached: refusing a client",
                        self.limits.max_connections,
                    )
                    await stream.aclose()
                    continue
                self._shed(next(iter(self._handshaking)))  # authenticated clients stay
            self.metrics.connections_accepted += 1
            self._pick_up_new_crl()
            connection = _Connection(self, stream)
            self._admit_handshake(connection)
            self._connections.add(connection)
            self._all_closed = trio.Event()
            self.service.info.connections = len(self._connections)
            nursery.start_soon(self._run_connection, connection)

    @property
    def handshaking_count(self) -> int:
        return len(self._handshaking)

    def _admit_handshake(self, connection: _Connection) -> None:
        """Make room among handshaking connections by shedding the oldest, never the new one.

        A flood of bare TCP connections then only ever displaces itself: a real
        client finishes its handshake in milliseconds, long before it is the oldest.
        """
        limits = self.limits
        host = connection.peer_host
        if self._handshaking_by_address[host] >= limits.max_handshaking_per_address:
            oldest = next(c for c in self._handshaking if c.peer_host == host)
            self._shed(oldest)
        if len(self._handshaking) >= min(limits.max_handshaking, limits.max_connections):
            self._shed(next(iter(self._handshaking)))
        self._handshaking[connection] = None
        self._handshaking_by_address[host] += 1
        if len(self._handshaking) > HANDSHAKE_PRESSURE * limits.max_handshaking:
            deadline = trio.current_time() + self.handshake_timeout()
            for waiting in self._handshaking:
                waiting.shorten_handshake(deadline)

    def handshake_timeout(self) -> float:
        """The full timeout, or a quarter of it while handshaking connections pile up."""
        timeout = self.limits.handshake_timeout
        if len(self._handshaking) > HANDSHAKE_PRESSURE * self.limits.max_handshaking:
            return min(timeout, max(PRESSED_HANDSHAKE_FLOOR, timeout / 4))
        return timeout

    def _shed(self, connection: _Connection) -> None:
        self.handshake_done(connection)
        self.metrics.handshakes_shed += 1
        connection.shed()

    def handshake_done(self, connection: _Connection) -> None:
        if self._handshaking.pop(connection, 0) is None:
            self._handshaking_by_address[connection.peer_host] -= 1
            if not self._handshaking_by_address[connection.peer_host]:
                del self._handshaking_by_address[connection.peer_host]

    def admit_identity(self, identity: str) -> int | None:
        """Count one more connection of ``identity``; None if it is over its budget."""
        granted = any(
            fnmatch.fnmatchcase(identity, grant.identity) for grant in self.service.policy.grants
        )
        budget = (
            self.limits.max_connections_per_identity
            if granted
            else self.limits.max_connections_ungranted
        )
        if self._by_identity[identity] >= budget:
            self.metrics.connections_refused_identity["granted" if granted else "ungranted"] += 1
            return None
        self._by_identity[identity] += 1
        return budget

    def release_identity(self, identity: str) -> None:
        self._by_identity[identity] -= 1
        if not self._by_identity[identity]:
            del self._by_identity[identity]

    def _pick_up_new_crl(self) -> None:
        """A revocation takes effect within a second, without a reload.

        Checked when a client connects (one stat call, at most once a second);
        a CRL that fails to load is logged and the previous one stays in force.
        """
        now = trio.current_time()
        if now - self._crl_checked_at < self._crl_check_interval:
            return
        self._crl_checked_at = now
        stamp = self.tls.current_crl_stamp()
        if stamp in (self.tls.crl_stamp, self._refused_crl_stamp):
            return
        try:
            self.tls = ServerTls.load(self.tls.settings)
        except TlsConfigError as exc:
            self._refused_crl_stamp = stamp  # say it once, not on every connection
            log.error("new CRL not loaded, the previous one stays in force: %s", exc)
            return
        log.info("loaded new CRL: %d revoked certificate(s)", len(self.tls.revoked))

    async def _run_connection(self, connection: _Connection) -> None:
        try:
            await connection.run()
        except Exception as exc:
            # Whatever one connection does, the server and its other clients carry on.
            if _only_disconnects(exc):
                log.debug("connection from %s broken: %r", connection.peer, exc)
            else:
                log.exception("connection from %s failed", connection.peer)
        finally:
            self.handshake_done(connection)
            self._connections.discard(connection)
            self.service.info.connections = len(self._connections)
            if not self._connections:
                self._all_closed.set()


class _Connection:
    def __init__(self, server: KmipServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.limits = server.limits
        self.peer = _peer_name(stream)
        self.peer_host = _peer_host(stream)
        self._handshake_scope: trio.CancelScope | None = None
        self._handshake_started = trio.current_time()
        self._shed = False
        self._stream = stream
        self.channel = TlsChannel(stream, server.tls.context, server_side=True)
        self.conn: ServerConnection | None = None
        #: The verified peer certificate, once the handshake passed.
        self.certificate: x509.Certificate | None = None
        self._not_after = math.inf
        #: Set when the certificate stopped holding: nothing is served after that.
        self._cut = False
        self.kmip: KmipSession | None = None
        self._request_scopes: dict[int, trio.CancelScope] = {}
        self._capacity = trio.Event()
        self._draining = False
        self._heard_while_draining = False
        self._partial_since: float | None = None
        self._partial_frames = 0
        self._receive_scope: trio.CancelScope | None = None
        self._deadline_reason = "idle"  # or "frame": which deadline a receive waits under
        self._output_ready = trio.Event()
        self._writing = True
        #: Frames handled since the reader last waited (see FRAMES_PER_TURN).
        self._turn = 0

    def start_draining(self) -> None:
        """Refuse every new request with shutting-down, finish those in flight, hang up.

        The reader goes on reading until then, so a client pipelining into
        the drain hears shutting-down for each request instead of silence,
        and the socket is not closed on unread data (which would reset it).
        """
        self._draining = True
        if self.conn is not None:
            self.conn.start_draining()
        if self.kmip is not None:
            self.kmip.start_draining()
        self._update_receive_deadline()

    def cut_off(self) -> None:
        for scope in self._request_scopes.values():
            scope.cancel()

    def shed(self) -> None:
        """Given up on in favour of a newer handshake: end the handshake now."""
        self._shed = True
        if self._handshake_scope is not None:
            self._handshake_scope.cancel()

    @property
    def was_shed(self) -> bool:
        return self._shed

    def shorten_handshake(self, deadline: float) -> None:
        if self._handshake_scope is not None:
            self._handshake_scope.deadline = min(self._handshake_scope.deadline, deadline)

    def certificate_problem(
        self, tls: ServerTls, now: datetime.datetime, *, full: bool = False
    ) -> tuple[str, str] | None:
        if self.certificate is None or self._cut:
            return None
        return tls.certificate_problem(self.certificate, now, full=full)

    def still_trusted(self) -> bool:
        """Checked at dispatch and before an answer leaves: the scan may not have run yet."""
        if self._cut:
            return False
        assert self.certificate is not None
        if self.certificate.serial_number in self.server.tls.revoked:
            self.end_for_certificate("revoked", "client certificate was revoked")
            return False
        if time.time() > self._not_after:
            self.end_for_certificate("expired", "client certificate expired")
            return False
        return True

    def end_for_certificate(self, reason: str, message: str) -> None:
        """Send certificate-revoked, serve nothing more, close: the cut-off is now."""
        if self.conn is not None:
            identity = self.conn.identity
        elif self.kmip is not None:
            identity = self.kmip.identity
        else:
            return  # still before the first message: the dispatch check will refuse it
        if self._cut:
            return
        self._cut = True
        self.server.metrics.connections_cut[reason] += 1
        log.warning(
            "closing connection from %s: %s",
            self.peer,
            message,
            extra={"fields": {"peer": self.peer, "identity": identity, "reason": reason}},
        )
        audit = self.server.service.audit
        if audit is not None:
            try:
                audit.append(
                    AuditEvent(
                        identity=identity,
                        operation="connection-closed",
                        result=ErrorCode.CERTIFICATE_REVOKED.wire_name,
                        detail=f"{reason}; peer {self.peer}",
                    ),
                    time.time(),
                )
            except AuditError as exc:
                log.error("audit record of a closed connection not written: %s", exc)
        if self.kmip is not None:
            self.kmip.end_for_certificate(message)
            return
        assert self.conn is not None
        self.conn.fail(ErrorCode.CERTIFICATE_REVOKED, message)
        self.cut_off()
        if self._receive_scope is not None:
            self._receive_scope.cancel()
        self._capacity.set()
        self._output_ready.set()

    async def run(self) -> None:
        try:
            try:
                identity = await self._handshake()
            finally:
                self.server.handshake_done(self)
            if identity is None:
                return
            if self.server.admit_identity(identity) is None:
                await self._refuse_over_budget(identity)
                return
            try:
                await self._serve(identity)
            finally:
                self.server.release_identity(identity)
        finally:
            await self.channel.aclose(linger=LINGER if self._client_still_sending() else 0)

    async def _refuse_over_budget(self, identity: str) -> None:
        log.warning(
            "refusing a connection of %s from %s: its connection budget is used up",
            identity,
            self.peer,
            extra={"fields": {"peer": self.peer, "identity": identity}},
        )
        message = "too many connections for this identity; try again later"
        # The client speaks first in both protocols: answer it in its own.
        first = b""
        with trio.move_on_after(self.limits.send_timeout):
            first = await self.channel.receive_some()
        if first[:1] == bytes([KMIP_FIRST_BYTE]) and self.server.kmip is not None:
            self.kmip = KmipSession(self.server, self.channel, identity, self.peer)
            await self.kmip.refuse(first, message)
            return
        frame = encode_frame(encode_item(error_to_wire(None, ErrorCode.BUSY, message)))
        with trio.move_on_after(self.limits.send_timeout):
            await self.channel.send_all(frame)

    async def _serve(self, identity: str) -> None:
        first = await self._first_bytes()
        if not first:
            return
        if first[0] == KMIP_FIRST_BYTE and self.server.kmip is not None:
            self.kmip = KmipSession(
                self.server, self.channel, identity, self.peer, still_trusted=self.still_trusted
            )
            await self.kmip.run(first)
            return
        if not await self._native_tls_ok():
            return
        self.conn = ServerConnection(
            identity=identity,
            server_name=self.server.service.info.name,
            store_id=self.server.service.store.store_id,
            max_frame_size=self.limits.max_frame_size,
            max_in_flight=self.limits.max_in_flight,
            error_counts=self.server.metrics.protocol_errors,
        )
        self.conn.receive_data(first)
        if self._draining:
            self.conn.start_draining()
        async with trio.open_nursery() as writer:
            writer.start_soon(self._write_loop)
            async with trio.open_nursery() as requests:
                await self._read_loop(requests)
                if self._draining:
                    await self._refuse_buffered_requests()
            self._writing = False  # every request has answered: send the rest and stop
            self._output_ready.set()

    def _client_still_sending(self) -> bool:
        """While draining: did the client send after we stopped reading (or may it)?"""
        if not self._draining:
            return False
        if self._heard_while_draining:
            return True
        try:
            readable, _, _ = select.select([self._stream.socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    async def _handshake(self) -> str | None:
        tls = self.server.tls
        if self._shed:
            return None
        with trio.move_on_after(self.server.handshake_timeout()) as scope:
            self._handshake_scope = scope
            try:
                await self.channel.handshake()
            except TlsHandshakeError as exc:
                reason = _handshake_reason(exc)
                log.info(
                    "TLS handshake with %s refused: %s",
                    self.peer,
                    exc.reason or exc,
                    extra={"fields": {"peer": self.peer, "reason": reason}},
                )
                self.server.metrics.handshake_failures[reason] += 1
                return None
            der = self.channel.ssl_object.getpeercert(binary_form=True)
            try:
                identity = tls.verify_peer(der)
            except PeerRejectedError as exc:
                log.info(
                    "client %s refused: %s",
                    self.peer,
                    exc,
                    extra={"fields": {"peer": self.peer, "reason": exc.reason}},
                )
                self.server.metrics.handshake_failures[exc.reason] += 1
                refusal = ServerConnection(identity="", server_name="", store_id="")
                refusal.fail(ErrorCode.CERTIFICATE_REJECTED, f"certificate rejected: {exc}")
                await self.channel.send_all(refusal.data_to_send())
                return None
            assert der is not None
            self.certificate = x509.load_der_x509_certificate(der)
            self._not_after = self.certificate.not_valid_after_utc.timestamp()
            return identity
        if self.was_shed:
            log.info(
                "TLS handshake with %s shed for a newer one (handshake budget full)",
                self.peer,
                extra={"fields": {"peer": self.peer, "reason": "shed"}},
            )
            return None
        log.info(
            "TLS handshake with %s timed out",
            self.peer,
            extra={"fields": {"peer": self.peer, "reason": "timeout"}},
        )
        self.server.metrics.handshake_failures["timeout"] += 1
        return None

    async def _first_bytes(self) -> bytes:
        """The client speaks first in both protocols: its first byte says which one."""
        with trio.move_on_after(self.limits.idle_timeout):
            return await self.channel.receive_some()
        # Silent from the start: answered as the native protocol answers an idle client.
        log.info("closing connection from %s: idle for %g s", self.peer, self.limits.idle_timeout)
        refusal = ServerConnection(identity="", server_name="", store_id="")
        refusal.fail(ErrorCode.TIMEOUT, f"idle for {self.limits.idle_timeout:g} s")
        await self.channel.send_all(refusal.data_to_send())
        return b""

    async def _native_tls_ok(self) -> bool:
        """TLS 1.2 may be on for KMIP clients; the native protocol still needs 1.3."""
        version = self.channel.ssl_object.version()
        if version == "TLSv1.3" or self.server.tls.settings.allow_tls12:
            return True
        log.info(
            "client %s refused: native protocol over %s",
            self.peer,
            version,
            extra={"fields": {"peer": self.peer, "reason": "native-needs-tls13"}},
        )
        self.server.metrics.handshake_failures["native-needs-tls13"] += 1
        refusal = ServerConnection(identity="", server_name="", store_id="")
        refusal.fail(
            ErrorCode.CERTIFICATE_REJECTED,
            f"the native protocol needs TLS 1.3; this connection negotiated {version}",
        )
        await self.channel.send_all(refusal.data_to_send())
        return False

    async def _read_loop(self, requests: trio.Nursery) -> None:
        assert self.conn is not None
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is ANSWERED or isinstance(event, RequestReceived):
                # Frames handled since this task last waited: a receive that had to
                # wait gave every other connection its turn already.
                self._turn += 1
                if self._turn >= FRAMES_PER_TURN:
                    self._turn = 0
                    await trio.lowlevel.checkpoint()
            if event is ANSWERED:
                continue
            if event is NEED_DATA:
                # Send what is queued (answers given inline, errors the
                # connection queued itself) before waiting for more.
                await self._send_queued()
                data = await self._receive()
                if data is not None:
                    self._heard_while_draining |= self._draining
                    conn.receive_data(data)
                elif self._draining and conn.in_flight == 0:
                    return  # drained: every request has its answer
            elif event is PAUSED:
                self._output_ready.set()
                self._capacity = trio.Event()
                await self._capacity.wait()
            elif isinstance(event, RequestReceived):
                if not self.still_trusted():
                    continue  # the connection failed: its next event ends it
                if not self._answer_now(event):
                    requests.start_soon(self._run_request, event)
            else:
                assert isinstance(event, ConnectionEnded)
                return

    async def _receive(self) -> bytes | None:
        """Receive within the deadline that applies; on expiry fail the connection.

        Bytes already there are taken without a cancel scope or a scheduler
        pass; only a receive that must wait gets its deadline scope.
        """
        assert self.conn is not None
        deadline = self._receive_deadline(trio.current_time())
        if deadline > trio.current_time():
            data = self.channel.receive_nowait()
            if data is not None:
                return data
            with trio.CancelScope(deadline=deadline) as scope:
                self._receive_scope = scope
                try:
                    data = await self.channel.receive_some(after_nowait=True)
                finally:
                    self._receive_scope = None
                self._turn = 0
                return data
        if self._cut or (self._draining and self.conn.in_flight == 0):
            return None
        reason = (
            f"frame not completed within {self.limits.frame_timeout:g} s"
            if self._deadline_reason == "frame"
            else f"idle for {self.limits.idle_timeout:g} s"
        )
        log.info(
            "closing connection from %s: %s",
            self.peer,
            reason,
            extra={"fields": {"peer": self.peer, "identity": self.conn.identity}},
        )
        self.conn.fail(ErrorCode.TIMEOUT, reason)
        return None

    def _update_receive_deadline(self) -> None:
        """Idle and partial-frame deadlines, recomputed whenever in-flight work changes."""
        if self._receive_scope is not None and self.conn is not None:
            self._receive_scope.deadline = self._receive_deadline(trio.current_time())

    def _receive_deadline(self, now: float) -> float:
        conn = self.conn
        assert conn is not None
        if self._draining and conn.in_flight == 0:
            return -math.inf  # nothing left to answer: stop reading now
        if conn.has_partial_frame:
            # The clock runs from when the current partial frame began: a
            # sender that keeps completing frames is making progress.
            if self._partial_since is None or self._partial_frames != conn.frames_received:
                self._partial_since = now
                self._partial_frames = conn.frames_received
            self._deadline_reason = "frame"
            return self._partial_since + self.limits.frame_timeout
        self._partial_since = None
        if conn.in_flight == 0:
            self._deadline_reason = "idle"
            return now + self.limits.idle_timeout
        return math.inf  # our own answers are pending; the client waits on us

    async def _refuse_buffered_requests(self) -> None:
        """After drain began: answer what is already buffered with shutting-down."""
        assert self.conn is not None
        while True:
            event = self.conn.next_event()
            self._output_ready.set()
            if event is PAUSED:
                self._capacity = trio.Event()
                await self._capacity.wait()
            elif event is NEED_DATA or isinstance(event, ConnectionEnded):
                return

    def _answer_now(self, event: RequestReceived) -> bool:
        """Answer inline when the service can without waiting (a cached get-dek)."""
        assert self.conn is not None
        start = time.perf_counter()
        try:
            result = self.server.service.handle_now(
                Caller(self.conn.identity, event.request_id), event.request
            )
        except ServiceError as exc:
            self.conn.send_error(event.request_id, exc.code, exc.message)
            self.server.metrics.record_request(
                event.request.OPERATION, time.perf_counter() - start, exc.code
            )
            return True
        if result is NOT_NOW:
            return False
        self.conn.send_result(event.request_id, result)
        self.server.metrics.record_request(
            event.request.OPERATION, time.perf_counter() - start, None
        )
        return True

    async def _run_request(self, event: RequestReceived) -> None:
        assert self.conn is not None
        conn, request_id = self.conn, event.request_id
        start = time.perf_counter()
        error: ErrorCode | None = None
        with trio.CancelScope() as scope:
            self._request_scopes[request_id] = scope
            try:
                result = await self.server.service.handle(
                    Caller(conn.identity, request_id, certificate=self.certificate),
                    event.request,
                )
            except ServiceError as exc:
                error = exc.code
                if self.still_trusted():
                    conn.send_error(request_id, exc.code, exc.message)
            except Exception:
                log.exception("request %s (%s) failed", request_id, event.request.OPERATION)
                error = ErrorCode.INTERNAL
                if self.still_trusted():
                    conn.send_error(
                        request_id, ErrorCode.INTERNAL, "internal error; see the server log"
                    )
            else:
                # The certificate may have been revoked or expired while this ran.
                if self.still_trusted():
                    conn.send_result(request_id, result)
                else:
                    error = ErrorCode.CERTIFICATE_REVOKED
        del self._request_scopes[request_id]
        if self._cut:
            error = ErrorCode.CERTIFICATE_REVOKED
        elif scope.cancelled_caught:
            error = ErrorCode.SHUTTING_DOWN
            conn.send_error(request_id, ErrorCode.SHUTTING_DOWN, "cut off by server shutdown")
        self.server.metrics.record_request(
            event.request.OPERATION, time.perf_counter() - start, error
        )
        self._capacity.set()
        self._update_receive_deadline()
        self._output_ready.set()

    async def _write_loop(self) -> None:
        """Sends what requests answered in their own tasks.

        Woken after answers are queued, it runs once every request that
        finished in the same scheduler pass has queued its answer, so a
        burst of pipelined answers leaves in one TLS record and one send.
        """
        while True:
            await self._output_ready.wait()
            self._output_ready = trio.Event()
            await self._send_queued()
            if not self._writing:
                return

    async def _send_queued(self) -> None:
        assert self.conn is not None
        if not self.conn.has_data_to_send and not self.channel.has_backlog:
            return
        if self.channel.try_send(self.conn.data_to_send):
            return  # the socket took it all: no wait, so no deadline to keep
        with trio.move_on_after(self.limits.send_timeout) as scope:
            await self.channel.send_pending(self.conn.data_to_send)
        if scope.cancelled_caught:
            log.info("closing connection from %s: it stopped reading responses", self.peer)
            raise trio.BrokenResourceError("send timeout")


_DISCONNECTS = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, ConnectionError)


def _only_disconnects(exc: BaseException) -> bool:
    """True if ``exc`` (or every member of an exception group) means the peer went away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_disconnects(member) for member in exc.exceptions)
    return isinstance(exc, _DISCONNECTS)


def _handshake_reason(exc: TlsHandshakeError) -> str:
    """OpenSSL's short reason as a metric label: "certificate-verify-failed"..."""
    if not exc.reason:
        return "peer-closed" if "closed" in str(exc) else "other"
    return exc.reason.lower().replace("_", "-").replace(" ", "-")


def _peer_host(stream: trio.SocketStream) -> str:
    """The source address without the port: what the per-address handshake bound counts."""
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "<unknown>"


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "<unknown>"
    return format_address(host, port)
