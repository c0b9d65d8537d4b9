"""A small schema layer: message classes declare their wire fields as data.

Each message is a frozen attrs class whose fields carry a *kind* (how the
value looks on the wire and what bounds it has) and a wire name. One
generic parser and one generic encoder walk those declarations, so adding
an operation means declaring two classes, not writing a codec. The same
declarations validate requests on the server and responses on the client.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, TypeVar

import attrs

from kmipd.protocol._errors import ErrorCode, ProtocolError

_UINT64_MAX = 2**64 - 1


def _fail(path: str, problem: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f"{path}: {problem}")


def _quote(name: object) -> str:
    """Quote a peer-supplied name for an error message, cut short: never echo a large input."""
    text = repr(name)
    return text if len(text) <= 42 else text[:39] + "..."


def _type_name(value: object) -> str:
    names = {
        bool: "boolean",
        int: "integer",
        str: "text",
        bytes: "bytes",
        list: "array",
        dict: "map",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


class Kind(Protocol):
    def parse(self, value: object, path: str) -> Any: ...
    def encode(self, value: Any) -> object: ...


@attrs.frozen
class Text:
    max_length: int
    pattern: re.Pattern[str] | None = None
    #: Said in the error when the pattern does not match, e.g. "a namespace name".
    description: str = "text"
    min_length: int = 1

    def parse(self, value: object, path: str) -> str:
        if type(value) is not str:
            raise _fail(path, f"expected text, got {_type_name(value)}")
        if not self.min_length <= len(value) <= self.max_length:
            raise _fail(
                path, f"length {len(value)} is outside {self.min_length}..{self.max_length}"
            )
        if self.pattern is not None and self.pattern.fullmatch(value) is None:
            raise _fail(path, f"not a valid {self.description}")
        return value

    def encode(self, value: str) -> object:
        return value


@attrs.frozen
class Bytes:
    max_length: int
    min_length: int = 0

    def parse(self, value: object, path: str) -> bytes:
        if type(value) is not bytes:
            raise _fail(path, f"expected bytes, got {_type_name(value)}")
        if not self.min_length <= len(value) <= self.max_length:
            raise _fail(
                path, f"length {len(value)} is outside {self.min_length}..{self.max_length}"
            )
        return value

    def encode(self, value: bytes) -> object:
        return value


@attrs.frozen
class UInt:
    maximum: int = _UINT64_MAX
    minimum: int = 0

    def parse(self, value: object, path: str) -> int:
        if type(value) is not int:
            raise _fail(path, f"expected an unsigned integer, got {_type_name(value)}")
        if not self.minimum <= value <= self.maximum:
            raise _fail(path, f"{value} is outside {self.minimum}..{self.maximum}")
        return value

    def encode(self, value: int) -> object:
        return value


@attrs.frozen
class Bool:
    def parse(self, value: object, path: str) -> bool:
        if type(value) is not bool:
            raise _fail(path, f"expected a boolean, got {_type_name(value)}")
        return value

    def encode(self, value: bool) -> object:
        return value


@attrs.frozen
class ListOf:
    item: Kind
    max_items: int
    min_items: int = 0

    def parse(self, value: object, path: str) -> tuple[Any, ...]:
        if type(value) is not list:
            raise _fail(path, f"expected an array, got {_type_name(value)}")
        if not self.min_items <= len(value) <= self.max_items:
            raise _fail(path, f"{len(value)} items is outside {self.min_items}..{self.max_items}")
        return tuple(self.item.parse(member, f"{path}[{i}]") for i, member in enumerate(value))

    def encode(self, value: tuple[Any, ...]) -> object:
        return [self.item.encode(member) for member in value]


@attrs.frozen
class TextMap:
    """A map of text to text, e.g. an encryption context."""

    max_entries: int
    key: Text
    value: Text

    def parse(self, value: object, path: str) -> dict[str, str]:
        if type(value) is not dict:
            raise _fail(path, f"expected a map, got {_type_name(value)}")
        if len(value) > self.max_entries:
            raise _fail(path, f"{len(value)} entries; at most {self.max_entries}")
        return {
            self.key.parse(k, f"{path} key"): self.value.parse(v, f"{path}[{_quote(k)}]")
            for k, v in value.items()
        }

    def encode(self, value: dict[str, str]) -> object:
        return dict(value)


@attrs.frozen
class Struct:
    cls: type[Any]

    def parse(self, value: object, path: str) -> Any:
        return parse_struct(self.cls, value, path)

    def encode(self, value: Any) -> object:
        return encode_struct(value)


def wire(kind: Kind, name: str | None = None, **field_args: Any) -> Any:
    """Declare an attrs field together with its wire kind and name.

    The wire name defaults to the Python name with ``_`` turned into ``-``.
    A field with a default is optional on the wire.
    """
    return attrs.field(metadata={"kind": kind, "wire": name}, **field_args)


def redacted(value: bytes) -> str:
    """attrs ``repr`` hook for key material: the length, never the bytes."""
    return f"<{len(value)} bytes redacted>"


@attrs.frozen
class _FieldSpec:
    attr: str
    wire: str
    kind: Kind
    required: bool


_SPECS: dict[type[Any], tuple[_FieldSpec, ...]] = {}
#: The wire names of each class's fields, made once (parse_struct checks every map against it).
_WIRE_NAMES: dict[type[Any], frozenset[str]] = {}


def _specs(cls: type[Any]) -> tuple[_FieldSpec, ...]:
    specs = _SPECS.get(cls)
    if specs is None:
        specs = tuple(
            _FieldSpec(
                attr=field.name,
                wire=field.metadata.get("wire") or field.name.replace("_", "-"),
                kind=field.metadata["kind"],
                required=field.default is attrs.NOTHING,
            )
            for field in attrs.fields(cls)
        )
        _SPECS[cls] = specs
        _WIRE_NAMES[cls] = frozenset(spec.wire for spec in specs)
    return specs


T = TypeVar("T")


def parse_struct(cls: type[T], value: object, path: str) -> T:
    """Build ``cls`` from a decoded CBOR map, refusing missing, unknown or mistyped fields."""
    if type(value) is not dict:
        raise _fail(path, f"expected a map, got {_type_name(value)}")
    specs = _specs(cls)
    known = _WIRE_NAMES[cls]
    if not known.issuperset(value):
        unknown = [key for key in value if key not in known]
        raise _fail(path, f"unknown field {_quote(unknown[0])}")
    kwargs: dict[str, Any] = {}
    for spec in specs:
        raw = value.get(spec.wire, _ABSENT)
        if raw is not _ABSENT:
            kwargs[spec.attr] = spec.kind.parse(raw, f"{path}.{spec.wire}")
        elif spec.required:
            raise _fail(path, f"missing required field {spec.wire!r}")
    return cls(**kwargs)


_ABSENT = object()


def encode_struct(obj: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for spec in _specs(type(obj)):
        value = getattr(obj, spec.attr)
        if value is None and not spec.required:
            continue
        out[spec.wire] = spec.kind.encode(value)
    return out
