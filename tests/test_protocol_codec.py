"""Framing and the hardened CBOR codec, with no I/O at all."""

from __future__ import annotations

import struct

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmipd.protocol import (
    ErrorCode,
    FrameReader,
    ProtocolError,
    decode_item,
    encode_deterministic,
    encode_frame,
)
from kmipd.protocol._codec import MAX_DEPTH, ItemDecoder

# -- framing --------------------------------------------------------------------------


def test_frames_split_one_byte_at_a_time_reassemble() -> None:
    payloads = [b"a", b"", b"x" * 300, b"\x00\x01"]
    stream = b"".join(encode_frame(p) for p in payloads)
    reader = FrameReader(max_frame_size=1024)
    out = []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        while (frame := reader.next_frame()) is not None:
            out.append(frame)
    assert out == payloads
    assert reader.buffered == 0


def test_oversized_length_prefix_is_refused_before_the_body_arrives() -> None:
    reader = FrameReader(max_frame_size=100)
    reader.feed(struct.pack(">I", 101))  # only the header: no body was sent
    with pytest.raises(ProtocolError) as caught:
        reader.next_frame()
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE
    assert "101" in caught.value.message and "100" in caught.value.message


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    reader = FrameReader(max_frame_size=100)
    reader.feed(encode_frame(b"y" * 100))
    assert reader.next_frame() == b"y" * 100


def test_reader_refuses_use_after_a_framing_error() -> None:
    reader = FrameReader(max_frame_size=4)
    reader.feed(struct.pack(">I", 5))
    with pytest.raises(ProtocolError):
        reader.next_frame()
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


@given(
    payloads=st.lists(st.binary(max_size=70), max_size=20),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=40),
)
def test_any_chunking_yields_the_same_frames(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    reader = FrameReader(max_frame_size=70)
    out, position = [], 0
    for size in [*cuts, len(stream)]:
        reader.feed(stream[position : position + size])
        position += size
        while (frame := reader.next_frame()) is not None:
            out.append(frame)
    assert out == payloads


# -- hardened CBOR -----------------------------------------------------------------------


def _refusal(data: bytes) -> str:
    with pytest.raises(ProtocolError) as caught:
        decode_item(data)
    assert caught.value.code is ErrorCode.BAD_REQUEST
    return caught.value.message


def test_plain_values_decode() -> None:
    item = {
        "id": 7,
        "op": "get-dek",
        "args": {"dek-id": "x", "b": b"\x00", "l": [1, -2, True, None]},
    }
    assert decode_item(cbor2.dumps(item)) == item


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty frame"),
        (b"\xff", "invalid CBOR"),
        (bytes.fromhex("0102"), "trailing bytes"),
        (bytes.fromhex("a2616101616102"), "duplicate map key"),
        (bytes.fromhex("9f01ff"), "indefinite-length"),
        (bytes.fromhex("5f4101ff"), "indefinite-length"),
        (bytes.fromhex("62c328"), "UTF-8"),
        (bytes.fromhex("a1"), "truncated"),
        (bytes.fromhex("f93c00"), "unsupported CBOR type"),  # half float 1.0
        (bytes.fromhex("f7"), "unsupported CBOR type"),  # undefined
        (bytes.fromhex("f0"), "unsupported CBOR type"),  # simple(16)
        (bytes.fromhex("a1010a"), "map keys must be text"),
        (b"\x81" * (MAX_DEPTH + 1) + b"\x01", "nesting"),
    ],
)
def test_refusals_name_the_rule_broken(data: bytes, expected: str) -> None:
    assert expected in _refusal(data)


@pytest.mark.parametrize(
    "tag",
    [
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
        6,
        24,
        1000,
        2**32,
        2**64 - 1,
    ],
)
def test_every_tag_is_refused(tag: int) -> None:
    assert _refusal(cbor2.dumps(cbor2.CBORTag(tag, 0))) == "CBOR tags are not allowed"


@pytest.mark.slow
def test_no_tag_up_to_65536_slips_through() -> None:
    """Guards the list of tags cbor2 decodes itself: a new one in an upgrade fails here."""
    for tag in range(65537):
        data = cbor2.dumps(cbor2.CBORTag(tag, 0))
        with pytest.raises(ProtocolError):
            decode_item(data)


def test_shared_reference_cycles_are_refused() -> None:
    # tag 28 (shareable) around an array holding tag 29 (reference to itself)
    assert _refusal(bytes.fromhex("d81c81d81d00")) == "CBOR tags are not allowed"


def test_non_preferred_integer_encoding_is_accepted() -> None:
    # The spec asks encoders for preferred serialisation but decoders accept any.
    assert decode_item(bytes.fromhex("1b00000000000000ff")) == 255


def test_deterministic_encoding_sorts_keys_bytewise() -> None:
    # RFC 8949 4.2.1: "b" (0x61 62) sorts before "aa" (0x62 61 61) because
    # the length is part of the encoded key; cbor2's canonical mode agrees
    # here, but both differ from plain string order.
    encoded = encode_deterministic({"aa": 1, "b": 2, "c": {"zz": 1, "y": 2}})
    assert encoded == cbor2.dumps({"b": 2, "c": {"y": 2, "zz": 1}, "aa": 1})


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    """h11's fuzz invariant: parse it, or raise our protocol error, never anything else."""
    try:
        decode_item(data)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
).filter(lambda value: _depth(value) <= MAX_DEPTH)


@given(_plain)
def test_plain_values_round_trip(value: object) -> None:
    assert decode_item(cbor2.dumps(value)) == value


# -- one decoder reused for every frame of a connection -------------------------------------

_REFUSED_FRAMES = [
    b"",
    b"\xff",
    bytes.fromhex("0102"),
    bytes.fromhex("a2616101616102"),
    bytes.fromhex("9f01ff"),
    bytes.fromhex("62c328"),
    bytes.fromhex("a1"),
    bytes.fromhex("f93c00"),
    bytes.fromhex("d81c01"),  # shareable (tag 28)
    bytes.fromhex("d9010081"),  # stringref namespace (tag 256), then a truncated array
    b"\x81" * (MAX_DEPTH + 1) + b"\x01",
    b"\x81" * (MAX_DEPTH - 1) + b"\x61",  # truncated at the deepest level
]


def test_a_reused_decoder_refuses_like_a_fresh_one_and_then_decodes_the_next_frame() -> None:
    decoder = ItemDecoder()
    # The deepest frame allowed.
    deepest = cbor2.dumps(_nest(MAX_DEPTH - 2, {"k": [b"\x00", None, True, -1]}))
    for bad in _REFUSED_FRAMES * 3:
        with pytest.raises(ProtocolError) as caught:
            decoder.decode(bad)
        assert caught.value.message == _refusal(bad)
        # Nothing the refused frame left behind changes the next one.
        assert decoder.decode(deepest) == decode_item(deepest)


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=60) | _plain.map(cbor2.dumps), max_size=12))
def test_one_decoder_over_many_frames_agrees_with_a_fresh_decoder_each(
    frames: list[bytes],
) -> None:
    decoder = ItemDecoder()
    for frame in frames:
        try:
            expected: object = decode_item(frame)
        except ProtocolError as exc:
            expected = exc.message
        try:
            got: object = decoder.decode(frame)
        except ProtocolError as exc:
            got = exc.message
        assert got == expected


def _nest(levels: int, inner: object) -> object:
    for _ in range(levels):
        inner = [inner]
    return inner
