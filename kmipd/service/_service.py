"""The operations: authorize, then store, then HSM, then a result, with an audit record.

The service performs no I/O of its own; it awaits the store, the HSM backend
and the audit log, and every refusal is a ServiceError carrying a wire error
code. It never puts key material into an exception, a log line, an audit
record or a repr.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import fnmatch
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import trio
from cryptography import x509

from kmipd.audit import AuditError, AuditEvent, AuditLog
from kmipd.crypto import (
    TransportCertError,
    TransportTrust,
    certificate_fingerprint,
    check_transport_certificate,
    data_key_binding,
    dek_binding,
    delivery_info,
    parse_certificate,
    seal_to_certificate,
    transport_kem,
)
from kmipd.crypto._transport_cert import check_still_valid
from kmipd.hsm import (
    HsmBackend,
    HsmError,
    HsmIntegrityError,
    HsmKeyNotFoundError,
    HsmUnavailableError,
)
from kmipd.lifecycle import (
    DEK_USAGES,
    KEK_USAGES,
    Event,
    Lifecycle,
    LifecycleError,
    LifecyclePolicy,
    RevocationReason,
    State,
    Usage,
    revocation_event,
)
from kmipd.protocol import (
    KEY_SIZE,
    Activate,
    ChangeInfo,
    ChangesResult,
    ChangesSince,
    CreateDek,
    CreateKek,
    DataKeyBlob,
    DataKeyResult,
    DekResult,
    Dependents,
    DependentsResult,
    Destroy,
    ErrorCode,
    GenerateDataKey,
    GetAttributes,
    GetDek,
    GetJob,
    GetTransportCert,
    JobInfo,
    KekInfo,
    KeyAttributes,
    KeyRef,
    ListJobs,
    ListJobsResult,
    ListKeks,
    ListKeksResult,
    Locate,
    LocateResult,
    ProtocolError,
    Recover,
    RegisterTransportCert,
    Revoke,
    RewrapBlob,
    RewrapBlobResult,
    RewrapDek,
    RotateKek,
    SealedDataKeyResult,
    SealedDekResult,
    SealedUnwrapResult,
    StartRewrap,
    Status,
    StatusResult,
    TransportCertInfo,
    Unwrap,
    UnwrapResult,
    decode_item,
    encode_deterministic,
    encode_item,
    encode_struct,
    parse_struct,
)
from kmipd.service._policy import Policy
from kmipd.store import (
    AlreadyExistsError,
    DekRecord,
    IdempotencyKeyUsedError,
    KekRecord,
    KekVersion,
    KeyStore,
    RewrapJob,
    StoreError,
    TransportCertRecord,
)
from kmipd.store._commit import request_scope

log = logging.getLogger("kmipd.service")

DATA_KEY_BLOB_FORMAT = 1
#: Seconds the status operation waits for the HSM backend to answer its check.
STATUS_CHECK_TIMEOUT = 2.0
LOCATE_DEFAULT_LIMIT = 100

#: Operations whose audit record is on disk before the client hears of them.
STATE_CHANGING = frozenset(
    {
        "create-dek",
        "create-kek",
        "rotate-kek",
        "activate",
        "revoke",
        "destroy",
        "recover",
        "rewrap-dek",
        "start-rewrap",
        "register-transport-cert",
        "set-secret",
        "update-secret",
        "delete-secret",
        "recover-secret",
        "purge-secret",
    }
)

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
    return encode_deterministic(["kmipd/dek/v1", dek_id, namespace, kek_version])


def blob_associated_data(kek: str, kek_version: int, context: dict[str, str]) -> bytes:
    """Binds a data-key blob to its KEK version and the caller's context."""
    return encode_deterministic(["kmipd/data-key/v1", kek, kek_version, context])


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
        )


Handler = Callable[[_Call, Any], Awaitable[Any]]


