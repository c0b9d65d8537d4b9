"""The trio client: concurrent calls pipelined over a few connections per daemon.

There is no background task: whichever caller is waiting reads, and hands
every response it finds to the caller it belongs to; the others wait for
their own to be handed over, or for the reader to leave so one of them can
take over. A caller cancelled while waiting simply stops waiting; its
response is read and dropped later.
"""

from __future__ import annotations

import io
import logging
import select
import ssl
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmipd.client._cache import DekCache
from kmipd.client._common import (
    DEFAULT_TIMEOUT,
    ConnectionInfo,
    Endpoint,
    key_ref,
    make_endpoints,
    new_idempotency_key,
    unwrap_outcome,
)
from kmipd.client._envelope import (
    EnvelopeError,
    new_header,
    open_body,
    read_header,
    seal_body,
    write_header,
)
from kmipd.client._errors import (
    CertificateRejectedError,
    DeadlineExceededError,
    KmipdError,
    NotAuthorizedError,
    ServerCertificateError,
    ServerTimeoutError,
    UnavailableError,
    remote_error,
    tls_failure,
)
from kmipd.client._failover import FailoverCall, ServerSet, ServerState
from kmipd.client._keys import DataKey, Dek, KeyKeeper
from kmipd.client._transport import KeyDelivery, client_ca_certificates, verify_fetched
from kmipd.crypto import DEFAULT_CHUNK_SIZE as SEALED_CHUNK_SIZE
from kmipd.crypto import SealedEnvelopeError, TransportKey, open_stream, seal_stream
from kmipd.crypto._chunked_aead import DEFAULT_CHUNK_SIZE, Readable, Writable
from kmipd.net._trio_tls import TlsChannel, TlsHandshakeError
from kmipd.protocol import (
    NEED_DATA,
    Activate,
    ChangesResult,
    ChangesSince,
    ClientConnection,
    ConnectionFailed,
    CreateDek,
    CreateKek,
    Dependents,
    DependentsResult,
    Destroy,
    GenerateDataKey,
    GetAttributes,
    GetDek,
    GetJob,
    GetTransportCert,
    JobInfo,
    KekInfo,
    KeyAttributes,
    ListJobs,
    ListKeks,
    Locate,
    LocateResult,
    Recover,
    RegisterTransportCert,
    ResponseReceived,
    Revoke,
    RewrapBlob,
    RewrapBlobResult,
    RewrapDek,
    RotateKek,
    StartRewrap,
    Status,
    StatusResult,
    TransportCertInfo,
    Unwrap,
)

log = logging.getLogger("kmipd.client")
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
            request_id, frame = self.protocol.send_request(request)
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
                waiter.done = True

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


