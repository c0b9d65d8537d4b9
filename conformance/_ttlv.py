"""KMIP TTLV as the suite writes and reads it, independently of the daemon's codec.

Just enough for the KMIP cases: structures, integers, enumerations, text and
byte strings, written byte for byte; responses are walked with every length
checked against its enclosing structure.
"""

from __future__ import annotations

import struct
from typing import Any

STRUCTURE, INTEGER, ENUMERATION, TEXT, BYTES = 0x01, 0x02, 0x05, 0x07, 0x08

REQUEST_MESSAGE = 0x420078
RESPONSE_MESSAGE = 0x42007B
REQUEST_HEADER = 0x420077
PROTOCOL_VERSION = 0x420069
VERSION_MAJOR = 0x42006A
VERSION_MINOR = 0x42006B
BATCH_COUNT = 0x42000D
BATCH_ITEM = 0x42000F
OPERATION = 0x42005C
UNIQUE_BATCH_ITEM_ID = 0x420093
REQUEST_PAYLOAD = 0x420079
RESPONSE_PAYLOAD = 0x42007C
RESULT_STATUS = 0x42007F
RESULT_REASON = 0x42007E
UNIQUE_IDENTIFIER = 0x420094
QUERY_FUNCTION = 0x420074

OP_CREATE, OP_LOCATE, OP_GET, OP_GET_ATTRIBUTES = 0x01, 0x08, 0x0A, 0x0B
OP_DESTROY, OP_QUERY, OP_DISCOVER_VERSIONS = 0x14, 0x18, 0x1E
OBJECT_TYPE, TEMPLATE_ATTRIBUTE, ATTRIBUTE = 0x420057, 0x420091, 0x420008
ATTRIBUTE_NAME, ATTRIBUTE_VALUE, UNIQUE_IDENTIFIER_COUNT = 0x42000A, 0x42000B, 0x4200D5
SYMMETRIC_KEY, AES = 2, 3
SUCCESS, FAILED = 0, 1
ITEM_NOT_FOUND, INVALID_MESSAGE, PERMISSION_DENIED = 0x01, 0x04, 0x0C


def item(tag: int, kind: int, value: bytes) -> bytes:
    return (
        struct.pack(">I", tag << 8 | kind)
        + struct.pack(">I", len(value))
        + value
        + bytes(-len(value) % 8)
    )


def structure(tag: int, *children: bytes) -> bytes:
    return item(tag, STRUCTURE, b"".join(children))


def integer(tag: int, value: int) -> bytes:
    return item(tag, INTEGER, struct.pack(">i", value))


def enumeration(tag: int, value: int) -> bytes:
    return item(tag, ENUMERATION, struct.pack(">I", value))


def text(tag: int, value: str) -> bytes:
    return item(tag, TEXT, value.encode())


def byte_string(tag: int, value: bytes) -> bytes:
    return item(tag, BYTES, value)


def request(version: tuple[int, int], *items: bytes, count: int | None = None) -> bytes:
    header = structure(
        REQUEST_HEADER,
        structure(
            PROTOCOL_VERSION, integer(VERSION_MAJOR, version[0]), integer(VERSION_MINOR, version[1])
        ),
        integer(BATCH_COUNT, len(items) if count is None else count),
    )
    return structure(REQUEST_MESSAGE, header, *items)


def attribute(name: str, value: bytes) -> bytes:
    """A KMIP 1.x Attribute; ``value`` is an item tagged ATTRIBUTE_VALUE."""
    return structure(ATTRIBUTE, text(ATTRIBUTE_NAME, name), value)


def batch_item(operation: int, uid: bytes | None, *payload: bytes) -> bytes:
    return structure(
        BATCH_ITEM,
        enumeration(OPERATION, operation),
        b"" if uid is None else byte_string(UNIQUE_BATCH_ITEM_ID, uid),
        structure(REQUEST_PAYLOAD, *payload),
    )


class TtlvError(ValueError):
    pass


Node = tuple[int, int, Any]


def parse(data: bytes) -> Node:
    """(tag, type, value) of one item spanning data; a structure's value is a list of nodes."""
    node, end = _parse(data, 0, len(data))
    if end != len(data):
        raise TtlvError(f"{len(data) - end} bytes after the item")
    return node


def _parse(data: bytes, at: int, limit: int) -> tuple[Node, int]:
    if limit - at < 8:
        raise TtlvError("truncated header")
    word, length = struct.unpack_from(">II", data, at)
    tag, kind = word >> 8, word & 0xFF
    start, end = at + 8, at + 8 + length + (-length % 8)
    if end > limit:
        raise TtlvError(f"item {tag:06X} runs past its structure")
    if kind == STRUCTURE:
        children, cursor = [], start
        while cursor < end:
            child, cursor = _parse(data, cursor, end)
            children.append(child)
        return (tag, kind, children), end
    raw = data[start : start + length]
    if kind in (INTEGER, ENUMERATION):
        return (tag, kind, struct.unpack(">i" if kind == INTEGER else ">I", raw)[0]), end
    return (tag, kind, raw), end


def find(node: Node, tag: int) -> Node | None:
    return next((child for child in node[2] if child[0] == tag), None)


def find_all(node: Node, tag: int) -> list[Node]:
    return [child for child in node[2] if child[0] == tag]


def results(response: Node) -> list[tuple[bytes | None, int, int | None]]:
    """(unique batch item id, result status, result reason) per batch item."""
    if response[0] != RESPONSE_MESSAGE:
        raise TtlvError(f"not a ResponseMessage: {response[0]:06X}")
    out = []
    for entry in find_all(response, BATCH_ITEM):
        uid, status, reason = (
            find(entry, t) for t in (UNIQUE_BATCH_ITEM_ID, RESULT_STATUS, RESULT_REASON)
        )
        if status is None:
            raise TtlvError("a batch item without Result Status")
        out.append(
            (None if uid is None else uid[2], status[2], None if reason is None else reason[2])
        )
    return out