class KeyService:
    def __init__(
        self,
        *,
        store: KeyStore,
        hsm: HsmBackend,
        policy: Policy,
        info: ServerInfo | None = None,
        clock: Callable[[], float] = time.time,
        create_kek_on_demand: bool = False,
        lifecycle: LifecyclePolicy | None = None,
        audit: AuditLog | None = None,
        transport_trust: TransportTrust | None = None,
        require_sealed: tuple[str, ...] = (),
        secret_max_size: int = 64 * 1024,
    ) -> None:
        from kmipd.service._secrets import SecretOperations  # noqa: PLC0415 - it imports us

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
        self._handlers: dict[type[Any], Handler] = {
            Status: self._status,
            CreateDek: self._create_dek,
            GetDek: self._get_dek,
            GenerateDataKey: self._generate_data_key,
            Unwrap: self._unwrap,
            CreateKek: self._create_kek,
            ListKeks: self._list_keks,
            RotateKek: self._rotate_kek,
            Activate: self._activate,
            Revoke: self._revoke,
            Destroy: self._destroy,
            Recover: self._recover,
            GetAttributes: self._get_attributes,
            Locate: self._locate,
            Dependents: self._dependents,
            RewrapDek: self._rewrap_dek,
            RewrapBlob: self._rewrap_blob,
            StartRewrap: self._start_rewrap,
            GetJob: self._get_job,
            ListJobs: self._list_jobs,
            ChangesSince: self._changes_since,
            RegisterTransportCert: self._register_transport_cert,
            GetTransportCert: self._get_transport_cert,
        }
        #: The secret operations (kmipd.service._secrets), beside the key ones.
        self.secrets = SecretOperations(self, secret_max_size)
        self._handlers.update(self.secrets.handlers())  # type: ignore[arg-type]

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
                self._audit(call, exc.code.wire_name)
                raise
            seq = self._audit(call, "ok")
            if seq is not None and call.operation in STATE_CHANGING:
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
        if type(request) is not GetDek:
            return NOT_NOW
        record = self.store.cached_dek(request.dek_id)
        if record is None:
            return NOT_NOW
        call = _Call(caller, request.OPERATION)
        try:
            with _backend_errors(request):
                version = self._check_get_dek(call, request, record)
                with _unwrap_errors(version, _stored_dek_what(record)):
                    key = self.hsm.unwrap_now(
                        version.hsm_handle, record.wrapped, _record_associated_data(record)
                    )
        except ServiceError as exc:
            self._audit(call, exc.code.wire_name)
            raise
        if key is None:
            return NOT_NOW
        try:
            result = self._dek_delivery(call, request.seal_to, record, key)
        except ServiceError as exc:
            self._audit(call, exc.code.wire_name)
            raise
        self._audit(call, "ok")
        return result

    def _audit(self, call: _Call, result: str) -> int | None:
        if self.audit is None or call.operation == "status":
            return None
        try:
            return self.audit.append(call.event(result), self._clock())
        except AuditError as exc:
            log.error("%s", exc)
            if self.audit.fail_open_reads and call.operation not in STATE_CHANGING:
                return None
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

    async def _kek_for_new_key(self, namespace: str, identity: str) -> KekRecord:
        kek = self.store.get_kek(namespace)
        if kek is not None:
            return kek
        if not self._create_kek_on_demand:
            raise ServiceError(
                ErrorCode.NOT_FOUND,
                f"namespace {namespace!r} has no KEK; an administrator creates it "
                f"(kmipd kek create {namespace})",
            )
        async with self._kek_changes:
            kek = self.store.get_kek(namespace)
            if kek is not None:
                return kek
            try:
                kek = await self._make_kek(namespace, identity, KEK_USAGES, None)
            except ServiceError as exc:
                if exc.code is not ErrorCode.ALREADY_EXISTS or not self.store.shared:
                    raise
                # Another daemon sharing the store created it first: use theirs.
                await self.store.refresh_if_changed()
                kek = self.store.get_kek(namespace)
                if kek is None:
                    raise
                return kek
            log.info("created KEK %r on demand for %s", namespace, identity)
            return kek

    async def _make_kek(
        self, name: str, identity: str, usage: frozenset[Usage], activation: int | None
    ) -> KekRecord:
        now = self._now()
        handle = await self.hsm.generate_kek(f"{name}/v1")
        lifecycle = self.lifecycle.new_lifecycle("kek", name, now, usage, activation)
        version = KekVersion(name, 1, handle, now, lifecycle)
        try:
            return await self.store.create_kek(name, version, identity)
        except AlreadyExistsError:
            await self.hsm.destroy_kek(handle)
            raise ServiceError(ErrorCode.ALREADY_EXISTS, f"KEK {name!r} already exists") from None

    async def _version_for_protection(self, call: _Call, kek: KekRecord) -> KekVersion:
        """The newest version that may wrap now; rotate first if it expired and that is on."""
        now = self._now()
        version = kek.for_protection(now)
        if version is None and self.lifecycle.auto_rotate and _rotation_due(kek, now):
            version = (await self.rotate(kek.name, "automatic: protect-stop reached")).latest
        if version is None:
            newest = kek.latest
            with _lifecycle_errors():
                newest.lifecycle.check_protect(Usage.WRAP, now, _kek_what(newest))
            raise ServiceError(ErrorCode.WRONG_STATE, f"KEK {kek.name!r} has no version to wrap")
        with _lifecycle_errors():
            version.lifecycle.check_protect(Usage.WRAP, now, _kek_what(version))
        call.kek, call.kek_version = version.kek, version.version
        return version

    def _kek_version(self, name: str, number: int) -> KekVersion:
        kek = self.store.get_kek(name)
        version = None if kek is None else kek.version(number)
        if version is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"KEK {name!r} has no version {number}")
        return version

    async def rotate(self, name: str, why: str) -> KekRecord:
        """Make the KEK's next version (a new HSM key); new wraps use it from now on."""
        async with self._kek_changes:
            kek = self.store.get_kek(name)
            if kek is None:
                raise ServiceError(ErrorCode.NOT_FOUND, f"no KEK named {name!r}")
            now = self._now()
            latest = kek.latest
            number = latest.version + 1
            handle = await self.hsm.generate_kek(f"{name}/v{number}")
            lifecycle = self.lifecycle.new_lifecycle("kek", name, now, latest.lifecycle.usage, None)
            try:
                kek = await self.store.add_kek_version(
                    KekVersion(name, number, handle, now, lifecycle)
                )
            except AlreadyExistsError:
                await self.hsm.destroy_kek(handle)  # another daemon rotated first
                await self.store.refresh_if_changed()
                return self.store.get_kek(name) or kek
        log.info("rotated KEK %r to version %d (%s)", name, number, why)
        return kek

    # -- data operations -------------------------------------------------------------------

    async def _status(self, call: _Call, request: Status) -> StatusResult:
        hsm_state = store_state = "ok"
        try:
            with trio.fail_after(STATUS_CHECK_TIMEOUT):  # a wedged HSM must not wedge status
                await self.hsm.check()
        except (HsmError, trio.TooSlowError):
            hsm_state = "unavailable"
        try:
            await self.store.check()
        except StoreError:
            store_state = "failed"
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
        )

    async def _create_dek(self, call: _Call, request: CreateDek) -> DekResult | SealedDekResult:
        namespace = request.namespace
        self._authorize(call, "create-dek", namespace)
        identity = call.caller.identity
        self._check_sealed_policy(call, namespace, request.seal_to)
        if request.seal_to is not None:
            self._seal_target(call, request.seal_to)  # refuse before anything is created
        if request.idempotency_key is not None:
            earlier = await self._created_earlier(call, request)
            if earlier is not None:
                return earlier
        version = await self._version_for_protection(
            call, await self._kek_for_new_key(namespace, identity)
        )
        now = self._now()
        usage = _usage(request.usage, DEK_USAGES)
        dek_id = new_dek_id()
        call.dek_id = dek_id
        key = secrets.token_bytes(KEY_SIZE)
        wrapped = await self.hsm.wrap(
            version.hsm_handle, key, dek_associated_data(dek_id, namespace, version.version)
        )
        lifecycle = self.lifecycle.new_lifecycle("dek", namespace, now, usage, None)
        record = DekRecord(dek_id, namespace, version.version, wrapped, now, identity, lifecycle)
        try:
            await self.store.put_dek(record, idempotency_key=request.idempotency_key)
        except IdempotencyKeyUsedError:
            # The same create, retried while the first attempt was committing.
            earlier = await self._created_earlier(call, request)
            assert earlier is not None
            return earlier
        # The row is durable from here on: nothing below may await (and be cancelled).
        return self._dek_delivery(call, request.seal_to, record, key)

    async def _created_earlier(
        self, call: _Call, request: CreateDek
    ) -> DekResult | SealedDekResult | None:
        """The DEK an earlier attempt of this create made, if there was one."""
        assert request.idempotency_key is not None
        dek_id = await self.store.find_idempotent(call.caller.identity, request.idempotency_key)
        if dek_id is None:
            return None
        record = await self.store.get_dek(dek_id)
        if record is None or record.namespace != request.namespace:
            raise ServiceError(
                ErrorCode.BAD_REQUEST,
                "idempotency key already used for another create-dek; use a fresh key per create",
            )
        return await self._get_dek(
            call, GetDek(dek_id=dek_id, purpose="encrypt", seal_to=request.seal_to)
        )

    def _check_get_dek(self, call: _Call, request: GetDek, record: DekRecord | None) -> KekVersion:
        self._require_some_grant(call, "get-dek")
        call.dek_id = request.dek_id
        if record is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"no DEK with id {request.dek_id}")
        call.namespace = record.namespace
        call.kek, call.kek_version = record.namespace, record.kek_version
        purpose = request.purpose or "decrypt"
        call.detail = f"purpose {purpose}"
        operation = "recovery" if purpose == "recovery" else "get-dek"
        if not self._may(call, operation, record.namespace):
            raise ServiceError(
                ErrorCode.NOT_AUTHORIZED,
                f"{call.caller.identity} is not allowed {operation} on {record.dek_id}",
            )
        self._check_sealed_policy(call, record.namespace, request.seal_to)
        now = self._clock()
        what = f"DEK {record.dek_id}"
        version = self._kek_version(record.namespace, record.kek_version)
        with _lifecycle_errors():
            if purpose == "encrypt":
                record.lifecycle.check_protect(Usage.ENCRYPT, now, what)
            elif purpose == "decrypt":
                record.lifecycle.check_process(Usage.DECRYPT, now, what)
            else:
                record.lifecycle.check_recovery(Usage.DECRYPT, now, what)
            if purpose == "recovery":
                version.lifecycle.check_recovery(Usage.UNWRAP, now, _kek_what(version))
            else:
                version.lifecycle.check_process(Usage.UNWRAP, now, _kek_what(version))
        return version

    async def _get_dek(self, call: _Call, request: GetDek) -> DekResult | SealedDekResult:
        self._require_some_grant(call, "get-dek")
        record = await self.store.get_dek(request.dek_id)
        version = self._check_get_dek(call, request, record)
        assert record is not None
        if request.seal_to is not None:
            self._seal_target(call, request.seal_to)
        with _unwrap_errors(version, _stored_dek_what(record)):
            key = await self.hsm.unwrap(
                version.hsm_handle, record.wrapped, _record_associated_data(record)
            )
        return self._dek_delivery(call, request.seal_to, record, key)

    async def _generate_data_key(
        self, call: _Call, request: GenerateDataKey
    ) -> DataKeyResult | SealedDataKeyResult:
        self._authorize(call, "generate-data-key", request.kek)
        self._check_sealed_policy(call, request.kek, request.seal_to)
        if request.seal_to is not None:
            self._seal_target(call, request.seal_to)
        kek = await self._kek_for_new_key(request.kek, call.caller.identity)
        version = await self._version_for_protection(call, kek)
        key = secrets.token_bytes(KEY_SIZE)
        blob = await self._wrap_blob(version, key, request.context)
        call.blob_mac = self._mac(blob)
        if request.seal_to is not None:
            sealed = self._seal(
                call, request.seal_to, key, data_key_binding(blob, request.kek, version.version)
            )
            return SealedDataKeyResult(
                sealed_key=sealed, blob=blob, kek=request.kek, kek_version=version.version
            )
        return DataKeyResult(key=key, blob=blob, kek=request.kek, kek_version=version.version)

    # -- sealed delivery and the transport-certificate directory --------------------------

    def _check_sealed_policy(self, call: _Call, namespace: str, seal_to: bytes | None) -> None:
        if seal_to is None and any(
            fnmatch.fnmatchcase(namespace, pattern) for pattern in self.require_sealed
        ):
            raise ServiceError(
                ErrorCode.SEALED_DELIVERY_REQUIRED,
                f"keys of namespace {namespace!r} are delivered only sealed to a registered "
                "transport certificate (args.seal-to); nothing was done",
            )

    def _certificate(self, der: bytes) -> x509.Certificate:
        """Parsed once per certificate: a sealed delivery re-checks it, not re-parses it."""
        cert = self._parsed_certs.get(der)
        if cert is None:
            cert = parse_certificate(der)
            if len(self._parsed_certs) >= 4096:
                self._parsed_certs.clear()
            self._parsed_certs[der] = cert
        return cert

    def _usable_certificate(self, record: TransportCertRecord) -> x509.Certificate:
        """A registered certificate, checked again: validity and the CRL change after
        registration."""
        cert = self._certificate(record.certificate)
        try:
            check_still_valid(cert, self._trust())
        except TransportCertError as exc:
            raise ServiceError(
                ErrorCode.TRANSPORT_CERTIFICATE_REJECTED,
                f"{record.identity}'s registered transport certificate can no longer be used: "
                f"{exc}",
            ) from None
        return cert

    def _seal_target(self, call: _Call, fingerprint: bytes) -> x509.Certificate:
        """The caller's registered certificate named by ``fingerprint``, still acceptable."""
        identity = call.caller.identity
        record = self.store.get_transport_cert(identity)
        if record is None:
            raise ServiceError(
                ErrorCode.NO_TRANSPORT_CERTIFICATE,
                f"{identity} has no registered transport certificate; register one first "
                "(kmipd transport register)",
            )
        if not hmac.compare_digest(record.fingerprint, fingerprint):
            raise ServiceError(
                ErrorCode.NO_TRANSPORT_CERTIFICATE,
                f"args.seal-to is not the fingerprint of {identity}'s registered transport "
                f"certificate (that is {record.fingerprint.hex()[:16]}...; replaced meanwhile?)",
            )
        if call.caller.request_id is None:
            raise ServiceError(ErrorCode.BAD_REQUEST, "sealed delivery needs a request id")
        cert = self._usable_certificate(record)
        call.detail = (call.detail + ", " if call.detail else "") + "sealed"
        return cert

    def _seal(self, call: _Call, fingerprint: bytes, key: bytes, binding: list[object]) -> bytes:
        cert = self._seal_target(call, fingerprint)
        assert call.caller.request_id is not None
        info = delivery_info(
            call.operation, call.caller.request_id, call.caller.identity, fingerprint, binding
        )
        return seal_to_certificate(cert, key, info)

    def _dek_delivery(
        self, call: _Call, seal_to: bytes | None, record: DekRecord, key: bytes
    ) -> DekResult | SealedDekResult:
        if seal_to is None:
            return _dek_result(record, key)
        binding = dek_binding(record.dek_id, record.namespace, record.kek_version)
        return SealedDekResult(
            dek_id=record.dek_id,
            namespace=record.namespace,
            kek_version=record.kek_version,
            sealed_key=self._seal(call, seal_to, key, binding),
        )

    def _trust(self) -> TransportTrust:
        if self.transport_trust is None:
            raise ServiceError(
                ErrorCode.TRANSPORT_CERTIFICATE_REJECTED,
                "this daemon has no CA loaded for transport certificates",
            )
        return self.transport_trust

    async def _register_transport_cert(
        self, call: _Call, request: RegisterTransportCert
    ) -> TransportCertInfo:
        identity = call.caller.identity
        try:
            cert = parse_certificate(request.certificate)
            kem = check_transport_certificate(cert, self._trust(), identity=identity)
        except TransportCertError as exc:
            raise ServiceError(
                ErrorCode.TRANSPORT_CERTIFICATE_REJECTED,
                f"transport certificate refused: {exc}; the registered one (if any) stays",
            ) from None
        fingerprint = certificate_fingerprint(cert)
        call.detail = f"transport certificate {fingerprint.hex()[:16]}... ({kem.value})"
        record = TransportCertRecord(identity, request.certificate, fingerprint, self._now())
        await self.store.put_transport_cert(record)
        log.info("registered the transport certificate of %s (%s)", identity, kem.value)
        return _transport_info(record, cert)

    async def _get_transport_cert(
        self, call: _Call, request: GetTransportCert
    ) -> TransportCertInfo:
        call.detail = f"of {request.identity}"
        # Not open to every authenticated client: the directory would tell anyone
        # which identities exist.
        self._require_some_grant(call, "get-transport-cert")
        record = self.store.get_transport_cert(request.identity)
        if record is None:
            raise ServiceError(
                ErrorCode.NO_TRANSPORT_CERTIFICATE,
                f"{request.identity} has no registered transport certificate",
            )
        return _transport_info(record, self._usable_certificate(record))

    async def _wrap_blob(self, version: KekVersion, key: bytes, context: dict[str, str]) -> bytes:
        wrapped = await self.hsm.wrap(
            version.hsm_handle, key, blob_associated_data(version.kek, version.version, context)
        )
        blob = DataKeyBlob(
            format=DATA_KEY_BLOB_FORMAT,
            kek=version.kek,
            kek_version=version.version,
            wrapped=wrapped,
        )
        return encode_item(encode_struct(blob))

    def _mac(self, blob: bytes) -> str | None:
        return None if self.audit is None else self.audit.mac(blob)

    async def _open_blob(
        self,
        call: _Call,
        operation: str,
        blob_bytes: bytes,
        context: dict[str, str],
        *,
        recovery: bool = False,
        seal_to: bytes | bool | None = False,
    ) -> tuple[bytes, KekVersion]:
        """Unwrap a blob's key. ``seal_to`` (bytes or None) marks a delivery to the
        caller: the namespace's sealed-delivery policy and the seal target are
        checked before the unwrap; False means the key never leaves the daemon."""
        call.blob_mac = self._mac(blob_bytes)
        try:
            blob = parse_struct(DataKeyBlob, decode_item(blob_bytes), "blob")
        except ProtocolError as exc:
            raise ServiceError(
                ErrorCode.BAD_REQUEST, f"args.blob is not a kmipd data-key blob ({exc.message})"
            ) from None
        self._authorize(call, operation, blob.kek)
        call.kek, call.kek_version = blob.kek, blob.kek_version
        if seal_to is not False:
            assert not isinstance(seal_to, bool)
            self._check_sealed_policy(call, blob.kek, seal_to)
            if seal_to is not None:
                self._seal_target(call, seal_to)
        version = self._kek_version(blob.kek, blob.kek_version)
        with _lifecycle_errors():
            if recovery:
                version.lifecycle.check_recovery(Usage.UNWRAP, self._clock(), _kek_what(version))
            else:
                version.lifecycle.check_process(Usage.UNWRAP, self._clock(), _kek_what(version))
        with _unwrap_errors(version, "data-key blob (wrong context, or the blob was altered)"):
            key = await self.hsm.unwrap(
                version.hsm_handle,
                blob.wrapped,
                blob_associated_data(blob.kek, blob.kek_version, context),
            )
        return key, version

    async def _unwrap(self, call: _Call, request: Unwrap) -> UnwrapResult | SealedUnwrapResult:
        key, version = await self._open_blob(
            call, "unwrap", request.blob, request.context, seal_to=request.seal_to
        )
        if request.seal_to is not None:
            binding = data_key_binding(request.blob, version.kek, version.version)
            return SealedUnwrapResult(
                sealed_key=self._seal(call, request.seal_to, key, binding),
                kek=version.kek,
                kek_version=version.version,
            )
        return UnwrapResult(key=key, kek=version.kek, kek_version=version.version)

    # -- KEK administration -------------------------------------------------------------------

    async def _create_kek(self, call: _Call, request: CreateKek) -> KekInfo:
        self._authorize(call, "create-kek", request.name)
        call.kek = request.name
        now = self._now()
        if request.activation is not None and request.activation < now:
            raise ServiceError(
                ErrorCode.BAD_REQUEST,
                "args.activation is in the past; omit it to activate the KEK now",
            )
        usage = _usage(request.usage, KEK_USAGES)
        async with self._kek_changes:
            if self.store.get_kek(request.name) is not None:
                raise ServiceError(ErrorCode.ALREADY_EXISTS, f"KEK {request.name!r} already exists")
            kek = await self._make_kek(
                request.name, call.caller.identity, usage, request.activation
            )
        call.kek_version = 1
        log.info("created KEK %r for %s", request.name, call.caller.identity)
        return self._kek_info(kek)

    def _kek_info(self, kek: KekRecord) -> KekInfo:
        return KekInfo(
            name=kek.name,
            version=kek.latest.version,
            created=kek.created_at,
            state=kek.latest.lifecycle.effective(self._clock()).value,
        )

    async def _list_keks(self, call: _Call, request: ListKeks) -> ListKeksResult:
        self._require_some_grant(call, "list-keks")
        return ListKeksResult(
            keks=tuple(
                self._kek_info(kek)
                for kek in self.store.list_keks(request.prefix)
                if self._may(call, "list-keks", kek.name)
            )
        )

    async def _rotate_kek(self, call: _Call, request: RotateKek) -> KeyAttributes:
        self._authorize(call, "rotate-kek", request.name)
        call.kek = request.name
        kek = await self.rotate(request.name, f"requested by {call.caller.identity}")
        call.kek_version = kek.latest.version
        return self._kek_attributes(kek.latest)

    # -- lifecycle transitions ------------------------------------------------------------------

    async def _resolve(self, call: _Call, operation: str, ref: KeyRef) -> DekRecord | KekVersion:
        if ref.dek_id is not None and ref.kek is None and ref.version is None:
            call.dek_id = ref.dek_id
            self._require_some_grant(call, operation)
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

    async def _transition(
        self, call: _Call, target: DekRecord | KekVersion, event: Event, **changes: Any
    ) -> KeyAttributes:
        with _lifecycle_errors():
            lifecycle = target.lifecycle.apply(event, self._now(), **changes)
        return await self._record(target, lifecycle)

    async def _record(self, target: DekRecord | KekVersion, lifecycle: Lifecycle) -> KeyAttributes:
        now = self._now()
        if isinstance(target, DekRecord):
            updated = await self.store.set_dek_lifecycle(target, lifecycle)
            return _dek_attributes(updated, now)
        await self.store.set_kek_version_lifecycle(target, lifecycle)
        return self._kek_attributes(self._kek_version(target.kek, target.version))

    async def _activate(self, call: _Call, request: Activate) -> KeyAttributes:
        target = await self._resolve(call, "activate", request.key)
        return await self._transition(call, target, Event.ACTIVATE)

    async def _revoke(self, call: _Call, request: Revoke) -> KeyAttributes:
        target = await self._resolve(call, "revoke", request.key)
        reason = RevocationReason(request.reason)
        call.detail = f"reason {reason.value}"
        attributes = await self._transition(
            call,
            target,
            revocation_event(reason),
            revocation_reason=reason,
            revocation_message=request.message,
        )
        log.warning("revoked %s (%s) for %s", _what(target), reason.value, call.caller.identity)
        return attributes

    async def _destroy(self, call: _Call, request: Destroy) -> KeyAttributes:
        target = await self._resolve(call, "destroy", request.key)
        if isinstance(target, KekVersion) and not request.force:
            count, ids = await self.store.dependents(target.kek, target.version, 5)
            if count:
                raise ServiceError(
                    ErrorCode.DEPENDENTS_EXIST,
                    f"{count} DEK(s) are wrapped only under {_kek_what(target)} "
                    f"(e.g. {', '.join(ids)}); rewrap them first, or destroy with force "
                    "to make them unrecoverable",
                )
            secrets_under = await self.store.count_secret_versions_under(target.kek, target.version)
            if secrets_under:
                raise ServiceError(
                    ErrorCode.DEPENDENTS_EXIST,
                    f"{secrets_under} secret version(s) are wrapped only under "
                    f"{_kek_what(target)}; rewrap them first (start-rewrap), or destroy with "
                    "force to make them unrecoverable",
                )
        now = self._now()
        purge_at = now if request.purge_now else now + self.lifecycle.soft_delete_seconds
        call.detail = "purge now" if request.purge_now else f"purge at {purge_at}"
        with _lifecycle_errors():
            scheduled = target.lifecycle.schedule_destroy(now, purge_at)
        attributes = await self._record(target, scheduled)
        log.warning("destroying %s for %s (%s)", _what(target), call.caller.identity, call.detail)
        if purge_at <= now:
            await self.purge_due()
            return await self._attributes_of(call, request.key)
        return attributes

    async def _recover(self, call: _Call, request: Recover) -> KeyAttributes:
        target = await self._resolve(call, "recover", request.key)
        with _lifecycle_errors():
            lifecycle = target.lifecycle.cancel_destroy()
        return await self._record(target, lifecycle)

    # -- queries ---------------------------------------------------------------------------

    async def _attributes_of(self, call: _Call, ref: KeyRef) -> KeyAttributes:
        target = await self._resolve(call, "get-attributes", ref)
        if isinstance(target, DekRecord):
            return _dek_attributes(target, self._clock())
        return self._kek_attributes(target)

    async def _get_attributes(self, call: _Call, request: GetAttributes) -> KeyAttributes:
        return await self._attributes_of(call, request.key)

    def _kek_attributes(self, version: KekVersion) -> KeyAttributes:
        return _attributes(
            "kek",
            namespace=version.kek,
            version=version.version,
            created=version.created_at,
            lifecycle=version.lifecycle,
            now=self._clock(),
        )

    async def _locate(self, call: _Call, request: Locate) -> LocateResult:
        self._require_some_grant(call, "locate")
        now = self._clock()
        state = None if request.state is None else State(request.state)
        limit = request.limit or LOCATE_DEFAULT_LIMIT
        found: list[KeyAttributes] = []
        if request.kind in (None, "kek"):
            for kek in self.store.list_keks():
                if not self._namespace_matches(kek.name, request.namespace):
                    continue
                if not self._may(call, "locate", kek.name):
                    continue
                found.extend(
                    self._kek_attributes(version)
                    for version in kek.versions
                    if state is None or version.lifecycle.effective(now) is state
                )
        next_after = None
        if request.kind in (None, "dek"):
            records = await self.store.locate_deks(
                namespace=request.namespace, state=None, after=request.after or "", limit=limit
            )
            for record in records:
                if state is not None and record.lifecycle.effective(now) is not state:
                    continue
                if self._may(call, "locate", record.namespace):
                    found.append(_dek_attributes(record, now))
            if len(records) == limit:
                next_after = records[-1].dek_id
        return LocateResult(keys=tuple(found), next=next_after)

    @staticmethod
    def _namespace_matches(name: str, pattern: str | None) -> bool:
        return pattern is None or fnmatch.fnmatchcase(name, pattern)

    async def _dependents(self, call: _Call, request: Dependents) -> DependentsResult:
        self._authorize(call, "dependents", request.kek)
        call.kek, call.kek_version = request.kek, request.version
        self._kek_version(request.kek, request.version)
        count, ids = await self.store.dependents(
            request.kek,
            request.version,
            LOCATE_DEFAULT_LIMIT if request.limit is None else request.limit,
        )
        return DependentsResult(count=count, dek_ids=tuple(ids))

    async def _changes_since(self, call: _Call, request: ChangesSince) -> ChangesResult:
        self._require_some_grant(call, "changes-since")
        changes, newest, pruned = await self.store.changes_since(request.seq, request.limit or 1000)
        visible = tuple(
            ChangeInfo(
                seq=c.seq,
                at=c.at,
                namespace=c.namespace,
                state=c.state,
                dek_id=c.dek_id,
                kek_version=c.kek_version,
            )
            for c in changes
            if self._may(call, "changes-since", c.namespace)
        )
        # Fewer than the limit means the caller has everything up to ``newest``.
        seq = newest if len(changes) < (request.limit or 1000) else changes[-1].seq
        # Behind the pruned part of the feed: what it missed is gone, so say so.
        return ChangesResult(changes=visible, seq=seq, reset=True if request.seq < pruned else None)

    # -- rewrap -----------------------------------------------------------------------------

    async def rewrap_record(self, record: DekRecord, target: KekVersion) -> bool:
        """Re-wrap one stored DEK under ``target`` without the key leaving the daemon."""
        wrapped = await self._rewrapped(record, target)
        return await self.store.rewrap_dek(record, target.version, wrapped)

    async def _rewrapped(self, record: DekRecord, target: KekVersion) -> bytes:
        """The DEK's wrapping under ``target`` (unwrapped and re-wrapped inside the HSM path)."""
        old = self._kek_version(record.namespace, record.kek_version)
        with _lifecycle_errors():
            old.lifecycle.check_recovery(Usage.UNWRAP, self._clock(), _kek_what(old))
        with _unwrap_errors(old, _stored_dek_what(record)):
            key = await self.hsm.unwrap(
                old.hsm_handle, record.wrapped, _record_associated_data(record)
            )
        wrapped = await self.hsm.wrap(
            target.hsm_handle,
            key,
            dek_associated_data(record.dek_id, record.namespace, target.version),
        )
        del key
        return wrapped

    async def _rewrap_dek(self, call: _Call, request: RewrapDek) -> KeyAttributes:
        record = await self._resolve(call, "rewrap", KeyRef(dek_id=request.dek_id))
        assert isinstance(record, DekRecord)
        kek = self.store.get_kek(record.namespace)
        assert kek is not None
        target = await self._version_for_protection(call, kek)
        if record.kek_version != target.version:
            await self.rewrap_record(record, target)
        updated = await self.store.get_dek(record.dek_id)
        assert updated is not None
        return _dek_attributes(updated, self._clock())

    async def _rewrap_blob(self, call: _Call, request: RewrapBlob) -> RewrapBlobResult:
        blob_bytes = request.blob
        blob_kek = _blob_kek(blob_bytes)
        recovery = blob_kek is not None and self._may(call, "recovery", blob_kek)
        key, old = await self._open_blob(
            call, "rewrap", blob_bytes, request.context, recovery=recovery
        )
        kek = self.store.get_kek(old.kek)
        assert kek is not None
        target = await self._version_for_protection(call, kek)
        blob = await self._wrap_blob(target, key, request.context)
        del key
        return RewrapBlobResult(blob=blob, kek=target.kek, kek_version=target.version)

    async def _start_rewrap(self, call: _Call, request: StartRewrap) -> JobInfo:
        self._authorize(call, "start-rewrap", request.namespace)
        kek = self.store.get_kek(request.namespace)
        if kek is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"no KEK named {request.namespace!r}")
        target = await self._version_for_protection(call, kek)
        now = self._now()
        job = RewrapJob(
            job_id="job_" + secrets.token_hex(8),
            namespace=request.namespace,
            target=target.version,
            cursor="",
            rewrapped=0,
            skipped=0,
            remaining=await self.store.count_to_rewrap(request.namespace, target.version),
            state="running",
            created_at=now,
            updated_at=now,
            created_by=call.caller.identity,
        )
        await self.store.create_job(job)
        call.detail = f"job {job.job_id}"
        self.jobs_waiting.set()
        log.info(
            "rewrap job %s started: %s to version %d (%d DEKs)",
            job.job_id,
            job.namespace,
            job.target,
            job.remaining,
        )
        return _job_info(job)

    async def _get_job(self, call: _Call, request: GetJob) -> JobInfo:
        job = await self.store.get_job(request.job_id)
        if job is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"no job {request.job_id}")
        self._authorize(call, "get-job", job.namespace)
        return _job_info(job)

    async def _list_jobs(self, call: _Call, request: ListJobs) -> ListJobsResult:
        self._require_some_grant(call, "list-jobs")
        jobs = await self.store.list_jobs(request.state)
        return ListJobsResult(
            jobs=tuple(_job_info(j) for j in jobs if self._may(call, "list-jobs", j.namespace))
        )

    async def run_rewrap_batch(self, job: RewrapJob, batch_size: int) -> RewrapJob:
        """Advance a job by one batch.

        The batch's new wrappings and the job's progress are committed in one
        transaction, and each row is only replaced if it is still under the
        version that was read: after a crash the job resumes at its last
        commit, and no DEK is lost, skipped or counted twice.
        """
        records = await self.store.deks_to_rewrap(job.namespace, job.target, job.cursor, batch_size)
        target = self._kek_version(job.namespace, job.target)
        updates: list[tuple[DekRecord, bytes]] = []
        skipped = 0
        for record in records:
            try:
                updates.append((record, await self._rewrapped(record, target)))
            except ServiceError as exc:
                log.warning("rewrap job %s: skipping %s: %s", job.job_id, record.dek_id, exc)
                skipped += 1
        done = len(records) < batch_size
        job = attrs.evolve(
            job,
            cursor=records[-1].dek_id if records else job.cursor,
            skipped=job.skipped + skipped,
            state="done" if done else "running",
            updated_at=self._now(),
        )
        job = await self.store.commit_rewrap_batch(job, updates)
        if done:
            # Secrets of the namespace move to the target version too.
            secrets_rewrapped = await self.secrets.rewrap_namespace(job.namespace, target)
            if secrets_rewrapped:
                log.info(
                    "rewrap job %s: %d secret version(s) rewrapped", job.job_id, secrets_rewrapped
                )
            log.info(
                "rewrap job %s done: %d rewrapped, %d skipped",
                job.job_id,
                job.rewrapped,
                job.skipped,
            )
        return job

    # -- maintenance: dates, automatic rotation, purging --------------------------------------

    async def purge_due(self) -> int:
        """Erase the material of destroyed keys whose soft-delete window ended."""
        now = self._now()
        deks, versions = await self.store.due_for_purge(now)
        for record in deks:
            await self.store.purge_dek(record, record.lifecycle.apply(Event.DESTROY, now))
            log.info("destroyed DEK %s: its wrapped material is erased", record.dek_id)
        purged = 0
        for version in versions:
            if version.hsm_handle:
                try:
                    await self.hsm.destroy_kek(version.hsm_handle)
                except HsmKeyNotFoundError:
                    pass  # already gone from the HSM: the row goes too
                except HsmError as exc:
                    # Keep the row (and its handle): dropping it would leave the KEK in
                    # the HSM with nothing pointing at it. The next pass retries.
                    log.error(
                        "cannot purge %s from the HSM yet (%s); retrying at the next "
                        "maintenance pass",
                        _kek_what(version),
                        exc,
                    )
                    continue
            purged += 1
            orphans = await self.store.purge_kek_version(
                version, version.lifecycle.apply(Event.DESTROY, now)
            )
            log.warning(
                "purged %s from the HSM; %d DEK(s) only it wrapped are gone",
                _kek_what(version),
                len(orphans),
            )
        secrets_purged = await self.secrets.purge_due()
        if deks or purged or secrets_purged:
            await self.store.checkpoint()
        return len(deks) + purged + secrets_purged

    async def maintain(self) -> None:
        """One maintenance pass: record date transitions, rotate due KEKs, purge."""
        now = self._now()
        for kek in self.store.list_keks():
            for version in kek.versions:
                effective = version.lifecycle.effective(now)
                if effective is not version.lifecycle.state:
                    changed = attrs.evolve(version.lifecycle, state=effective)
                    await self.store.set_kek_version_lifecycle(version, changed)
                    log.info("%s is now %s (its date passed)", _kek_what(version), effective.value)
            fresh = self.store.get_kek(kek.name)
            if fresh is not None and self.lifecycle.auto_rotate and _rotation_due(fresh, now):
                await self.rotate(kek.name, "automatic: protect-stop reached")
        await self.purge_due()
        pruned = await self.store.prune_changes(self.lifecycle.change_feed_seconds)
        if pruned:
            log.info("pruned %d change-feed entries older than the feed's retention", pruned)


