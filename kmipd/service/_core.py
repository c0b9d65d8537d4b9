"""The shared core of the operations: construction, dispatch, authorize, audit, commit point.

The service performs no I/O of its own; it awaits the store, the HSM backend
and the audit log, and every refusal is a ServiceError carrying a wire error
code. It never puts key material into an exception, a log line, an audit
record or a repr.

``ServiceCore`` holds what every operation shares: the backends and policies
given at construction, the entry points ``handle`` (one request, audited,
inside the commit point ``request_scope``) and ``handle_now`` (the inline
fast path), the handler table, the authorization checks, the audit record and
the helpers more than one family needs (KEK version lookup, key references,
attributes, error mapping). The operations themselves live in one module per
family, each a class deriving from ``ServiceCore``; ``KeyService``
(``_service.py``) composes them.

Adding a family (the KMIP front end's extras, secrets, ...):

1. write ``kmipd/service/_<family>.py`` with ``class <Family>Operations(ServiceCore)``
   (derive from another family instead if you call its helpers, e.g.
   ``DeliveryOperations`` for sealing and KEK versions: mypy then checks the
   calls);
2. give each handler the signature ``async def _op(self, call: _Call, request:
   Request) -> Result`` and mark it ``@handles(Request)``, with
   ``changes_state=True`` if the operation changes stored state (its audit
   record is then on disk before the client hears of it, and it never fails
   open); ``@handles_now(Request)`` marks a synchronous inline variant for
   ``handle_now``, which returns ``NOT_NOW`` when it would have to wait;
3. call ``self._authorize`` / ``self._require_some_grant`` before touching
   anything, and record what the audit trail should say on ``call``;
4. add the class to ``KeyService``'s bases in ``_service.py`` (before the
   families it derives from).

Handlers are collected once per class, when it is defined (two handlers for
one request type is a TypeError there); the instance keeps them as one dict of
bound methods, so dispatch stays one dict lookup.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, ClassVar, TypeVar

import attrs
import trio
from cryptography import x509

from kmipd.audit import AuditError, AuditEvent, AuditLog
from kmipd.crypto import TransportTrust
from kmipd.hsm import HsmBackend, HsmError, HsmIntegrityError, HsmUnavailableError
from kmipd.lifecycle import Lifecycle, LifecycleError, LifecyclePolicy, Usage
from kmipd.protocol import (
    ErrorCode,
    KeyAttributes,
    KeyRef,
    Status,
    StatusResult,
    encode_deterministic,
    encode_item,
)
from kmipd.service._policy import Policy
from kmipd.store import (
    DekRecord,
    KekVersion,
    StaleRecordError,
    Store,
    StoreError,
    StoreOutcomeUnknownError,
    StoreUnavailableError,
)
from kmipd.store._commit import request_scope

log = logging.getLogger("kmipd.service")

#: Seconds the status operation waits for the HSM backend to answer its check.
STATUS_CHECK_TIMEOUT = 2.0

_LIFECYCLE_CODES = {
    "wrong-state": ErrorCode.WRONG_STATE,
    "usage-not-permitted": ErrorCode.USAGE_NOT_PERMITTED,
    "not-yet-active": ErrorCode.KEY_NOT_ACTIVE,
    "deactivated": ErrorCode.KEY_DEACTIVATED,
    "protect-stop-passed": ErrorCode.PROTECT_STOP_PASSED,
    "compromised": ErrorCode.KEY_COMPROMISED,
    "destroyed": ErrorCode.KEY_DESTROYED,
    "destroy-pending": ErrorCode.DESTROY_PENDING,
}


class ServiceError(Exception):
    """A refusal with its wire code; the message is safe to send to the client."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def dek_associated_data(dek_id: str, namespace: str, kek_version: int) -> bytes:
    """Binds a stored DEK to its row: a wrapped key moved to another row fails to unwrap."""
    # encode_deterministic's bytes: a list of plain values has no map to sort.
    return encode_item(["kmipd/dek/v1", dek_id, namespace, kek_version])


def blob_associated_data(kek: str, kek_version: int, context: dict[str, str]) -> bytes:
    """Binds a data-key blob to its KEK version and the caller's context."""
    return encode_deterministic(["kmipd/data-key/v1", kek, kek_version, context])


#: Signing key ids (kmipd.service._signing): never a DEK id, so either refuses the other.
SIGNING_KEY_ID_PREFIX = "sig_"


