"""Key delivery: create-dek, get-dek (also answered inline by handle_now), generate-data-key,
unwrap, and the data-key blobs they make and open.
"""

from __future__ import annotations

import secrets

from kmipd.crypto import data_key_binding
from kmipd.hsm import HsmError
from kmipd.lifecycle import DEK_USAGES, Usage
from kmipd.protocol import (
    KEY_SIZE,
    CreateDek,
    DataKeyBlob,
    DataKeyResult,
    DekResult,
    ErrorCode,
    GenerateDataKey,
    GetDek,
    ProtocolError,
    SealedDataKeyResult,
    SealedDekResult,
    SealedUnwrapResult,
    Unwrap,
    UnwrapResult,
    decode_item,
    encode_item,
    encode_struct,
    parse_struct,
)
from kmipd.service._core import (
    BACKEND_ERRORS,
    NOT_NOW,
    ServiceError,
    _Call,
    _kek_what,
    _lifecycle_errors,
    _NotNow,
    _record_associated_data,
    _stored_dek_what,
    _unwrap_errors,
    _usage,
    backend_error,
    blob_associated_data,
    dek_associated_data,
    handles,
    handles_now,
    new_dek_id,
    refuse_signing_key_id,
    unwrap_error,
)
from kmipd.service._keks import KekOperations
from kmipd.service._transport import TransportOperations
from kmipd.store import DekRecord, IdempotencyKeyUsedError, KekVersion

DATA_KEY_BLOB_FORMAT = 1

#: The audit record's detail for each purpose, made once.
_PURPOSE_DETAIL = {purpose: f"purpose {purpose}" for purpose in ("decrypt", "encrypt", "recovery")}


def _check_get_dek_lifecycles(
    record: DekRecord, version: KekVersion, purpose: str, now: float
) -> None:
    """The DEK's and its KEK version's lifecycle checks for ``purpose``, as ServiceError."""
    what = f"DEK {record.dek_id}"
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


class DeliveryOperations(TransportOperations, KekOperations):
    """DEKs and data keys to the caller.

    Clear or sealed (TransportOperations), wrapped under the KEK version
    KekOperations picks.
    """

    @handles(CreateDek, changes_state=True)
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
        refuse_signing_key_id(request.dek_id)
        if record is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"no DEK with id {request.dek_id}")
        namespace = record.namespace
        call.namespace = namespace
        call.kek, call.kek_version = namespace, record.kek_version
        purpose = request.purpose or "decrypt"
        call.detail = _PURPOSE_DETAIL.get(purpose) or f"purpose {purpose}"
        operation = "recovery" if purpose == "recovery" else "get-dek"
        if not self._may(call, operation, namespace):
            raise ServiceError(
                ErrorCode.NOT_AUTHORIZED,
                f"{call.caller.identity} is not allowed {operation} on {record.dek_id}",
            )
        self._check_sealed_policy(call, namespace, request.seal_to)
        now = self._clock()
        version = self._kek_version(namespace, record.kek_version)
        # The common answer (yes) without building messages; the checks say why not.
        if purpose == "decrypt":
            usable = record.lifecycle.may_process(Usage.DECRYPT, now)
        elif purpose == "encrypt":
            usable = record.lifecycle.may_protect(Usage.ENCRYPT, now)
        else:
            usable = False
        if not (usable and version.lifecycle.may_process(Usage.UNWRAP, now)):
            _check_get_dek_lifecycles(record, version, purpose, now)
        return version

    @handles(GetDek)
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

    @handles_now(GetDek)
    def _get_dek_now(self, call: _Call, request: GetDek) -> DekResult | SealedDekResult | _NotNow:
        """get-dek from the cached row through an HSM that unwraps without blocking."""
        record = self.store.cached_dek(request.dek_id)
        if record is None:
            return NOT_NOW
        # One try for what _get_dek's context managers translate (see backend_error).
        try:
            version = self._check_get_dek(call, request, record)
            try:
                key = self.hsm.unwrap_now(
                    version.hsm_handle, record.wrapped, _record_associated_data(record)
                )
            except HsmError as exc:
                raise unwrap_error(exc, version, _stored_dek_what(record)) from None
        except BACKEND_ERRORS as exc:
            raise backend_error(exc, request) from None
        if key is None:
            return NOT_NOW
        return self._dek_delivery(call, request.seal_to, record, key)

    @handles(GenerateDataKey)
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

    # -- data-key blobs -----------------------------------------------------------------------

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

    @handles(Unwrap)
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
