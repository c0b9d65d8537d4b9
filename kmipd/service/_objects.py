"""Operations on keys as KMIP sees them: created with attributes, registered, read, changed.

These are KeyService handlers like the native ones (authorize, store, HSM,
audit in ``KeyService.handle``); kmipd.service._kmip turns KMIP payloads into
these requests. A KMIP object IS a DEK row: the same namespace, KEK, wrapping
(bound by ``dek_associated_data``), lifecycle and change feed, with its KMIP
attributes (object type, length, names, group, custom attributes) beside it
in the store's ``object_attributes``. So a DEK made by ``create-dek`` can be
fetched over KMIP (it reads as an AES-256 symmetric key) and a KMIP key by
``get-dek`` when it is 256 bits.
"""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmipd.lifecycle import DEK_USAGES, State, Usage
from kmipd.protocol import ErrorCode
from kmipd.service._core import (
    NOT_NOW,
    ServiceError,
    _backend_errors,
    _Call,
    _kek_what,
    _lifecycle_errors,
    _NotNow,
    _record_associated_data,
    _stored_dek_what,
    _unwrap_errors,
    dek_associated_data,
    new_dek_id,
)
from kmipd.store import UNCACHED, DekRecord, KekVersion, ObjectRecord

if TYPE_CHECKING:
    from kmipd.service._service import KeyService

#: Key lengths a Create may ask for (AES).
AES_LENGTHS = frozenset({128, 192, 256})
#: Largest key or secret a Register may bring, bytes.
MAX_MATERIAL = 1024
#: KMIP Cryptographic Usage Mask bits that map onto our usages.
MASK_ENCRYPT = 0x04
MASK_DECRYPT = 0x08


def _redacted(value: object) -> str:
    return "<redacted>" if value is not None else "None"


@attrs.frozen
class CreateObject:
    """Create (KMIP): a new AES key made here, or Register: material the client brings."""

    OPERATION: ClassVar[str] = "create-dek"
    namespace: str
    object_type: str = "symmetric-key"
    length: int = 256
    usage_mask: int | None = None
    object_group: str | None = None
    names: tuple[str, ...] = ()
    custom: dict[str, list[Any]] = attrs.field(factory=dict)
    links: tuple[tuple[int, str], ...] = ()
    activation: int | None = None
    secret_data_type: int | None = None
    material: bytes | None = attrs.field(default=None, repr=_redacted)

    @property
    def operation(self) -> str:
        return self.OPERATION


@attrs.frozen
class RegisterObject(CreateObject):
    OPERATION: ClassVar[str] = "register"


@attrs.frozen
class ObjectCreated:
    dek_id: str


@attrs.frozen
class GetObject:
    """Get (KMIP): the key material, unwrapped."""

    OPERATION: ClassVar[str] = "get-dek"
    dek_id: str


@attrs.frozen
class ObjectMaterial:
    record: DekRecord
    kmip: ObjectRecord
    key: bytes = attrs.field(repr=_redacted)


@attrs.frozen
class ObjectInfo:
    """Get Attributes / Get Attribute List (KMIP): a key's metadata, never its material."""

    OPERATION: ClassVar[str] = "get-attributes"
    dek_id: str


@attrs.frozen
class ObjectView:
    record: DekRecord
    kmip: ObjectRecord


@attrs.frozen
class PutObject:
    """Add / Modify / Delete Attribute, and Re-key's links: the key's new KMIP attributes."""

    OPERATION: ClassVar[str] = "modify-attributes"
    kmip: ObjectRecord
    #: The last_change read before computing the change: refuse if another change won.
    expected_change: int | None


@attrs.frozen
class LocateObjects:
    OPERATION: ClassVar[str] = "locate"
    name: str | None = None
    object_type: str | None = None
    object_group: str | None = None
    algorithm: str | None = None
    length: int | None = None
    state: str | None = None
    maximum: int | None = None
    offset: int = 0


@attrs.frozen
class LocatedObjects:
    dek_ids: tuple[str, ...]
    #: How many matched before Maximum Items cut the list (KMIP 1.3 Located Items).
    total: int