class AsyncClient:
    """A trio kmipd client: pipelined, pooled, failing over between daemons.

    >>> async with AsyncClient(["kms1:5696", "kms2:5696"], ca=..., cert=..., key=...) as kms:
    ...     async with await kms.create_dek("orders") as dek:
    ...         ...
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        client_name: str = "kmipd-python",
        pool_size: int = 2,
        cache: DekCache | None = None,
        revocation_check: float = 5.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 30.0,
        transport: TransportKey | None = None,
    ) -> None:
        """``transport``: this client's key-transport key; every DEK-returning call
        then asks for the key sealed to it (HPKE) and opens it here."""
        if timeout <= 0 or pool_size < 1:
            raise KmipdError("timeout must be positive and pool_size at least 1")
        self._delivery = KeyDelivery(transport)
        endpoints = make_endpoints(
            address,
            ca=ca,
            cert=cert,
            key=key,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            timeout=timeout,
            client_name=client_name,
        )
        self._timeout = timeout
        self._servers = ServerSet(
            endpoints,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            clock=trio.current_time,  # only called from inside trio
        )
        self._pools = {s.address: _Pool(s, pool_size) for s in self._servers.servers}
        self._keys = KeyKeeper(cache, revocation_check)
        self._closed = False
        self._context = endpoints[0].context

    @property
    def transport(self) -> TransportKey | None:
        return self._delivery.key

    async def _call_dek(self, request: Any) -> Any:
        """A DEK result in the clear, opened here when it came sealed."""
        outcome, server, request_id = await self._run(request)
        result = unwrap_outcome(outcome, server=server, request_id=request_id)
        return self._delivery.dek(result, request.OPERATION, server=server, request_id=request_id)

    @property
    def cache(self) -> DekCache | None:
        return self._keys.cache

    @property
    def addresses(self) -> list[str]:
        return [server.address for server in self._servers.servers]

    @property
    def address(self) -> str:
        return self.addresses[0]

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

        await self._run(None, inspect=describe)
        return info[0]

    async def aclose(self) -> None:
        """Close every connection and zero every cached key."""
        self._closed = True
        with trio.CancelScope(shield=True):
            for pool in self._pools.values():
                await pool.aclose()
        if self._keys.cache is not None:
            self._keys.cache.clear()

    async def _call(self, request: Any) -> Any:
        outcome, server, request_id = await self._run(request)
        return unwrap_outcome(outcome, server=server, request_id=request_id)

    async def _run(
        self, request: Any | None, *, inspect: Callable[[_Connection], None] | None = None
    ) -> tuple[Any, str, int]:
        try:
            return await self._run_failing_over(request, inspect=inspect)
        except CertificateRejectedError:
            # Refused, revoked or expired: this identity may no longer hold keys.
            if self._keys.cache is not None:
                self._keys.cache.clear()
            raise

    async def _run_failing_over(
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

    async def _follow_revocations(self) -> None:
        """Before the cache serves anything: evict what the daemon revoked since last asked.

        At most every ``revocation_check`` seconds (5 by default): a revoked
        or destroyed key leaves the cache within that delay while a daemon
        answers. During an outage the cache keeps serving (see stale_grace).
        """
        keys = self._keys
        if not keys.changes_due(trio.current_time()):
            return
        try:
            seq = 2**62 if keys.changes_seq is None else keys.changes_seq
            result = await self.changes_since(seq)
            while True:
                keys.apply_changes(result, trio.current_time())
                if len(result.changes) < 1000 or keys.changes_seq is None:
                    break
                result = await self.changes_since(keys.changes_seq)
        except NotAuthorizedError:
            keys.disable_changes("this identity may not call changes-since")
        except (UnavailableError, DeadlineExceededError):
            keys.changes_checked_at = trio.current_time()  # try again after the interval

    # -- operations ----------------------------------------------------------------

    async def create_dek(self, namespace: str, *, idempotency_key: bytes | None = None) -> Dek:
        await self._follow_revocations()
        key = idempotency_key or new_idempotency_key()
        result = await self._call_dek(
            CreateDek(namespace=namespace, idempotency_key=key, seal_to=self._delivery.seal_to)
        )
        return self._keys.keep_dek(result)

    async def get_dek(self, dek_id: str) -> Dek:
        await self._follow_revocations()
        if (cached := self._keys.cached_dek(dek_id)) is not None:
            return cached
        try:
            result = await self._call_dek(GetDek(dek_id=dek_id, seal_to=self._delivery.seal_to))
        except (UnavailableError, DeadlineExceededError):
            stale = self._keys.stale_deks([dek_id])
            if stale is None:
                raise
            return stale[dek_id]
        return self._keys.keep_dek(result)

    async def get_deks(self, dek_ids: Iterable[str]) -> list[Dek]:
        """Many DEKs concurrently (pipelined); raises the first error."""
        await self._follow_revocations()
        ids = list(dek_ids)
        found: dict[str, Dek] = {}

        async def fetch(dek_id: str) -> None:
            found[dek_id] = await self.get_dek(dek_id)

        async with trio.open_nursery() as nursery:
            for dek_id in set(ids):
                nursery.start_soon(fetch, dek_id)
        return self._keys.hand_out(ids, found)

    async def generate_data_key(self, kek: str, context: dict[str, str] | None = None) -> DataKey:
        await self._follow_revocations()
        context = dict(context or {})
        request = GenerateDataKey(kek=kek, context=context, seal_to=self._delivery.seal_to)
        outcome, server, request_id = await self._run(request)
        result = unwrap_outcome(outcome, server=server, request_id=request_id)
        made = self._delivery.data_key(result, server=server, request_id=request_id)
        return self._keys.keep_data_key(made.blob, context, made.kek, made.kek_version, made.key)

    async def unwrap(self, blob: bytes, context: dict[str, str] | None = None) -> DataKey:
        await self._follow_revocations()
        blob, context = bytes(blob), dict(context or {})
        if (cached := self._keys.cached_data_key(blob, context)) is not None:
            return cached
        try:
            outcome, server, request_id = await self._run(
                Unwrap(blob=blob, context=context, seal_to=self._delivery.seal_to)
            )
        except (UnavailableError, DeadlineExceededError):
            stale = self._keys.cached_data_key(blob, context, stale=True)
            if stale is None:
                raise
            log.warning("daemons unreachable: serving a stale cached data key")
            return stale
        result = unwrap_outcome(outcome, server=server, request_id=request_id)
        opened = self._delivery.unwrapped(result, blob, server=server, request_id=request_id)
        return self._keys.keep_data_key(blob, context, opened.kek, opened.kek_version, opened.key)

    # -- key transport: the certificate directory, client-to-client sealing ----------------

    async def register_transport_certificate(
        self, certificate: x509.Certificate | None = None
    ) -> TransportCertInfo:
        """Register our key-transport certificate (by default the ``transport`` key's)."""
        if certificate is None:
            certificate = self._delivery.require_key(
                "give a certificate or construct the client with transport="
            ).certificate
        der = certificate.public_bytes(serialization.Encoding.DER)
        result: TransportCertInfo = await self._call(RegisterTransportCert(certificate=der))
        return result

    async def get_transport_certificate(self, identity: str) -> x509.Certificate:
        """``identity``'s current transport certificate, verified against our own CA."""
        outcome, server, request_id = await self._run(GetTransportCert(identity=identity))
        info = unwrap_outcome(outcome, server=server, request_id=request_id)
        return verify_fetched(info, identity, client_ca_certificates(self._context), server=server)

    async def seal(
        self, data: bytes, recipient: str, *, chunk_size: int = SEALED_CHUNK_SIZE
    ) -> bytes:
        """Seal ``data`` for ``recipient`` (a SPIFFE ID) in one self-describing envelope."""
        sink = io.BytesIO()
        await self.seal_stream(io.BytesIO(data), sink, recipient, chunk_size=chunk_size)
        return sink.getvalue()

    async def seal_stream(
        self,
        source: Readable,
        sink: Writable,
        recipient: str,
        *,
        chunk_size: int = SEALED_CHUNK_SIZE,
    ) -> int:
        """Seal a stream of any size in bounded memory (on a worker thread); bytes read."""
        certificate = await self.get_transport_certificate(recipient)
        try:
            return await trio.to_thread.run_sync(
                lambda: seal_stream(certificate, source, sink, chunk_size=chunk_size)
            )
        except SealedEnvelopeError as exc:
            raise EnvelopeError(str(exc)) from None

    async def open(self, envelope: bytes) -> bytes:
        """Open an envelope sealed to this client's transport key (no daemon needed)."""
        sink = io.BytesIO()
        await self.open_stream(io.BytesIO(envelope), sink)
        return sink.getvalue()

    async def open_stream(self, source: Readable, sink: Writable) -> int:
        """Open a sealed stream (on a worker thread); if this raises, discard ``sink``."""
        key = self._delivery.require_key("opening needs the client's transport key (transport=)")
        try:
            return await trio.to_thread.run_sync(lambda: open_stream(key, source, sink))
        except SealedEnvelopeError as exc:
            raise EnvelopeError(str(exc)) from None

    async def encrypt(
        self,
        data: bytes,
        kek: str,
        context: dict[str, str] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> bytes:
        """Envelope-encrypt ``data`` under a fresh data key from ``kek`` (see _envelope)."""
        context = dict(context or {})
        sink = io.BytesIO()
        with await self.generate_data_key(kek, context) as data_key:
            header = new_header(
                data_key.kek, data_key.kek_version, data_key.blob, context, chunk_size
            )
            prologue = write_header(sink, header)
            seal_body(data_key.key, header, prologue, io.BytesIO(data), sink)
        return sink.getvalue()

    async def decrypt(self, envelope: bytes) -> bytes:
        """Open an envelope: unwrap its data key (through the cache), then the body."""
        source, sink = io.BytesIO(envelope), io.BytesIO()
        header, prologue = read_header(source)
        with await self.unwrap(header.blob, header.context) as data_key:
            open_body(data_key.key, header, prologue, source, sink)
        return sink.getvalue()

    async def list_keks(self, prefix: str | None = None) -> list[KekInfo]:
        return list((await self._call(ListKeks(prefix=prefix))).keks)

    async def status(self) -> StatusResult:
        result: StatusResult = await self._call(Status())
        return result

    # -- key lifecycle (administrators; see PROTOCOL.md 4.3) --------------------------------

    async def create_kek(
        self, name: str, *, usage: Sequence[str] | None = None, activation: int | None = None
    ) -> KekInfo:
        """Create a namespace's KEK inside the HSM; a future ``activation`` makes it pre-active."""
        result: KekInfo = await self._call(
            CreateKek(
                name=name, usage=None if usage is None else tuple(usage), activation=activation
            )
        )
        return result

    async def rotate_kek(self, name: str) -> KeyAttributes:
        """A new KEK version; new wraps use it, older versions still unwrap."""
        result: KeyAttributes = await self._call(RotateKek(name=name))
        return result

    async def activate(
        self, *, dek_id: str | None = None, kek: str | None = None, version: int | None = None
    ) -> KeyAttributes:
        result: KeyAttributes = await self._call(Activate(key=key_ref(dek_id, kek, version)))
        return result

    async def revoke(
        self,
        reason: str,
        *,
        dek_id: str | None = None,
        kek: str | None = None,
        version: int | None = None,
        message: str | None = None,
    ) -> KeyAttributes:
        """key-compromise makes the key compromised; other reasons deactivate it."""
        result: KeyAttributes = await self._call(
            Revoke(key=key_ref(dek_id, kek, version), reason=reason, message=message)
        )
        return result

    async def destroy(
        self,
        *,
        dek_id: str | None = None,
        kek: str | None = None,
        version: int | None = None,
        force: bool = False,
        purge_now: bool = False,
    ) -> KeyAttributes:
        """Crypto-shredding, after the soft-delete window (or now, with ``purge_now``)."""
        result: KeyAttributes = await self._call(
            Destroy(key=key_ref(dek_id, kek, version), force=force, purge_now=purge_now)
        )
        return result

    async def recover(
        self, *, dek_id: str | None = None, kek: str | None = None, version: int | None = None
    ) -> KeyAttributes:
        """Undo a destroy within the soft-delete window."""
        result: KeyAttributes = await self._call(Recover(key=key_ref(dek_id, kek, version)))
        return result

    async def get_attributes(
        self, *, dek_id: str | None = None, kek: str | None = None, version: int | None = None
    ) -> KeyAttributes:
        result: KeyAttributes = await self._call(GetAttributes(key=key_ref(dek_id, kek, version)))
        return result

    async def locate(
        self,
        *,
        kind: str | None = None,
        namespace: str | None = None,
        state: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> LocateResult:
        """Keys by kind, namespace (glob) and state; page on with ``after=result.next``."""
        result: LocateResult = await self._call(
            Locate(kind=kind, namespace=namespace, state=state, after=after, limit=limit)
        )
        return result

    async def dependents(
        self, kek: str, version: int, *, limit: int | None = None
    ) -> DependentsResult:
        """Which DEKs still depend on a KEK version (rewrap them before destroying it)."""
        result: DependentsResult = await self._call(
            Dependents(kek=kek, version=version, limit=limit)
        )
        return result

    async def rewrap_dek(self, dek_id: str) -> KeyAttributes:
        """Re-wrap a stored DEK under its KEK's newest version (the key stays inside)."""
        result: KeyAttributes = await self._call(RewrapDek(dek_id=dek_id))
        return result

    async def rewrap_blob(
        self, blob: bytes, context: dict[str, str] | None = None
    ) -> RewrapBlobResult:
        result: RewrapBlobResult = await self._call(
            RewrapBlob(blob=bytes(blob), context=dict(context or {}))
        )
        return result

    async def start_rewrap(self, namespace: str) -> JobInfo:
        """A background job rewrapping the namespace's DEKs in batches."""
        result: JobInfo = await self._call(StartRewrap(namespace=namespace))
        return result

    async def get_job(self, job_id: str) -> JobInfo:
        result: JobInfo = await self._call(GetJob(job_id=job_id))
        return result

    async def list_jobs(self, state: str | None = None) -> list[JobInfo]:
        return list((await self._call(ListJobs(state=state))).jobs)

    async def changes_since(self, seq: int, *, limit: int | None = None) -> ChangesResult:
        """State changes after ``seq``; the DEK cache uses this to evict revoked keys."""
        result: ChangesResult = await self._call(ChangesSince(seq=seq, limit=limit))
        return result


def _store_id(connection: _Connection) -> str | None:
    hello = connection.protocol.hello
    return hello.store_id if hello is not None else None
