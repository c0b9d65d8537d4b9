"""The KMIP TTLV codec and connection state machine, with no sockets.

Invariants (h11's habit): every input either decodes or raises our
KmipCodecError; encode then decode is the identity; a connection fed one
byte at a time sees the same messages as one fed everything at once.
"""

from __future__ import annotations

import contextlib
import struct
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmipd.kmip import (
    ANSWERED,
    NEED_DATA,
    TAGS,
    BatchResult,
    ConnectionEnded,
    Item,
    ItemType,
    KmipCodecError,
    KmipConnection,
    RequestReceived,
    ResultReason,
    ResultStatus,
    byte_string,
    decode_ttlv,
    encode_ttlv,
    enumeration,
    integer,
    structure,
    text,
    version_item,
)

with warnings.catch_warnings():
    # PyKMIP 0.11 imports SQLAlchemy 1.x names at import time; nothing else is silenced.
    warnings.simplefilter("ignore", DeprecationWarning)
    from kmip.core import enums, utils
    from kmip.core.messages import contents, messages, payloads

_TAG = st.integers(min_value=0x420001, max_value=0x420160)
_SCALARS = st.one_of(
    st.builds(Item, _TAG, st.just(ItemType.INTEGER), st.integers(-(2**31), 2**31 - 1)),
    st.builds(Item, _TAG, st.just(ItemType.LONG_INTEGER), st.integers(-(2**63), 2**63 - 1)),
    st.builds(Item, _TAG, st.just(ItemType.BIG_INTEGER), st.integers(-(2**300), 2**300)),
    st.builds(Item, _TAG, st.just(ItemType.ENUMERATION), st.integers(0, 2**32 - 1)),
    st.builds(Item, _TAG, st.just(ItemType.BOOLEAN), st.booleans()),
    st.builds(Item, _TAG, st.just(ItemType.TEXT_STRING), st.text(max_size=40)),
    st.builds(Item, _TAG, st.just(ItemType.BYTE_STRING), st.binary(max_size=40)),
    st.builds(Item, _TAG, st.just(ItemType.DATE_TIME), st.integers(-(2**63), 2**63 - 1)),
    st.builds(Item, _TAG, st.just(ItemType.INTERVAL), st.integers(0, 2**32 - 1)),
    st.builds(Item, _TAG, st.just(ItemType.DATE_TIME_EXTENDED), st.integers(-(2**63), 2**63 - 1)),
)
_ITEMS = st.recursive(
    _SCALARS,
    lambda children: st.builds(
        Item, _TAG, st.just(ItemType.STRUCTURE), st.lists(children, max_size=5).map(tuple)
    ),
    max_leaves=30,
)


@given(_ITEMS)
def test_encode_then_decode_is_identity(item: Item) -> None:
    data = encode_ttlv(item)
    assert len(data) % 8 == 0
    assert decode_ttlv(data) == item
    assert encode_ttlv(decode_ttlv(data)) == data


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_our_error(data: bytes) -> None:
    try:
        decode_ttlv(data)
    except KmipCodecError as exc:
        assert exc.reason is ResultReason.INVALID_MESSAGE


@given(_ITEMS, st.data())
def test_mutated_messages_decode_or_raise_our_error(item: Item, data: st.DataObject) -> None:
    encoded = bytearray(encode_ttlv(item))
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    with contextlib.suppress(KmipCodecError):
        decode_ttlv(bytes(encoded[:cut]))


