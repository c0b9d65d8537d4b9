"""The connection state machines, byte by byte, with no sockets."""

from __future__ import annotations

import struct
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kmipd.protocol import (
    ANSWERED,
    NEED_DATA,
    PAUSED,
    SERVER_TRANSITIONS,
    ClientConnection,
    ConnectionEnded,
    ConnectionFailed,
    CreateDek,
    DekResult,
    ErrorCode,
    ErrorInfo,
    FrameReader,
    GetDek,
    RequestReceived,
    ResponseReceived,
    ServerConnection,
    ServerState,
    decode_item,
    encode_frame,
)
from kmipd.protocol._connection import _Input

IDENTITY = "spiffe://kmipd.test/storage"


def server(**kwargs: Any) -> ServerConnection:
    return ServerConnection(identity=IDENTITY, server_name="kmipd", store_id="s-1", **kwargs)


def frame(message: object) -> bytes:
    return encode_frame(cbor2.dumps(message))


HELLO = frame({"id": 1, "op": "hello", "args": {"versions": [1]}})


def responses(conn: ServerConnection) -> list[dict[str, Any]]:
    reader = FrameReader(1 << 20)
    reader.feed(conn.data_to_send())
    out = []
    while (payload := reader.next_frame()) is not None:
        out.append(decode_item(payload))
    return out


def drain_events(conn: ServerConnection) -> list[object]:
    """Events until the connection needs something; ANSWERED ("ask again") is skipped."""
    events = []
    while True:
        event = conn.next_event()
        if event is ANSWERED:
            continue
        if event is NEED_DATA or event is PAUSED or isinstance(event, ConnectionEnded):
            events.append(event)
            return events
        events.append(event)


def ready_server(**kwargs: Any) -> ServerConnection:
    conn = server(**kwargs)
    conn.receive_data(HELLO)
    assert drain_events(conn) == [NEED_DATA]
    conn.data_to_send()
    return conn


# -- version negotiation -----------------------------------------------------------------


def test_hello_negotiates_and_reports_identity_and_limits() -> None:
    conn = server(max_frame_size=4096, max_in_flight=8)
    conn.receive_data(frame({"id": 1, "op": "hello", "args": {"versions": [1, 9], "client": "t"}}))
    assert drain_events(conn) == [NEED_DATA]
    [response] = responses(conn)
    assert response == {
        "id": 1,
        "result": {
            "version": 1,
            "server": "kmipd",
            "identity": IDENTITY,
            "max-frame-size": 4096,
            "max-in-flight": 8,
            "store-id": "s-1",
        },
    }
    assert conn.state is ServerState.READY


def test_unsupported_version_is_refused_and_the_client_may_try_again() -> None:
    conn = server()
    conn.receive_data(frame({"id": 1, "op": "hello", "args": {"versions": [7, 8]}}))
    drain_events(conn)
    [refusal] = responses(conn)
    assert refusal["id"] == 1
    assert refusal["error"]["code"] == ErrorCode.UNSUPPORTED_VERSION
    assert "speaks 1" in refusal["error"]["message"]
    assert conn.state is ServerState.AWAITING_HELLO
    conn.receive_data(frame({"id": 2, "op": "hello", "args": {"versions": [1]}}))
    drain_events(conn)
    assert responses(conn)[0]["result"]["version"] == 1


def test_requests_before_hello_get_hello_required() -> None:
    conn = server()
    conn.receive_data(frame({"id": 5, "op": "get-dek", "args": {"dek-id": "a"}}))
    assert drain_events(conn) == [NEED_DATA]
    [refusal] = responses(conn)
    assert refusal["id"] == 5 and refusal["error"]["name"] == "hello-required"


def test_second_hello_is_a_bad_request() -> None:
    conn = ready_server()
    conn.receive_data(frame({"id": 2, "op": "hello", "args": {"versions": [1]}}))
    drain_events(conn)
    assert responses(conn)[0]["error"]["code"] == ErrorCode.BAD_REQUEST


# -- requests, pipelining, limits ------------------------------------------------------------