def refuse_signing_key_id(key_id: str) -> None:
    """A signing key's id where a DEK id goes (get-dek, rewrap-dek, ...): it never decrypts."""
    if key_id.startswith(SIGNING_KEY_ID_PREFIX):
        raise ServiceError(
            ErrorCode.SIGNING_KEY_ONLY,
            f"{key_id} is a signing key: it only signs and verifies (sign-digest, "
            "verify-digest), never decrypts, unwraps or is read as a DEK",
        )


def new_dek_id() -> str:
    """128 random bits, base32: unguessable, URL- and filename-safe."""
    return "dek_" + base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


@attrs.define
class ServerInfo:
    """What status reports about the server around the service; the server updates it."""

    name: str = "kmipd"
    state: str = "serving"
    connections: int = 0
    started_at: float = attrs.field(factory=time.monotonic)


@attrs.frozen
class Caller:
    """Who asks (the SPIFFE ID from the verified certificate) and the request's id."""

    identity: str
    request_id: int | None = None
    #: The protocol the request came in by, for the audit trail (None: native).
    protocol: str | None = None
    #: The verified TLS peer certificate: renew-certificate's proof of the current one.
    certificate: x509.Certificate | None = attrs.field(default=None, eq=False, repr=False)


@attrs.define
class _Call:
    """One operation in progress: what its audit record will say."""

    caller: Caller
    operation: str
    namespace: str | None = None
    dek_id: str | None = None
    kek: str | None = None
    kek_version: int | None = None
    blob_mac: str | None = None
    detail: str | None = None

    def event(self, result: str) -> AuditEvent:
        return AuditEvent(
            identity=self.caller.identity,
            operation=self.operation,
            result=result,
            request_id=self.caller.request_id,
            namespace=self.namespace,
            dek_id=self.dek_id,
            kek=self.kek,
            kek_version=self.kek_version,
            blob_mac=self.blob_mac,
            detail=self.detail,
            protocol=self.caller.protocol,
        )


Handler = Callable[[_Call, Any], Awaitable[Any]]
InlineHandler = Callable[[_Call, Any], Any]

_M = TypeVar("_M", bound=Callable[..., Any])

#: The attribute @handles and @handles_now put on the method they register.
_ROUTE = "_kmipd_service_route"


@attrs.frozen
class _Route:
    request: type[Any]
    changes_state: bool
    inline: bool


def handles(request: type[Any], *, changes_state: bool = False) -> Callable[[_M], _M]:
    """Register the method as ``handle``'s handler for requests of type ``request``.

    ``changes_state``: the operation changes stored state, so its audit record
    is synced to disk before the answer, and a failing trail refuses it even
    when reads may fail open.
    """

    def register(method: _M) -> _M:
        setattr(method, _ROUTE, _Route(request, changes_state, inline=False))
        return method

    return register


def handles_now(request: type[Any]) -> Callable[[_M], _M]:
    """Register the synchronous method as ``handle_now``'s answer to ``request``.

    It returns the result, raises ServiceError, or returns NOT_NOW (having
    changed nothing) when the answer needs waiting; ``handle_now`` audits it.
    """

    def register(method: _M) -> _M:
        setattr(method, _ROUTE, _Route(request, changes_state=False, inline=True))
        return method

    return register


@attrs.frozen
class _Routes:
    """A class's handlers by request type (method names), and its state-changing operations."""

    handlers: dict[type[Any], str]
    inline: dict[type[Any], str]
    changes_state: frozenset[str]


def _routes_of(cls: type) -> _Routes:
    handlers: dict[type[Any], str] = {}
    inline: dict[type[Any], str] = {}
    changes_state: set[str] = set()
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            route = getattr(value, _ROUTE, None)
            if not isinstance(route, _Route):
                continue
            table = inline if route.inline else handlers
            earlier = table.get(route.request)
            if earlier is not None and earlier != name:
                first, second = sorted((earlier, name))
                raise TypeError(
                    f"{cls.__name__}: {route.request.__name__} is handled by both "
                    f"{first} and {second}; one request type has one handler"
                )
            table[route.request] = name
            if route.changes_state:
                changes_state.add(route.request.OPERATION)
    return _Routes(handlers, inline, frozenset(changes_state))


