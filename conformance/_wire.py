"""Frames and CBOR as the suite speaks them, written independently of the daemon.

The suite carries its own small codec on purpose: a conformance test that
reused the server's parser would share its bugs. Requests are encoded with
cbor2 (or by hand, byte for byte, where a case needs a malformed or unusual
encoding); responses are first walked by ``scan_item``, which enforces the
protocol's CBOR profile on the server's output (definite lengths, no tags, no
floats or odd simple values), and only then decoded.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import attrs
import cbor2

HEADER = struct.Struct(">I")
#: The largest response frame the suite accepts (the protocol caps frames at 2**32-1).
MAX_RESPONSE_FRAME = 16 * 1024 * 1024


def frame(payload: bytes) -> bytes:
    """A frame: 4-byte big-endian length, then the payload."""
    return HEADER.pack(len(payload)) + payload


def encode(item: object) -> bytes:
    """Preferred-serialization CBOR of plain values (cbor2 keeps map insertion order)."""
    return cbor2.dumps(item)


def request_frame(request_id: int, op: str, args: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"id": request_id, "op": op}
    if args is not None:
        message["args"] = args
    return frame(encode(message))


class MalformedCbor(Exception):  # noqa: N818 (a verdict about the peer's bytes)
    """The bytes are not one well-formed CBOR item."""


@attrs.frozen
class Scan:
    """What walking one CBOR item found."""

    end: int
    #: Breaches of the protocol's CBOR profile (tags, indefinite lengths, floats...).
    profile_violations: tuple[str, ...]
    #: Integers or lengths not in their shortest form (the spec says encoders "should").
    non_preferred: bool


def scan_item(data: bytes, offset: int = 0) -> Scan:
    """Walk one CBOR item at ``offset`` without decoding it; raise MalformedCbor if broken."""
    walk = _Walk(data, offset)
    # Items still to read per open container (-1: an indefinite one, until its break).
    pending = [1]
    while pending:
        if pending[-1] == 0:
            pending.pop()
        elif walk.at_break():
            if pending.pop() != -1:
                raise MalformedCbor("break byte outside an indefinite-length item")
        else:
            if pending[-1] > 0:
                pending[-1] -= 1
            children = walk.item_head()
            if children:
                pending.append(children)
    return Scan(walk.position, tuple(walk.violations), walk.non_preferred)


class _Walk:
    """A cursor over CBOR bytes that reads one head at a time and notes what it sees."""

    def __init__(self, data: bytes, position: int) -> None:
        self.data = data
        self.position = position
        self.violations: list[str] = []
        self.non_preferred = False

    def at_break(self) -> bool:
        if self.position >= len(self.data):
            raise MalformedCbor("truncated CBOR item")
        if self.data[self.position] == 0xFF:
            self.position += 1
            return True
        return False

    def item_head(self) -> int:
        """Read one head (and a string's content); return how many items it contains."""
        initial = self.data[self.position]
        major, info = initial >> 5, initial & 0x1F
        self.position += 1
        if info == 31:
            if major in (0, 1, 6, 7):
                raise MalformedCbor(f"reserved indefinite encoding for major type {major}")
            self.violations.append("indefinite-length item")
            return -1
        if 28 <= info <= 30:
            raise MalformedCbor(f"reserved additional information {info}")
        argument, width = _argument(self.data, self.position, info)
        self.position += width
        if width and argument < (24 if width == 1 else 1 << (4 * width)):
            self.non_preferred = True
        if major in (2, 3):
            self._string(major, argument)
            return 0
        if major == 6:
            self.violations.append(f"tag {argument}")
        elif major == 7 and info in (25, 26, 27):
            self.violations.append("floating-point value")
        elif major == 7 and not 20 <= info <= 22:
            self.violations.append(f"simple value {argument if info == 24 else info}")
        return {4: argument, 5: 2 * argument, 6: 1}.get(major, 0)

    def _string(self, major: int, length: int) -> None:
        end = self.position + length
        if end > len(self.data):
            raise MalformedCbor("truncated string")
        if major == 3:
            try:
                self.data[self.position : end].decode("utf-8")
            except UnicodeDecodeError:
                self.violations.append("invalid UTF-8 in a text string")
        self.position = end


def _argument(data: bytes, position: int, info: int) -> tuple[int, int]:
    if info < 24:
        return info, 0
    width = 1 << (info - 24)  # 24..27 -> 1, 2, 4, 8 bytes
    if position + width > len(data):
        raise MalformedCbor("truncated CBOR head")
    return int.from_bytes(data[position : position + width], "big"), width


def decode_strict(payload: bytes) -> Any:
    """Decode a frame's payload that ``scan_item`` found clean; refuse duplicate map keys."""
    stream = io.BytesIO(payload)
    decoder = cbor2.CBORDecoder(stream, allow_duplicate_keys=False, str_errors="strict")
    try:
        item = decoder.decode()
    except cbor2.CBORDecodeError as exc:
        raise MalformedCbor(str(exc)) from None
    if stream.tell() != len(payload):
        raise MalformedCbor(f"{len(payload) - stream.tell()} trailing bytes after the item")
    return item


# -- hand-made encodings, for inputs cbor2 will not produce ----------------------------


def head(major: int, argument: int, *, width: int | None = None) -> bytes:
    """A CBOR head; ``width`` (1, 2, 4, 8) forces a longer-than-needed argument."""
    if width is None:
        if argument < 24:
            return bytes([major << 5 | argument])
        width = next(w for w in (1, 2, 4, 8) if argument < 1 << (8 * w))
    info = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | info]) + argument.to_bytes(width, "big")


def text(value: str) -> bytes:
    raw = value.encode()
    return head(3, len(raw)) + raw


def cbor_map(*pairs: tuple[bytes, bytes]) -> bytes:
    """A definite map from already-encoded keys and values, in the order given."""
    return head(5, len(pairs)) + b"".join(k + v for k, v in pairs)


# -- rendering, for reports ----------------------------------------------------------------


def hex_preview(data: bytes, limit: int = 16) -> str:
    """The first bytes of a frame; 16 stop short of any key a result carries."""
    shown = data[:limit].hex(" ")
    return shown + (f" ... ({len(data)} bytes)" if len(data) > limit else "")


def describe(item: Any, *, depth: int = 0) -> str:
    """A short diagnostic rendering; any ``key`` field is shown by length only."""
    if depth > 6:
        return "..."
    if isinstance(item, dict):
        parts = []
        for index, (name, value) in enumerate(item.items()):
            if index == 8:
                parts.append("...")
                break
            shown = (
                f"<{len(value)} bytes>"
                if name == "key" and isinstance(value, bytes)
                else describe(value, depth=depth + 1)
            )
            parts.append(f"{describe(name, depth=depth + 1)}: {shown}")
        return "{" + ", ".join(parts) + "}"
    if isinstance(item, list | tuple):
        inner = [describe(v, depth=depth + 1) for v in item[:8]]
        return "[" + ", ".join(inner + (["..."] if len(item) > 8 else [])) + "]"
    if isinstance(item, bytes):
        return f"h'{item[:12].hex()}{'...' if len(item) > 12 else ''}'({len(item)} bytes)"
    if isinstance(item, str):
        return repr(item if len(item) <= 80 else item[:77] + "...")
    return repr(item)