def test_pipelined_requests_are_answered_out_of_order_with_ids_echoed() -> None:
    conn = ready_server()
    conn.receive_data(
        b"".join(
            frame({"id": i, "op": "get-dek", "args": {"dek-id": f"d{i}"}}) for i in (10, 11, 12)
        )
    )
    events = drain_events(conn)
    assert [e.request_id for e in events if isinstance(e, RequestReceived)] == [10, 11, 12]
    for request_id in (12, 10, 11):
        conn.send_result(
            request_id,
            DekResult(dek_id=f"d{request_id}", namespace="n", kek_version=1, key=bytes(32)),
        )
    assert [r["id"] for r in responses(conn)] == [12, 10, 11]
    assert conn.in_flight == 0


def test_in_flight_limit_pauses_until_a_request_is_answered() -> None:
    conn = ready_server(max_in_flight=2)
    conn.receive_data(
        b"".join(frame({"id": i, "op": "get-dek", "args": {"dek-id": "d"}}) for i in range(2, 6))
    )
    events = drain_events(conn)
    assert events[-1] is PAUSED and len(events) == 3
    conn.send_error(2, ErrorCode.NOT_FOUND, "gone")
    event = conn.next_event()
    assert isinstance(event, RequestReceived) and event.request_id == 4
    assert conn.next_event() is PAUSED


def test_duplicate_in_flight_id_is_refused_without_an_id() -> None:
    conn = ready_server()
    conn.receive_data(frame({"id": 3, "op": "get-dek", "args": {"dek-id": "a"}}) * 2)
    events = drain_events(conn)
    assert len([e for e in events if isinstance(e, RequestReceived)]) == 1
    [refusal] = responses(conn)
    assert "id" not in refusal and refusal["error"]["name"] == "duplicate-request-id"


@pytest.mark.parametrize(
    ("payload", "code", "echoes_id", "says"),
    [
        (b"\xff\xff", ErrorCode.BAD_REQUEST, False, "invalid CBOR"),
        (cbor2.dumps([1, 2]), ErrorCode.BAD_REQUEST, False, "must be a CBOR map"),
        (cbor2.dumps({"id": "x", "op": "status"}), ErrorCode.BAD_REQUEST, False, "request.id"),
        (
            cbor2.dumps({"id": 9, "op": "nope"}),
            ErrorCode.UNKNOWN_OPERATION,
            True,
            "unknown operation",
        ),
        (cbor2.dumps({"id": 9}), ErrorCode.BAD_REQUEST, True, "request.op"),
        (
            cbor2.dumps({"id": 9, "op": "get-dek"}),
            ErrorCode.BAD_REQUEST,
            True,
            "missing required field 'dek-id'",
        ),
        (
            cbor2.dumps({"id": 9, "op": "get-dek", "args": {"dek-id": 5}}),
            ErrorCode.BAD_REQUEST,
            True,
            "args.dek-id: expected text, got integer",
        ),
        (
            cbor2.dumps({"id": 9, "op": "get-dek", "args": {"dek-id": "a", "x": 1}}),
            ErrorCode.BAD_REQUEST,
            True,
            "unknown field 'x'",
        ),
        (
            cbor2.dumps({"id": 9, "op": "create-dek", "args": {"namespace": "../etc"}}),
            ErrorCode.BAD_REQUEST,
            True,
            "not a valid namespace name",
        ),
        (
            cbor2.dumps({"id": 9, "op": "status", "extra": 1}),
            ErrorCode.BAD_REQUEST,
            True,
            "unknown top-level field 'extra'",
        ),
        (
            cbor2.dumps({"id": 9, "op": "unwrap", "args": {"blob": b"", "context": {"k": 1}}}),
            ErrorCode.BAD_REQUEST,
            True,
            "args.context['k']: expected text",
        ),
    ],
)
def test_a_bad_request_gets_its_documented_error_and_neighbours_are_served(
    payload: bytes, code: ErrorCode, echoes_id: bool, says: str
) -> None:
    conn = ready_server()
    good = frame({"id": 100, "op": "get-dek", "args": {"dek-id": "ok"}})
    conn.receive_data(good + encode_frame(payload) + frame({"id": 101, "op": "status"}))
    events = drain_events(conn)
    assert [e.request_id for e in events if isinstance(e, RequestReceived)] == [100, 101]
    [refusal] = responses(conn)
    assert refusal["error"]["code"] == code
    assert says in refusal["error"]["message"]
    assert ("id" in refusal) is echoes_id


