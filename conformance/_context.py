"""The target under test, the run's shared state, and what a case works with."""

from __future__ import annotations

import itertools
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from cryptography import x509

from conformance._case import CaseFailed, CaseSkipped
from conformance._certs import CertificateFactory, Credentials
from conformance._connection import Connection, ConnectionClosed, Message, NoResponse, Transcript
from conformance._schema import Schema

if TYPE_CHECKING:
    from conformance._selftest import SelfTestServer

#: "either an id or none" for expect_error: some errors may or may not be attributed.
ANY_ID = object()


@attrs.frozen
class Options:
    #: Seconds to wait for any one response.
    timeout: float = 10.0
    #: The server's frame and idle timeouts (not announced on the wire; defaults as documented).
    frame_timeout: float = 30.0
    idle_timeout: float = 300.0
    #: The server's connection limit (not announced; the documented default).
    max_connections: int = 1024
    #: Cases that must wait longer than this for a server timeout are skipped.
    max_wait: float = 60.0
    #: The most connections the flood case opens (it opens max_connections + a few).
    flood_limit: int = 5000
    garbage_frames: int = 1000
    fuzz_examples: int = 150
    fuzz_seed: int | None = None
    #: Where sslyze gets its own virtual environment (created on demand).
    sslyze_venv: Path | None = None
    sslyze_install: bool = True


@attrs.frozen
class Target:
    host: str
    port: int
    ca: Path
    client: Credentials
    admin: Credentials | None = None
    ca_key: Path | None = None
    #: A kmipd pki directory whose CRL the server reads (self-test: the dev CA).
    ca_dir: Path | None = None
    other_ca: Credentials | None = None
    revoked: Credentials | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Run:
    """State shared by every case of one run."""

    def __init__(
        self,
        target: Target,
        options: Options,
        *,
        scratch: Path,
        self_test: SelfTestServer | None = None,
    ) -> None:
        self.target = target
        self.options = options
        self.schema = Schema.load()
        self.scratch = scratch
        self.self_test = self_test
        self.run_id = secrets.token_hex(4)
        self.hello: dict[str, Any] = {}
        self.identity = ""
        self.baseline: tuple[str, bytes] | None = None
        self.certs: CertificateFactory | None = None
        self.observed_errors: set[str] = set()
        #: Operations that returned a result at least once in this run.
        self.served_operations: set[str] = set()
        #: Results cases share (e.g. the one sslyze scan), by name.
        self.cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def max_frame_size(self) -> int:
        return int(self.hello["max-frame-size"])

    @property
    def max_in_flight(self) -> int:
        return int(self.hello["max-in-flight"])

    def namespace(self, name: str = "main") -> str:
        """A namespace of this run's own: runs never see each other's keys."""
        return f"conformance-{self.run_id}/{name}"

    def observe(self, message: Message) -> None:
        if message.error_name is not None:
            with self._lock:
                self.observed_errors.add(message.error_name)

    def served(self, op: str) -> None:
        with self._lock:
            self.served_operations.add(op)


