"""The server side of one KMIP connection, with no I/O (the shape of kmipd.protocol's).

The shell feeds received bytes with ``receive_data``, takes events from
``next_event``, answers each RequestReceived with ``send_response`` (KMIP
answers messages in order: the shell answers one message before asking for
the next) and writes ``data_to_send()``. The receive buffer is bounded: a
message header that announces more than ``max_message_size`` is answered
with Invalid Message and ends the connection, before any of its body is
buffered. A message that is malformed inside a sound length is answered
with its error and the connection carries on with the next message.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final

import attrs

from kmipd.kmip._errors import KmipCodecError, KmipError, ResultReason
from kmipd.kmip._messages import (
    SUPPORTED_VERSIONS,
    BatchResult,
    RequestMessage,
    encode_response,
    error_response,
    parse_request,
    parse_version,
)
from kmipd.kmip._tables import TAGS
from kmipd.kmip._ttlv import DEFAULT_MAX_DEPTH, HEADER_SIZE, ItemType, decode_ttlv, read_header

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024
_REQUEST_MESSAGE = TAGS["RequestMessage"]
#: The version an answer is written in when the request's own cannot be read.
FALLBACK_VERSION: Final = (1, 0)


class _Sentinel(enum.Enum):
    NEED_DATA = "need-data"
    ANSWERED = "answered"


#: More bytes must arrive before another event can be produced.
NEED_DATA: Final = _Sentinel.NEED_DATA
#: A message was answered by the connection itself (an error): ask again.
ANSWERED: Final = _Sentinel.ANSWERED


@attrs.frozen
class RequestReceived:
    message: RequestMessage


@attrs.frozen
class ConnectionEnded:
    """No further events: the peer closed, or the framing broke (``error`` says why)."""

    error: KmipError | None = None


class KmipConnection:
    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_depth: int = DEFAULT_MAX_DEPTH,
        clock_seconds: int = 0,
    ) -> None:
        self.max_message_size = max_message_size
        self.max_depth = max_depth
        #: The time stamp for answers the connection gives itself; the shell updates it.
        self.now = clock_seconds
        self._buffer = bytearray()
        self._out = bytearray()
        self._awaiting_response = False
        self._closed = False
        self._peer_closed = False
        self.messages_received = 0

    # -- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" means it closed its side."""
        if self._closed:
            return
        if not data:
            self._peer_closed = True
        self._buffer += data

    @property
    def has_partial_message(self) -> bool:
        return bool(self._buffer)

    def next_event(self) -> RequestReceived | ConnectionEnded | _Sentinel:  # noqa: PLR0911
        if self._awaiting_response:
            raise RuntimeError("answer the last RequestReceived before asking for the next event")
        if self._closed:
            return ConnectionEnded()
        if len(self._buffer) < HEADER_SIZE:
            if self._peer_closed:
                self._closed = True
                return ConnectionEnded()
            return NEED_DATA
        tag, type_byte, length = read_header(self._buffer)
        if length > self.max_message_size - HEADER_SIZE:
            # The next message boundary cannot be trusted to arrive: answer and hang up.
            error = KmipCodecError(
                ResultReason.INVALID_MESSAGE,
                f"message of {length + HEADER_SIZE} bytes announced; the limit is "
                f"{self.max_message_size}",
            )
            return self._fail(error)
        if tag >> 16 != 0x42 or type_byte != ItemType.STRUCTURE:
            # Not a KMIP structure at all: nothing says where the next message starts.
            return self._fail(KmipCodecError(ResultReason.INVALID_MESSAGE, "not a KMIP message"))
        end = HEADER_SIZE + length + (-length % 8)
        if len(self._buffer) < end:
            if self._peer_closed:
                self._closed = True
                return ConnectionEnded()
            return NEED_DATA
        data = bytes(self._buffer[:end])
        del self._buffer[:end]
        self.messages_received += 1
        if tag != _REQUEST_MESSAGE:
            # A sound KMIP structure, but not a request: answer it, go on with the next.
            error = KmipCodecError(ResultReason.INVALID_MESSAGE, "not a RequestMessage")
            self._out += error_response(FALLBACK_VERSION, error, self.now)
            return ANSWERED
        try:
            message = parse_request(decode_ttlv(data, max_depth=self.max_depth))
        except KmipCodecError as exc:
            self._out += error_response(_best_version(data), exc, self.now)
            return ANSWERED
        self._awaiting_response = True
        return RequestReceived(message)

    def _fail(self, error: KmipError) -> ConnectionEnded:
        self._out += error_response(FALLBACK_VERSION, error, self.now)
        self._closed = True
        self._buffer = bytearray()
        return ConnectionEnded(error)

    # -- output ------------------------------------------------------------------------------

    def send_response(
        self, message: RequestMessage, results: Sequence[BatchResult], timestamp: int
    ) -> None:
        """Answer the message last received, one result per batch item in order."""
        if not self._awaiting_response:
            raise RuntimeError("send_response without a RequestReceived to answer")
        self._awaiting_response = False
        self.now = timestamp
        self._out += encode_response(message.header.version, results, timestamp)

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out


def _best_version(data: bytes) -> tuple[int, int]:
    """The request's own protocol version for an error answer, if it can be read."""
    try:
        item = decode_ttlv(data)
        header = item.find("RequestHeader")
        if header is not None and header.type is ItemType.STRUCTURE:
            version = parse_version(header.find("ProtocolVersion"), "RequestHeader")
            if version in SUPPORTED_VERSIONS:
                return version
    except KmipError:
        pass
    return FALLBACK_VERSION
