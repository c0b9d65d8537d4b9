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

import attrs

from kmipd.kmip._errors import KmipCodecError, ResultReason
from kmipd.kmip._tables import ENUMS, TAG_NAMES, TAGS

HEADER_SIZE = 8
#: Structures nest this deep at most; KMIP's own messages need about 8.
DEFAULT_MAX_DEPTH = 24

_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")
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
#: Inclusive value range of each integer type.
_RANGE = {
    ItemType.INTEGER: (-(2**31), 2**31 - 1),
    ItemType.LONG_INTEGER: (-(2**63), 2**63 - 1),
    ItemType.ENUMERATION: (0, 2**32 - 1),
    ItemType.DATE_TIME: (-(2**63), 2**63 - 1),
    ItemType.INTERVAL: (0, 2**32 - 1),
    ItemType.DATE_TIME_EXTENDED: (-(2**63), 2**63 - 1),
}

Value = int | bool | str | bytes | tuple["Item", ...]


def _value_repr(value: Value) -> str:
    # Byte strings may be key material: show their size only.
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return f"<{len(value)} chars>"
    return repr(value)


@attrs.frozen
class Item:
    """One TTLV item; a Structure's value is the tuple of its children."""

    tag: int
    type: ItemType
    value: Value = attrs.field(repr=_value_repr)

    @property
    def name(self) -> str:
        return TAG_NAMES.get(self.tag, f"0x{self.tag:06X}")

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
    parts: list[bytes] = []
    _encode_into(item, parts)
    return b"".join(parts)


def _header(item: Item, length: int) -> bytes:
    if not 0 <= item.tag < 2**24:
        raise ValueError(f"tag {item.tag:#x} is not 3 bytes")
    return _U32.pack(item.tag << 8 | int(item.type)) + _U32.pack(length)


def _encode_into(item: Item, parts: list[bytes]) -> int:
    """Append item's bytes to parts; return their total length."""
    kind, value = item.type, item.value
    if kind is ItemType.STRUCTURE:
        assert isinstance(value, tuple)
        at = len(parts)
        parts.append(b"")  # header, once the length is known
        length = sum(_encode_into(child, parts) for child in value)
        parts[at] = _header(item, length)
        return HEADER_SIZE + length
    if kind is ItemType.BOOLEAN:
        body = _U64.pack(1 if value else 0)
    elif kind in _RANGE:
        assert isinstance(value, int)
        low, high = _RANGE[kind]
        if not low <= value <= high:
            raise ValueError(f"{item.name}: {kind.name} out of range")
        if _FIXED_LENGTH[kind] == 4:
            body = (_I32 if low < 0 else _U32).pack(value)
        else:
            body = _I64.pack(value)
    elif kind is ItemType.BIG_INTEGER:
        assert isinstance(value, int)
        size = max(8, -(-(value.bit_length() + 1) // 64) * 8)  # two's complement, whole words
        body = value.to_bytes(size, "big", signed=True)
    elif kind is ItemType.TEXT_STRING:
        assert isinstance(value, str)
        body = value.encode("utf-8")
    else:
        assert isinstance(value, bytes)
        body = value
    padding = -len(body) % 8
    parts.append(_header(item, len(body)))
    parts.append(body)
    if padding:
        parts.append(_PAD[:padding])
    return HEADER_SIZE + len(body) + padding


# -- decoding ------------------------------------------------------------------------------


def _invalid(message: str) -> KmipCodecError:
    return KmipCodecError(ResultReason.INVALID_MESSAGE, message)


def read_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int]:
    """(tag, type byte, length) of the item at offset; the caller checks 8 bytes are there."""
    word, length = struct.unpack_from(">II", data, offset)
    return word >> 8, word & 0xFF, length


def decode_ttlv(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Item:
    """Decode exactly one item that spans all of data, or raise KmipCodecError."""
    view = memoryview(data)
    if len(view) < HEADER_SIZE:
        raise _invalid(f"{len(view)} bytes cannot hold a TTLV header")
    item, end = _decode_at(view, 0, len(view), max_depth)
    if end != len(view):
        raise _invalid(f"{len(view) - end} bytes after the message")
    return item


def _decode_at(view: memoryview, offset: int, limit: int, depth: int) -> tuple[Item, int]:
    if limit - offset < HEADER_SIZE:
        raise _invalid(f"{limit - offset} bytes left in the structure, less than a TTLV header")
    tag, type_byte, length = read_header(view, offset)
    name = TAG_NAMES.get(tag, f"0x{tag:06X}")
    try:
        kind = ItemType(type_byte)
    except ValueError:
        raise _invalid(f"{name}: unknown item type 0x{type_byte:02X}") from None
    start = offset + HEADER_SIZE
    padded = length + (-length % 8)
    if padded > limit - start:
        raise _invalid(
            f"{name}: length {length} runs past the enclosing item ({limit - start} bytes left)"
        )
    end = start + padded
    if kind is ItemType.STRUCTURE:
        if length % 8:
            raise _invalid(f"{name}: structure length {length} is not a multiple of 8")
        if depth <= 0:
            raise _invalid("structures nested too deep")
        children: list[Item] = []
        at = start
        while at < end:
            child, at = _decode_at(view, at, end, depth - 1)
            children.append(child)
        return Item(tag, kind, tuple(children)), end
    if view[start + length : end] != _PAD[: padded - length]:
        raise _invalid(f"{name}: non-zero padding")
    return Item(tag, kind, _decode_scalar(view, start, length, kind, name)), end


def _decode_scalar(view: memoryview, start: int, length: int, kind: ItemType, name: str) -> Value:
    fixed = _FIXED_LENGTH.get(kind)
    if fixed is not None and length != fixed:
        raise _invalid(f"{name}: {kind.name} must have length {fixed}, not {length}")
    value: Value
    if kind is ItemType.BOOLEAN:
        number = _U64.unpack_from(view, start)[0]
        if number > 1:
            raise _invalid(f"{name}: a Boolean is 0 or 1")
        value = bool(number)
    elif kind in (ItemType.INTEGER,):
        value = _I32.unpack_from(view, start)[0]
    elif kind in (ItemType.ENUMERATION, ItemType.INTERVAL):
        value = _U32.unpack_from(view, start)[0]
    elif kind in (ItemType.LONG_INTEGER, ItemType.DATE_TIME, ItemType.DATE_TIME_EXTENDED):
        value = _I64.unpack_from(view, start)[0]
    elif kind is ItemType.BIG_INTEGER:
        if length == 0 or length % 8:
            raise _invalid(f"{name}: Big Integer length {length} is not a positive multiple of 8")
        value = int.from_bytes(view[start : start + length], "big", signed=True)
    elif kind is ItemType.TEXT_STRING:
        try:
            value = bytes(view[start : start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid(f"{name}: text string is not UTF-8") from None
    else:
        value = bytes(view[start : start + length])
    return value


def walk(item: Item) -> Iterator[Item]:
    """The item and every item inside it, depth first."""
    yield item
    if item.type is ItemType.STRUCTURE:
        for child in item.children:
            yield from walk(child)
