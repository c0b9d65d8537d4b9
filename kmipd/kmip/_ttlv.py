"""TTLV: KMIP's tag, type, length, value encoding, with no I/O.

Every item is a 3-byte tag, a 1-byte type, a 4-byte big-endian length and
the value, padded with zeros to a multiple of 8 bytes. The decoder checks
each length against what is left of the enclosing structure before it
slices anything, bounds the nesting depth, and refuses non-zero padding,
wrong fixed lengths, invalid UTF-8 and Booleans other than 0 and 1, so
every input either decodes or raises KmipCodecError (Invalid Message).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from typing import NamedTuple

from kmipd.kmip._errors import KmipCodecError, ResultReason
from kmipd.kmip._tables import ENUMS, TAG_NAMES, TAGS

HEADER_SIZE = 8
#: Structures nest this deep at most; KMIP's own messages need about 8.
DEFAULT_MAX_DEPTH = 24

_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")
_HEAD = struct.Struct(">II")
_PAD = bytes(8)


class ItemType(enum.IntEnum):
    STRUCTURE = 0x01
    INTEGER = 0x02
    LONG_INTEGER = 0x03
    BIG_INTEGER = 0x04
    ENUMERATION = 0x05
    BOOLEAN = 0x06
    TEXT_STRING = 0x07
    BYTE_STRING = 0x08
    DATE_TIME = 0x09
    INTERVAL = 0x0A
    DATE_TIME_EXTENDED = 0x0B


#: Value length each fixed-size type must announce.
_FIXED_LENGTH = {
    ItemType.INTEGER: 4,
    ItemType.LONG_INTEGER: 8,
    ItemType.ENUMERATION: 4,
    ItemType.BOOLEAN: 8,
    ItemType.DATE_TIME: 8,
    ItemType.INTERVAL: 4,
    ItemType.DATE_TIME_EXTENDED: 8,
}
#: The item type of each type byte (None: not a KMIP type), so decoding needs no enum call.
_TYPES: tuple[ItemType | None, ...] = tuple(
    ItemType(byte) if byte in ItemType._value2member_map_ else None for byte in range(256)
)

Value = int | bool | str | bytes | tuple["Item", ...]


def _value_repr(value: Value) -> str:
    # Byte strings may be key material: show their size only.
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return f"<{len(value)} chars>"
    return repr(value)


def _tag_name(tag: int) -> str:
    return TAG_NAMES.get(tag) or f"0x{tag:06X}"


class Item(NamedTuple):
    """One TTLV item; a Structure's value is the tuple of its children.

    A named tuple, not an attrs class: a message decodes and encodes dozens of
    items, and a tuple is made at a third of the cost (immutable all the same).
    """

    tag: int
    type: ItemType
    value: Value

    def __repr__(self) -> str:
        return f"Item(tag={self.tag!r}, type={self.type!r}, value={_value_repr(self.value)})"

    @property
    def name(self) -> str:
        return _tag_name(self.tag)

    @property
    def children(self) -> tuple[Item, ...]:
        if self.type is not ItemType.STRUCTURE:
            raise KmipCodecError(ResultReason.INVALID_FIELD, f"{self.name} is not a structure")
        assert isinstance(self.value, tuple)
        return self.value

    def find(self, name: str) -> Item | None:
        tag = TAGS[name]
        for child in self.children:
            if child.tag == tag:
                return child
        return None

    def find_all(self, name: str) -> list[Item]:
        tag = TAGS[name]
        return [child for child in self.children if child.tag == tag]


_new = tuple.__new__  # Item's fields without NamedTuple's keyword handling: the codec's hot path


# -- building items ------------------------------------------------------------------------


def structure(name: str, *children: Item | None) -> Item:
    """A Structure of the given children; None children are left out (optional fields)."""
    return Item(TAGS[name], ItemType.STRUCTURE, tuple(c for c in children if c is not None))


def integer(name: str, value: int) -> Item:
    return Item(TAGS[name], ItemType.INTEGER, value)


def long_integer(name: str, value: int) -> Item:
    return Item(TAGS[name], ItemType.LONG_INTEGER, value)


def enumeration(name: str, value: int | str, enum_name: str | None = None) -> Item:
    """An Enumeration, by number or by its value name in ENUMS[enum_name or name]."""
    if isinstance(value, str):
        value = ENUMS[enum_name or name][value]
    return Item(TAGS[name], ItemType.ENUMERATION, value)


def boolean(name: str, value: bool) -> Item:
    return Item(TAGS[name], ItemType.BOOLEAN, value)


def text(name: str, value: str) -> Item:
    return Item(TAGS[name], ItemType.TEXT_STRING, value)


def byte_string(name: str, value: bytes) -> Item:
    return Item(TAGS[name], ItemType.BYTE_STRING, value)


def date_time(name: str, value: int) -> Item:
    return Item(TAGS[name], ItemType.DATE_TIME, value)


def interval(name: str, value: int) -> Item:
    return Item(TAGS[name], ItemType.INTERVAL, value)


# -- encoding ------------------------------------------------------------------------------


def encode_ttlv(item: Item) -> bytes:
    out = bytearray()
    _encode_into(item, out)
    return bytes(out)


#: Fixed-size types: (header + value + padding in one pack, its value's name in errors).
_FIXED_ITEMS = {
    ItemType.INTEGER: struct.Struct(">IIi4x"),
    ItemType.LONG_INTEGER: struct.Struct(">IIq"),
    ItemType.ENUMERATION: struct.Struct(">III4x"),
    ItemType.DATE_TIME: struct.Struct(">IIq"),
    ItemType.INTERVAL: struct.Struct(">III4x"),
    ItemType.DATE_TIME_EXTENDED: struct.Struct(">IIq"),
}
_FIXED_PACK = {kind: packer.pack for kind, packer in _FIXED_ITEMS.items()}
_BOOLEAN_ITEM = struct.Struct(">IIQ")
_STRUCTURE_WORD = int(ItemType.STRUCTURE)


def _encode_into(item: Item, out: bytearray) -> None:
    """Append item's bytes to out (a structure's length is filled in after its children)."""
    tag, kind, value = item
    if not 0 <= tag < 0x1000000:
        raise ValueError(f"tag {tag:#x} is not 3 bytes")
    word = tag << 8 | kind
    if kind is ItemType.STRUCTURE:
        assert isinstance(value, tuple)
        at = len(out)
        out += _HEAD.pack(word, 0)
        for child in value:
            _encode_into(child, out)
        _U32.pack_into(out, at + 4, len(out) - at - HEADER_SIZE)
        return
    pack = _FIXED_PACK.get(kind)
    if pack is not None:
        try:
            out += pack(word, _FIXED_LENGTH[kind], value)
        except struct.error:
            raise ValueError(f"{item.name}: {kind.name} out of range (or not an integer)") from None
        return
    if kind is ItemType.BOOLEAN:
        out += _BOOLEAN_ITEM.pack(word, 8, 1 if value else 0)
        return
    if kind is ItemType.TEXT_STRING:
        assert isinstance(value, str)
        body = value.encode("utf-8")
    elif kind is ItemType.BIG_INTEGER:
        assert isinstance(value, int)
        size = max(8, -(-(value.bit_length() + 1) // 64) * 8)  # two's complement, whole words
        body = value.to_bytes(size, "big", signed=True)
    else:
        assert isinstance(value, bytes)
        body = value
    size = len(body)
    out += _HEAD.pack(word, size)
    out += body
    if size & 7:
        out += _PAD[: 8 - (size & 7)]


# -- decoding ------------------------------------------------------------------------------


def _invalid(message: str) -> KmipCodecError:
    return KmipCodecError(ResultReason.INVALID_MESSAGE, message)


def read_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int]:
    """(tag, type byte, length) of the item at offset; the caller checks 8 bytes are there."""
    word, length = _HEAD.unpack_from(data, offset)
    return word >> 8, word & 0xFF, length


def decode_ttlv(
    data: bytes | bytearray | memoryview, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> Item:
    """Decode exactly one item that spans all of data, or raise KmipCodecError."""
    if not isinstance(data, bytes):
        data = bytes(data)
    size = len(data)
    if size < HEADER_SIZE:
        raise _invalid(f"{size} bytes cannot hold a TTLV header")
    end = HEADER_SIZE + ((_HEAD.unpack_from(data)[1] + 7) & ~7)
    # The item, decoded as the only child of a virtual structure that ends where it should.
    (item,) = _decode_children(data, 0, min(end, size), max_depth + 1)
    if end < size:
        raise _invalid(f"{size - end} bytes after the message")
    return item


def _decode_children(data: bytes, at: int, end: int, depth: int) -> tuple[Item, ...]:
    """The items between at and end (a structure's value), each checked against end."""
    if depth <= 0:
        raise _invalid("structures nested too deep")
    children: list[Item] = []
    append = children.append
    unpack_head = _HEAD.unpack_from
    while at < end:
        if end - at < HEADER_SIZE:
            raise _invalid(f"{end - at} bytes left in the structure, less than a TTLV header")
        word, length = unpack_head(data, at)
        kind = _TYPES[word & 0xFF]
        tag = word >> 8
        if kind is None:
            raise _invalid(f"{_tag_name(tag)}: unknown item type 0x{word & 0xFF:02X}")
        start = at + HEADER_SIZE
        at = start + ((length + 7) & ~7)
        if at > end:
            raise _invalid(
                f"{_tag_name(tag)}: length {length} runs past the enclosing item "
                f"({end - start} bytes left)"
            )
        if kind is ItemType.STRUCTURE:
            if length & 7:
                raise _invalid(
                    f"{_tag_name(tag)}: structure length {length} is not a multiple of 8"
                )
            append(_new(Item, (tag, kind, _decode_children(data, start, at, depth - 1))))
            continue
        if length & 7 and data[start + length : at] != _PAD[: at - start - length]:
            raise _invalid(f"{_tag_name(tag)}: non-zero padding")
        append(_new(Item, (tag, kind, _decode_scalar(data, start, length, kind, tag))))
    return tuple(children)


def _decode_scalar(data: bytes, start: int, length: int, kind: ItemType, tag: int) -> Value:
    fixed = _FIXED_LENGTH.get(kind)
    if fixed is not None and length != fixed:
        raise _invalid(f"{_tag_name(tag)}: {kind.name} must have length {fixed}, not {length}")
    value: Value
    if kind is ItemType.TEXT_STRING:
        try:
            value = data[start : start + length].decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid(f"{_tag_name(tag)}: text string is not UTF-8") from None
    elif kind is ItemType.ENUMERATION or kind is ItemType.INTERVAL:
        value = _U32.unpack_from(data, start)[0]
    elif kind is ItemType.INTEGER:
        value = _I32.unpack_from(data, start)[0]
    elif kind is ItemType.BYTE_STRING:
        value = data[start : start + length]
    elif kind is ItemType.BOOLEAN:
        number = _U64.unpack_from(data, start)[0]
        if number > 1:
            raise _invalid(f"{_tag_name(tag)}: a Boolean is 0 or 1")
        value = bool(number)
    elif kind is ItemType.BIG_INTEGER:
        if length == 0 or length % 8:
            raise _invalid(
                f"{_tag_name(tag)}: Big Integer length {length} is not a positive multiple of 8"
            )
        value = int.from_bytes(data[start : start + length], "big", signed=True)
    else:  # Long Integer, Date-Time, Date-Time Extended
        value = _I64.unpack_from(data, start)[0]
    return value


def walk(item: Item) -> Iterator[Item]:
    """The item and every item inside it, depth first."""
    yield item
    if item.type is ItemType.STRUCTURE:
        for child in item.children:
            yield from walk(child)