class _NotNow(enum.Enum):
    NOT_NOW = "not-now"


#: handle_now's answer when the request must go through handle().
NOT_NOW = _NotNow.NOT_NOW


def _rotation_due(kek: KekRecord, now: float) -> bool:
    """The newest version reached protect-stop without being revoked or destroyed."""
    latest = kek.latest.lifecycle
    return (
        latest.protect_stop is not None
        and now >= latest.protect_stop
        and latest.effective(now) in (State.ACTIVE, State.DEACTIVATED)
        and latest.revocation_reason is None
    )


def _usage(requested: tuple[str, ...] | None, allowed: frozenset[Usage]) -> frozenset[Usage]:
    if requested is None:
        return allowed
    usage = frozenset(Usage(u) for u in requested)
    if not usage <= allowed:
        raise ServiceError(
            ErrorCode.BAD_REQUEST, "args.usage names a usage this kind of key cannot have"
        )
    return usage


def _blob_kek(blob_bytes: bytes) -> str | None:
    try:
        return parse_struct(DataKeyBlob, decode_item(blob_bytes), "blob").kek
    except ProtocolError:
        return None


def _audit_failed(exc: AuditError) -> ServiceError:
    return ServiceError(
        ErrorCode.AUDIT_UNAVAILABLE, "the audit trail cannot be written; see the server log"
    )