def test_oversized_frame_ends_the_connection_with_an_unattributed_error() -> None:
    conn = ready_server(max_frame_size=64)
    conn.receive_data(struct.pack(">I", 65) + b"\x00" * 10)
    assert conn.next_event() == ConnectionEnded(ErrorCode.FRAME_TOO_LARGE)
    [error] = responses(conn)
    assert "id" not in error and error["error"]["name"] == "frame-too-large"
    assert conn.state is ServerState.CLOSED


def test_peer_close_after_requests_ends_the_event_stream() -> None:
    conn = ready_server()
    conn.receive_data(frame({"id": 2, "op": "status"}))
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, RequestReceived)
    assert conn.next_event() == ConnectionEnded()


def test_draining_refuses_new_requests_but_lets_in_flight_ones_finish() -> None:
    conn = ready_server()
    conn.receive_data(frame({"id": 2, "op": "status"}))
    assert isinstance(conn.next_event(), RequestReceived)
    conn.start_draining()
    conn.receive_data(frame({"id": 3, "op": "status"}))
    assert conn.next_event() is ANSWERED  # refused by the connection itself
    assert conn.next_event() is NEED_DATA
    conn.send_error(2, ErrorCode.INTERNAL, "x")
    assert [r["error"]["name"] for r in responses(conn)] == ["shutting-down", "internal"]


def test_answering_an_unknown_request_is_a_programming_error() -> None:
    conn = ready_server()
    with pytest.raises(RuntimeError):
        conn.send_error(99, ErrorCode.INTERNAL, "never received")


# -- the transition table is complete, and random input never breaks the machine -----------


def test_transition_table_covers_every_live_state_and_input() -> None:
    for state in ServerState:
        for event in _Input:
            if state is ServerState.CLOSED:
                assert (state, event) not in SERVER_TRANSITIONS
            else:
                assert (state, event) in SERVER_TRANSITIONS, (state, event)


_any_request = st.one_of(
    st.builds(
        lambda i, v: {"id": i, "op": "hello", "args": {"versions": v}},
        st.integers(0, 20),
        st.lists(st.integers(0, 3), min_size=1, max_size=3),
    ),
    st.builds(lambda i: {"id": i, "op": "status"}, st.integers(0, 20)),
    st.builds(
        lambda i, d: {"id": i, "op": "get-dek", "args": {"dek-id": d}},
        st.integers(0, 20),
        st.sampled_from(["a", "", 5, "b" * 70]),
    ),
    st.dictionaries(
        st.sampled_from(["id", "op", "args", "x"]),
        st.one_of(st.integers(-1, 3), st.text(max_size=3), st.none()),
        max_size=4,
    ),
)


class ServerMachine(RuleBasedStateMachine):
    """h2-style: any interleaving of inputs yields events or documented errors, never a crash."""

    def __init__(self) -> None:
        super().__init__()
        self.conn = server(max_in_flight=3, max_frame_size=200)
        self.delivered: set[int] = set()

    @rule(message=_any_request)
    def send_request(self, message: dict[str, object]) -> None:
        self.conn.receive_data(frame(message))
        self.pump()

    @rule(data=st.binary(max_size=30))
    def send_garbage_frame(self, data: bytes) -> None:
        self.conn.receive_data(encode_frame(data))
        self.pump()

    @rule()
    def answer_one(self) -> None:
        if self.delivered:
            self.conn.send_error(self.delivered.pop(), ErrorCode.NOT_FOUND, "x")
            self.pump()

    @rule()
    def drain(self) -> None:
        self.conn.start_draining()
        self.pump()

    @rule()
    def timeout(self) -> None:
        self.conn.fail(ErrorCode.TIMEOUT, "idle")
        self.pump()

    def pump(self) -> None:
        for event in drain_events(self.conn):
            if isinstance(event, RequestReceived):
                assert event.request_id not in self.delivered
                self.delivered.add(event.request_id)
        for response in responses(self.conn):
            assert set(response) <= {"id", "result", "error"}
            if "error" in response:
                assert ErrorCode(response["error"]["code"]).wire_name == response["error"]["name"]

    @invariant()
    def in_flight_matches(self) -> None:
        if self.conn.state is not ServerState.CLOSED:
            assert self.conn.in_flight == len(self.delivered) <= 3


