"""The server under hostile and unusual input: documented errors, neighbours unaffected."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import cbor2
import pycddl
import pytest
import trio

from kmipd.net._trio_tls import TlsHandshakeError
from kmipd.protocol import encode_frame
from tests.conftest import RawConnection, RunningServer, ServerFactory

SCHEMA_TEXT = (Path(__file__).parent.parent / "conformance" / "protocol.cddl").read_text()
MESSAGE_SCHEMA = pycddl.Schema(SCHEMA_TEXT)


def assert_valid(message: Any) -> None:
    """Validate against the normative CDDL; raises pycddl.ValidationError otherwise."""
    MESSAGE_SCHEMA.validate_cbor(cbor2.dumps(message))


async def assert_other_clients_unaffected(kmipd: RunningServer) -> None:
    async with kmipd.async_client() as kms:
        dek = await kms.create_dek("neighbours")
        assert (await kms.get_dek(dek.dek_id)).key_bytes() == dek.key_bytes()


# -- every operation's real messages validate against the CDDL ------------------------------


async def test_real_requests_and_responses_match_the_cddl(kmipd: RunningServer) -> None:
    storage = await kmipd.raw("storage", hello=False)
    admin = await kmipd.raw("admin")
    requests = [
        {"id": 1, "op": "hello", "args": {"versions": [1], "client": "test"}},
        {"id": 2, "op": "status"},
        {"id": 3, "op": "create-dek", "args": {"namespace": "orders/eu"}},
        {"id": 4, "op": "generate-data-key", "args": {"kek": "orders/eu", "context": {"a": "b"}}},
        {"id": 5, "op": "get-dek", "args": {"dek-id": "dek_missing"}},
    ]
    responses = {}
    for request in requests:
        assert_valid(request)
        await storage.send(request)
        response = await storage.receive()
        assert_valid(response)
        responses[response["id"]] = response
    dek_id = responses[3]["result"]["dek-id"]
    blob = responses[4]["result"]["blob"]
    pycddl.Schema("root = data-key-blob\n" + SCHEMA_TEXT).validate_cbor(blob)
    follow_ups = [
        (storage, {"id": 6, "op": "get-dek", "args": {"dek-id": dek_id}}),
        (storage, {"id": 7, "op": "unwrap", "args": {"blob": blob, "context": {"a": "b"}}}),
        (storage, {"id": 8, "op": "unwrap", "args": {"blob": blob}}),
        (admin, {"id": 9, "op": "create-kek", "args": {"name": "payments"}}),
        (admin, {"id": 10, "op": "list-keks", "args": {"prefix": "pay"}}),
        (admin, {"id": 11, "op": "list-keks"}),
    ]
    for connection, request in follow_ups:
        assert_valid(request)
        await connection.send(request)
        response = await connection.receive()
        assert_valid(response)
        assert response["id"] == request["id"]
    await storage.aclose()
    await admin.aclose()


def test_the_schema_refuses_what_the_server_refuses() -> None:
    for bad in (
        {"id": 1, "op": "create-dek", "args": {"namespace": "a//b"}},
        {"id": 1, "op": "get-dek", "args": {"dek-id": "x", "extra": 1}},
        {"id": -1, "op": "status"},
        {"error": {"code": 999, "name": "x", "message": "y"}},
    ):
        with pytest.raises(pycddl.ValidationError):
            assert_valid(bad)


# -- pipelining ---------------------------------------------------------------------------


async def test_pipelined_requests_complete_out_of_order(kmipd: RunningServer) -> None:
    raw = await kmipd.raw()
    await raw.send({"id": 1, "op": "create-dek", "args": {"namespace": "orders"}})
    created = await raw.receive()
    dek_id = created["result"]["dek-id"]
    # One write: a create (durable write on a worker thread) then a get of a
    # DEK the server has just cached (no thread hop): the get finishes first.
    await raw.send_raw(
        encode_frame(cbor2.dumps({"id": 2, "op": "create-dek", "args": {"namespace": "orders"}}))
        + encode_frame(cbor2.dumps({"id": 3, "op": "get-dek", "args": {"dek-id": dek_id}}))
    )
    first, second = await raw.receive(), await raw.receive()
    assert [first["id"], second["id"]] == [3, 2]
    assert first["result"]["key"] == created["result"]["key"]
    await raw.aclose()


async def test_in_flight_limit_pushes_back_without_losing_requests(
    start_server: ServerFactory,
) -> None:
    kmipd = await start_server(max_in_flight=2)
    raw = await kmipd.raw()
    frames = b"".join(
        encode_frame(cbor2.dumps({"id": i, "op": "create-dek", "args": {"namespace": "n"}}))
        for i in range(1, 41)
    )
    await raw.send_raw(frames)
    answered = {(await raw.receive())["id"] for _ in range(40)}
    assert answered == set(range(1, 41))
    await raw.aclose()


# -- malformed input: documented error, connection and neighbours survive ----------------------


@pytest.mark.parametrize(
    ("payload", "name"),
    [
        (b"", "bad-request"),
        (b"\xff\x00", "bad-request"),
        (cbor2.dumps({"id": 1, "op": "status"}) + b"\x00", "bad-request"),
        (b"\x81" * 40 + b"\x00", "bad-request"),
        (cbor2.dumps({"id": 1, "op": "rotate-everything"}), "unknown-operation"),
        (cbor2.dumps({"id": 1, "op": "create-dek", "args": {"namespace": 42}}), "bad-request"),
        (cbor2.dumps({"id": 1, "op": "get-dek", "args": {"dek-id": b"bytes"}}), "bad-request"),
        (cbor2.dumps({"id": 1, "op": "unwrap", "args": {"blob": b"not a blob"}}), "bad-request"),
        (bytes.fromhex("a262696401626f70667374617475736269640102"), "bad-request"),  # dup key
        (cbor2.dumps(cbor2.CBORTag(55799, {"id": 1, "op": "status"})), "bad-request"),
        (bytes.fromhex("bf626964 01626f70 66737461 747573ff".replace(" ", "")), "bad-request"),
    ],
)
async def test_malformed_frame_gets_its_error_and_the_connection_continues(
    kmipd: RunningServer, payload: bytes, name: str
) -> None:
    raw = await kmipd.raw()
    await raw.send_raw(encode_frame(payload))
    refusal = await raw.receive()
    assert refusal["error"]["name"] == name
    assert_valid(refusal)
    await raw.send({"id": 77, "op": "status"})
    assert (await raw.receive())["id"] == 77
    await raw.aclose()
    await assert_other_clients_unaffected(kmipd)


async def test_oversized_length_prefix_is_refused_and_the_connection_closed(
    kmipd: RunningServer,
) -> None:
    raw = await kmipd.raw()
    await raw.send_raw(struct.pack(">I", 64 * 1024 + 1))  # no body follows: refused on the header
    messages = await raw.receive_until_closed()
    assert [m["error"]["name"] for m in messages] == ["frame-too-large"]
    assert "id" not in messages[0]
    await raw.aclose()
    await assert_other_clients_unaffected(kmipd)


async def test_configured_frame_limit_is_announced_and_enforced(
    start_server: ServerFactory,
) -> None:
    kmipd = await start_server(max_frame_size=256)
    raw = await kmipd.raw(hello=False)
    await raw.send({"id": 1, "op": "hello", "args": {"versions": [1]}})
    assert (await raw.receive())["result"]["max-frame-size"] == 256
    await raw.send({"id": 2, "op": "unwrap", "args": {"blob": b"x" * 300}})
    assert [m["error"]["name"] for m in await raw.receive_until_closed()] == ["frame-too-large"]
    await raw.aclose()


async def test_truncated_frame_then_close_harms_nobody(kmipd: RunningServer) -> None:
    raw = await kmipd.raw()
    frame = encode_frame(cbor2.dumps({"id": 1, "op": "status"}))
    await raw.send_raw(frame[:-3])
    await raw.aclose()
    await assert_other_clients_unaffected(kmipd)


async def test_frame_split_into_single_bytes_is_reassembled(kmipd: RunningServer) -> None:
    raw = await kmipd.raw()
    for byte in encode_frame(cbor2.dumps({"id": 5, "op": "status"})):
        await raw.send_raw(bytes([byte]))
    assert (await raw.receive())["id"] == 5
    await raw.aclose()


async def test_stalled_partial_frame_times_out_that_connection_only(
    start_server: ServerFactory,
) -> None:
    kmipd = await start_server(frame_timeout=0.3)
    raw = await kmipd.raw()
    await raw.send_raw(encode_frame(cbor2.dumps({"id": 1, "op": "status"}))[:5])
    await assert_other_clients_unaffected(kmipd)  # served while the partial frame waits
    messages = await raw.receive_until_closed()
    assert [(m["error"]["name"], "id" in m) for m in messages] == [("timeout", False)]
    await raw.aclose()


async def test_connection_limit_refuses_cleanly_and_recovers(start_server: ServerFactory) -> None:
    kmipd = await start_server(max_connections=2)
    first, second = await kmipd.raw(), await kmipd.raw()
    with pytest.raises((TlsHandshakeError, trio.BrokenResourceError)):
        await RawConnection.open(kmipd.address, kmipd.ca, "storage")
    await first.aclose()
    # Once the server has seen the close, a new client gets in again.
    with trio.fail_after(10):
        while True:
            try:
                third = await kmipd.raw()
            except (TlsHandshakeError, trio.BrokenResourceError):
                continue
            break
    await third.aclose()
    await second.aclose()
    await assert_other_clients_unaffected(kmipd)


async def test_garbage_flood_from_one_client_does_not_stop_others(kmipd: RunningServer) -> None:
    raw = await kmipd.raw()
    await raw.send_raw(encode_frame(b"\xff") * 1000)
    async with kmipd.async_client() as kms:
        dek = await kms.create_dek("orders")
        for _ in range(20):
            assert (await kms.get_dek(dek.dek_id)).key_bytes() == dek.key_bytes()
    errors = [await raw.receive() for _ in range(1000)]
    assert {e["error"]["name"] for e in errors} == {"bad-request"}
    await raw.aclose()


async def test_duplicate_request_id_in_flight_is_refused(kmipd: RunningServer) -> None:
    raw = await kmipd.raw()
    request = encode_frame(cbor2.dumps({"id": 9, "op": "create-dek", "args": {"namespace": "n"}}))
    await raw.send_raw(request + request)
    replies = [await raw.receive(), await raw.receive()]
    names = sorted(r["error"]["name"] if "error" in r else "result" for r in replies)
    assert names == ["duplicate-request-id", "result"]
    await raw.aclose()


async def test_a_client_that_stops_reading_is_held_to_its_bounds_then_closed(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Pipelining without ever reading: the server answers until its send blocks,
    then stops reading (the rest stays in the client's socket, not in the server),
    serves everyone else, and closes the connection after server.send_timeout."""
    caplog.set_level(logging.INFO, logger="kmipd")
    kmipd = await start_server(send_timeout=1.0, max_in_flight=8)
    async with kmipd.async_client() as kms:
        dek = await kms.create_dek("orders")
    raw = await kmipd.raw()  # hello already negotiated
    chunk = b"".join(
        encode_frame(cbor2.dumps({"id": n, "op": "get-dek", "args": {"dek-id": dek.dek_id}}))
        for n in range(1, 1001)
    )
    offered = 400 * len(chunk)  # 400,000 gets: answers far beyond any socket buffer
    sent = 0
    stalled = trio.Event()

    async def flood() -> None:
        nonlocal sent
        try:
            for _ in range(400):
                with trio.move_on_after(0.5) as blocked:
                    await raw.send_raw(chunk)
                if blocked.cancelled_caught:
                    stalled.set()  # the server stopped reading: wait for it to hang up
                    await raw.send_raw(chunk)
                sent += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await stalled.wait()
            await assert_other_clients_unaffected(kmipd)  # served while that one is stuck
    assert sent < offered  # the server stopped reading long before the end
    assert kmipd.server.connection_count == 0
    assert "it stopped reading responses" in caplog.text
    await raw.aclose()