@contextlib.contextmanager
def _backend_errors(request: Any) -> Iterator[None]:
    """Backend failures as wire errors: the details go to the log, not the client."""
    try:
        yield
    except HsmUnavailableError as exc:
        raise ServiceError(ErrorCode.HSM_UNAVAILABLE, f"HSM unavailable: {exc}") from None
    except StoreError as exc:
        log.error("store failure during %s: %s", request.OPERATION, exc)
        raise ServiceError(ErrorCode.INTERNAL, "the key store failed; see the server log") from None


@contextlib.contextmanager
def _lifecycle_errors() -> Iterator[None]:
    try:
        yield
    except LifecycleError as exc:
        raise ServiceError(_LIFECYCLE_CODES[exc.reason], exc.message) from None


@contextlib.contextmanager
def _unwrap_errors(version: KekVersion, what: str) -> Iterator[None]:
    try:
        yield
    except HsmIntegrityError:
        raise ServiceError(ErrorCode.INTEGRITY_FAILURE, f"{what} failed authentication") from None
    except HsmUnavailableError:
        raise
    except HsmError as exc:
        log.error("HSM refused unwrap with KEK %s v%d: %s", version.kek, version.version, exc)
        raise ServiceError(
            ErrorCode.INTERNAL, "the HSM refused the unwrap; see the server log"
        ) from None