class ServiceCore:
    """What every operation family shares; see the module docstring for adding one."""

    _routes: ClassVar[_Routes]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._routes = _routes_of(cls)

    def __init__(
        self,
        *,
        store: Store,
        hsm: HsmBackend,
        policy: Policy,
        info: ServerInfo | None = None,
        clock: Callable[[], float] = time.time,
        create_kek_on_demand: bool = False,
        lifecycle: LifecyclePolicy | None = None,
        audit: AuditLog | None = None,
        transport_trust: TransportTrust | None = None,
        require_sealed: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.hsm = hsm
        self.policy = policy
        self.lifecycle = lifecycle or LifecyclePolicy()
        self.audit = audit
        #: The CA and CRL transport certificates are checked against; the server
        #: replaces it whenever it loads a new CRL or reloads its TLS material.
        self.transport_trust = transport_trust
        #: Namespace globs where keys leave the daemon only sealed (transport.require_sealed).
        self.require_sealed = require_sealed
        self._parsed_certs: dict[bytes, x509.Certificate] = {}
        self.info = info or ServerInfo()
        self._clock = clock
        self._create_kek_on_demand = create_kek_on_demand
        self._kek_changes = trio.Lock()
        #: Set when a rewrap job starts, so the job runner wakes at once.
        self.jobs_waiting = trio.Event()
        routes = type(self)._routes
        self._handlers: dict[type[Any], Handler] = {
            request: getattr(self, name) for request, name in routes.handlers.items()
        }
        self._inline: dict[type[Any], InlineHandler] = {
            request: getattr(self, name) for request, name in routes.inline.items()
        }
        #: Operations whose audit record is on disk before the client hears of them.
        self._changes_state = routes.changes_state

    # -- entry points ------------------------------------------------------------------

    async def handle(self, caller: Caller, request: Any) -> Any:
        """Run one request for an authenticated caller; raise ServiceError to refuse."""
        call = _Call(caller, request.OPERATION)
        with request_scope():  # shielded from the first durable write on: see kmipd.store._commit
            try:
                with _backend_errors(request):
                    if self.store.shared:
                        await self.store.refresh_if_changed()  # see what the other daemons did
                    result = await self._handlers[type(request)](call, request)
            except ServiceError as exc:
                try:
                    self._audit(call, exc.code.wire_name)
                except ServiceError:
                    # Nothing was applied nor delivered: the client must still hear
                    # "not applied" (and fail over), not "a change may be applied".
                    if exc.code is not ErrorCode.STORE_UNAVAILABLE:
                        raise
                raise exc from None
            seq = self._audit(call, "ok")
            if seq is not None and call.operation in self._changes_state:
                assert self.audit is not None
                try:
                    await self.audit.sync(seq)
                except AuditError as exc:
                    raise _audit_failed(exc) from None
        return result

    def handle_now(self, caller: Caller, request: Any) -> Any:
        """Answer at once if that needs no waiting at all, else return NOT_NOW.

        The hot path of a storage system is get-dek of a DEK it used moments
        ago: with the wrapped row cached and an HSM backend that unwraps
        without blocking, the server answers inline instead of starting a
        task for it. Same checks, same errors, same audit as ``handle``.
        """
        answer = self._inline.get(type(request))
        if answer is None:
            return NOT_NOW
        call = _Call(caller, request.OPERATION)
        try:
            result = answer(call, request)
        except ServiceError as exc:
            self._audit(call, exc.code.wire_name)
            raise
        if result is not NOT_NOW:
            self._audit(call, "ok")
        return result

    def _audit(self, call: _Call, result: str) -> int | None:
        if self.audit is None or call.operation == "status":
            return None
        try:
            return self.audit.append(call.event(result), self._clock())
        except AuditError as exc:
            if self.audit.health.ok:  # an understood fault was logged once by its WriteHealth
                log.error("%s", exc)
            if call.operation in self._changes_state:
                raise _audit_failed(exc) from None  # applied: the client must hear that
            if self.audit.fail_open_reads:
                return None
            if self.audit.health.cause is not None:
                # A read refused for an understood fault of the trail's disk: nothing was
                # applied nor served, so the client may go to a daemon that can audit it.
                raise ServiceError(
                    ErrorCode.STORE_UNAVAILABLE,
                    f"the audit trail cannot be written ({self.audit.health.cause}); "
                    "not served, retry elsewhere or later",
                ) from None
            raise _audit_failed(exc) from None

    # -- helpers -------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def _authorize(self, call: _Call, operation: str, namespace: str) -> None:
        call.namespace = namespace
        if not self.policy.allows(call.caller.identity, operation, namespace):
            raise ServiceError(
                ErrorCode.NOT_AUTHORIZED,
                f"{call.caller.identity} is not allowed {operation} in namespace {namespace!r}",
            )

    def _require_some_grant(self, call: _Call, operation: str) -> None:
        if not self.policy.allows_anywhere(call.caller.identity, operation):
            raise ServiceError(
                ErrorCode.NOT_AUTHORIZED, f"{call.caller.identity} is not allowed {operation}"
            )

    def _may(self, call: _Call, operation: str, namespace: str) -> bool:
        return self.policy.allows(call.caller.identity, operation, namespace)

    def _kek_version(self, name: str, number: int) -> KekVersion:
        kek = self.store.get_kek(name)
        version = None if kek is None else kek.version(number)
        if version is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"KEK {name!r} has no version {number}")
        return version

    async def _resolve(self, call: _Call, operation: str, ref: KeyRef) -> DekRecord | KekVersion:
        """The key ``ref`` names, once the caller may ``operation`` it."""
        if ref.dek_id is not None and ref.kek is None and ref.version is None:
            call.dek_id = ref.dek_id
            self._require_some_grant(call, operation)
            refuse_signing_key_id(ref.dek_id)
            record = await self.store.get_dek(ref.dek_id)
            if record is None:
                raise ServiceError(ErrorCode.NOT_FOUND, f"no DEK with id {ref.dek_id}")
            self._authorize(call, operation, record.namespace)
            call.kek, call.kek_version = record.namespace, record.kek_version
            return record
        if ref.dek_id is None and ref.kek is not None and ref.version is not None:
            call.kek, call.kek_version = ref.kek, ref.version
            self._authorize(call, operation, ref.kek)
            return self._kek_version(ref.kek, ref.version)
        raise ServiceError(
            ErrorCode.BAD_REQUEST,
            "args.key: give either dek-id, or kek and version (a KEK version)",
        )

    def _kek_attributes(self, version: KekVersion) -> KeyAttributes:
        return _attributes(
            "kek",
            namespace=version.kek,
            version=version.version,
            created=version.created_at,
            lifecycle=version.lifecycle,
            now=self._clock(),
        )

    # -- status -------------------------------------------------------------------------------

    @handles(Status)
    async def _status(self, call: _Call, request: Status) -> StatusResult:
        hsm_state = store_state = "ok"
        try:
            with trio.fail_after(STATUS_CHECK_TIMEOUT):  # a wedged HSM must not wedge status
                await self.hsm.check()
        except (HsmError, trio.TooSlowError):
            hsm_state = "unavailable"
        backend = self.store.backend
        try:
            with trio.fail_after(STATUS_CHECK_TIMEOUT):  # a remote database may not answer
                await self.store.check()
        except StoreUnavailableError as exc:
            health = self.store.health
            store_state = health.describe() if not health.ok else f"unavailable: {exc.cause}"
            store_state = store_state[:64]
            if backend == "postgresql":
                backend += " standby" if "read-only" in exc.cause else " unreachable"
        except (StoreError, trio.TooSlowError):
            store_state = "failed"
        else:
            store_state = self.store.health.describe()
            if backend == "postgresql":
                backend += f" primary at {self.store.server}"  # check() refuses a standby
        if self.audit is not None and not self.audit.health.ok:
            # The trail is the store's companion on disk: its fault degrades the daemon too.
            store_state = f"{store_state}; audit trail {self.audit.health.describe()}"[:64]
        state = self.info.state
        if state == "serving" and (hsm_state, store_state) != ("ok", "ok"):
            state = "degraded"
        return StatusResult(
            state=state,
            server=self.info.name,
            uptime=int(time.monotonic() - self.info.started_at),
            connections=self.info.connections,
            hsm=f"{self.hsm.name}: {hsm_state}",
            store=store_state,
            store_backend=backend[:64],
        )