TestServerMachine = ServerMachine.TestCase


# -- the client side ---------------------------------------------------------------------------


def test_client_matches_responses_to_requests_and_records_hello() -> None:
    client, srv = ClientConnection(), server()
    hello_id, hello = client.start()
    first_id, first = client.send_request(CreateDek(namespace="orders"))
    second_id, second = client.send_request(GetDek(dek_id="d"))
    srv.receive_data(hello + first + second)
    requests = [e for e in drain_events(srv) if isinstance(e, RequestReceived)]
    assert [r.request for r in requests] == [CreateDek(namespace="orders"), GetDek(dek_id="d")]
    srv.send_error(second_id, ErrorCode.NOT_FOUND, "no such DEK")
    srv.send_result(
        first_id, DekResult(dek_id="d1", namespace="orders", kek_version=1, key=bytes(32))
    )
    client.receive_data(srv.data_to_send())
    events = [client.next_event() for _ in range(3)]
    assert isinstance(events[0], ResponseReceived) and events[0].request_id == hello_id
    assert client.hello is not None and client.hello.identity == IDENTITY
    assert events[1] == ResponseReceived(second_id, ErrorInfo(ErrorCode.NOT_FOUND, "no such DEK"))
    assert isinstance(events[2], ResponseReceived) and events[2].outcome.dek_id == "d1"
    assert "redacted" in repr(events[2].outcome) and repr(bytes(32)) not in repr(events[2].outcome)
    assert client.next_event() is NEED_DATA


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ({"id": 99, "result": {}}, "not in flight"),
        ({"error": {"code": 100, "name": "certificate-rejected", "message": "revoked"}}, "revoked"),
        (
            {
                "id": 1,
                "result": {
                    "version": 5,
                    "server": "s",
                    "identity": "i",
                    "max-frame-size": 1,
                    "max-in-flight": 1,
                    "store-id": "x",
                },
            },
            "not offered",
        ),
        ([1], "must be a CBOR map"),
    ],
)
def test_client_fails_the_connection_on_server_misbehaviour(message: object, says: str) -> None:
    client = ClientConnection()
    client.start()
    client.receive_data(frame(message))
    event = client.next_event()
    assert isinstance(event, ConnectionFailed) and says in event.error.message
    with pytest.raises(RuntimeError):
        client.send_request(GetDek(dek_id="x"))


@given(st.binary(max_size=100))
def test_client_survives_any_server_bytes(data: bytes) -> None:
    client = ClientConnection()
    client.start()
    client.receive_data(data)
    event = client.next_event()
    assert event is NEED_DATA or isinstance(event, ResponseReceived | ConnectionFailed)


def test_frames_answered_by_the_connection_come_out_one_per_call() -> None:
    # The server shell lets other clients run between these: a flood of bad
    # frames must not be parsed in one uninterruptible call.
    conn = ready_server()
    conn.receive_data(encode_frame(b"\x1c") * 5 + frame({"id": 3, "op": "status"}))
    events = [conn.next_event() for _ in range(7)]
    assert events[:5] == [ANSWERED] * 5
    assert isinstance(events[5], RequestReceived)
    assert events[6] is NEED_DATA
    assert [r["error"]["name"] for r in responses(conn)] == ["bad-request"] * 5
