"""KMIP, sans-IO: TTLV codec, tag and enumeration tables, messages, connection state.

A second protocol beside kmipd.protocol: the server picks this connection
state machine when a client's first byte after the handshake is 0x42 (the
RequestMessage tag 0x420078); kmipd.service turns its requests into the
same operations the native protocol runs.
"""

from kmipd.kmip._connection import (
    ANSWERED,
    DEFAULT_MAX_MESSAGE_SIZE,
    NEED_DATA,
    ConnectionEnded,
    KmipConnection,
    RequestReceived,
)
from kmipd.kmip._errors import KmipCodecError, KmipError, ResultReason, ResultStatus
from kmipd.kmip._messages import (
    ATTRIBUTE_TYPES,
    CUSTOM_PREFIXES,
    MAX_BATCH_ITEMS,
    SUPPORTED_VERSIONS,
    Attribute,
    BatchItem,
    BatchResult,
    RequestHeader,
    RequestMessage,
    attribute_item,
    attribute_reference_name,
    encode_response,
    error_response,
    parse_attribute_v1,
    parse_attribute_v2,
    parse_attributes,
    parse_cryptographic_parameters,
    parse_request,
    version_item,
)
from kmipd.kmip._tables import ENUM_NAMES, ENUMS, TAG_NAMES, TAGS
from kmipd.kmip._ttlv import (
    HEADER_SIZE,
    Item,
    ItemType,
    boolean,
    byte_string,
    date_time,
    decode_ttlv,
    encode_ttlv,
    enumeration,
    integer,
    interval,
    long_integer,
    structure,
    text,
    walk,
)

#: The first byte of every KMIP request (the RequestMessage tag 0x420078).
FIRST_BYTE = 0x42

__all__ = [
    "ANSWERED",
    "ATTRIBUTE_TYPES",
    "CUSTOM_PREFIXES",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "ENUMS",
    "ENUM_NAMES",
    "FIRST_BYTE",
    "HEADER_SIZE",
    "MAX_BATCH_ITEMS",
    "NEED_DATA",
    "SUPPORTED_VERSIONS",
    "TAGS",
    "TAG_NAMES",
    "Attribute",
    "BatchItem",
    "BatchResult",
    "ConnectionEnded",
    "Item",
    "ItemType",
    "KmipCodecError",
    "KmipConnection",
    "KmipError",
    "RequestHeader",
    "RequestMessage",
    "RequestReceived",
    "ResultReason",
    "ResultStatus",
    "attribute_item",
    "attribute_reference_name",
    "boolean",
    "byte_string",
    "date_time",
    "decode_ttlv",
    "encode_response",
    "encode_ttlv",
    "enumeration",
    "error_response",
    "integer",
    "interval",
    "long_integer",
    "parse_attribute_v1",
    "parse_attribute_v2",
    "parse_attributes",
    "parse_cryptographic_parameters",
    "parse_request",
    "structure",
    "text",
    "version_item",
    "walk",
]
