"""Hardened CBOR: decode one frame into plain Python values, or refuse it.

cbor2 decodes permissively by default (duplicate keys, trailing bytes,
semantic tags such as regexes and shared references, depth 400). The
protocol allows none of that: a frame is exactly one definite-length data
item built from unsigned/negative integers, text, bytes, arrays, maps with
text keys, booleans and null.
"""

from __future__ import annotations

import io
from typing import Any, NoReturn

import cbor2

from kmipd.protocol._errors import ErrorCode, ProtocolError

#: Deepest nesting a valid message has is 4 (response -> result -> list -> entry).
MAX_DEPTH = 8

# cbor2 resolves these tags itself, before a tag_hook would see them; each
# is overridden with a refusal. The test suite checks every tag up to 2**16
# and a sample beyond, so a cbor2 release that learns a new tag fails CI
# instead of silently widening what we accept.
_CBOR2_BUILTIN_TAGS = (
    0,
    1,
    2,
    3,
    4,
    5,
    25,
    28,
    29,
    30,
    35,
    36,
    37,
    52,
    54,
    100,
    256,
    258,
    260,
    261,
    1004,
    43000,
    55799,
)


class _TagRefusedError(Exception):
    pass


def _refuse_tag(*_args: object) -> NoReturn:
    raise _TagRefusedError


def _refuse_unknown_tag(tag: cbor2.CBORTag, _immutable: bool) -> NoReturn:
    raise _TagRefusedError


_REFUSE_SEMANTIC = dict.fromkeys(_CBOR2_BUILTIN_TAGS, _refuse_tag)

_PLAIN_TYPES = frozenset({int, str, bytes, bool, type(None)})


def decode_item(frame: bytes) -> Any:
    """Decode exactly one CBOR data item that fills ``frame``.

    Raises ProtocolError(BAD_REQUEST) for anything else. The message says
    what rule was broken, never what the bytes were.
    """
    return ItemDecoder().decode(frame)


def _new_decoder() -> cbor2.CBORDecoder:
    return cbor2.CBORDecoder(
        io.BytesIO(),
        tag_hook=_refuse_unknown_tag,
        semantic_decoders=_REFUSE_SEMANTIC,
        max_depth=MAX_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        str_errors="strict",
    )


class ItemDecoder:
    """``decode_item`` for one connection: one cbor2 decoder reused for every frame.

    Making the decoder is half the cost of decoding a get-dek (measured:
    3.0 -> 1.5 us); after any refusal it is made afresh, so nothing a bad
    frame left in it can reach the next. Not thread-safe: one per connection.
    """

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = _new_decoder()

    def decode(self, frame: bytes) -> Any:
        if not frame:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "empty frame: a frame holds one CBOR item")
        stream = io.BytesIO(frame)
        decoder = self._decoder
        decoder.fp = stream
        try:
            item = decoder.decode()
        except cbor2.CBORDecodeError as exc:
            self._decoder = _new_decoder()
            raise ProtocolError(ErrorCode.BAD_REQUEST, _describe_decode_error(exc)) from None
        except RecursionError:
            self._decoder = _new_decoder()
            raise ProtocolError(ErrorCode.BAD_REQUEST, "CBOR nesting too deep") from None
        finally:
            decoder.fp = _EMPTY  # the frame is not kept past its decode
        if stream.tell() != len(frame):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"trailing bytes: the frame holds {len(frame) - stream.tell()} bytes "
                "after its CBOR item",
            )
        _check_plain(item)
        return item


_EMPTY = io.BytesIO()


#: cbor2 reports its refusals as text; these fragments map them to our messages.
_DECODE_ERROR_MESSAGES = (
    ("semantic tag", "CBOR tags are not allowed"),
    ("indefinite length", "indefinite-length CBOR items are not allowed"),
    ("Duplicate map key", "duplicate map key"),
    ("nesting depth", f"CBOR nesting deeper than {MAX_DEPTH} levels"),
    ("premature end of stream", "truncated CBOR item"),
    ("text string", "invalid UTF-8 in a text string"),
)


def _describe_decode_error(exc: cbor2.CBORDecodeError) -> str:
    if isinstance(exc.__cause__ or exc.__context__, _TagRefusedError):
        return "CBOR tags are not allowed"
    text = str(exc)
    for fragment, message in _DECODE_ERROR_MESSAGES:
        if fragment in text:
            return message
    return "invalid CBOR"


def _check_plain(item: Any) -> None:
    """Refuse floats, simple values, undefined and non-text map keys.

    Iterative, so a hostile shape cannot exhaust the Python stack; cbor2's
    max_depth already bounds the depth. Exact types (cbor2 makes no
    subclasses of these), so a flat map of scalars costs one set look-up a value.
    """
    pending = [item]
    while pending:
        value = pending.pop()
        kind = type(value)
        if kind is dict:
            for key, member in value.items():
                if type(key) is not str:
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "map keys must be text strings")
                if type(member) not in _PLAIN_TYPES:
                    pending.append(member)
        elif kind is list:
            pending.extend(value)
        elif kind not in _PLAIN_TYPES:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                "unsupported CBOR type: only integers, text, bytes, arrays, maps, "
                "booleans and null are allowed",
            )


def encode_item(item: object) -> bytes:
    """Encode a message built from plain values (no tags, definite lengths)."""
    return cbor2.dumps(item)


#: A tuple made once: ``dict | list | tuple`` inside the loop built a union per item.
_CONTAINERS = (dict, list, tuple)


def encode_deterministic(item: object) -> bytes:
    """RFC 8949 section 4.2.1 deterministic encoding, for bytes we authenticate.

    cbor2's ``canonical=True`` sorts map keys length-first (the older RFC 7049
    rule); RFC 8949 sorts by the bytewise order of the encoded keys, so the
    maps are sorted here before cbor2 writes them (it keeps insertion order).
    """
    if isinstance(item, list) and not any(isinstance(x, _CONTAINERS) for x in item):
        return cbor2.dumps(item)  # no maps to sort: the common case (associated data)
    return cbor2.dumps(_sorted_maps(item))


def _sorted_maps(item: object) -> object:
    if isinstance(item, dict):
        return {
            key: _sorted_maps(value)
            for key, value in sorted(item.items(), key=lambda pair: cbor2.dumps(pair[0]))
        }
    if isinstance(item, list | tuple):
        return [_sorted_maps(member) for member in item]
    return item
