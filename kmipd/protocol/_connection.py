"""Connection state machines for both ends, with no I/O (h11's shape).

The shell feeds received bytes in with ``receive_data``, pulls events out
with ``next_event``, hands responses (server) or requests (client) back in,
and writes whatever ``data_to_send`` returns. Neither class owns a socket,
a clock or a thread, so every rule here is testable byte by byte.
"""

from __future__ import annotations

import collections
import enum
from typing import Any, Final

import attrs

from kmipd.protocol._codec import ItemDecoder, encode_item
from kmipd.protocol._errors import CONNECTION_FATAL, ErrorCode, ProtocolError
from kmipd.protocol._framing import DEFAULT_MAX_FRAME_SIZE, FrameReader, encode_frame
from kmipd.protocol._messages import (
    PROTOCOL_VERSIONS,
    SECRET_MAX_VALUE_SIZE,
    ErrorInfo,
    Hello,
    HelloResult,
    error_to_wire,
    parse_request,
    parse_response,
    request_to_wire,
    result_to_wire,
    result_type,
)


class _Sentinel(enum.Enum):
    NEED_DATA = "need-data"
    PAUSED = "paused"
    ANSWERED = "answered"


#: More bytes must arrive before another event can be produced.
NEED_DATA: Final = _Sentinel.NEED_DATA
#: The server has max_in_flight requests unanswered: answer one, then ask again.
PAUSED: Final = _Sentinel.PAUSED
#: A frame was answered by the connection itself (an error, hello): ask again.
#: One per frame, so a shell can let other connections run between the frames
#: of one client's flood of bad requests instead of parsing them all at once.
ANSWERED: Final = _Sentinel.ANSWERED


@attrs.frozen
class RequestReceived:
    request_id: int
    request: Any


@attrs.frozen
class ConnectionEnded:
    """No further events: the peer closed, or a fatal error was queued for sending.

    ``error`` is the fatal error, if any; the shell sends ``data_to_send()``,
    waits for requests in flight (none after a fatal error matter) and closes.
    """

    error: ErrorCode | None = None


class ServerState(enum.Enum):
    AWAITING_HELLO = "awaiting-hello"
    READY = "ready"
    DRAINING = "draining"
    CLOSED = "closed"


class _Input(enum.Enum):
    HELLO_ACCEPTED = "hello-accepted"
    HELLO_REFUSED = "hello-refused"
    REQUEST = "request"
    DRAIN = "drain"
    FATAL = "fatal"


class _Action(enum.Enum):
    ANSWER_HELLO = "answer-hello"
    REFUSE_VERSION = "refuse-version"
    REFUSE_REPEATED_HELLO = "refuse-repeated-hello"
    REFUSE_HELLO_REQUIRED = "refuse-hello-required"
    REFUSE_SHUTTING_DOWN = "refuse-shutting-down"
    DELIVER = "deliver"
    NONE = "none"


_S, _I, _A = ServerState, _Input, _Action

#: (state, input) -> (next state, what to do). Pairs not listed are impossible
#: by construction (e.g. any input after CLOSED) and raise.
SERVER_TRANSITIONS: Final[dict[tuple[ServerState, _Input], tuple[ServerState, _Action]]] = {
    (_S.AWAITING_HELLO, _I.HELLO_ACCEPTED): (_S.READY, _A.ANSWER_HELLO),
    (_S.AWAITING_HELLO, _I.HELLO_REFUSED): (_S.AWAITING_HELLO, _A.REFUSE_VERSION),
    (_S.AWAITING_HELLO, _I.REQUEST): (_S.AWAITING_HELLO, _A.REFUSE_HELLO_REQUIRED),
    (_S.AWAITING_HELLO, _I.DRAIN): (_S.DRAINING, _A.NONE),
    (_S.AWAITING_HELLO, _I.FATAL): (_S.CLOSED, _A.NONE),
    (_S.READY, _I.HELLO_ACCEPTED): (_S.READY, _A.REFUSE_REPEATED_HELLO),
    (_S.READY, _I.HELLO_REFUSED): (_S.READY, _A.REFUSE_REPEATED_HELLO),
    (_S.READY, _I.REQUEST): (_S.READY, _A.DELIVER),
    (_S.READY, _I.DRAIN): (_S.DRAINING, _A.NONE),
    (_S.READY, _I.FATAL): (_S.CLOSED, _A.NONE),
    (_S.DRAINING, _I.HELLO_ACCEPTED): (_S.DRAINING, _A.REFUSE_SHUTTING_DOWN),
    (_S.DRAINING, _I.HELLO_REFUSED): (_S.DRAINING, _A.REFUSE_SHUTTING_DOWN),
    (_S.DRAINING, _I.REQUEST): (_S.DRAINING, _A.REFUSE_SHUTTING_DOWN),
    (_S.DRAINING, _I.DRAIN): (_S.DRAINING, _A.NONE),
    (_S.DRAINING, _I.FATAL): (_S.CLOSED, _A.NONE),
}


