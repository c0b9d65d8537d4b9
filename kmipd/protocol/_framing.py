"""Length-prefixed framing: a 4-byte big-endian length, then the CBOR item.

The reader refuses an oversized frame as soon as its 4-byte header has
arrived, before any of the body is buffered, so a hostile length prefix
costs the server four bytes of memory.
"""

from __future__ import annotations

import struct

from kmipd.protocol._errors import ErrorCode, ProtocolError

HEADER_SIZE = 4
DEFAULT_MAX_FRAME_SIZE = 64 * 1024
#: The length field is 32 bits; a configured limit can never exceed it.
ABSOLUTE_MAX_FRAME_SIZE = 2**32 - 1

_HEADER = struct.Struct(">I")


def encode_frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


class FrameReader:
    """Accumulates received bytes and cuts them into frames.

    Compaction is amortised: consumed bytes are dropped only once they are
    at least half the buffer, so cutting many small frames from one large
    read stays linear.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not 0 < max_frame_size <= ABSOLUTE_MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be 1..{ABSOLUTE_MAX_FRAME_SIZE}")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._start = 0
        self._broken = False

    def feed(self, data: bytes) -> None:
        if self._broken:
            raise RuntimeError("feed() after a framing error")
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer) - self._start

    def next_frame(self) -> bytes | None:
        """Return the next complete frame's payload, or None if more bytes are needed.

        Raises ProtocolError(FRAME_TOO_LARGE) when a header announces more
        than the limit; after that the stream is unusable because the next
        frame boundary is unknown.
        """
        if self._broken:
            raise RuntimeError("next_frame() after a framing error")
        available = len(self._buffer) - self._start
        if available < HEADER_SIZE:
            self._compact()
            return None
        (length,) = _HEADER.unpack_from(self._buffer, self._start)
        if length > self.max_frame_size:
            self._broken = True
            self._buffer = bytearray()
            self._start = 0
            raise ProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame of {length} bytes announced; the limit is {self.max_frame_size}",
            )
        end = self._start + HEADER_SIZE + length
        if len(self._buffer) < end:
            self._compact()
            return None
        payload = bytes(self._buffer[self._start + HEADER_SIZE : end])
        self._start = end
        return payload

    def _compact(self) -> None:
        if self._start and self._start * 2 >= len(self._buffer):
            del self._buffer[: self._start]
            self._start = 0