ServiceCore._routes = _routes_of(ServiceCore)


class _NotNow(enum.Enum):
    NOT_NOW = "not-now"


#: handle_now's answer when the request must go through handle().
NOT_NOW = _NotNow.NOT_NOW


def _usage(requested: tuple[str, ...] | None, allowed: frozenset[Usage]) -> frozenset[Usage]:
    if requested is None:
        return allowed
    usage = frozenset(Usage(u) for u in requested)
    if not usage <= allowed:
        raise ServiceError(
            ErrorCode.BAD_REQUEST, "args.usage names a usage this kind of key cannot have"
        )
    return usage


def _audit_failed(exc: AuditError) -> ServiceError:
    return ServiceError(
        ErrorCode.AUDIT_UNAVAILABLE, "the audit trail cannot be written; see the server log"
    )


#: What ``backend_error`` translates.
BACKEND_ERRORS = (HsmUnavailableError, StoreUnavailableError, StoreError)


def backend_error(
    exc: HsmUnavailableError | StoreUnavailableError | StoreError, request: Any
) -> ServiceError:
    """A backend failure as a wire error: the details go to the log, not the client."""
    if isinstance(exc, HsmUnavailableError):
        return ServiceError(ErrorCode.HSM_UNAVAILABLE, f"HSM unavailable: {exc}")
    if isinstance(exc, StaleRecordError):
        # Another daemon changed the key between our read and our write: nothing was
        # written, and the caller sees the key's state afresh if it asks again.
        return ServiceError(ErrorCode.WRONG_STATE, f"{exc}; read it again")
    if isinstance(exc, StoreOutcomeUnknownError):
        # The database went away during COMMIT: the write may or may not be there.
        log.error("store outcome unknown during %s: %s", request.OPERATION, exc)
        return ServiceError(
            ErrorCode.STORE_OUTCOME_UNKNOWN,
            f"the key store's connection broke while committing ({exc.cause}); the change "
            "may or may not be applied: read it back, or retry a create with its "
            "idempotency key",
        )
    if isinstance(exc, StoreUnavailableError):
        # Logged once per fault by the store's WriteHealth, not once per request.
        return ServiceError(
            ErrorCode.STORE_UNAVAILABLE,
            f"the key store cannot write ({exc.cause}); not applied, retry elsewhere or later",
        )
    log.error("store failure during %s: %s", request.OPERATION, exc)
    return ServiceError(ErrorCode.INTERNAL, "the key store failed; see the server log")


