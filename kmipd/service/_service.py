"""The operations: authorize, then store, then HSM, then a result.

The service performs no I/O of its own; it awaits the store and the HSM
backend, and every refusal is a ServiceError carrying a wire error code.
It never puts key material into an exception, a log line or a repr.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import trio

from kmipd.hsm import HsmBackend, HsmError, HsmIntegrityError, HsmUnavailableError
from kmipd.protocol import (
    KEY_SIZE,
    CreateDek,
    CreateKek,
    DataKeyBlob,
    DataKeyResult,
    DekResult,
    ErrorCode,
    GenerateDataKey,
    GetDek,
    KekInfo,
    ListKeks,
    ListKeksResult,
    ProtocolError,
    Status,
    StatusResult,
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
    StoreError,
)

log = logging.getLogger("kmipd.service")

DATA_KEY_BLOB_FORMAT = 1


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
    ) -> None:
        self.store = store
        self.hsm = hsm
        self.policy = policy
        self.info = info or ServerInfo()
        self._clock = clock
        self._create_kek_on_demand = create_kek_on_demand
        self._kek_creation = trio.Lock()
        self._handlers: dict[type[Any], Callable[[str, Any], Awaitable[Any]]] = {
            Status: self._status,
            CreateDek: self._create_dek,
            GetDek: self._get_dek,
            GenerateDataKey: self._generate_data_key,
            Unwrap: self._unwrap,
            CreateKek: self._create_kek,
            ListKeks: self._list_keks,
        }

    async def handle(self, identity: str, request: Any) -> Any:
        """Run one request for an authenticated identity; raise ServiceError to refuse."""
        with _backend_errors(request):
            if self.store.shared:
                await self.store.refresh_if_changed()  # see what the other daemons did
            return await self._handlers[type(request)](identity, request)

    def handle_now(self, identity: str, request: Any) -> Any:
        """Answer at once if that needs no waiting at all, else return NOT_NOW.

        The hot path of a storage system is get-dek of a DEK it used moments
        ago: with the wrapped row cached and an HSM backend that unwraps
        without blocking, the server answers inline instead of starting a
        task for it. Same checks, same errors as ``handle``.
        """
        if type(request) is not GetDek:
            return NOT_NOW
        record = self.store.cached_dek(request.dek_id)
        if record is None:
            return NOT_NOW
        with _backend_errors(request):
            version = self._check_get_dek(identity, request, record)
            with _unwrap_errors(version, _stored_dek_what(record)):
                key = self.hsm.unwrap_now(
                    version.hsm_handle, record.wrapped, _record_associated_data(record)
                )
        return NOT_NOW if key is None else _dek_result(record, key)

    def _now(self) -> int:
        return int(self._clock())

    def _authorize(self, identity: str, operation: str, namespace: str) -> None:
        if not self.policy.allows(identity, operation, namespace):
            raise ServiceError(
                ErrorCode.NOT_AUTHORIZED,
                f"{identity} is not allowed {operation} in namespace {namespace!r}",
            )

    def _require_some_grant(self, identity: str, operation: str) -> None:
        if not self.policy.allows_anywhere(identity, operation):
            raise ServiceError(ErrorCode.NOT_AUTHORIZED, f"{identity} is not allowed {operation}")

    # -- KEK selection -------------------------------------------------------------

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
        async with self._kek_creation:
            kek = self.store.get_kek(namespace)
            if kek is not None:
                return kek
            try:
                kek = await self._make_kek(namespace, identity)
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

    async def _make_kek(self, name: str, identity: str) -> KekRecord:
        handle = await self.hsm.generate_kek(f"{name}/v1")
        version = KekVersion(name, 1, handle, self._now())
        try:
            return await self.store.create_kek(name, version, identity)
        except AlreadyExistsError:
            await self.hsm.destroy_kek(handle)
            raise ServiceError(ErrorCode.ALREADY_EXISTS, f"KEK {name!r} already exists") from None

    def _kek_version(self, name: str, number: int) -> KekVersion:
        kek = self.store.get_kek(name)
        version = None if kek is None else kek.version(number)
        if version is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"KEK {name!r} has no version {number}")
        return version

    # -- operations ------------------------------------------------------------------

    async def _status(self, identity: str, request: Status) -> StatusResult:
        hsm_state = store_state = "ok"
        try:
            await self.hsm.check()
        except HsmError:
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

    async def _create_dek(self, identity: str, request: CreateDek) -> DekResult:
        namespace = request.namespace
        self._authorize(identity, "create-dek", namespace)
        if request.idempotency_key is not None:
            earlier = await self._created_earlier(identity, request)
            if earlier is not None:
                return earlier
        version = (await self._kek_for_new_key(namespace, identity)).latest
        dek_id = new_dek_id()
        key = secrets.token_bytes(KEY_SIZE)
        wrapped = await self.hsm.wrap(
            version.hsm_handle, key, dek_associated_data(dek_id, namespace, version.version)
        )
        record = DekRecord(dek_id, namespace, version.version, wrapped, self._now(), identity)
        try:
            await self.store.put_dek(record, idempotency_key=request.idempotency_key)
        except IdempotencyKeyUsedError:
            # The same create, retried while the first attempt was committing.
            earlier = await self._created_earlier(identity, request)
            assert earlier is not None
            return earlier
        # The row is durable from here on: nothing below may await (and be cancelled).
        return DekResult(dek_id=dek_id, namespace=namespace, kek_version=version.version, key=key)

    async def _created_earlier(self, identity: str, request: CreateDek) -> DekResult | None:
        """The DEK an earlier attempt of this create made, if there was one."""
        assert request.idempotency_key is not None
        dek_id = await self.store.find_idempotent(identity, request.idempotency_key)
        if dek_id is None:
            return None
        record = await self.store.get_dek(dek_id)
        if record is None or record.namespace != request.namespace:
            raise ServiceError(
                ErrorCode.BAD_REQUEST,
                "idempotency key already used for another create-dek; use a fresh key per create",
            )
        return await self._get_dek(identity, GetDek(dek_id=dek_id))

    def _check_get_dek(
        self, identity: str, request: GetDek, record: DekRecord | None
    ) -> KekVersion:
        self._require_some_grant(identity, "get-dek")
        if record is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"no DEK with id {request.dek_id}")
        if not self.policy.allows(identity, "get-dek", record.namespace):
            raise ServiceError(
                ErrorCode.NOT_AUTHORIZED, f"{identity} is not allowed get-dek on {record.dek_id}"
            )
        return self._kek_version(record.namespace, record.kek_version)

    async def _get_dek(self, identity: str, request: GetDek) -> DekResult:
        self._require_some_grant(identity, "get-dek")
        record = await self.store.get_dek(request.dek_id)
        version = self._check_get_dek(identity, request, record)
        assert record is not None
        with _unwrap_errors(version, _stored_dek_what(record)):
            key = await self.hsm.unwrap(
                version.hsm_handle, record.wrapped, _record_associated_data(record)
            )
        return _dek_result(record, key)

    async def _generate_data_key(self, identity: str, request: GenerateDataKey) -> DataKeyResult:
        self._authorize(identity, "generate-data-key", request.kek)
        version = (await self._kek_for_new_key(request.kek, identity)).latest
        key = secrets.token_bytes(KEY_SIZE)
        wrapped = await self.hsm.wrap(
            version.hsm_handle,
            key,
            blob_associated_data(request.kek, version.version, request.context),
        )
        blob = DataKeyBlob(
            format=DATA_KEY_BLOB_FORMAT,
            kek=request.kek,
            kek_version=version.version,
            wrapped=wrapped,
        )
        return DataKeyResult(
            key=key,
            blob=encode_item(encode_struct(blob)),
            kek=request.kek,
            kek_version=version.version,
        )

    async def _unwrap(self, identity: str, request: Unwrap) -> UnwrapResult:
        try:
            blob = parse_struct(DataKeyBlob, decode_item(request.blob), "blob")
        except ProtocolError as exc:
            raise ServiceError(
                ErrorCode.BAD_REQUEST, f"args.blob is not a kmipd data-key blob ({exc.message})"
            ) from None
        self._authorize(identity, "unwrap", blob.kek)
        version = self._kek_version(blob.kek, blob.kek_version)
        with _unwrap_errors(version, "data-key blob (wrong context, or the blob was altered)"):
            key = await self.hsm.unwrap(
                version.hsm_handle,
                blob.wrapped,
                blob_associated_data(blob.kek, blob.kek_version, request.context),
            )
        return UnwrapResult(key=key, kek=blob.kek, kek_version=blob.kek_version)

    async def _create_kek(self, identity: str, request: CreateKek) -> KekInfo:
        self._authorize(identity, "create-kek", request.name)
        async with self._kek_creation:
            if self.store.get_kek(request.name) is not None:
                raise ServiceError(ErrorCode.ALREADY_EXISTS, f"KEK {request.name!r} already exists")
            kek = await self._make_kek(request.name, identity)
        log.info("created KEK %r for %s", request.name, identity)
        return _kek_info(kek)

    async def _list_keks(self, identity: str, request: ListKeks) -> ListKeksResult:
        self._require_some_grant(identity, "list-keks")
        return ListKeksResult(
            keks=tuple(
                _kek_info(kek)
                for kek in self.store.list_keks(request.prefix)
                if self.policy.allows(identity, "list-keks", kek.name)
            )
        )


class _NotNow(enum.Enum):
    NOT_NOW = "not-now"


#: handle_now's answer when the request must go through handle().
NOT_NOW = _NotNow.NOT_NOW


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


def _stored_dek_what(record: DekRecord) -> str:
    return f"stored DEK {record.dek_id} (its row was altered or moved)"


def _record_associated_data(record: DekRecord) -> bytes:
    return dek_associated_data(record.dek_id, record.namespace, record.kek_version)


def _dek_result(record: DekRecord, key: bytes) -> DekResult:
    return DekResult(
        dek_id=record.dek_id, namespace=record.namespace, kek_version=record.kek_version, key=key
    )


def _kek_info(kek: KekRecord) -> KekInfo:
    return KekInfo(name=kek.name, version=kek.latest.version, created=kek.created_at)
