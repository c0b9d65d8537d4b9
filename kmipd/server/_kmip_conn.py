"""The trio shell around one KMIP connection: kmipd.kmip's state machine, KmipOperations.

The native listener hands a connection here when the first byte after the
TLS handshake is 0x42 (a KMIP RequestMessage). KMIP answers messages in
order, so one message is handled at a time; its batch items run in order
too (ID Placeholder carries results from one item to the next). The same
deadlines as the native protocol apply: idle, a started message, sending.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import attrs
import trio

from kmipd.kmip import (
    ANSWERED,
    DEFAULT_MAX_MESSAGE_SIZE,
    NEED_DATA,
    ConnectionEnded,
    KmipConnection,
    RequestReceived,
)
from kmipd.service import Caller, KmipOperations

if TYPE_CHECKING:
    from kmipd.net._trio_tls import TlsChannel
    from kmipd.server._server import KmipServer

log = logging.getLogger("kmipd.server.kmip")

#: Messages one connection may have answered in a row before others get a turn.
MESSAGES_PER_TURN = 4


@attrs.frozen
class KmipSettings:
    """``[kmip]`` in the config; the server serves KMIP only when it has these."""

    enabled: bool = True
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: Where a Create/Register without an Object Group puts its object.
    default_namespace: str = "kmip"


class KmipSession:
    def __init__(self, server: KmipServer, channel: TlsChannel, identity: str, peer: str) -> None:
        self.server = server
        self.channel = channel
        self.identity = identity
        self.peer = peer
        self.limits = server.limits
        settings = server.kmip or KmipSettings()
        self.conn = KmipConnection(
            max_message_size=settings.max_message_size, clock_seconds=int(time.time())
        )
        self.operations = KmipOperations(
            server.service, default_namespace=settings.default_namespace
        )
        self._draining = False
        self._busy = False

    def start_draining(self) -> None:
        """Finish the message being handled, answer it, hang up (KMIP has no goaway)."""
        self._draining = True

    async def run(self, first: bytes) -> None:
        conn = self.conn
        conn.receive_data(first)
        answered = 0
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                await self._send_queued()
                if self._draining:
                    return
                data = await self._receive()
                if data is None:
                    return
                conn.receive_data(data)
                continue
            answered += 1
            if answered % MESSAGES_PER_TURN == 0:
                await trio.lowlevel.checkpoint()
            if event is ANSWERED:
                self.server.metrics.record_request("kmip-invalid-message", 0.0, None)
                continue
            if isinstance(event, ConnectionEnded):
                await self._send_queued()
                if event.error is not None:
                    log.info("KMIP connection from %s ended: %s", self.peer, event.error.message)
                return
            assert isinstance(event, RequestReceived)
            self._busy = True
            try:
                results = await self.operations.handle_message(
                    Caller(self.identity, None, protocol="kmip"),
                    event.message,
                    self.server.metrics.record_request,
                )
            finally:
                self._busy = False
            conn.send_response(event.message, results, int(time.time()))
            if self._draining:
                await self._send_queued()
                return

    async def _receive(self) -> bytes | None:
        """Bytes within the deadline that applies; None when it passed."""
        timeout = (
            self.limits.frame_timeout if self.conn.has_partial_message else self.limits.idle_timeout
        )
        with trio.move_on_after(timeout if math.isfinite(timeout) else math.inf):
            return await self.channel.receive_some()
        log.info("closing KMIP connection from %s: no message within %g s", self.peer, timeout)
        return None

    async def _send_queued(self) -> None:
        if not self.conn.has_data_to_send:
            return
        with trio.move_on_after(self.limits.send_timeout) as scope:
            await self.channel.send_pending(self.conn.data_to_send)
        if scope.cancelled_caught:
            log.info("closing KMIP connection from %s: it stopped reading responses", self.peer)
            raise trio.BrokenResourceError("send timeout")