def test_known_encoding_from_the_specification() -> None:
    # KMIP 1.4 spec, 9.1.2 examples: an Integer 8 and a Text String "Hello World".
    assert encode_ttlv(Item(0x420020, ItemType.INTEGER, 8)).hex() == (
        "42002002000000040000000800000000"
    )
    assert encode_ttlv(Item(0x420020, ItemType.TEXT_STRING, "Hello World")).hex() == (
        "420020070000000b48656c6c6f20576f726c640000000000"
    )
    assert encode_ttlv(
        Item(0x420020, ItemType.BIG_INTEGER, 1234567890000000000000000000)
    ).hex() == ("42002004000000100000000003fd35eb6bc2df4618080000")


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (bytes.fromhex("4200200200000008" + "00" * 8), "must have length 4"),
        (bytes.fromhex("42002002000000040000000800000001"), "non-zero padding"),
        (bytes.fromhex("4200200600000008" + "00" * 7 + "02"), "Boolean"),
        (bytes.fromhex("4200200700000002ffff000000000000"), "UTF-8"),
        (bytes.fromhex("420020ff00000000"), "unknown item type"),
        (bytes.fromhex("4200200100000010" + "4200200200000040"), "runs past"),
        (bytes.fromhex("4200200400000004" + "00" * 8), "Big Integer"),
        (bytes.fromhex("4200200100000004" + "00" * 8), "multiple of 8"),
        (bytes.fromhex("4200200200000004000000080000000000"), "after the message"),
    ],
)
def test_malformed_items_name_the_problem(data: bytes, what: str) -> None:
    with pytest.raises(KmipCodecError, match=what) as caught:
        decode_ttlv(data)
    assert caught.value.reason is ResultReason.INVALID_MESSAGE


def test_a_length_past_the_structure_is_refused_before_allocating() -> None:
    # A child announcing 4 GiB inside a 16-byte structure: refused, not sliced.
    data = bytes.fromhex("4200200100000010") + bytes.fromhex("42002008ffffff00") + bytes(8)
    with pytest.raises(KmipCodecError, match="runs past"):
        decode_ttlv(data)


def test_depth_is_bounded() -> None:
    item = Item(0x420020, ItemType.INTEGER, 1)
    for _ in range(40):
        item = Item(0x420020, ItemType.STRUCTURE, (item,))
    with pytest.raises(KmipCodecError, match="too deep"):
        decode_ttlv(encode_ttlv(item))


def test_byte_strings_are_redacted_in_repr() -> None:
    item = byte_string("KeyMaterial", b"\x01" * 32)
    assert "01" not in repr(item)
    assert "32 bytes" in repr(item)


# -- messages and the connection -------------------------------------------------------------


def _request(*items: Item, version: tuple[int, int] = (1, 2), count: int | None = None) -> bytes:
    header = structure(
        "RequestHeader",
        version_item(version),
        integer("BatchCount", len(items) if count is None else count),
    )
    return encode_ttlv(structure("RequestMessage", header, *items))


def _batch_item(operation: str, uid: bytes | None = None, *payload: Item) -> Item:
    return structure(
        "BatchItem",
        enumeration("Operation", operation),
        None if uid is None else byte_string("UniqueBatchItemId", uid),
        structure("RequestPayload", *payload),
    )


def _response_items(data: bytes) -> list[Item]:
    message = decode_ttlv(data)
    assert message.tag == TAGS["ResponseMessage"]
    return message.find_all("BatchItem")


def _answer_all(conn: KmipConnection) -> list[RequestReceived]:
    received = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or isinstance(event, ConnectionEnded):
            return received
        if event is ANSWERED:
            continue
        assert isinstance(event, RequestReceived)
        received.append(event)
        results = [BatchResult(item.operation, item.unique_id) for item in event.message.items]
        conn.send_response(event.message, results, 1_700_000_000)


def test_a_request_is_parsed_into_batch_items() -> None:
    conn = KmipConnection()
    conn.receive_data(
        _request(
            _batch_item("Create", b"\x01", text("UniqueIdentifier", "a")),
            _batch_item("Get", b"\x02"),
            version=(1, 4),
        )
    )
    event = conn.next_event()
    assert isinstance(event, RequestReceived)
    assert event.message.header.version == (1, 4)
    assert [item.unique_id for item in event.message.items] == [b"\x01", b"\x02"]
    conn.send_response(
        event.message,
        [BatchResult(item.operation, item.unique_id) for item in event.message.items],
        1_700_000_000,
    )
    items = _response_items(conn.data_to_send())
    assert [i.find("UniqueBatchItemId").value for i in items] == [b"\x01", b"\x02"]  # type: ignore[union-attr]
    assert conn.next_event() is NEED_DATA


