"""The blocking client: plain ``socket`` + ``ssl``, for programs that do not use trio.

It drives the same sans-IO ClientConnection as the trio client. One
long-lived connection is reused across calls (a mutual-TLS handshake
costs milliseconds of CPU); calls from several threads are serialised on
it. ``get_deks`` pipelines a batch of ids in one round trip.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

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
from kmipd.crypto import (
    DEFAULT_CHUNK_SIZE as SEALED_CHUNK_SIZE,
)
from kmipd.crypto import (
    SealedEnvelopeError,
    TransportKey,
    open_stream,
    seal_stream,
)
from kmipd.crypto._chunked_aead import DEFAULT_CHUNK_SIZE, Readable, Writable
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

_RECEIVE_SIZE = 65536


class _Connection:
    """One TLS connection with its protocol state; not thread-safe on its own."""

    def __init__(
        self, endpoint: Endpoint, deadline: float, session: ssl.SSLSession | None = None
    ) -> None:
        self.endpoint = endpoint
        self.server = endpoint.address
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

    def notice(self) -> KmipdError | None:
        """What the server said before closing this stale connection, if it said anything.

        A connection-level error (certificate-revoked, timeout) waits there while
        the connection sits in the pool; a revoked client must get that error,
        not a fresh handshake on another connection.
        """
        try:
            self.sock.settimeout(1.0)  # the data is already there, or arriving
            data = self.sock.recv(_RECEIVE_SIZE)
        except (OSError, ssl.SSLError):
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
        self._session: ssl.SSLSession | None = None
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
                    connection.close()  # the server closed it while idle
                    self._open -= 1
                    if isinstance(notice, CertificateRejectedError):
                        raise notice  # revoked or expired: no new connection will do
                if self._open < self._size:
                    self._open += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceededError(
                        "no connection became free in time", server=self.server.address
                    )
                self._cond.wait(remaining)
        try:
            connection = _Connection(self.server.endpoint, deadline, self._session)
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise
        # Resumption skips a full handshake; it is only offered by a server
        # that issues tickets, and kmipd re-checks revocation on each one.
        self._session = connection.sock.session
        return connection

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


class Client:
    """A blocking kmipd client: thread-safe, pooled, failing over between daemons.

    >>> with Client(["kms1:5696", "kms2:5696"], ca="ca.pem", cert="me.pem", key="me-key.pem",
    ...             cache=DekCache(ttl=60)) as kms:
    ...     with kms.create_dek("orders") as dek:
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
        pool_size: int = 4,
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
        self._servers = ServerSet(endpoints, backoff_base=backoff_base, backoff_cap=backoff_cap)
        self._pools = {s.address: _Pool(s, pool_size) for s in self._servers.servers}
        self._keys = KeyKeeper(cache, revocation_check)
        self._context = endpoints[0].context

    @property
    def transport(self) -> TransportKey | None:
        return self._delivery.key

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

        self._run([], inspect=describe)
        return info[0]

    def close(self) -> None:
        """Close every connection and zero every cached key."""
        for pool in self._pools.values():
            pool.close()
        if self._keys.cache is not None:
            self._keys.cache.clear()

    # -- sending, failing over ----------------------------------------------------------

    def _call_many(self, requests: Sequence[Any]) -> list[Any]:
        return [
            unwrap_outcome(outcome, server=server, request_id=request_id)
            for outcome, server, request_id in self._run(list(requests))
        ]

    def _call(self, request: Any) -> Any:
        return self._call_many([request])[0]

    def _call_many_ids(self, requests: Sequence[Any]) -> list[tuple[Any, str, int]]:
        """Results with the server and the id of the request that was answered."""
        return [
            (unwrap_outcome(outcome, server=server, request_id=request_id), server, request_id)
            for outcome, server, request_id in self._run(list(requests))
        ]

    def _clear_dek(self, answer: tuple[Any, str, int], operation: str) -> Any:
        result, server, request_id = answer
        return self._delivery.dek(result, operation, server=server, request_id=request_id)

    def _run(
        self, requests: list[Any], *, inspect: Callable[[_Connection], None] | None = None
    ) -> list[tuple[Any, str, int]]:
        try:
            return self._run_failing_over(requests, inspect=inspect)
        except CertificateRejectedError:
            # Refused, revoked or expired: this identity may no longer hold keys.
            if self._keys.cache is not None:
                self._keys.cache.clear()
            raise

    def _run_failing_over(
        self, requests: list[Any], *, inspect: Callable[[_Connection], None] | None = None
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
                frames = [connection.protocol.send_request(r) for r in requests]
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

    def _follow_revocations(self) -> None:
        """Before the cache serves anything: evict what the daemon revoked since last asked.

        At most every ``revocation_check`` seconds (5 by default): a revoked
        or destroyed key leaves the cache within that delay while a daemon
        answers. During an outage the cache keeps serving (see stale_grace).
        """
        keys = self._keys
        if not keys.changes_due(time.monotonic()):
            return
        try:
            seq = 2**62 if keys.changes_seq is None else keys.changes_seq
            result = self.changes_since(seq)
            while True:
                keys.apply_changes(result, time.monotonic())
                if len(result.changes) < 1000 or keys.changes_seq is None:
                    break
                result = self.changes_since(keys.changes_seq)
        except NotAuthorizedError:
            keys.disable_changes("this identity may not call changes-since")
        except (UnavailableError, DeadlineExceededError):
            keys.changes_checked_at = time.monotonic()  # try again after the interval

    # -- operations ----------------------------------------------------------------

    def create_dek(self, namespace: str, *, idempotency_key: bytes | None = None) -> Dek:
        """Have the daemon generate, wrap and store a new 256-bit DEK; returns it and its id.

        The request carries an idempotency key (random unless given): if its
        answer is lost, retrying with the same key can never create a second DEK.
        """
        self._follow_revocations()
        key = idempotency_key or new_idempotency_key()
        request = CreateDek(
            namespace=namespace, idempotency_key=key, seal_to=self._delivery.seal_to
        )
        (answer,) = self._call_many_ids([request])
        return self._keys.keep_dek(self._clear_dek(answer, "create-dek"))

    def get_dek(self, dek_id: str) -> Dek:
        """The DEK, from the cache when fresh there, else from a daemon."""
        return self.get_deks([dek_id])[0]

    def get_deks(self, dek_ids: Iterable[str]) -> list[Dek]:
        """Many DEKs: cached ones at once, the others in one pipelined round trip."""
        self._follow_revocations()
        ids = list(dek_ids)
        found: dict[str, Dek] = {}
        for dek_id in set(ids):
            if (dek := self._keys.cached_dek(dek_id)) is not None:
                found[dek_id] = dek
        missing = [dek_id for dek_id in set(ids) if dek_id not in found]
        if missing:
            try:
                answers = self._call_many_ids(
                    [GetDek(dek_id=dek_id, seal_to=self._delivery.seal_to) for dek_id in missing]
                )
            except (UnavailableError, DeadlineExceededError):
                stale = self._keys.stale_deks(missing)
                if stale is None:
                    raise
                found.update(stale)
            else:
                results = [self._clear_dek(answer, "get-dek") for answer in answers]
                found.update((r.dek_id, self._keys.keep_dek(r)) for r in results)
        return self._keys.hand_out(ids, found)

    def generate_data_key(self, kek: str, context: dict[str, str] | None = None) -> DataKey:
        """A fresh key plus its wrapped blob, bound to ``context``; store the blob yourself."""
        self._follow_revocations()
        context = dict(context or {})
        request = GenerateDataKey(kek=kek, context=context, seal_to=self._delivery.seal_to)
        ((result, server, request_id),) = self._call_many_ids([request])
        made = self._delivery.data_key(result, server=server, request_id=request_id)
        return self._keys.keep_data_key(made.blob, context, made.kek, made.kek_version, made.key)

    def unwrap(self, blob: bytes, context: dict[str, str] | None = None) -> DataKey:
        """Recover a blob's key (cached by blob and context); the context must match."""
        self._follow_revocations()
        blob, context = bytes(blob), dict(context or {})
        if (cached := self._keys.cached_data_key(blob, context)) is not None:
            return cached
        try:
            ((result, server, request_id),) = self._call_many_ids(
                [Unwrap(blob=blob, context=context, seal_to=self._delivery.seal_to)]
            )
        except (UnavailableError, DeadlineExceededError):
            stale = self._keys.cached_data_key(blob, context, stale=True)
            if stale is None:
                raise
            log.warning("daemons unreachable: serving a stale cached data key")
            return stale
        opened = self._delivery.unwrapped(result, blob, server=server, request_id=request_id)
        return self._keys.keep_data_key(blob, context, opened.kek, opened.kek_version, opened.key)

    # -- key transport: the certificate directory, client-to-client sealing ----------------

    def register_transport_certificate(
        self, certificate: x509.Certificate | None = None
    ) -> TransportCertInfo:
        """Register our key-transport certificate (by default the ``transport`` key's)."""
        if certificate is None:
            certificate = self._delivery.require_key(
                "give a certificate or construct the client with transport="
            ).certificate
        der = certificate.public_bytes(serialization.Encoding.DER)
        result: TransportCertInfo = self._call(RegisterTransportCert(certificate=der))
        return result

    def get_transport_certificate(self, identity: str) -> x509.Certificate:
        """``identity``'s current transport certificate, verified against our own CA."""
        ((info, server, _),) = self._call_many_ids([GetTransportCert(identity=identity)])
        return verify_fetched(info, identity, client_ca_certificates(self._context), server=server)

    def seal(self, data: bytes, recipient: str, *, chunk_size: int = SEALED_CHUNK_SIZE) -> bytes:
        """Seal ``data`` for ``recipient`` (a SPIFFE ID) in one self-describing envelope."""
        sink = io.BytesIO()
        self.seal_stream(io.BytesIO(data), sink, recipient, chunk_size=chunk_size)
        return sink.getvalue()

    def seal_stream(
        self,
        source: Readable,
        sink: Writable,
        recipient: str,
        *,
        chunk_size: int = SEALED_CHUNK_SIZE,
    ) -> int:
        """Seal a stream of any size in bounded memory; returns bytes read."""
        certificate = self.get_transport_certificate(recipient)
        try:
            return seal_stream(certificate, source, sink, chunk_size=chunk_size)
        except SealedEnvelopeError as exc:
            raise EnvelopeError(str(exc)) from None

    def open(self, envelope: bytes) -> bytes:
        """Open an envelope sealed to this client's transport key (no daemon needed)."""
        sink = io.BytesIO()
        self.open_stream(io.BytesIO(envelope), sink)
        return sink.getvalue()

    def open_stream(self, source: Readable, sink: Writable) -> int:
        """Open a sealed stream; each chunk is written once it authenticated.

        If this raises, discard what reached ``sink``.
        """
        key = self._delivery.require_key("opening needs the client's transport key (transport=)")
        try:
            return open_stream(key, source, sink)
        except SealedEnvelopeError as exc:
            raise EnvelopeError(str(exc)) from None

    def encrypt(
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
        with self.generate_data_key(kek, context) as data_key:
            header = new_header(
                data_key.kek, data_key.kek_version, data_key.blob, context, chunk_size
            )
            prologue = write_header(sink, header)
            seal_body(data_key.key, header, prologue, io.BytesIO(data), sink)
        return sink.getvalue()

    def decrypt(self, envelope: bytes) -> bytes:
        """Open an envelope: unwrap its data key (through the cache), then the body."""
        source, sink = io.BytesIO(envelope), io.BytesIO()
        header, prologue = read_header(source)
        with self.unwrap(header.blob, header.context) as data_key:
            open_body(data_key.key, header, prologue, source, sink)
        return sink.getvalue()

    def encrypt_stream(
        self,
        source: Readable,
        sink: Writable,
        kek: str,
        context: dict[str, str] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> int:
        """Envelope-encrypt a file of any size in constant memory; returns bytes read."""
        context = dict(context or {})
        with self.generate_data_key(kek, context) as data_key:
            header = new_header(
                data_key.kek, data_key.kek_version, data_key.blob, context, chunk_size
            )
            prologue = write_header(sink, header)
            return seal_body(data_key.key, header, prologue, source, sink)

    def decrypt_stream(self, source: Readable, sink: Writable) -> int:
        """Open an envelope of any size in constant memory; returns bytes written.

        Each chunk is written once it authenticated; if this raises, discard
        what reached ``sink``.
        """
        header, prologue = read_header(source)
        with self.unwrap(header.blob, header.context) as data_key:
            return open_body(data_key.key, header, prologue, source, sink)

    def list_keks(self, prefix: str | None = None) -> list[KekInfo]:
        return list(self._call(ListKeks(prefix=prefix)).keks)

    def status(self) -> StatusResult:
        result: StatusResult = self._call(Status())
        return result

    # -- key lifecycle (administrators; see PROTOCOL.md 4.3) --------------------------------

    def create_kek(
        self, name: str, *, usage: Sequence[str] | None = None, activation: int | None = None
    ) -> KekInfo:
        """Create a namespace's KEK inside the HSM; a future ``activation`` makes it pre-active."""
        result: KekInfo = self._call(
            CreateKek(
                name=name, usage=None if usage is None else tuple(usage), activation=activation
            )
        )
        return result

    def rotate_kek(self, name: str) -> KeyAttributes:
        """A new KEK version; new wraps use it, older versions still unwrap."""
        result: KeyAttributes = self._call(RotateKek(name=name))
        return result

    def activate(
        self, *, dek_id: str | None = None, kek: str | None = None, version: int | None = None
    ) -> KeyAttributes:
        result: KeyAttributes = self._call(Activate(key=key_ref(dek_id, kek, version)))
        return result

    def revoke(
        self,
        reason: str,
        *,
        dek_id: str | None = None,
        kek: str | None = None,
        version: int | None = None,
        message: str | None = None,
    ) -> KeyAttributes:
        """key-compromise makes the key compromised; other reasons deactivate it."""
        result: KeyAttributes = self._call(
            Revoke(key=key_ref(dek_id, kek, version), reason=reason, message=message)
        )
        return result

    def destroy(
        self,
        *,
        dek_id: str | None = None,
        kek: str | None = None,
        version: int | None = None,
        force: bool = False,
        purge_now: bool = False,
    ) -> KeyAttributes:
        """Crypto-shredding, after the soft-delete window (or now, with ``purge_now``)."""
        result: KeyAttributes = self._call(
            Destroy(key=key_ref(dek_id, kek, version), force=force, purge_now=purge_now)
        )
        return result

    def recover(
        self, *, dek_id: str | None = None, kek: str | None = None, version: int | None = None
    ) -> KeyAttributes:
        """Undo a destroy within the soft-delete window."""
        result: KeyAttributes = self._call(Recover(key=key_ref(dek_id, kek, version)))
        return result

    def get_attributes(
        self, *, dek_id: str | None = None, kek: str | None = None, version: int | None = None
    ) -> KeyAttributes:
        result: KeyAttributes = self._call(GetAttributes(key=key_ref(dek_id, kek, version)))
        return result

    def locate(
        self,
        *,
        kind: str | None = None,
        namespace: str | None = None,
        state: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> LocateResult:
        """Keys by kind, namespace (glob) and state; page on with ``after=result.next``."""
        result: LocateResult = self._call(
            Locate(kind=kind, namespace=namespace, state=state, after=after, limit=limit)
        )
        return result

    def dependents(self, kek: str, version: int, *, limit: int | None = None) -> DependentsResult:
        """Which DEKs still depend on a KEK version (rewrap them before destroying it)."""
        result: DependentsResult = self._call(Dependents(kek=kek, version=version, limit=limit))
        return result

    def rewrap_dek(self, dek_id: str) -> KeyAttributes:
        """Re-wrap a stored DEK under its KEK's newest version (the key stays inside)."""
        result: KeyAttributes = self._call(RewrapDek(dek_id=dek_id))
        return result

    def rewrap_blob(self, blob: bytes, context: dict[str, str] | None = None) -> RewrapBlobResult:
        result: RewrapBlobResult = self._call(
            RewrapBlob(blob=bytes(blob), context=dict(context or {}))
        )
        return result

    def start_rewrap(self, namespace: str) -> JobInfo:
        """A background job rewrapping the namespace's DEKs in batches."""
        result: JobInfo = self._call(StartRewrap(namespace=namespace))
        return result

    def get_job(self, job_id: str) -> JobInfo:
        result: JobInfo = self._call(GetJob(job_id=job_id))
        return result

    def list_jobs(self, state: str | None = None) -> list[JobInfo]:
        return list((self._call(ListJobs(state=state))).jobs)

    def changes_since(self, seq: int, *, limit: int | None = None) -> ChangesResult:
        """State changes after ``seq``; the DEK cache uses this to evict revoked keys."""
        result: ChangesResult = self._call(ChangesSince(seq=seq, limit=limit))
        return result
