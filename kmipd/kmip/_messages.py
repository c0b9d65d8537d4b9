"""KMIP request and response messages, and attributes in both KMIP 1.x and 2.0 form.

A request is parsed in two stages: the header (a broken header fails the
whole message), then each Batch Item on its own, so a malformed item is
answered with its own error while the others run. Attributes are turned into
one neutral form, ``name -> Python value`` with the KMIP 1.x attribute name,
whatever version sent them: 1.x's Attribute (name, index, value) structures
and 2.0's Attributes structure (the attributes as tagged items).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import attrs

from kmipd.kmip._errors import KmipCodecError, KmipError, ResultReason, ResultStatus
from kmipd.kmip._tables import TAG_NAMES, TAGS
from kmipd.kmip._ttlv import (
    Item,
    ItemType,
    byte_string,
    date_time,
    encode_ttlv,
    enumeration,
    integer,
    structure,
    text,
)

#: Protocol versions served, newest first (Discover Versions answers this list).
SUPPORTED_VERSIONS: Final[tuple[tuple[int, int], ...]] = (
    (2, 0),
    (1, 4),
    (1, 3),
    (1, 2),
    (1, 1),
    (1, 0),
)
#: Batch items one request may carry.
MAX_BATCH_ITEMS = 64


@attrs.frozen
class RequestHeader:
    version: tuple[int, int]
    batch_count: int
    asynchronous: bool = False
    #: Batch Error Continuation Option when given: 1 continue, 2 stop, 3 undo. Without
    #: one, kmipd continues: one failing item never fails the others.
    error_continuation: int | None = None
    maximum_response_size: int | None = None


@attrs.frozen
class BatchItem:
    operation: int | None
    unique_id: bytes | None
    payload: Item | None
    #: Set when the item itself is malformed: it is answered with this error.
    error: KmipError | None = None


@attrs.frozen
class RequestMessage:
    header: RequestHeader
    items: tuple[BatchItem, ...]


@attrs.frozen
class BatchResult:
    operation: int | None
    unique_id: bytes | None
    status: ResultStatus = ResultStatus.SUCCESS
    reason: ResultReason | None = None
    message: str | None = None
    payload: Item | None = None

    @classmethod
    def failure(cls, item: BatchItem, error: KmipError) -> BatchResult:
        return cls(
            item.operation,
            item.unique_id,
            ResultStatus.OPERATION_FAILED,
            error.reason,
            error.message,
        )


def _expect(item: Item | None, name: str, kind: ItemType, where: str) -> Item:
    if item is None:
        raise KmipCodecError(ResultReason.INVALID_MESSAGE, f"{where} lacks {name}")
    if item.type is not kind:
        raise KmipCodecError(
            ResultReason.INVALID_MESSAGE, f"{name} in {where} must be a {kind.name}"
        )
    return item


def _int(item: Item) -> int:
    assert isinstance(item.value, int)
    return item.value


def parse_version(item: Item | None, where: str) -> tuple[int, int]:
    version = _expect(item, "ProtocolVersion", ItemType.STRUCTURE, where)
    major = _expect(
        version.find("ProtocolVersionMajor"), "ProtocolVersionMajor", ItemType.INTEGER, where
    )
    minor = _expect(
        version.find("ProtocolVersionMinor"), "ProtocolVersionMinor", ItemType.INTEGER, where
    )
    return _int(major), _int(minor)


def version_item(version: tuple[int, int]) -> Item:
    return structure(
        "ProtocolVersion",
        integer("ProtocolVersionMajor", version[0]),
        integer("ProtocolVersionMinor", version[1]),
    )


def parse_request_header(message: Item) -> RequestHeader:
    """The header of a decoded RequestMessage; raises KmipCodecError if it is unusable."""
    if message.tag != TAGS["RequestMessage"] or message.type is not ItemType.STRUCTURE:
        raise KmipCodecError(ResultReason.INVALID_MESSAGE, "not a RequestMessage structure")
    header = _expect(
        message.find("RequestHeader"), "RequestHeader", ItemType.STRUCTURE, "RequestMessage"
    )
    version = parse_version(header.find("ProtocolVersion"), "RequestHeader")
    count = _int(
        _expect(header.find("BatchCount"), "BatchCount", ItemType.INTEGER, "RequestHeader")
    )
    asynchronous = header.find("AsynchronousIndicator")
    option = header.find("BatchErrorContinuationOption")
    size = header.find("MaximumResponseSize")
    return RequestHeader(
        version=version,
        batch_count=count,
        asynchronous=bool(asynchronous is not None and asynchronous.value is True),
        error_continuation=_int(option)
        if option is not None and option.type is ItemType.ENUMERATION
        else None,
        maximum_response_size=_int(size)
        if size is not None and size.type is ItemType.INTEGER
        else None,
    )


def parse_request(message: Item) -> RequestMessage:
    """Header first (raises), then each Batch Item (errors kept per item)."""
    header = parse_request_header(message)
    raw_items = message.find_all("BatchItem")
    if header.batch_count != len(raw_items):
        raise KmipCodecError(
            ResultReason.INVALID_MESSAGE,
            f"BatchCount says {header.batch_count}, the message has {len(raw_items)} batch items",
        )
    if not raw_items:
        raise KmipCodecError(ResultReason.INVALID_MESSAGE, "the message has no batch items")
    if len(raw_items) > MAX_BATCH_ITEMS:
        raise KmipCodecError(
            ResultReason.INVALID_MESSAGE, f"more than {MAX_BATCH_ITEMS} batch items in one message"
        )
    for child in message.children:
        if child.tag not in (TAGS["RequestHeader"], TAGS["BatchItem"]):
            raise KmipCodecError(
                ResultReason.INVALID_MESSAGE, f"unexpected {child.name} in RequestMessage"
            )
    return RequestMessage(header, tuple(_parse_batch_item(raw) for raw in raw_items))


def _parse_batch_item(raw: Item) -> BatchItem:
    operation: int | None = None
    unique_id: bytes | None = None
    if raw.type is not ItemType.STRUCTURE:
        error = KmipCodecError(ResultReason.INVALID_MESSAGE, "BatchItem must be a structure")
        return BatchItem(None, None, None, error)
    op = raw.find("Operation")
    if op is not None and op.type is ItemType.ENUMERATION:
        operation = _int(op)
    uid = raw.find("UniqueBatchItemId")
    if uid is not None and uid.type is ItemType.BYTE_STRING:
        assert isinstance(uid.value, bytes)
        unique_id = uid.value
    try:
        _expect(op, "Operation", ItemType.ENUMERATION, "BatchItem")
        if uid is not None:
            _expect(uid, "UniqueBatchItemId", ItemType.BYTE_STRING, "BatchItem")
        payload = _expect(
            raw.find("RequestPayload"), "RequestPayload", ItemType.STRUCTURE, "BatchItem"
        )
    except KmipCodecError as exc:
        return BatchItem(operation, unique_id, None, exc)
    return BatchItem(operation, unique_id, payload)


def encode_response(
    version: tuple[int, int], results: Sequence[BatchResult], timestamp: int
) -> bytes:
    items = []
    for result in results:
        items.append(
            structure(
                "BatchItem",
                None if result.operation is None else enumeration("Operation", result.operation),
                None
                if result.unique_id is None
                else byte_string("UniqueBatchItemId", result.unique_id),
                enumeration("ResultStatus", int(result.status)),
                None if result.reason is None else enumeration("ResultReason", int(result.reason)),
                None if result.message is None else text("ResultMessage", result.message),
                result.payload,
            )
        )
    header = structure(
        "ResponseHeader",
        version_item(version),
        date_time("TimeStamp", timestamp),
        integer("BatchCount", len(items)),
    )
    return encode_ttlv(structure("ResponseMessage", header, *items))


def error_response(version: tuple[int, int], error: KmipError, timestamp: int) -> bytes:
    """The answer to a message whose header could not be used: one failed item."""
    result = BatchResult(None, None, ResultStatus.OPERATION_FAILED, error.reason, error.message)
    return encode_response(version, [result], timestamp)


# -- attributes ------------------------------------------------------------------------------

#: KMIP 1.x attribute name -> (its tag name, its item type). Attributes not listed
#: are refused as unsupported; names starting x- / y- are custom (any scalar type).
ATTRIBUTE_TYPES: Final[dict[str, ItemType]] = {
    "Unique Identifier": ItemType.TEXT_STRING,
    "Name": ItemType.STRUCTURE,
    "Object Type": ItemType.ENUMERATION,
    "Cryptographic Algorithm": ItemType.ENUMERATION,
    "Cryptographic Length": ItemType.INTEGER,
    "Cryptographic Usage Mask": ItemType.INTEGER,
    "Cryptographic Parameters": ItemType.STRUCTURE,
    "Object Group": ItemType.TEXT_STRING,
    "State": ItemType.ENUMERATION,
    "Initial Date": ItemType.DATE_TIME,
    "Activation Date": ItemType.DATE_TIME,
    "Process Start Date": ItemType.DATE_TIME,
    "Protect Stop Date": ItemType.DATE_TIME,
    "Deactivation Date": ItemType.DATE_TIME,
    "Destroy Date": ItemType.DATE_TIME,
    "Compromise Date": ItemType.DATE_TIME,
    "Compromise Occurrence Date": ItemType.DATE_TIME,
    "Last Change Date": ItemType.DATE_TIME,
    "Original Creation Date": ItemType.DATE_TIME,
    "Revocation Reason": ItemType.STRUCTURE,
    "Link": ItemType.STRUCTURE,
    "Contact Information": ItemType.TEXT_STRING,
    "Operation Policy Name": ItemType.TEXT_STRING,
    "Sensitive": ItemType.BOOLEAN,
    "Extractable": ItemType.BOOLEAN,
    "Fresh": ItemType.BOOLEAN,
    "Description": ItemType.TEXT_STRING,
    "Comment": ItemType.TEXT_STRING,
}
#: 2.0 writes attributes as items tagged with the attribute: tag -> 1.x name.
_ATTRIBUTE_BY_TAG: Final[dict[int, str]] = {
    TAGS[name.replace(" ", "")]: name for name in ATTRIBUTE_TYPES if name.replace(" ", "") in TAGS
}
CUSTOM_PREFIXES = ("x-", "y-")
#: Custom attribute values: the scalar types a client may send.
_CUSTOM_TYPES = frozenset(
    {
        ItemType.TEXT_STRING,
        ItemType.BYTE_STRING,
        ItemType.INTEGER,
        ItemType.LONG_INTEGER,
        ItemType.ENUMERATION,
        ItemType.BOOLEAN,
        ItemType.DATE_TIME,
        ItemType.INTERVAL,
    }
)

#: A parsed attribute: (name, value). Scalars are ints/str/bool/bytes; Name is
#: (value, name type); Link is (link type, id); Revocation Reason (code, message);
#: a custom attribute is (item type, value); Cryptographic Parameters a dict.
Attribute = tuple[str, Any]


def _field_error(message: str) -> KmipError:
    return KmipError(ResultReason.INVALID_FIELD, message)


def _value_from_item(name: str, item: Item) -> Any:
    if name.startswith(CUSTOM_PREFIXES):
        if item.type not in _CUSTOM_TYPES:
            raise _field_error(f"custom attribute {name!r} must be a scalar")
        return (int(item.type), item.value)
    expected = ATTRIBUTE_TYPES.get(name)
    if expected is None:
        raise KmipError(ResultReason.INVALID_FIELD, f"attribute {name!r} is not supported")
    if item.type is not expected:
        raise _field_error(f"attribute {name!r} must be a {expected.name}")
    if name == "Name":
        value = item.find("NameValue")
        kind = item.find("NameType")
        if value is None or value.type is not ItemType.TEXT_STRING:
            raise _field_error("Name lacks a NameValue text string")
        name_type = kind.value if kind is not None and kind.type is ItemType.ENUMERATION else 1
        return (value.value, name_type)
    if name == "Link":
        link_type, linked = item.find("LinkType"), item.find("LinkedObjectIdentifier")
        if link_type is None or linked is None:
            raise _field_error("Link needs LinkType and LinkedObjectIdentifier")
        return (link_type.value, linked.value)
    if name == "Revocation Reason":
        code, message = item.find("RevocationReasonCode"), item.find("RevocationMessage")
        if code is None or code.type is not ItemType.ENUMERATION:
            raise _field_error("Revocation Reason lacks its code")
        return (code.value, None if message is None else message.value)
    if name == "Cryptographic Parameters":
        return parse_cryptographic_parameters(item)
    return item.value


def parse_cryptographic_parameters(item: Item) -> dict[str, Any]:
    """Cryptographic Parameters as {tag name: value} (scalars only)."""
    return {
        child.name: child.value for child in item.children if child.type is not ItemType.STRUCTURE
    }


def _attribute_name(item: Item | None) -> str:
    if item is None or item.type is not ItemType.TEXT_STRING:
        raise _field_error("Attribute lacks an AttributeName text string")
    assert isinstance(item.value, str)
    return item.value


def parse_attribute_v1(item: Item) -> Attribute:
    """One 1.x Attribute structure: (name, value)."""
    if item.type is not ItemType.STRUCTURE:
        raise _field_error("Attribute must be a structure")
    name = _attribute_name(item.find("AttributeName"))
    value = item.find("AttributeValue")
    if value is None:
        raise _field_error(f"attribute {name!r} has no AttributeValue")
    return name, _value_from_item(name, value)


def parse_attribute_v2(item: Item) -> Attribute:
    """One item inside a 2.0 Attributes structure (or a 2.0 Vendor Attribute)."""
    if item.tag == TAGS.get("VendorAttribute"):
        name = _attribute_name(item.find("AttributeName"))
        value = item.find("AttributeValue")
        if value is None:
            raise _field_error(f"vendor attribute {name!r} has no AttributeValue")
        if not name.startswith(CUSTOM_PREFIXES):
            name = "x-" + name
        return name, _value_from_item(name, value)
    known = _ATTRIBUTE_BY_TAG.get(item.tag)
    if known is None:
        raise KmipError(ResultReason.INVALID_FIELD, f"attribute {item.name} is not supported")
    return known, _value_from_item(known, item)


def parse_attributes(payload: Item) -> list[Attribute]:
    """The attributes a Create/Register/Locate payload carries, in any version's form.

    1.x: TemplateAttribute { Attribute* } (or bare Attribute items, as Locate
    sends them); 2.0: Attributes { <attribute items> }.
    """
    found: list[Attribute] = []
    for holder_name in ("TemplateAttribute", "CommonTemplateAttribute"):
        holder = payload.find(holder_name)
        if holder is not None:
            found.extend(parse_attribute_v1(a) for a in holder.find_all("Attribute"))
            if holder.find("Name") is not None:
                raise KmipError(
                    ResultReason.FEATURE_NOT_SUPPORTED, "named templates are not supported"
                )
    found.extend(parse_attribute_v1(a) for a in payload.find_all("Attribute"))
    for holder_name in ("Attributes", "CommonAttributes"):
        holder = payload.find(holder_name)
        if holder is not None:
            found.extend(parse_attribute_v2(a) for a in holder.children)
    return found


def _value_to_item(tag_name: str, name: str, value: Any) -> Item:
    if name.startswith(CUSTOM_PREFIXES):
        kind, scalar = value
        return Item(TAGS[tag_name], ItemType(kind), scalar)
    kind = ATTRIBUTE_TYPES[name]
    if name == "Name":
        return structure(tag_name, text("NameValue", value[0]), enumeration("NameType", value[1]))
    if name == "Link":
        return structure(
            tag_name, enumeration("LinkType", value[0]), text("LinkedObjectIdentifier", value[1])
        )
    if name == "Revocation Reason":
        return structure(
            tag_name,
            enumeration("RevocationReasonCode", value[0]),
            None if value[1] is None else text("RevocationMessage", value[1]),
        )
    if name == "Cryptographic Parameters":
        return structure(tag_name, *(_scalar(key, v) for key, v in value.items()))
    return Item(TAGS[tag_name], kind, value)


def _scalar(tag_name: str, value: Any) -> Item:
    if isinstance(value, bool):
        return Item(TAGS[tag_name], ItemType.BOOLEAN, value)
    if isinstance(value, int):
        kind = ItemType.INTEGER if tag_name in ("IvLength", "TagLength") else ItemType.ENUMERATION
        return Item(TAGS[tag_name], kind, value)
    if isinstance(value, bytes):
        return Item(TAGS[tag_name], ItemType.BYTE_STRING, value)
    return Item(TAGS[tag_name], ItemType.TEXT_STRING, value)


def attribute_item(
    version: tuple[int, int], name: str, value: Any, index: int | None = None
) -> Item:
    """One attribute as the given version writes it (1.x Attribute or a 2.0 tagged item)."""
    if version >= (2, 0):
        if name.startswith(CUSTOM_PREFIXES):
            return structure(
                "VendorAttribute",
                text("VendorIdentification", "x"),
                text("AttributeName", name[2:]),
                _value_to_item("AttributeValue", name, value),
            )
        return _value_to_item(name.replace(" ", ""), name, value)
    return structure(
        "Attribute",
        text("AttributeName", name),
        None if index is None else integer("AttributeIndex", index),
        _value_to_item("AttributeValue", name, value),
    )


def attribute_reference_name(item: Item, version: tuple[int, int]) -> str:
    """A requested attribute name: 1.x AttributeName text, 2.0 AttributeReference/tag."""
    if item.type is ItemType.TEXT_STRING:
        assert isinstance(item.value, str)
        return item.value
    if item.type is ItemType.ENUMERATION:  # 2.0 Attribute Reference: the attribute's tag
        assert isinstance(item.value, int)
        found = _ATTRIBUTE_BY_TAG.get(item.value)
        if found is None:
            raise KmipError(
                ResultReason.INVALID_FIELD,
                f"attribute {TAG_NAMES.get(item.value, item.value)} is not supported",
            )
        return found
    if item.type is ItemType.STRUCTURE:
        vendor = item.find("AttributeName")
        if vendor is not None and isinstance(vendor.value, str):
            return vendor.value if vendor.value.startswith(CUSTOM_PREFIXES) else "x-" + vendor.value
    raise _field_error("unusable attribute reference")
