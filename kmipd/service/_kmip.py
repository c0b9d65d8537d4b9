"""KMIP operations: request payloads in, service requests through KeyService.handle, payloads out.

Every KMIP operation becomes one or more service requests (native ones such
as Activate, Revoke and Destroy, or the object requests of
kmipd.service._objects), so authorization, the store, the HSM and the audit
trail are the native protocol's, with ``protocol: kmip`` in each record.

Secrets (kmipd.service._secrets) are KMIP Secret Data: a Register of Secret
Data WITH a Name sets a secret of that name (a new version if it exists) in
the Object Group's namespace; Locate (by Name, Object Type, Object Group,
State) finds each secret's current version (newest enabled: KMIP's Name goes
to the newest, as on Re-key), whose Unique Identifier is
``secret:NAMESPACE:NAME:VERSION``; Get, Get Attributes, Get Attribute List,
Activate (enable), Revoke (disable) and Destroy (soft delete of the whole
secret, recoverable as over the native protocol) take such an id; the
attribute operations, Re-key and Encrypt/Decrypt refuse it (a secret's
attributes change with update-secret). A Secret Data WITHOUT a Name
(libmongocrypt registers its data keys so) has no name to be a secret under:
it stays an anonymous KMIP object, a wrapped row addressed by its id only,
like a registered key, and never shows among the secrets. So does one whose
Name no secret can have (secret names are letters, digits, ``. _ - /``;
PyKMIP's default Name "Secret Data" holds a space) or with several Names: it
keeps its Names as KMIP attributes, and Locate finds it by them.

Namespaces: a Create or Register puts its object in the namespace named by
its Object Group attribute, or, without one, in ``kmip.default_namespace``;
the grants of that namespace decide, as for create-dek. Any other operation
finds the object by id and is authorized in the object's namespace: an
identity without a grant there gets Permission Denied, whether or not the id
exists elsewhere, and never learns its attributes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

import attrs

from kmipd.kmip import (
    ATTRIBUTE_TYPES,
    CUSTOM_PREFIXES,
    ENUM_NAMES,
    ENUMS,
    SUPPORTED_VERSIONS,
    TAGS,
    Attribute,
    BatchItem,
    BatchResult,
    Item,
    ItemType,
    KmipError,
    RequestMessage,
    ResultReason,
    attribute_item,
    attribute_reference_name,
    byte_string,
    enumeration,
    integer,
    parse_attribute_v1,
    parse_attribute_v2,
    parse_attributes,
    parse_cryptographic_parameters,
    structure,
    text,
    version_item,
)
from kmipd.lifecycle import RevocationReason, State
from kmipd.protocol import (
    NAMESPACE_PATTERN,
    Activate,
    DeleteSecret,
    Destroy,
    ErrorCode,
    GetSecret,
    KeyRef,
    Revoke,
    SecretInfo,
    SecretValue,
    SecretVersions,
    SecretVersionsResult,
    SetSecret,
    UpdateSecret,
)
from kmipd.service._core import NOT_NOW, Caller, ServiceError
from kmipd.service._objects import (
    CreateObject,
    CryptObject,
    CryptResult,
    DecryptObject,
    GetObject,
    LocatedObjects,
    LocateObjects,
    ObjectCreated,
    ObjectInfo,
    ObjectMaterial,
    ObjectView,
    PutObject,
    RegisterObject,
    kmip_state,
)
from kmipd.service._secrets import (
    LocatedSecrets,
    LocateSecrets,
    parse_secret_uid,
    secret_uid,
)
from kmipd.service._service import KeyService
from kmipd.store import ObjectRecord

log = logging.getLogger("kmipd.kmip")

OP: Final = ENUMS["Operation"]
OP_NAMES: Final = ENUM_NAMES["Operation"]
_OBJECT_TYPES: Final = {
    "symmetric-key": ENUMS["ObjectType"]["SymmetricKey"],
    "secret-data": ENUMS["ObjectType"]["SecretData"],
}
_OBJECT_TYPE_NAMES: Final = {number: name for name, number in _OBJECT_TYPES.items()}
_AES: Final = ENUMS["CryptographicAlgorithm"]["Aes"]
_STATES: Final = {
    State.PRE_ACTIVE.value: 1,
    State.ACTIVE.value: 2,
    State.DEACTIVATED.value: 3,
    State.COMPROMISED.value: 4,
    State.DESTROYED.value: 5,
    State.DESTROYED_COMPROMISED.value: 6,
}
_STATE_NAMES: Final = {number: name for name, number in _STATES.items()}
_REVOCATION: Final = {
    1: RevocationReason.UNSPECIFIED,
    2: RevocationReason.KEY_COMPROMISE,
    3: RevocationReason.CA_COMPROMISE,
    4: RevocationReason.AFFILIATION_CHANGED,
    5: RevocationReason.SUPERSEDED,
    6: RevocationReason.CESSATION_OF_OPERATION,
    7: RevocationReason.PRIVILEGE_WITHDRAWN,
}
_REVOCATION_CODES: Final = {reason.value: code for code, reason in _REVOCATION.items()}
_LINK_REPLACEMENT: Final = ENUMS["LinkType"]["ReplacementObjectLink"]
_LINK_REPLACED: Final = ENUMS["LinkType"]["ReplacedObjectLink"]
_KEY_FORMAT: Final = ENUMS["KeyFormatType"]
_GCM: Final = ENUMS["BlockCipherMode"]["Gcm"]
_CBC: Final = ENUMS["BlockCipherMode"]["Cbc"]

#: Service error -> the KMIP Result Reason that says the same.
_REASONS: Final = {
    ErrorCode.BAD_REQUEST: ResultReason.INVALID_FIELD,
    ErrorCode.NOT_FOUND: ResultReason.ITEM_NOT_FOUND,
    ErrorCode.NOT_AUTHORIZED: ResultReason.PERMISSION_DENIED,
    ErrorCode.INTEGRITY_FAILURE: ResultReason.CRYPTOGRAPHIC_FAILURE,
    ErrorCode.ALREADY_EXISTS: ResultReason.ILLEGAL_OPERATION,
    ErrorCode.WRONG_STATE: ResultReason.PERMISSION_DENIED,
    ErrorCode.USAGE_NOT_PERMITTED: ResultReason.PERMISSION_DENIED,
    ErrorCode.KEY_NOT_ACTIVE: ResultReason.PERMISSION_DENIED,
    ErrorCode.KEY_DEACTIVATED: ResultReason.PERMISSION_DENIED,
    ErrorCode.PROTECT_STOP_PASSED: ResultReason.PERMISSION_DENIED,
    ErrorCode.KEY_COMPROMISED: ResultReason.PERMISSION_DENIED,
    ErrorCode.KEY_DESTROYED: ResultReason.ITEM_NOT_FOUND,
    ErrorCode.DESTROY_PENDING: ResultReason.ITEM_NOT_FOUND,
    ErrorCode.SECRET_DISABLED: ResultReason.PERMISSION_DENIED,
    ErrorCode.SECRET_EXPIRED: ResultReason.PERMISSION_DENIED,
    ErrorCode.SECRET_NOT_YET_VALID: ResultReason.PERMISSION_DENIED,
    ErrorCode.SECRET_TOO_LARGE: ResultReason.INVALID_FIELD,
    ErrorCode.UNKNOWN_SECRET_VERSION: ResultReason.ITEM_NOT_FOUND,
    ErrorCode.SECRET_DELETED: ResultReason.ITEM_NOT_FOUND,
}
#: The tag a registered Secret Data's type is kept under, when it is not Password.
_SECRET_DATA_TYPE_TAG: Final = "kmip-secret-data-type"  # noqa: S105 - a tag name
#: Result Reason -> the error code the metrics count it under.
_METRIC_CODES: Final = {
    ResultReason.ITEM_NOT_FOUND: ErrorCode.NOT_FOUND,
    ResultReason.PERMISSION_DENIED: ErrorCode.NOT_AUTHORIZED,
    ResultReason.OPERATION_NOT_SUPPORTED: ErrorCode.UNKNOWN_OPERATION,
    ResultReason.CRYPTOGRAPHIC_FAILURE: ErrorCode.INTEGRITY_FAILURE,
    ResultReason.GENERAL_FAILURE: ErrorCode.INTERNAL,
}

#: The operations answered (Query lists them); the others are Operation Not Supported.
SERVED_OPERATIONS: Final = (
    "Create",
    "Register",
    "ReKey",
    "Locate",
    "Get",
    "GetAttributes",
    "GetAttributeList",
    "AddAttribute",
    "ModifyAttribute",
    "DeleteAttribute",
    "Activate",
    "Revoke",
    "Destroy",
    "Query",
    "DiscoverVersions",
    "Encrypt",
    "Decrypt",
)
#: Attributes the server sets; a client may not add, change or delete them.
_READ_ONLY: Final = frozenset(
    {
        "Unique Identifier",
        "Object Type",
        "Cryptographic Algorithm",
        "Cryptographic Length",
        "State",
        "Initial Date",
        "Activation Date",
        "Process Start Date",
        "Protect Stop Date",
        "Deactivation Date",
        "Destroy Date",
        "Compromise Date",
        "Compromise Occurrence Date",
        "Last Change Date",
        "Revocation Reason",
        "Object Group",
        "Link",
    }
)
#: Attributes a client may set at Create/Register time (beyond custom x- ones).
_SETTABLE_AT_CREATE: Final = frozenset(
    {
        "Name",
        "Cryptographic Algorithm",
        "Cryptographic Length",
        "Cryptographic Usage Mask",
        "Object Group",
        "Activation Date",
        "Object Type",
        "Cryptographic Parameters",
        "Contact Information",
        "Operation Policy Name",
        "Sensitive",
        "Extractable",
        "Description",
        "Comment",
    }
)

#: record(operation, seconds, error) — the server's metrics.
Recorder = Callable[[str, float, ErrorCode | None], None]


def _fail(reason: ResultReason, message: str) -> KmipError:
    return KmipError(reason, message)


def _uid(payload: Item, placeholder: str | None) -> str:
    item = payload.find("UniqueIdentifier")
    if item is None:
        if placeholder is None:
            raise _fail(ResultReason.MISSING_DATA, "no Unique Identifier and no ID Placeholder")
        return placeholder
    if item.type is not ItemType.TEXT_STRING:
        raise _fail(ResultReason.INVALID_FIELD, "Unique Identifier must be a text string")
    assert isinstance(item.value, str)
    return item.value


def _key_uid(payload: Item, placeholder: str | None, operation: str) -> str:
    """The id of an operation that secrets do not take (it refuses a secret's id)."""
    uid = _uid(payload, placeholder)
    if parse_secret_uid(uid) is not None:
        raise _fail(
            ResultReason.ILLEGAL_OPERATION,
            f"{uid} is a secret: {operation} is not served for secrets "
            "(their attributes change with update-secret, e.g. kmipd secret update)",
        )
    return uid


def _secret_name(names: tuple[str, ...]) -> str | None:
    """The secret a registered Secret Data becomes: its one Name, if that is a secret name.

    Without a Name (libmongocrypt), with several, or with one no secret can have
    (PyKMIP's default "Secret Data" holds a space), it stays an anonymous object.
    """
    if len(names) != 1 or len(names[0]) > 256 or not NAMESPACE_PATTERN.fullmatch(names[0]):
        return None
    return names[0]


def _secret_of(uid: str) -> tuple[str, str, int]:
    parsed = parse_secret_uid(uid)
    assert parsed is not None
    return parsed


def _secret_state(info: SecretInfo, now: float) -> int:
    """A secret version's KMIP State: Active while it may be read, else why not."""
    if info.not_before is not None and now < info.not_before:
        return _STATES[State.PRE_ACTIVE.value]
    if not info.enabled or (info.expires is not None and now >= info.expires):
        return _STATES[State.DEACTIVATED.value]
    return _STATES[State.ACTIVE.value]


def _scalar(payload: Item, name: str, kind: ItemType) -> Any:
    item = payload.find(name)
    if item is None:
        return None
    if item.type is not kind:
        raise _fail(ResultReason.INVALID_FIELD, f"{name} must be a {kind.name}")
    return item.value


@attrs.define
class _Batch:
    caller: Caller
    version: tuple[int, int]
    placeholder: str | None = None


class KmipOperations:
    def __init__(self, service: KeyService, *, default_namespace: str = "kmip") -> None:
        self.service = service
        self.default_namespace = default_namespace
        self._handlers: dict[int, Callable[[_Batch, Item], Any]] = {
            OP["DiscoverVersions"]: self._discover_versions,
            OP["Query"]: self._query,
            OP["Create"]: self._create,
            OP["Register"]: self._register,
            OP["ReKey"]: self._rekey,
            OP["Get"]: self._get,
            OP["GetAttributes"]: self._get_attributes,
            OP["GetAttributeList"]: self._get_attribute_list,
            OP["AddAttribute"]: self._add_attribute,
            OP["ModifyAttribute"]: self._modify_attribute,
            OP["DeleteAttribute"]: self._delete_attribute,
            OP["Locate"]: self._locate,
            OP["Activate"]: self._activate,
            OP["Revoke"]: self._revoke,
            OP["Destroy"]: self._destroy,
            OP["Encrypt"]: self._encrypt,
            OP["Decrypt"]: self._decrypt,
        }

    async def handle_message(
        self, caller: Caller, message: RequestMessage, record: Recorder | None = None
    ) -> list[BatchResult]:
        """One result per batch item, in order; a failing item does not stop the others
        (unless the request asked for Batch Error Continuation Option Stop)."""
        header = message.header
        batch = _Batch(caller, header.version)
        results: list[BatchResult] = []
        refusal: KmipError | None = None
        if header.version not in SUPPORTED_VERSIONS:
            refusal = _fail(
                ResultReason.INVALID_MESSAGE,
                f"protocol version {header.version[0]}.{header.version[1]} is not served",
            )
        elif header.asynchronous:
            refusal = _fail(
                ResultReason.FEATURE_NOT_SUPPORTED, "asynchronous operations are not supported"
            )
        for item in message.items:
            start = time.perf_counter()
            error = refusal or item.error
            result = (
                BatchResult.failure(item, error)
                if error is not None
                else await self._run_item(batch, item)
            )
            results.append(result)
            if record is not None:
                name = OP_NAMES.get(item.operation or 0, "unknown")
                code = (
                    None
                    if result.reason is None
                    else _METRIC_CODES.get(result.reason, ErrorCode.BAD_REQUEST)
                )
                record(f"kmip-{name}", time.perf_counter() - start, code)
            if result.reason is not None and header.error_continuation in (2, 3):
                break  # the client asked for Stop (or Undo, which kmipd treats as Stop)
        return results

    async def _run_item(self, batch: _Batch, item: BatchItem) -> BatchResult:
        assert item.operation is not None
        assert item.payload is not None
        handler = self._handlers.get(item.operation)
        if handler is None:
            name = OP_NAMES.get(item.operation, f"0x{item.operation:x}")
            return BatchResult.failure(
                item, _fail(ResultReason.OPERATION_NOT_SUPPORTED, f"{name} is not supported")
            )
        try:
            payload = await handler(batch, item.payload)
        except KmipError as exc:
            return BatchResult.failure(item, exc)
        except ServiceError as exc:
            reason = _REASONS.get(exc.code, ResultReason.GENERAL_FAILURE)
            return BatchResult.failure(item, KmipError(reason, exc.message))
        except Exception:
            log.exception("KMIP %s failed", OP_NAMES.get(item.operation))
            return BatchResult.failure(
                item, _fail(ResultReason.GENERAL_FAILURE, "internal error; see the server log")
            )
        return BatchResult(item.operation, item.unique_id, payload=payload)

    async def _call(self, batch: _Batch, request: Any) -> Any:
        return await self.service.handle(batch.caller, request)

    # -- server information ------------------------------------------------------------

    async def _discover_versions(self, batch: _Batch, payload: Item) -> Item:
        offered = []
        for item in payload.find_all("ProtocolVersion"):
            major, minor = item.find("ProtocolVersionMajor"), item.find("ProtocolVersionMinor")
            if major is not None and minor is not None:
                offered.append((major.value, minor.value))
        versions = [v for v in SUPPORTED_VERSIONS if not offered or v in offered]
        return structure("ResponsePayload", *(version_item(v) for v in versions))

    async def _query(self, batch: _Batch, payload: Item) -> Item:
        functions = {item.value for item in payload.find_all("QueryFunction")}
        query = ENUMS["QueryFunction"]
        out: list[Item] = []
        if query["QueryOperations"] in functions:
            out += [enumeration("Operation", OP[name]) for name in SERVED_OPERATIONS]
        if query["QueryObjects"] in functions:
            out += [enumeration("ObjectType", number) for number in _OBJECT_TYPES.values()]
        if query["QueryServerInformation"] in functions:
            out.append(text("VendorIdentification", "kmipd"))
            out.append(
                structure(
                    "ServerInformation",
                    text("ServerName", self.service.info.name) if "ServerName" in TAGS else None,
                )
            )
        return structure("ResponsePayload", *out)

    # -- create, register, re-key -----------------------------------------------------

    def _creation(
        self, batch: _Batch, attributes: list[Attribute], object_type: str
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {"names": [], "custom": {}}
        algorithm = length = None
        for name, value in attributes:
            if name.startswith(CUSTOM_PREFIXES):
                fields["custom"][name] = _custom_json(value)
            elif name not in _SETTABLE_AT_CREATE:
                raise _fail(ResultReason.INVALID_FIELD, f"attribute {name!r} is set by the server")
            elif name == "Name":
                fields["names"].append(value[0])
            elif name == "Cryptographic Algorithm":
                algorithm = value
            elif name == "Cryptographic Length":
                length = value
            elif name == "Cryptographic Usage Mask":
                fields["usage_mask"] = value
            elif name == "Object Group":
                fields["object_group"] = value
            elif name == "Activation Date":
                fields["activation"] = value
        if object_type == "symmetric-key":
            if algorithm not in (None, _AES):
                raise _fail(ResultReason.INVALID_FIELD, "only AES symmetric keys are served")
            fields["_length"] = length
        group = fields.get("object_group")
        if group is not None and not (len(group) <= 128 and NAMESPACE_PATTERN.fullmatch(group)):
            # The group is the namespace: it must be one (letters, digits, . _ - and /).
            raise _fail(ResultReason.INVALID_FIELD, "Object Group must be a kmipd namespace name")
        fields["namespace"] = group or self.default_namespace
        fields["names"] = tuple(fields["names"])
        return fields

    async def _create(self, batch: _Batch, payload: Item) -> Item:
        object_type = _scalar(payload, "ObjectType", ItemType.ENUMERATION)
        if object_type != _OBJECT_TYPES["symmetric-key"]:
            raise _fail(ResultReason.INVALID_FIELD, "Create makes symmetric keys only")
        fields = self._creation(batch, parse_attributes(payload), "symmetric-key")
        length = fields.pop("_length")
        if length is None:
            raise _fail(ResultReason.MISSING_DATA, "Create needs a Cryptographic Length")
        created: ObjectCreated = await self._call(batch, CreateObject(length=length, **fields))
        batch.placeholder = created.dek_id
        return structure(
            "ResponsePayload",
            enumeration("ObjectType", object_type),
            text("UniqueIdentifier", created.dek_id),
        )

    async def _register(self, batch: _Batch, payload: Item) -> Item:
        object_type = _scalar(payload, "ObjectType", ItemType.ENUMERATION)
        kind = _OBJECT_TYPE_NAMES.get(object_type)
        if kind is None:
            raise _fail(ResultReason.INVALID_FIELD, "Register takes a Symmetric Key or Secret Data")
        holder = payload.find("SymmetricKey" if kind == "symmetric-key" else "SecretData")
        if holder is None or holder.type is not ItemType.STRUCTURE:
            raise _fail(ResultReason.MISSING_DATA, "Register lacks the object")
        fields = self._creation(batch, parse_attributes(payload), kind)
        fields.pop("_length", None)
        material, block_attributes = _key_block(holder)
        for name, value in block_attributes:
            if name == "Cryptographic Algorithm" and kind == "symmetric-key" and value != _AES:
                raise _fail(ResultReason.INVALID_FIELD, "only AES symmetric keys are served")
        if kind == "symmetric-key" and len(material) * 8 not in (128, 192, 256):
            raise _fail(ResultReason.INVALID_FIELD, "an AES key is 16, 24 or 32 bytes")
        secret_type = None
        if kind == "secret-data":
            secret_type = _scalar(holder, "SecretDataType", ItemType.ENUMERATION)
            if _secret_name(fields["names"]) is not None:
                return await self._register_secret(batch, fields, material, secret_type)
        created: ObjectCreated = await self._call(
            batch,
            RegisterObject(
                object_type=kind, material=material, secret_data_type=secret_type, **fields
            ),
        )
        batch.placeholder = created.dek_id
        return structure("ResponsePayload", text("UniqueIdentifier", created.dek_id))

    async def _register_secret(
        self, batch: _Batch, fields: dict[str, Any], material: bytes, secret_type: int | None
    ) -> Item:
        """A named Secret Data: a new version of the secret of that name (see the module doc)."""
        name = _secret_name(fields["names"])
        assert name is not None
        tags = {}
        if secret_type not in (None, ENUMS["SecretDataType"]["Password"]):
            tags[_SECRET_DATA_TYPE_TAG] = str(secret_type)
        info: SecretInfo = await self._call(
            batch,
            SetSecret(
                namespace=fields["namespace"],
                name=name,
                value=material,
                tags=tags,
                not_before=fields.get("activation"),
            ),
        )
        uid = secret_uid(info.namespace, info.name, info.version)
        batch.placeholder = uid
        return structure("ResponsePayload", text("UniqueIdentifier", uid))

    async def _rekey(self, batch: _Batch, payload: Item) -> Item:
        uid = _key_uid(payload, batch.placeholder, "Re-key")
        view: ObjectView = await self._call(batch, ObjectInfo(uid))
        old = view.kmip
        if old.object_type != "symmetric-key":
            raise _fail(ResultReason.ILLEGAL_OPERATION, "only symmetric keys are re-keyed")
        created: ObjectCreated = await self._call(
            batch,
            CreateObject(
                namespace=view.record.namespace,
                length=old.length,
                usage_mask=old.usage_mask,
                object_group=old.object_group,
                names=old.names,
                custom=old.custom,
                links=((_LINK_REPLACED, uid),),
                activation=int(time.time()),
            ),
        )
        await self._call(
            batch,
            PutObject(
                attrs.evolve(old, links=(*old.links, (_LINK_REPLACEMENT, created.dek_id))),
                view.kmip.last_change,
            ),
        )
        batch.placeholder = created.dek_id
        return structure("ResponsePayload", text("UniqueIdentifier", created.dek_id))

    # -- get ------------------------------------------------------------------------

    async def _get(self, batch: _Batch, payload: Item) -> Item:
        uid = _uid(payload, batch.placeholder)
        if payload.find("KeyWrappingSpecification") is not None:
            raise _fail(ResultReason.FEATURE_NOT_SUPPORTED, "key wrapping on Get is not supported")
        wanted = _scalar(payload, "KeyFormatType", ItemType.ENUMERATION)
        if parse_secret_uid(uid) is not None:
            return await self._get_secret(batch, uid, wanted)
        request = GetObject(uid)
        got = self.service.handle_now(batch.caller, request)  # the cached row: no waiting
        if got is NOT_NOW:
            got = await self._call(batch, request)
        assert isinstance(got, ObjectMaterial)
        kmip = got.kmip
        if kmip.object_type == "secret-data":
            if wanted not in (None, _KEY_FORMAT["Opaque"], _KEY_FORMAT["Raw"]):
                raise _fail(ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED, "Secret Data is Opaque")
            block = structure(
                "KeyBlock",
                enumeration("KeyFormatType", wanted or _KEY_FORMAT["Opaque"]),
                structure("KeyValue", byte_string("KeyMaterial", got.key)),
            )
            obj = structure(
                "SecretData",
                enumeration(
                    "SecretDataType", kmip.secret_data_type or ENUMS["SecretDataType"]["Password"]
                ),
                block,
            )
        else:
            if wanted in (None, _KEY_FORMAT["Raw"]):
                key_format, material = _KEY_FORMAT["Raw"], byte_string("KeyMaterial", got.key)
            elif wanted == _KEY_FORMAT["TransparentSymmetricKey"]:
                key_format = wanted
                material = structure("KeyMaterial", byte_string("Key", got.key))
            else:
                raise _fail(
                    ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED,
                    "symmetric keys are served Raw or Transparent Symmetric Key",
                )
            obj = structure(
                "SymmetricKey",
                structure(
                    "KeyBlock",
                    enumeration("KeyFormatType", key_format),
                    structure("KeyValue", material),
                    enumeration("CryptographicAlgorithm", _AES),
                    integer("CryptographicLength", len(got.key) * 8),
                ),
            )
        return structure(
            "ResponsePayload",
            enumeration("ObjectType", _OBJECT_TYPES[kmip.object_type]),
            text("UniqueIdentifier", uid),
            obj,
        )

    async def _get_secret(self, batch: _Batch, uid: str, wanted: int | None) -> Item:
        if wanted not in (None, _KEY_FORMAT["Opaque"], _KEY_FORMAT["Raw"]):
            raise _fail(ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED, "Secret Data is Opaque")
        namespace, name, version = _secret_of(uid)
        got: SecretValue = await self._call(
            batch, GetSecret(namespace=namespace, name=name, version=version)
        )
        secret_type = got.tags.get(_SECRET_DATA_TYPE_TAG, "")
        password = ENUMS["SecretDataType"]["Password"]
        return structure(
            "ResponsePayload",
            enumeration("ObjectType", _OBJECT_TYPES["secret-data"]),
            text("UniqueIdentifier", uid),
            structure(
                "SecretData",
                enumeration(
                    "SecretDataType",
                    int(secret_type) if secret_type.isdigit() else password,
                ),
                structure(
                    "KeyBlock",
                    enumeration("KeyFormatType", wanted or _KEY_FORMAT["Opaque"]),
                    structure("KeyValue", byte_string("KeyMaterial", got.value)),
                ),
            ),
        )

    # -- attributes -----------------------------------------------------------------

    async def _secret_attributes(self, batch: _Batch, uid: str) -> list[tuple[str, Any]]:
        namespace, name, number = _secret_of(uid)
        listed: SecretVersionsResult = await self._call(
            batch, SecretVersions(namespace=namespace, name=name)
        )
        info = next((v for v in listed.versions if v.version == number), None)
        if info is None:
            raise _fail(ResultReason.ITEM_NOT_FOUND, f"secret {name!r} has no version {number}")
        current = [v for v in listed.versions if v.enabled]
        found: list[tuple[str, Any]] = [
            ("Unique Identifier", uid),
            ("Object Type", _OBJECT_TYPES["secret-data"]),
        ]
        if current and current[-1].version == number:
            found.append(("Name", (name, 1)))  # the Name is the current version's
        found += [
            ("Cryptographic Usage Mask", 0),
            ("Object Group", namespace),
            ("State", _secret_state(info, self.service._clock())),
            ("Initial Date", info.created),
            ("Last Change Date", info.updated),
        ]
        if info.not_before is not None:
            found.append(("Activation Date", info.not_before))
        if info.expires is not None:
            found.append(("Deactivation Date", info.expires))
        return found

    async def _attributes_of(self, batch: _Batch, uid: str) -> list[tuple[str, Any]]:
        if parse_secret_uid(uid) is not None:
            return await self._secret_attributes(batch, uid)
        view: ObjectView = await self._call(batch, ObjectInfo(uid))
        return self._all_attributes(view)

    def _all_attributes(self, view: ObjectView) -> list[tuple[str, Any]]:
        record, kmip = view.record, view.kmip
        lifecycle = record.lifecycle
        state = kmip_state(record, self.service._clock())
        found: list[tuple[str, Any]] = [
            ("Unique Identifier", record.dek_id),
            ("Object Type", _OBJECT_TYPES[kmip.object_type]),
        ]
        if kmip.object_type == "symmetric-key":
            found += [("Cryptographic Algorithm", _AES), ("Cryptographic Length", kmip.length)]
        found += [(("Name"), (name, 1)) for name in kmip.names]
        found.append(
            ("Cryptographic Usage Mask", kmip.usage_mask if kmip.usage_mask is not None else 0)
        )
        if kmip.object_group:
            found.append(("Object Group", kmip.object_group))
        found.append(("State", _STATES[state]))
        found.append(("Initial Date", record.created_at))
        found.append(("Last Change Date", kmip.last_change or record.created_at))
        for name, value in (
            ("Activation Date", lifecycle.activation),
            ("Process Start Date", lifecycle.process_start),
            ("Protect Stop Date", lifecycle.protect_stop),
            ("Deactivation Date", lifecycle.deactivation),
            ("Compromise Date", lifecycle.compromise_date),
            ("Destroy Date", lifecycle.destroy_date),
        ):
            if value is not None:
                found.append((name, value))
        if lifecycle.revocation_reason is not None:
            found.append(
                (
                    "Revocation Reason",
                    (
                        _REVOCATION_CODES[lifecycle.revocation_reason.value],
                        lifecycle.revocation_message,
                    ),
                )
            )
        found += [("Link", link) for link in kmip.links]
        found += [(name, _custom_value(value)) for name, value in sorted(kmip.custom.items())]
        return found

    def _attribute_items(self, batch: _Batch, attributes: list[tuple[str, Any]]) -> list[Item]:
        items: list[Item] = []
        seen: dict[str, int] = {}
        for name, value in attributes:
            index = seen.get(name, 0)
            seen[name] = index + 1
            items.append(attribute_item(batch.version, name, value, index if index else None))
        if batch.version >= (2, 0):
            return [structure("Attributes", *items)]
        return items

    async def _get_attributes(self, batch: _Batch, payload: Item) -> Item:
        uid = _uid(payload, batch.placeholder)
        wanted = [
            attribute_reference_name(item, batch.version)
            for item in payload.find_all("AttributeName") + payload.find_all("AttributeReference")
        ]
        attributes = await self._attributes_of(batch, uid)
        if wanted:
            attributes = [(n, v) for n, v in attributes if n in wanted]
        return structure(
            "ResponsePayload",
            text("UniqueIdentifier", uid),
            *self._attribute_items(batch, attributes),
        )

    async def _get_attribute_list(self, batch: _Batch, payload: Item) -> Item:
        uid = _uid(payload, batch.placeholder)
        names = list(dict.fromkeys(name for name, _ in await self._attributes_of(batch, uid)))
        if batch.version >= (2, 0):
            refs = [
                enumeration("AttributeReference", TAGS[name.replace(" ", "")])
                for name in names
                if not name.startswith(CUSTOM_PREFIXES)
            ]
            return structure("ResponsePayload", text("UniqueIdentifier", uid), *refs)
        return structure(
            "ResponsePayload",
            text("UniqueIdentifier", uid),
            *(text("AttributeName", name) for name in names),
        )

    async def _change(
        self,
        batch: _Batch,
        payload: Item,
        change: Callable[[ObjectRecord, ObjectView], tuple[ObjectRecord, Attribute | None]],
    ) -> Item:
        uid = _key_uid(payload, batch.placeholder, "changing attributes")
        view: ObjectView = await self._call(batch, ObjectInfo(uid))
        updated, shown = change(view.kmip, view)
        await self._call(batch, PutObject(updated, view.kmip.last_change))
        out = [text("UniqueIdentifier", uid)]
        if shown is not None and batch.version < (2, 0):
            out.append(attribute_item(batch.version, shown[0], shown[1]))
        return structure("ResponsePayload", *out)

    def _one_attribute(
        self, batch: _Batch, payload: Item, holder: str = "NewAttribute"
    ) -> Attribute:
        if batch.version >= (2, 0):
            item = payload.find(holder)
            if item is None or not item.children:
                raise _fail(ResultReason.MISSING_DATA, f"{holder} is missing")
            return parse_attribute_v2(item.children[0])
        item = payload.find("Attribute")
        if item is None:
            raise _fail(ResultReason.MISSING_DATA, "Attribute is missing")
        return parse_attribute_v1(item)

    async def _add_attribute(self, batch: _Batch, payload: Item) -> Item:
        name, value = self._one_attribute(batch, payload)

        def add(kmip: ObjectRecord, view: ObjectView) -> tuple[ObjectRecord, Attribute]:
            if name == "Name":
                if value[0] in kmip.names:
                    raise _fail(ResultReason.ILLEGAL_OPERATION, "the object already has this Name")
                return attrs.evolve(kmip, names=(*kmip.names, value[0])), (name, value)
            if name.startswith(CUSTOM_PREFIXES):
                if name in kmip.custom:
                    raise _fail(ResultReason.ILLEGAL_OPERATION, f"{name!r} is already set")
                return attrs.evolve(kmip, custom={**kmip.custom, name: _custom_json(value)}), (
                    name,
                    value,
                )
            if name == "Cryptographic Usage Mask" and kmip.usage_mask is None:
                return attrs.evolve(kmip, usage_mask=value), (name, value)
            raise _fail(ResultReason.ILLEGAL_OPERATION, f"attribute {name!r} cannot be added")

        return await self._change(batch, payload, add)

    async def _modify_attribute(self, batch: _Batch, payload: Item) -> Item:
        name, value = self._one_attribute(batch, payload)
        index = (
            _scalar(payload.find("Attribute") or payload, "AttributeIndex", ItemType.INTEGER) or 0
        )

        def modify(kmip: ObjectRecord, view: ObjectView) -> tuple[ObjectRecord, Attribute]:
            if name == "Name":
                if index >= len(kmip.names):
                    raise _fail(ResultReason.ITEM_NOT_FOUND, "no Name at that index")
                names = list(kmip.names)
                names[index] = value[0]
                return attrs.evolve(kmip, names=tuple(names)), (name, value)
            if name.startswith(CUSTOM_PREFIXES):
                if name not in kmip.custom:
                    raise _fail(ResultReason.ITEM_NOT_FOUND, f"{name!r} is not set")
                return attrs.evolve(kmip, custom={**kmip.custom, name: _custom_json(value)}), (
                    name,
                    value,
                )
            raise _fail(ResultReason.ILLEGAL_OPERATION, f"attribute {name!r} cannot be modified")

        return await self._change(batch, payload, modify)

    async def _delete_attribute(self, batch: _Batch, payload: Item) -> Item:
        if batch.version >= (2, 0):
            ref = payload.find("AttributeReference")
            current = payload.find("CurrentAttribute")
            if ref is not None:
                name, index = attribute_reference_name(ref, batch.version), 0
            elif current is not None and current.children:
                name, _ = parse_attribute_v2(current.children[0])
                index = 0
            else:
                raise _fail(ResultReason.MISSING_DATA, "which attribute to delete?")
        else:
            item = payload.find("AttributeName")
            if item is None or not isinstance(item.value, str):
                raise _fail(ResultReason.MISSING_DATA, "AttributeName is missing")
            name = item.value
            index = _scalar(payload, "AttributeIndex", ItemType.INTEGER) or 0

        def delete(kmip: ObjectRecord, view: ObjectView) -> tuple[ObjectRecord, Attribute]:
            if name == "Name":
                if index >= len(kmip.names):
                    raise _fail(ResultReason.ITEM_NOT_FOUND, "no Name at that index")
                names = list(kmip.names)
                removed = names.pop(index)
                return attrs.evolve(kmip, names=tuple(names)), (name, (removed, 1))
            if name.startswith(CUSTOM_PREFIXES):
                if name not in kmip.custom:
                    raise _fail(ResultReason.ITEM_NOT_FOUND, f"{name!r} is not set")
                custom = dict(kmip.custom)
                removed_value = custom.pop(name)
                return attrs.evolve(kmip, custom=custom), (name, _custom_value(removed_value))
            if name in ATTRIBUTE_TYPES:
                raise _fail(ResultReason.PERMISSION_DENIED, f"attribute {name!r} cannot be deleted")
            raise _fail(ResultReason.ITEM_NOT_FOUND, f"no attribute {name!r}")

        return await self._change(batch, payload, delete)

    # -- locate -----------------------------------------------------------------------

    async def _locate(self, batch: _Batch, payload: Item) -> Item:
        filters: dict[str, Any] = {}
        for name, value in parse_attributes(payload):
            if name == "Name":
                filters["name"] = value[0]
            elif name == "Object Type":
                kind = _OBJECT_TYPE_NAMES.get(value)
                if kind is None:
                    return structure(
                        "ResponsePayload",
                        *([integer("LocatedItems", 0)] if batch.version >= (1, 3) else []),
                    )
                filters["object_type"] = kind
            elif name == "State":
                filters["state"] = _STATE_NAMES.get(value, "none")
            elif name == "Object Group":
                filters["object_group"] = value
            elif name == "Cryptographic Algorithm":
                filters["algorithm"] = "aes" if value == _AES else "none"
            elif name == "Cryptographic Length":
                filters["length"] = value
            else:
                raise _fail(ResultReason.INVALID_FIELD, f"Locate by {name!r} is not supported")
        maximum = _scalar(payload, "MaximumItems", ItemType.INTEGER)
        offset = _scalar(payload, "OffsetItems", ItemType.INTEGER) or 0
        if (maximum is not None and maximum < 0) or offset < 0:
            raise _fail(ResultReason.INVALID_FIELD, "Maximum Items and Offset Items are >= 0")
        ids, total = await self._located(batch, filters, maximum, offset)
        if ids:
            batch.placeholder = ids[0]
        out: list[Item] = []
        if batch.version >= (1, 3):
            out.append(integer("LocatedItems", total))
        out += [text("UniqueIdentifier", uid) for uid in ids]
        return structure("ResponsePayload", *out)

    async def _located(
        self, batch: _Batch, filters: dict[str, Any], maximum: int | None, offset: int
    ) -> tuple[list[str], int]:
        if not self._may_be_secret(filters):
            located: LocatedObjects = await self._call(
                batch, LocateObjects(maximum=maximum, offset=offset, **filters)
            )
            return list(located.dek_ids), located.total
        # Keys and anonymous objects first, then the secrets; one window over both.
        located = await self._call(batch, LocateObjects(**filters))
        ids = [*located.dek_ids, *await self._locate_secrets(batch, filters)]
        window = ids[offset:] if maximum is None else ids[offset : offset + maximum]
        return window, len(ids)

    @staticmethod
    def _may_be_secret(filters: dict[str, Any]) -> bool:
        """Whether a secret can match: secrets have no algorithm and no length."""
        return (
            filters.get("object_type") in (None, "secret-data")
            and "algorithm" not in filters
            and "length" not in filters
        )

    async def _locate_secrets(self, batch: _Batch, filters: dict[str, Any]) -> list[str]:
        name, group = filters.get("name"), filters.get("object_group")
        if (name is not None and not NAMESPACE_PATTERN.fullmatch(name)) or (
            group is not None and not NAMESPACE_PATTERN.fullmatch(group)
        ):
            return []  # no secret can have it
        found: LocatedSecrets = await self._call(
            # A namespace name holds no GLOB syntax: as a pattern it matches only itself.
            batch,
            LocateSecrets(name=name, namespace=group),
        )
        state = filters.get("state")
        now = self.service._clock()
        return [
            secret_uid(info.namespace, info.name, info.version)
            for info in found.versions
            if state is None or _STATES.get(state) == _secret_state(info, now)
        ]

    # -- lifecycle --------------------------------------------------------------------

    async def _enable_secret(self, batch: _Batch, uid: str, enabled: bool) -> Item:
        namespace, name, version = _secret_of(uid)
        await self._call(
            batch, UpdateSecret(namespace=namespace, name=name, version=version, enabled=enabled)
        )
        return structure("ResponsePayload", text("UniqueIdentifier", uid))

    async def _activate(self, batch: _Batch, payload: Item) -> Item:
        uid = _uid(payload, batch.placeholder)
        if parse_secret_uid(uid) is not None:
            return await self._enable_secret(batch, uid, True)
        await self._call(batch, Activate(key=KeyRef(dek_id=uid)))
        return structure("ResponsePayload", text("UniqueIdentifier", uid))

    async def _revoke(self, batch: _Batch, payload: Item) -> Item:
        uid = _uid(payload, batch.placeholder)
        reason_item = payload.find("RevocationReason")
        if reason_item is None or reason_item.type is not ItemType.STRUCTURE:
            raise _fail(ResultReason.MISSING_DATA, "Revoke needs a Revocation Reason")
        code = _scalar(reason_item, "RevocationReasonCode", ItemType.ENUMERATION)
        message = _scalar(reason_item, "RevocationMessage", ItemType.TEXT_STRING)
        reason = _REVOCATION.get(code)
        if reason is None:
            raise _fail(ResultReason.INVALID_FIELD, "unknown Revocation Reason Code")
        if parse_secret_uid(uid) is not None:
            return await self._enable_secret(batch, uid, False)
        await self._call(
            batch,
            Revoke(
                key=KeyRef(dek_id=uid),
                reason=reason.value,
                message=None if message is None else message[:256],
            ),
        )
        return structure("ResponsePayload", text("UniqueIdentifier", uid))

    async def _destroy(self, batch: _Batch, payload: Item) -> Item:
        uid = _uid(payload, batch.placeholder)
        parsed = parse_secret_uid(uid)
        if parsed is not None:
            await self._call(batch, DeleteSecret(namespace=parsed[0], name=parsed[1]))
            return structure("ResponsePayload", text("UniqueIdentifier", uid))
        await self._call(batch, Destroy(key=KeyRef(dek_id=uid)))
        return structure("ResponsePayload", text("UniqueIdentifier", uid))

    # -- encrypt, decrypt ---------------------------------------------------------------

    def _crypt_request(self, batch: _Batch, payload: Item, cls: type[CryptObject]) -> CryptObject:
        uid = _key_uid(payload, batch.placeholder, "Encrypt/Decrypt")
        params_item = payload.find("CryptographicParameters")
        params = {} if params_item is None else parse_cryptographic_parameters(params_item)
        mode_number = params.get("BlockCipherMode", _GCM)
        if mode_number not in (_GCM, _CBC):
            raise _fail(ResultReason.FEATURE_NOT_SUPPORTED, "AES-GCM and AES-CBC are served")
        mode = "gcm" if mode_number == _GCM else "cbc"
        if mode == "cbc" and params.get("PaddingMethod", 3) != 3:
            raise _fail(ResultReason.FEATURE_NOT_SUPPORTED, "AES-CBC is served with PKCS5 padding")
        data = _scalar(payload, "Data", ItemType.BYTE_STRING)
        if data is None:
            raise _fail(ResultReason.MISSING_DATA, "Data is missing")
        iv = _scalar(payload, "IvCounterNonce", ItemType.BYTE_STRING)
        if iv is not None and len(iv) != (12 if mode == "gcm" else 16):
            raise _fail(ResultReason.INVALID_FIELD, "IV must be 12 bytes (GCM) or 16 (CBC)")
        if cls is DecryptObject and iv is None:
            raise _fail(ResultReason.MISSING_DATA, "Decrypt needs the IV/Counter/Nonce")
        return cls(
            dek_id=uid,
            mode=mode,
            data=data,
            iv=iv,
            aad=_scalar(payload, "AuthenticatedEncryptionAdditionalData", ItemType.BYTE_STRING)
            or b"",
            tag=_scalar(payload, "AuthenticatedEncryptionTag", ItemType.BYTE_STRING),
        )

    async def _encrypt(self, batch: _Batch, payload: Item) -> Item:
        request = self._crypt_request(batch, payload, CryptObject)
        result: CryptResult = await self._call(batch, request)
        return structure(
            "ResponsePayload",
            text("UniqueIdentifier", request.dek_id),
            byte_string("Data", result.data),
            None if result.iv is None else byte_string("IvCounterNonce", result.iv),
            None if result.tag is None else byte_string("AuthenticatedEncryptionTag", result.tag),
        )

    async def _decrypt(self, batch: _Batch, payload: Item) -> Item:
        request = self._crypt_request(batch, payload, DecryptObject)
        result: CryptResult = await self._call(batch, request)
        return structure(
            "ResponsePayload",
            text("UniqueIdentifier", request.dek_id),
            byte_string("Data", result.data),
        )


def _key_block(holder: Item) -> tuple[bytes, list[Attribute]]:
    """Key material of a Register's Symmetric Key / Secret Data (unwrapped formats only)."""
    block = holder.find("KeyBlock")
    if block is None or block.type is not ItemType.STRUCTURE:
        raise _fail(ResultReason.MISSING_DATA, "the object has no Key Block")
    if block.find("KeyWrappingData") is not None:
        raise _fail(ResultReason.FEATURE_NOT_SUPPORTED, "wrapped key blocks are not accepted")
    key_format = _scalar(block, "KeyFormatType", ItemType.ENUMERATION)
    value = block.find("KeyValue")
    if value is None or value.type is not ItemType.STRUCTURE:
        raise _fail(ResultReason.MISSING_DATA, "the Key Block has no Key Value")
    material = value.find("KeyMaterial")
    if material is None:
        raise _fail(ResultReason.MISSING_DATA, "the Key Value has no Key Material")
    if (
        key_format in (_KEY_FORMAT["Raw"], _KEY_FORMAT["Opaque"])
        and material.type is ItemType.BYTE_STRING
    ):
        key = material.value
    elif (
        key_format == _KEY_FORMAT["TransparentSymmetricKey"] and material.type is ItemType.STRUCTURE
    ):
        inner = material.find("Key")
        if inner is None or inner.type is not ItemType.BYTE_STRING:
            raise _fail(ResultReason.INVALID_FIELD, "Transparent Symmetric Key lacks its Key")
        key = inner.value
    else:
        raise _fail(ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED, "key format not accepted")
    assert isinstance(key, bytes)
    found: list[Attribute] = []
    for name in ("Cryptographic Algorithm", "Cryptographic Length"):
        item = block.find(name.replace(" ", ""))
        if item is not None:
            found.append((name, item.value))
    return key, found


def _custom_json(value: tuple[int, Any]) -> list[Any]:
    kind, scalar = value
    if isinstance(scalar, bytes):
        return [kind, {"hex": scalar.hex()}]
    return [kind, scalar]


def _custom_value(stored: list[Any]) -> tuple[int, Any]:
    kind, scalar = stored
    if isinstance(scalar, dict):
        return (int(kind), bytes.fromhex(scalar["hex"]))
    if int(kind) == ItemType.BOOLEAN:
        return (int(kind), bool(scalar))
    return (int(kind), scalar)