class Context:
    """What one case works with: the run, plus its own transcript and request ids."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.target = run.target
        self.options = run.options
        self.schema = run.schema
        self.transcript = Transcript()
        self.notes: list[str] = []
        self.measurements: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._labels = itertools.count(1)
        self._open: list[Connection] = []

    # -- connections -----------------------------------------------------------------------

    def next_id(self) -> int:
        return next(self._ids)

    def tls_context(self, creds: Credentials | None) -> ssl.SSLContext:
        """A client context that verifies the server against --ca and presents ``creds``."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(self.target.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if creds is not None:
            context.load_cert_chain(str(creds.cert), str(creds.key))
        return context

    def tcp(self, timeout: float | None = None) -> socket.socket:
        sock = socket.create_connection(
            (self.target.host, self.target.port), timeout=timeout or self.options.timeout
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def connect(
        self,
        creds: Credentials | None = None,
        *,
        hello: bool = True,
        label: str | None = None,
        context: ssl.SSLContext | None = None,
    ) -> Connection:
        """A TLS connection as ``creds`` (default: --cert), hello done unless told otherwise."""
        creds = creds or self.target.client
        label = label or f"c{next(self._labels)}"
        sock = self.tcp()
        try:
            tls = (context or self.tls_context(creds)).wrap_socket(
                sock, server_hostname=self.target.host
            )
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            self.transcript.add(f"-- {label} TLS handshake failed: {exc}")
            raise
        cipher = tls.cipher()
        self.transcript.add(f"-- {label} connected ({tls.version()}, {cipher and cipher[0]})")
        connection = Connection(
            tls,
            schema=self.schema,
            transcript=self.transcript,
            label=label,
            observe=self.run.observe,
        )
        self._open.append(connection)
        if hello:
            self.expect_result(self.hello(connection), "hello-result")
        return connection

    def hello(self, connection: Connection, versions: list[int] | None = None) -> Message:
        """Negotiate the version (``ctx.request`` records that hello was served)."""
        return self.request(connection, "hello", {"versions": versions or [1]})

    def request(
        self, connection: Connection, op: str, args: dict[str, Any] | None = None
    ) -> Message:
        reply = connection.request(self.next_id(), op, args, self.options.timeout)
        if not reply.is_error:
            self.run.served(op)
        return reply

    def receive(self, connection: Connection, timeout: float | None = None) -> Message:
        return connection.receive(timeout or self.options.timeout)

    def close_all(self) -> None:
        for connection in self._open:
            connection.close()
        self._open.clear()

    # -- verdict helpers --------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.notes.append(text)

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            raise CaseFailed(message)

    def expect_result(
        self, reply: Message, rule: str, *, request_id: int | None = None
    ) -> dict[str, Any]:
        """The reply is a success whose result matches the CDDL ``rule``; returns the result."""
        if reply.is_error:
            raise CaseFailed(f"expected a {rule}, got {reply.summary()}")
        if request_id is not None and reply.id != request_id:
            raise CaseFailed(f"expected the response to request {request_id}, got id={reply.id}")
        problem = self.schema.validate(f"{{ id: request-id, result: {rule} }}", reply.payload)
        if problem is not None:
            raise CaseFailed(f"the result is not a valid {rule}: {problem}")
        return reply.result

    def expect_error(
        self,
        reply: Message,
        name: str,
        *,
        request_id: int | object | None = ANY_ID,
        mentions: str | None = None,
    ) -> None:
        """The reply is the error ``name``; ``request_id`` None means it must carry no id."""
        self.schema.code_of(name)  # a typo in a case must not pass silently
        if reply.error_name != name:
            raise CaseFailed(f"expected error {name}, got {reply.summary()}")
        if request_id is None and reply.id is not None:
            raise CaseFailed(f"expected an unattributed {name} (no id), got id={reply.id}")
        if isinstance(request_id, int) and reply.id != request_id:
            raise CaseFailed(f"expected {name} for request {request_id}, got id={reply.id}")
        if mentions is not None and mentions not in reply.error_message:
            raise CaseFailed(
                f"the {name} message should name {mentions!r}: {reply.error_message!r}"
            )

    def expect_closed(self, connection: Connection, timeout: float) -> list[Message]:
        """The server closes the connection within ``timeout``; returns what came first."""
        try:
            return connection.receive_until_closed(timeout)
        except NoResponse:
            raise CaseFailed(
                f"the server kept the connection open for more than {timeout:g} s"
            ) from None

    def expect_usable(self, connection: Connection) -> None:
        """The connection still answers a request correctly."""
        try:
            self.expect_result(self.request(connection, "status"), "status-result")
        except ConnectionClosed as exc:
            raise CaseFailed(f"the connection should stay usable, but it closed ({exc})") from None

    # -- the run's fixtures ---------------------------------------------------------------

    @property
    def certs(self) -> CertificateFactory:
        assert self.run.certs is not None
        return self.run.certs

    def need_admin(self) -> Credentials:
        if self.target.admin is None:
            raise CaseSkipped("needs administrator credentials (--admin-cert/--admin-key)")
        return self.target.admin

    def need_self_test(self) -> SelfTestServer:
        if self.run.self_test is None:
            raise CaseSkipped("needs control of the server process (--self-test only)")
        return self.run.self_test

    def check_alive(self) -> None:
        """A fresh client is served correctly: hello, status, and the baseline DEK unchanged."""
        assert self.run.baseline is not None
        dek_id, key = self.run.baseline
        label = f"fresh{next(self._labels)}"
        try:
            connection = self.connect(label=label)
        except (ssl.SSLError, OSError, ConnectionClosed, NoResponse) as exc:
            raise CaseFailed(f"a fresh client could not connect afterwards: {exc}") from None
        with connection:
            try:
                self.expect_result(self.request(connection, "status"), "status-result")
                got = self.expect_result(
                    self.request(connection, "get-dek", {"dek-id": dek_id}), "dek-result"
                )
            except (ConnectionClosed, NoResponse) as exc:
                raise CaseFailed(f"a fresh client was not served afterwards: {exc}") from None
        if got["key"] != key:
            raise CaseFailed("after this case, get-dek returned a different key for the same DEK")


def certificate_identity(path: Path) -> str | None:
    """The single URI SAN of a PEM certificate (a SPIFFE ID), if it has one."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else None


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Bounded polling, for conditions with no event to wait on (e.g. a CRL reload)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