@settings(max_examples=20)
@given(st.integers(1, 4))
def test_byte_by_byte_feeding_sees_the_same_messages(count: int) -> None:
    data = b"".join(_request(_batch_item("Get", bytes([n]))) for n in range(count))
    whole = KmipConnection()
    whole.receive_data(data)
    trickled = KmipConnection()
    seen = []
    for byte in data:
        trickled.receive_data(bytes([byte]))
        seen += _answer_all(trickled)
    assert [e.message for e in seen] == [e.message for e in _answer_all(whole)]
    assert len(seen) == count


def test_a_malformed_message_is_answered_and_the_next_one_served() -> None:
    conn = KmipConnection()
    bad_count = _request(_batch_item("Get"), count=3)
    bad_padding = bytearray(_request(_batch_item("Query")))
    bad_padding[-1] = 1  # Query's payload is empty: the last byte is the enum's padding
    conn.receive_data(bad_count + bytes(bad_padding) + _request(_batch_item("Get", b"ok")))
    served = _answer_all(conn)
    assert len(served) == 1
    assert served[0].message.items[0].unique_id == b"ok"
    out = conn.data_to_send()
    # three responses: two errors (Invalid Message), then the answer
    responses = []
    view = memoryview(out)
    while view:
        length = struct.unpack(">I", view[4:8])[0] + 8
        responses.append(bytes(view[:length]))
        view = view[length:]
    assert len(responses) == 3
    for response in responses[:2]:
        (item,) = _response_items(response)
        assert item.find("ResultStatus").value == ResultStatus.OPERATION_FAILED  # type: ignore[union-attr]
        assert item.find("ResultReason").value == ResultReason.INVALID_MESSAGE  # type: ignore[union-attr]


def test_a_malformed_batch_item_fails_only_itself() -> None:
    conn = KmipConnection()
    broken = structure("BatchItem", enumeration("Operation", "Get"))  # no payload
    conn.receive_data(_request(_batch_item("Get", b"1"), broken))
    event = conn.next_event()
    assert isinstance(event, RequestReceived)
    first, second = event.message.items
    assert first.error is None
    assert second.error is not None
    assert second.error.reason is ResultReason.INVALID_MESSAGE


def test_an_oversized_message_is_refused_from_its_header_and_ends_the_connection() -> None:
    conn = KmipConnection(max_message_size=1024)
    conn.receive_data(bytes.fromhex("4200780100100000"))  # 1 MiB announced
    event = conn.next_event()
    assert isinstance(event, ConnectionEnded)
    assert event.error is not None
    (item,) = _response_items(conn.data_to_send())
    assert item.find("ResultReason").value == ResultReason.INVALID_MESSAGE  # type: ignore[union-attr]
    assert not conn.has_partial_message


def test_a_response_message_echoes_the_request_version() -> None:
    conn = KmipConnection()
    conn.receive_data(_request(_batch_item("Query"), version=(2, 0)))
    _answer_all(conn)
    header = decode_ttlv(conn.data_to_send()).find("ResponseHeader")
    assert header is not None
    version = header.find("ProtocolVersion")
    assert version is not None
    assert [c.value for c in version.children] == [2, 0]


def test_pykmip_encoded_request_decodes() -> None:
    """A message from an encoder nobody here wrote: PyKMIP's own."""
    header = messages.RequestHeader(
        protocol_version=contents.ProtocolVersion(1, 2), batch_count=contents.BatchCount(1)
    )
    batch = messages.RequestBatchItem(
        operation=contents.Operation(enums.Operation.GET),
        request_payload=payloads.GetRequestPayload(unique_identifier="key-1"),
    )
    stream = utils.BytearrayStream()
    messages.RequestMessage(request_header=header, batch_items=[batch]).write(stream)
    data = stream.buffer
    conn = KmipConnection()
    conn.receive_data(bytes(data))
    event = conn.next_event()
    assert isinstance(event, RequestReceived)
    (item,) = event.message.items
    assert item.payload is not None
    uid = item.payload.find("UniqueIdentifier")
    assert uid is not None
    assert uid.value == "key-1"
    assert encode_ttlv(decode_ttlv(bytes(data))) == bytes(data)