def lifecycle_error(exc: LifecycleError) -> ServiceError:
    return ServiceError(_LIFECYCLE_CODES[exc.reason], exc.message)


def unwrap_error(exc: HsmError, version: KekVersion, what: str) -> Exception:
    """An HSM's unwrap failure as a wire error; HsmUnavailableError stays itself (for
    ``backend_error``)."""
    if isinstance(exc, HsmIntegrityError):
        return ServiceError(ErrorCode.INTEGRITY_FAILURE, f"{what} failed authentication")
    if isinstance(exc, HsmUnavailableError):
        return exc
    log.error("HSM refused unwrap with KEK %s v%d: %s", version.kek, version.version, exc)
    return ServiceError(ErrorCode.INTERNAL, "the HSM refused the unwrap; see the server log")


# The context managers below are the translators above around a block; the hot
# path (get-dek inline) calls the translators from its own try instead: a
# contextlib manager costs about a microsecond per use.


@contextlib.contextmanager
def _backend_errors(request: Any) -> Iterator[None]:
    try:
        yield
    except BACKEND_ERRORS as exc:
        raise backend_error(exc, request) from None


@contextlib.contextmanager
def _lifecycle_errors() -> Iterator[None]:
    try:
        yield
    except LifecycleError as exc:
        raise lifecycle_error(exc) from None


@contextlib.contextmanager
def _unwrap_errors(version: KekVersion, what: str) -> Iterator[None]:
    try:
        yield
    except HsmUnavailableError:
        raise
    except HsmError as exc:
        raise unwrap_error(exc, version, what) from None


def _kek_what(version: KekVersion) -> str:
    return f"KEK {version.kek!r} version {version.version}"


def _stored_dek_what(record: DekRecord) -> str:
    return f"stored DEK {record.dek_id} (its row was altered or moved)"


def _record_associated_data(record: DekRecord) -> bytes:
    return dek_associated_data(record.dek_id, record.namespace, record.kek_version)


def _attributes(
    kind: str,
    *,
    namespace: str,
    version: int,
    created: int,
    lifecycle: Lifecycle,
    now: float,
    dek_id: str | None = None,
) -> KeyAttributes:
    reason = lifecycle.revocation_reason
    return KeyAttributes(
        kind=kind,
        namespace=namespace,
        version=version,
        dek_id=dek_id,
        state=lifecycle.effective(now).value,
        usage=tuple(sorted(u.value for u in lifecycle.usage)),
        created=created,
        activation=lifecycle.activation,
        protect_stop=lifecycle.protect_stop,
        process_start=lifecycle.process_start,
        deactivation=lifecycle.deactivation,
        compromise_date=lifecycle.compromise_date,
        destroy_date=lifecycle.destroy_date,
        purge_at=lifecycle.purge_at,
        revocation_reason=None if reason is None else reason.value,
        revocation_message=lifecycle.revocation_message,
    )


def _dek_attributes(record: DekRecord, now: float) -> KeyAttributes:
    return _attributes(
        "dek",
        namespace=record.namespace,
        version=record.kek_version,
        created=record.created_at,
        lifecycle=record.lifecycle,
        now=now,
        dek_id=record.dek_id,
    )
