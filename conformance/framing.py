"""Framing: a 4-byte big-endian length, then exactly that many bytes of one CBOR item."""

from __future__ import annotations

import socket
import time

from conformance._case import CaseFailed, CaseSkipped, When, case
from conformance._connection import Connection, ConnectionClosed
from conformance._context import Context
from conformance._wire import HEADER, encode, frame, request_frame

#: How soon a refusal that needs no waiting must arrive.
PROMPT = 5.0


def _half_close(connection: Connection) -> None:
    """TCP FIN without a TLS close_notify: the peer just stops sending mid-frame."""
    socket.socket.shutdown(connection.sock, socket.SHUT_WR)


@case(
    "FRAME-001",
    "A zero-length frame is answered with an unattributed bad-request and the connection "
    "stays usable.",
    hostile=True,
)
def zero_length_frame(ctx: Context) -> None:
    with ctx.connect() as c:
        c.send_raw(HEADER.pack(0), "zero-length frame")
        ctx.expect_error(ctx.receive(c), "bad-request", request_id=None)
        ctx.expect_usable(c)


def _oversized_prefix(ctx: Context, length: int) -> None:
    with ctx.connect() as c:
        started = time.monotonic()
        c.send_raw(HEADER.pack(length), f"header announcing {length} bytes, no body")
        messages = ctx.expect_closed(c, PROMPT)
        ctx.expect(
            len(messages) == 1,
            f"expected one frame-too-large error before the close, got {len(messages)} message(s)",
        )
        ctx.expect_error(messages[0], "frame-too-large", request_id=None)
        ctx.note(f"refused and closed {time.monotonic() - started:.2f} s after the header")


@case(
    "FRAME-002",
    "A length prefix one byte above the announced max-frame-size is refused from the header "
    "alone (no body sent) with an unattributed frame-too-large, then the connection closes.",
    hostile=True,
)
def prefix_above_limit(ctx: Context) -> None:
    _oversized_prefix(ctx, ctx.run.max_frame_size + 1)


@case(
    "FRAME-003",
    "A length prefix of 2**32-1 is refused from the header alone with frame-too-large, "
    "then the connection closes.",
    hostile=True,
)
def prefix_maximum(ctx: Context) -> None:
    _oversized_prefix(ctx, 2**32 - 1)


@case(
    "FRAME-004",
    "A frame of exactly max-frame-size bytes is read in full and answered (here: bad-request "
    "naming the unknown padding field, with the request id echoed).",
    hostile=True,
)
def frame_at_limit(ctx: Context) -> None:
    size = ctx.run.max_frame_size
    request_id = ctx.next_id()
    message: dict[str, object] = {"id": request_id, "op": "status", "padding": b""}
    # Grow the padding until the encoded item is exactly the limit.
    padding = size - len(encode(message))
    while len(encode({**message, "padding": b"\0" * padding})) > size:
        padding -= 1
    payload = encode({**message, "padding": b"\0" * padding})
    if len(payload) != size:
        raise CaseSkipped(f"could not build a {size}-byte request (got {len(payload)})")
    with ctx.connect() as c:
        c.send_raw(frame(payload), f"{size}-byte request with a padding field")
        ctx.expect_error(ctx.receive(c), "bad-request", request_id=request_id, mentions="padding")
        ctx.expect_usable(c)


@case(
    "FRAME-005",
    "A request written one byte per TLS record (header and body split everywhere) is answered.",
)
def one_byte_writes(ctx: Context) -> None:
    with ctx.connect(hello=False) as c:
        data = request_frame(1, "hello", {"versions": [1]}) + request_frame(2, "status")
        c.transcript.add(f"-> {c.label} {len(data)} bytes, one byte per write: hello, status")
        for byte in data:
            c.sock.sendall(bytes([byte]))
        replies = {m.id: m for m in (ctx.receive(c), ctx.receive(c))}
        ctx.expect(set(replies) == {1, 2}, f"expected answers to ids 1 and 2, got {set(replies)}")
        ctx.expect_result(replies[1], "hello-result")
        ctx.expect_result(replies[2], "status-result")