def _kek_what(version: KekVersion) -> str:
    return f"KEK {version.kek!r} version {version.version}"


def _what(target: DekRecord | KekVersion) -> str:
    return f"DEK {target.dek_id}" if isinstance(target, DekRecord) else _kek_what(target)


def _stored_dek_what(record: DekRecord) -> str:
    return f"stored DEK {record.dek_id} (its row was altered or moved)"


def _record_associated_data(record: DekRecord) -> bytes:
    return dek_associated_data(record.dek_id, record.namespace, record.kek_version)


def _dek_result(record: DekRecord, key: bytes) -> DekResult:
    return DekResult(
        dek_id=record.dek_id, namespace=record.namespace, kek_version=record.kek_version, key=key
    )


def _transport_info(record: TransportCertRecord, cert: x509.Certificate) -> TransportCertInfo:
    return TransportCertInfo(
        identity=record.identity,
        certificate=record.certificate,
        fingerprint=record.fingerprint,
        suite=transport_kem(cert).value,
        registered=record.registered_at,
        not_after=int(cert.not_valid_after_utc.timestamp()),
    )


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


def _job_info(job: RewrapJob) -> JobInfo:
    return JobInfo(
        job_id=job.job_id,
        namespace=job.namespace,
        target_version=job.target,
        state=job.state,
        rewrapped=job.rewrapped,
        skipped=job.skipped,
        remaining=job.remaining,
        created=job.created_at,
        updated=job.updated_at,
    )