@attrs.frozen
class CryptObject:
    """Encrypt / Decrypt (KMIP) with a managed key that never leaves the daemon."""

    OPERATION: ClassVar[str] = "encrypt"
    dek_id: str
    #: "gcm" or "cbc" (PKCS#7 padding, as libmongocrypt asks).
    mode: str
    data: bytes = attrs.field(repr=_redacted)
    iv: bytes | None = None
    aad: bytes = attrs.field(default=b"", repr=_redacted)
    tag: bytes | None = None
    tag_length: int = 16


@attrs.frozen
class DecryptObject(CryptObject):
    OPERATION: ClassVar[str] = "decrypt"


@attrs.frozen
class CryptResult:
    data: bytes = attrs.field(repr=_redacted)
    iv: bytes | None = None
    tag: bytes | None = None


def default_object(record: DekRecord) -> ObjectRecord:
    """How a native DEK (no KMIP attributes yet) reads over KMIP."""
    return ObjectRecord(dek_id=record.dek_id, usage_mask=MASK_ENCRYPT | MASK_DECRYPT)


def usages_for(mask: int | None) -> frozenset[Usage]:
    if mask is None:
        return DEK_USAGES
    usage = set()
    if mask & MASK_ENCRYPT:
        usage.add(Usage.ENCRYPT)
    if mask & MASK_DECRYPT:
        usage.add(Usage.DECRYPT)
    # A mask with neither (export, MAC...): encrypt/decrypt here stay refused.
    return frozenset(usage)


def object_handlers(service: KeyService) -> tuple[dict[type[Any], Any], dict[type[Any], Any]]:
    """The handlers KeyService registers for the KMIP object requests: for ``handle``,
    and the inline ones for ``handle_now``."""
    ops = _ObjectOperations(service)
    handlers = {
        CreateObject: ops.create,
        RegisterObject: ops.create,
        GetObject: ops.get,
        ObjectInfo: ops.info,
        PutObject: ops.put,
        LocateObjects: ops.locate,
        CryptObject: ops.crypt,
        DecryptObject: ops.crypt,
    }
    return handlers, {GetObject: ops.get_now}


