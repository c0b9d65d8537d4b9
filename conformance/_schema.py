"""What the suite knows about the protocol, read from conformance/protocol.cddl.

Every response the suite receives is validated against the CDDL with
pycddl; the error codes and their names, and the operations with their
argument fields (for the fuzzer), are read from the same file, so the
suite follows the schema instead of a copy of it.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import attrs
import pycddl

CDDL_PATH = Path(__file__).with_name("protocol.cddl")

_RULE = re.compile(r"^([a-z][a-z0-9-]*)\s*=\s*", re.MULTILINE)
_ERROR_CODE = re.compile(r"^\s*([a-z][a-z0-9-]*):\s*(\d+),", re.MULTILINE)
_BYTES_LIST = re.compile(r'"\[(\d+(, \d+)*)\]"')


@attrs.frozen
class Field:
    name: str
    #: The CDDL type text, e.g. ``namespace-name`` or ``bstr .size (16..32)``.
    type: str
    optional: bool
    #: The CBOR kind the type resolves to: text, bytes, uint, bool, array or map.
    kind: str = "text"


@attrs.frozen
class RequestShape:
    op: str
    #: None when the request has no args map at all.
    args: tuple[Field, ...] | None
    args_optional: bool


class ValidatorCrashedError(Exception):
    """The CDDL validator itself failed on an item, so it cannot say if it is valid."""


class Schema:
    def __init__(self, text: str) -> None:
        self.text = text
        self.rules = _split_rules(text)
        self.error_codes = _error_codes(self.rules["error-code"])
        self.requests = _request_shapes(self.rules)

    @classmethod
    def load(cls, path: Path = CDDL_PATH) -> Schema:
        return cls(path.read_text(encoding="utf-8"))

    def code_of(self, name: str) -> int:
        for code, known in self.error_codes.items():
            if known == name:
                return code
        raise KeyError(f"protocol.cddl documents no error named {name!r}")

    def validate(self, rule: str, payload: bytes) -> str | None:
        """None if ``payload`` matches ``rule``, else pycddl's complaint (bytes redacted)."""
        try:
            _compiled(self.text, rule).validate_cbor(payload)
        except pycddl.ValidationError as exc:
            # pycddl quotes byte strings as lists of numbers: they may be keys.
            return _BYTES_LIST.sub("<bytes>", str(exc))[:400]
        except BaseException as exc:
            # A Rust panic inside pycddl surfaces as pyo3's PanicException, which
            # derives from BaseException: the item is then neither valid nor invalid.
            if type(exc).__name__ != "PanicException":
                raise
            raise ValidatorCrashedError(
                f"pycddl crashed validating a {len(payload)}-byte item against {rule!r}"
            ) from None
        return None


@cache
def _compiled(text: str, rule: str) -> pycddl.Schema:
    # pycddl validates against the first rule: put the one we want in front.
    return pycddl.Schema(f"conformance-root = {rule}\n{text}")


def _split_rules(text: str) -> dict[str, str]:
    """Rule name -> its definition text, comments removed."""
    lines = [line.split(";", 1)[0].rstrip() for line in text.splitlines()]
    body = "\n".join(lines)
    starts = list(_RULE.finditer(body))
    rules = {}
    for index, match in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(body)
        rules[match.group(1)] = body[match.end() : end].strip()
    return rules


def _error_codes(definition: str) -> dict[int, str]:
    return {int(code): name for name, code in _ERROR_CODE.findall(definition + ",")}


def _request_rules(rules: dict[str, str], name: str = "request") -> list[str]:
    """The request rules, following choices of choices (``lifecycle-request = a / b``)."""
    found = []
    for member in re.findall(r"[a-z0-9-]+", rules[name]):
        definition = rules.get(member, "")
        if "op:" in definition:
            found.append(member)
        elif definition and not definition.startswith("{"):
            found += _request_rules(rules, member)
    return found


#: How a CDDL type starts -> the CBOR kind it asks for.
_KIND_BY_PREFIX = (
    (("[",), "array"),
    (("{",), "map"),
    (('"', "tstr", "text"), "text"),
    (("bstr", "bytes"), "bytes"),
    (("bool",), "bool"),
    (("uint",), "uint"),
)


def kind_of(rules: dict[str, str], type_text: str, depth: int = 0) -> str:
    """The CBOR kind a CDDL type asks for, following rule names and the first choice."""
    first = type_text.strip().lstrip("(").strip().split(" / ")[0].strip()
    for prefixes, kind in _KIND_BY_PREFIX:
        if first.startswith(prefixes):
            return kind
    if re.match(r"\d+\.\.", first):
        return "uint"
    name = re.match(r"[a-z][a-z0-9-]*", first)
    if name and name.group(0) in rules and depth < 8:
        return kind_of(rules, rules[name.group(0)], depth + 1)
    return "text"


def _request_shapes(rules: dict[str, str]) -> dict[str, RequestShape]:
    """Each request rule's op name and args fields (the fuzzer's raw material)."""
    shapes = {}
    for name in _request_rules(rules):
        definition = rules[name]
        op = re.search(r'op:\s*"([^"]+)"', definition)
        if op is None:
            continue
        args = re.search(r"(\?\s*)?args:\s*\{", definition)
        if args is None:
            shapes[op.group(1)] = RequestShape(op.group(1), None, True)
            continue
        body = _balanced_body(definition, args.end() - 1)
        fields = tuple(
            Field(
                field.group(2),
                field.group(3).strip(),
                bool(field.group(1)),
                kind_of(rules, field.group(3)),
            )
            for field in re.finditer(
                r'(\?\s*)?"?([a-z][a-z0-9-]*)"?\s*:\s*([^,]+(?:\([^)]*\)[^,]*)?),', body + ","
            )
        )
        shapes[op.group(1)] = RequestShape(op.group(1), fields, bool(args.group(1)))
    return shapes


def _balanced_body(text: str, open_brace: int) -> str:
    """The text inside the brace at ``open_brace`` and its matching close."""
    depth = 0
    for index in range(open_brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[open_brace + 1 : index]
    raise ValueError("unbalanced braces in protocol.cddl")