class ServerConnection:
    """One client connection, after the TLS handshake, as the server sees it."""

    def __init__(
        self,
        *,
        identity: str,
        server_name: str,
        store_id: str,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_in_flight: int = 64,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
        error_counts: collections.Counter[ErrorCode] | None = None,
    ) -> None:
        self.identity = identity
        self.state = ServerState.AWAITING_HELLO
        #: Errors this connection sent on its own (not through send_error), by code;
        #: the server passes one counter shared by all connections, for its metrics.
        self.error_counts = collections.Counter() if error_counts is None else error_counts
        self.version: int | None = None
        self._server_name = server_name
        self._store_id = store_id
        self._max_in_flight = max_in_flight
        self._versions = versions
        self._reader = FrameReader(max_frame_size)
        self._decoder = ItemDecoder()
        self._outgoing = bytearray()
        self._in_flight: set[int] = set()
        self._peer_closed = False
        self._fatal: ErrorCode | None = None
        #: Complete frames cut so far; the shell uses it to see progress.
        self.frames_received = 0

    # -- input -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._peer_closed = True
        elif self.state is not ServerState.CLOSED:
            self._reader.feed(data)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def has_partial_frame(self) -> bool:
        """True while part of a frame is buffered: the shell times out a stalled sender."""
        return self.state is not ServerState.CLOSED and self._reader.buffered > 0

    def next_event(self) -> RequestReceived | ConnectionEnded | _Sentinel:
        while True:
            if self.state is ServerState.CLOSED:
                return ConnectionEnded(self._fatal)
            if len(self._in_flight) >= self._max_in_flight:
                return PAUSED
            try:
                frame = self._reader.next_frame()
            except ProtocolError as exc:
                self.fail(exc.code, exc.message)
                continue
            if frame is None:
                return ConnectionEnded() if self._peer_closed else NEED_DATA
            self.frames_received += 1
            return self._process_frame(frame) or ANSWERED

    def _process_frame(self, frame: bytes) -> RequestReceived | None:
        try:
            request_id, request = parse_request(self._decoder.decode(frame))
        except ProtocolError as exc:
            self._queue_error(exc.request_id, exc.code, exc.message)
            return None
        if request_id in self._in_flight:
            # Echoing the id would make the response ambiguous: leave it out.
            self._queue_error(
                None,
                ErrorCode.DUPLICATE_REQUEST_ID,
                f"request id {request_id} is already in flight",
            )
            return None
        if isinstance(request, Hello):
            chosen = max(set(request.versions) & set(self._versions), default=None)
            _, action = self._transition(_I.HELLO_REFUSED if chosen is None else _I.HELLO_ACCEPTED)
            if action is _A.ANSWER_HELLO:
                self.version = chosen
            self._perform(action, request_id, request)
            return None
        _, action = self._transition(_I.REQUEST)
        if action is _A.DELIVER:
            self._in_flight.add(request_id)
            return RequestReceived(request_id, request)
        self._perform(action, request_id, request)
        return None

    def _transition(self, event: _Input) -> tuple[ServerState, _Action]:
        next_state, action = SERVER_TRANSITIONS[(self.state, event)]
        self.state = next_state
        return next_state, action

    def _perform(self, action: _Action, request_id: int, request: Any) -> None:
        if action is _A.ANSWER_HELLO:
            assert self.version is not None
            self._queue(
                result_to_wire(
                    request_id,
                    HelloResult(
                        version=self.version,
                        server=self._server_name,
                        identity=self.identity,
                        max_frame_size=self._reader.max_frame_size,
                        max_in_flight=self._max_in_flight,
                        store_id=self._store_id,
                    ),
                )
            )
        elif action is _A.REFUSE_VERSION:
            supported = ", ".join(str(v) for v in self._versions)
            self._queue_error(
                request_id,
                ErrorCode.UNSUPPORTED_VERSION,
                f"no common protocol version; this server speaks {supported}",
            )
        elif action is _A.REFUSE_REPEATED_HELLO:
            self._queue_error(
                request_id, ErrorCode.BAD_REQUEST, "hello was already negotiated on this connection"
            )
        elif action is _A.REFUSE_HELLO_REQUIRED:
            self._queue_error(
                request_id,
                ErrorCode.HELLO_REQUIRED,
                f"send hello before {request.OPERATION}: the protocol version is not negotiated",
            )
        elif action is _A.REFUSE_SHUTTING_DOWN:
            self._queue_error(request_id, ErrorCode.SHUTTING_DOWN, "the server is shutting down")

    # -- output ------------------------------------------------------------

    def send_result(self, request_id: int, result: Any) -> None:
        self._finish(request_id)
        self._queue(result_to_wire(request_id, result))

    def send_error(self, request_id: int, code: ErrorCode, message: str) -> None:
        self._finish(request_id)
        self._queue(error_to_wire(request_id, code, message))

    def _finish(self, request_id: int) -> None:
        try:
            self._in_flight.remove(request_id)
        except KeyError:
            raise RuntimeError(f"request {request_id} is not in flight") from None

    def start_draining(self) -> None:
        """Refuse every further request with shutting-down; those in flight still finish."""
        if self.state is not ServerState.CLOSED:
            self._transition(_I.DRAIN)

    def fail(self, code: ErrorCode, message: str) -> None:
        """Queue a connection-level error and end the connection (timeouts, refusals)."""
        if self.state is ServerState.CLOSED:
            return
        assert code in CONNECTION_FATAL, code
        self._transition(_I.FATAL)
        self._fatal = code
        self._queue_error(None, code, message)

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._outgoing)

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def _queue(self, message: dict[str, object]) -> None:
        self._outgoing += encode_frame(encode_item(message))

    def _queue_error(self, request_id: int | None, code: ErrorCode, message: str) -> None:
        self.error_counts[code] += 1
        self._queue(error_to_wire(request_id, code, message))