class _ObjectOperations:
    def __init__(self, service: KeyService) -> None:
        self.service = service

    def _error(self, code: ErrorCode, message: str) -> Exception:
        return ServiceError(code, message)

    async def create(self, call: _Call, request: CreateObject) -> ObjectCreated:
        service = self.service
        namespace = request.namespace
        service._authorize(call, "create-dek", namespace)
        if request.material is not None:
            if not 0 < len(request.material) <= MAX_MATERIAL:
                raise self._error(
                    ErrorCode.BAD_REQUEST, f"key material must be 1..{MAX_MATERIAL} bytes"
                )
            key = request.material
        else:
            if request.length not in AES_LENGTHS:
                raise self._error(ErrorCode.BAD_REQUEST, "AES keys are 128, 192 or 256 bits long")
            key = secrets.token_bytes(request.length // 8)
        version = await service._version_for_protection(
            call, await service._kek_for_new_key(namespace, call.caller.identity)
        )
        now = service._now()
        dek_id = new_dek_id()
        call.dek_id = dek_id
        call.detail = request.object_type
        wrapped = await service.hsm.wrap(
            version.hsm_handle, key, dek_associated_data(dek_id, namespace, version.version)
        )
        lifecycle = service.lifecycle.new_lifecycle(
            "dek", namespace, now, usages_for(request.usage_mask), request.activation or now
        )
        if request.activation is None:
            # KMIP: a new object is Pre-Active until Activate (or its Activation Date).
            lifecycle = attrs.evolve(lifecycle, state=State.PRE_ACTIVE, activation=None)
        record = DekRecord(
            dek_id, namespace, version.version, wrapped, now, call.caller.identity, lifecycle
        )
        kmip = ObjectRecord(
            dek_id=dek_id,
            object_type=request.object_type,
            algorithm="aes" if request.object_type == "symmetric-key" else None,
            length=len(key) * 8,
            usage_mask=request.usage_mask,
            object_group=request.object_group,
            names=request.names,
            custom=request.custom,
            links=request.links,
            last_change=now,
            secret_data_type=request.secret_data_type,
        )
        await service.store.put_dek(record, kmip=kmip)
        return ObjectCreated(dek_id)

    async def _record(self, call: _Call, operation: str, dek_id: str) -> DekRecord:
        call.dek_id = dek_id
        self.service._require_some_grant(call, operation)
        return self._admit(call, operation, dek_id, await self.service.store.get_dek(dek_id))

    def _admit(
        self, call: _Call, operation: str, dek_id: str, record: DekRecord | None
    ) -> DekRecord:
        """The record once the caller may ``operation`` it (some grant already checked)."""
        service = self.service
        if record is None:
            raise self._error(ErrorCode.NOT_FOUND, f"no key with id {dek_id}")
        call.namespace = record.namespace
        call.kek, call.kek_version = record.namespace, record.kek_version
        if not service._may(call, operation, record.namespace):
            raise self._error(
                ErrorCode.NOT_AUTHORIZED,
                f"{call.caller.identity} is not allowed {operation} on {dek_id}",
            )
        return record

    async def _kmip(self, record: DekRecord) -> ObjectRecord:
        return await self.service.store.get_object(record.dek_id) or default_object(record)

    def _unwrapping_version(self, record: DekRecord) -> KekVersion:
        service = self.service
        version = service._kek_version(record.namespace, record.kek_version)
        with _lifecycle_errors():
            version.lifecycle.check_recovery(Usage.UNWRAP, service._clock(), _kek_what(version))
        return version

    async def _unwrap(self, call: _Call, record: DekRecord) -> bytes:
        version = self._unwrapping_version(record)
        with _unwrap_errors(version, _stored_dek_what(record)):
            return await self.service.hsm.unwrap(
                version.hsm_handle, record.wrapped, _record_associated_data(record)
            )

    async def get(self, call: _Call, request: GetObject) -> ObjectMaterial:
        record = await self._record(call, "get-dek", request.dek_id)
        self._check_get(call, record)
        key = await self._unwrap(call, record)
        return ObjectMaterial(record, await self._kmip(record), key)

    def get_now(self, call: _Call, request: GetObject) -> ObjectMaterial | _NotNow:
        """Get from the cached row and attributes through an HSM that unwraps without
        blocking (a storage system fetches the same keys again and again)."""
        store = self.service.store
        record = store.cached_dek(request.dek_id)
        kmip = store.cached_object(request.dek_id)
        if record is None or kmip is UNCACHED:
            return NOT_NOW
        call.dek_id = request.dek_id
        with _backend_errors(request):
            self.service._require_some_grant(call, "get-dek")
            self._admit(call, "get-dek", request.dek_id, record)
            self._check_get(call, record)
            version = self._unwrapping_version(record)
            with _unwrap_errors(version, _stored_dek_what(record)):
                key = self.service.hsm.unwrap_now(
                    version.hsm_handle, record.wrapped, _record_associated_data(record)
                )
        if key is None:
            return NOT_NOW
        return ObjectMaterial(record, kmip or default_object(record), key)

    def _check_get(self, call: _Call, record: DekRecord) -> None:
        lifecycle = record.lifecycle
        state = lifecycle.effective(self.service._clock())
        call.detail = "kmip get"
        if lifecycle.destroy_pending or state in (State.DESTROYED, State.DESTROYED_COMPROMISED):
            raise self._error(ErrorCode.KEY_DESTROYED, f"key {record.dek_id} is destroyed")
        if state is State.COMPROMISED and not self.service._may(call, "recovery", record.namespace):
            raise self._error(ErrorCode.KEY_COMPROMISED, f"key {record.dek_id} is compromised")
        # Pre-Active, Active and Deactivated objects may be fetched (KMIP Get); what
        # the holder may do with them is the key's lifecycle, checked here on Encrypt.

    async def info(self, call: _Call, request: ObjectInfo) -> ObjectView:
        record = await self._record(call, "get-attributes", request.dek_id)
        return ObjectView(record, await self._kmip(record))

    async def put(self, call: _Call, request: PutObject) -> ObjectView:
        record = await self._record(call, "modify-attributes", request.kmip.dek_id)
        current = await self._kmip(record)
        if current.last_change != request.expected_change:
            raise self._error(
                ErrorCode.WRONG_STATE, "the attributes changed meanwhile; read them again"
            )
        if request.kmip.object_group != current.object_group and request.kmip.object_group:
            # The group names the namespace at creation; moving it would move the key.
            raise self._error(ErrorCode.BAD_REQUEST, "Object Group cannot change after creation")
        updated = attrs.evolve(request.kmip, last_change=self.service._now())
        await self.service.store.put_object(updated)
        return ObjectView(record, updated)

    async def locate(self, call: _Call, request: LocateObjects) -> LocatedObjects:
        service = self.service
        service._require_some_grant(call, "locate")
        ids = await service.store.locate_objects(
            name=request.name,
            object_type=request.object_type,
            object_group=request.object_group,
            algorithm=request.algorithm,
            length=request.length,
            limit=10_000,
        )
        now = service._clock()
        found: list[str] = []
        for dek_id in ids:
            record = await service.store.get_dek(dek_id)
            if record is None or not service._may(call, "locate", record.namespace):
                continue  # default deny: another namespace's keys are not even counted
            if request.state is not None and _kmip_state(record, now) != request.state:
                continue
            found.append(dek_id)
        selected = found[request.offset :]
        if request.maximum is not None:
            selected = selected[: request.maximum]
        return LocatedObjects(tuple(selected), len(found))

    async def crypt(self, call: _Call, request: CryptObject) -> CryptResult:
        encrypt = not isinstance(request, DecryptObject)
        record = await self._record(call, "get-dek", request.dek_id)
        call.detail = request.mode
        what = f"key {record.dek_id}"
        now = self.service._clock()
        with _lifecycle_errors():
            if encrypt:
                record.lifecycle.check_protect(Usage.ENCRYPT, now, what)
            else:
                record.lifecycle.check_process(Usage.DECRYPT, now, what)
        kmip = await self._kmip(record)
        if kmip.object_type != "symmetric-key":
            raise self._error(ErrorCode.BAD_REQUEST, f"{what} is not a symmetric key")
        key = await self._unwrap(call, record)
        try:
            return _crypt(key, request, encrypt)
        except (ValueError, InvalidTag):
            raise self._error(
                ErrorCode.INTEGRITY_FAILURE,
                "decryption failed: wrong key, IV, tag or data" if not encrypt else "bad input",
            ) from None


def _crypt(key: bytes, request: CryptObject, encrypt: bool) -> CryptResult:
    if request.mode == "gcm":
        iv = request.iv if request.iv is not None else os.urandom(12)
        if encrypt:
            sealed = AESGCM(key).encrypt(iv, request.data, request.aad or None)
            cut = len(sealed) - 16
            return CryptResult(sealed[:cut], iv if request.iv is None else None, sealed[cut:])
        if request.tag is None or len(request.tag) != 16:
            raise ValueError("AES-GCM decryption needs the 16-byte tag")
        return CryptResult(AESGCM(key).decrypt(iv, request.data + request.tag, request.aad or None))
    # CBC with PKCS#7 (KMIP's "PKCS5") padding.
    iv = request.iv if request.iv is not None else os.urandom(16)
    cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
    if encrypt:
        padder = padding.PKCS7(128).padder()
        padded = padder.update(request.data) + padder.finalize()
        encryptor = cipher.encryptor()
        data = encryptor.update(padded) + encryptor.finalize()
        return CryptResult(data, iv if request.iv is None else None)
    decryptor = cipher.decryptor()
    padded = decryptor.update(request.data) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return CryptResult(unpadder.update(padded) + unpadder.finalize())


def _kmip_state(record: DekRecord, now: float) -> str:
    """The state as KMIP reports it: a key scheduled for destruction reads as destroyed."""
    lifecycle = record.lifecycle
    state = lifecycle.effective(now)
    if lifecycle.destroy_pending:
        return (
            State.DESTROYED_COMPROMISED.value
            if state is State.COMPROMISED
            else State.DESTROYED.value
        )
    return state.value


kmip_state = _kmip_state