@case(
    "FRAME-006",
    "Two hundred frames in one write are all answered, each request id exactly once.",
)
def many_frames_in_one_write(ctx: Context) -> None:
    assert ctx.run.baseline is not None
    dek_id = ctx.run.baseline[0]
    count = 200
    with ctx.connect() as c:
        data = b"".join(
            request_frame(i, "status") if i % 2 else request_frame(i, "get-dek", {"dek-id": dek_id})
            for i in range(1000, 1000 + count)
        )
        c.send_quietly(data, f"{count} frames: status and get-dek alternating, ids 1000..")
        replies = c.receive_many(count, ctx.options.timeout * 3)
        ids = sorted(m.id for m in replies if m.id is not None)
        ctx.expect(ids == list(range(1000, 1000 + count)), f"ids answered: {ids[:10]}...")
        for reply in replies:
            assert reply.id is not None
            ctx.expect_result(reply, "status-result" if reply.id % 2 else "dek-result")


def _truncated_then_eof(ctx: Context, data: bytes, note: str) -> None:
    with ctx.connect() as c:
        c.send_raw(data, note)
        _half_close(c)
        messages = ctx.expect_closed(c, PROMPT)
        results = [m for m in messages if not m.is_error]
        ctx.expect(not results, f"the server answered a request nobody completed: {results}")


@case(
    "FRAME-007",
    "A frame cut short in its body, then end of stream: the server closes the connection "
    "promptly and answers nothing.",
    hostile=True,
)
def truncated_body_then_close(ctx: Context) -> None:
    partial = request_frame(7, "status")[:-2]
    _truncated_then_eof(ctx, partial, "a status frame missing its last 2 bytes, then FIN")


@case(
    "FRAME-008",
    "A frame cut short in its 4-byte header, then end of stream: the server closes promptly.",
    hostile=True,
)
def truncated_header_then_close(ctx: Context) -> None:
    _truncated_then_eof(ctx, b"\x00\x00", "2 of the 4 header bytes, then FIN")


@case(
    "FRAME-009",
    "A stalled partial frame gets an unattributed timeout error and a close after the frame "
    "timeout, while another client is served normally during the stall.",
    hostile=True,
    when=When.BACKGROUND,
)
def stalled_partial_frame(ctx: Context) -> None:
    limit = ctx.options.frame_timeout
    if limit > ctx.options.max_wait:
        raise CaseSkipped(f"the frame timeout ({limit:g} s) exceeds --max-wait")
    with ctx.connect(label="staller") as staller:
        staller.send_raw(request_frame(9, "status")[:6], "6 bytes of a frame, then nothing")
        started = time.monotonic()
        with ctx.connect(label="other") as other:
            ctx.expect_usable(other)
        messages = ctx.expect_closed(staller, limit + 10)
        elapsed = time.monotonic() - started
        ctx.expect(
            len(messages) == 1, f"expected one timeout error, got {len(messages)} message(s)"
        )
        ctx.expect_error(messages[0], "timeout", request_id=None)
        ctx.expect(
            elapsed >= limit * 0.5,
            f"closed after {elapsed:.1f} s, well before the {limit:g} s frame timeout",
        )
        ctx.note(f"closed {elapsed:.1f} s into the stall")


@case(
    "FRAME-010",
    "A connection with nothing in flight is closed after the idle timeout with an "
    "unattributed timeout error.",
    when=When.BACKGROUND,
)
def idle_connection(ctx: Context) -> None:
    limit = ctx.options.idle_timeout
    if limit > ctx.options.max_wait:
        raise CaseSkipped(
            f"the idle timeout ({limit:g} s, --idle-timeout) exceeds --max-wait "
            f"({ctx.options.max_wait:g} s)"
        )
    with ctx.connect(label="idler") as idler:
        try:
            messages = ctx.expect_closed(idler, limit + 10)
        except ConnectionClosed as exc:  # pragma: no cover - expect_closed handles it
            raise CaseFailed(str(exc)) from None
        ctx.expect(len(messages) == 1, f"expected one timeout error, got {len(messages)}")
        ctx.expect_error(messages[0], "timeout", request_id=None)