# ---------------------------------------------------------------------------


@attrs.frozen
class ResponseReceived:
    request_id: int
    #: The typed result, or ErrorInfo for an error response.
    outcome: Any

    @property
    def ok(self) -> bool:
        return not isinstance(self.outcome, ErrorInfo)


@attrs.frozen
class ConnectionFailed:
    """The server sent a connection-level error, or broke the protocol itself."""

    error: ErrorInfo


#: The largest response a client reads. The server's max_frame_size bounds what it
#: reads, not what it answers: a get-secret result carries a whole value (up to the
#: wire's 16 MiB) and its metadata, a listing a page of 1,000 entries.
RESPONSE_MAX_FRAME_SIZE = 2 * SECRET_MAX_VALUE_SIZE


class ClientConnection:
    """The client's end: assigns request ids, matches responses, negotiates the version."""

    def __init__(
        self,
        *,
        max_frame_size: int = RESPONSE_MAX_FRAME_SIZE,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
        client_name: str = "kmipd-python",
    ) -> None:
        self.versions = versions
        self.hello: HelloResult | None = None
        self.failed: ErrorInfo | None = None
        self._client_name = client_name
        self._reader = FrameReader(max_frame_size)
        self._decoder = ItemDecoder()
        self._next_id = 1
        self._pending: dict[int, type[Any]] = {}
        self._hello_id: int | None = None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def start(self) -> tuple[int, bytes]:
        """The hello request; may be pipelined with the first real requests."""
        hello = Hello(versions=self.versions, client=self._client_name)
        request_id, frame = self.send_request(hello)
        self._hello_id = request_id
        return request_id, frame

    def send_request(self, request: Any) -> tuple[int, bytes]:
        if self.failed is not None:
            raise RuntimeError("connection failed: " + self.failed.message)
        request_id = self._next_id
        payload = encode_item(request_to_wire(request_id, request))
        if self.hello is not None and len(payload) > self.hello.max_frame_size:
            # The server would refuse it on the length prefix and close the
            # connection, and every request in flight on it: refuse it here.
            raise ProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"the {request.OPERATION} request is {len(payload)} bytes; this daemon reads "
                f"frames of at most {self.hello.max_frame_size} (server.max_frame_size); "
                "nothing was sent",
            )
        self._next_id += 1
        self._pending[request_id] = result_type(request)
        return request_id, encode_frame(payload)

    def receive_data(self, data: bytes) -> None:
        self._reader.feed(data)

    def next_event(self) -> ResponseReceived | ConnectionFailed | _Sentinel:
        if self.failed is not None:
            return ConnectionFailed(self.failed)
        try:
            frame = self._reader.next_frame()
            if frame is None:
                return NEED_DATA
            request_id, outcome = parse_response(self._decoder.decode(frame), self._pending)
        except ProtocolError as exc:
            self.failed = ErrorInfo(exc.code, "the server broke the protocol: " + exc.message)
            return ConnectionFailed(self.failed)
        if request_id is None:
            self.failed = outcome
            return ConnectionFailed(outcome)
        del self._pending[request_id]
        if request_id == self._hello_id and isinstance(outcome, HelloResult):
            if outcome.version not in self.versions:
                self.failed = ErrorInfo(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"server chose protocol version {outcome.version}, which was not offered",
                )
                return ConnectionFailed(self.failed)
            self.hello = outcome
        return ResponseReceived(request_id, outcome)
