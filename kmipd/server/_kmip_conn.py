"""The trio shell around one KMIP connection: kmipd.kmip's state machine, KmipOperations.

The native listener hands a connection here when the first byte after the
TLS handshake is 0x42 (a KMIP RequestMessage). KMIP answers messages in
order, so one message is handled at a time; its batch items run in order
too (ID Placeholder carries results from one item to the next). The same
deadlines as the native protocol apply: idle, a started message, sending.

When the peer's certificate stops holding (revoked, expired, no longer
trusted), KMIP has no unsolicited message to say so: a message in progress
or arriving is answered item by item with Authentication Not Successful,
never served (an item of that message already committed stays committed, as
on the native side), and the connection is closed; an idle one is closed at
once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from kmipd.kmip import (
    ANSWERED,
    DEFAULT_MAX_MESSAGE_SIZE,
    NEED_DATA,
    BatchResult,
    ConnectionEnded,
    KmipConnection,
    KmipError,
    RequestReceived,
    ResultReason,
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
    def __init__(
        self,
        server: KmipServer,
        channel: TlsChannel,
        identity: str,
        peer: str,
        still_trusted: Callable[[], bool] = lambda: True,
    ) -> None:
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
        #: Re-checks the peer certificate (revocation, expiry): at dispatch and before answering.
        self._still_trusted = still_trusted
        #: Once set (the certificate stopped holding, or the connection is over its
        #: budget), every message is answered with it and nothing more is served.
        self._refusal: KmipError | None = None
        self._receive_scope: trio.CancelScope | None = None
        self._request_scope: trio.CancelScope | None = None

    def end_for_certificate(self, message: str) -> None:
        """The peer's certificate no longer holds: refuse what is in progress, then close."""
        self._refusal = KmipError(ResultReason.AUTHENTICATION_NOT_SUCCESSFUL, message)
        for scope in (self._receive_scope, self._request_scope):
            if scope is not None:
                scope.cancel()

    def start_draining(self) -> None:
        """Finish the message being handled, answer it, hang up (KMIP has no goaway)."""
        self._draining = True

    async def refuse(self, first: bytes, message: str) -> None:
        """Answer the first message with General Failure (KMIP has no "busy"), then close."""
        self._refusal = KmipError(ResultReason.GENERAL_FAILURE, message)
        await self.run(first)

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
            served = self._refusal is None and self._still_trusted()
            results = await self._handle(event) if served else None
            if results is None or not self._still_trusted() or self._refusal is not None:
                # Refused or cut off: answer every item refused (never served), then hang up.
                refused = self._refusal or KmipError(
                    ResultReason.AUTHENTICATION_NOT_SUCCESSFUL, "client certificate not trusted"
                )
                results = [BatchResult.failure(item, refused) for item in event.message.items]
                conn.send_response(event.message, results, int(time.time()))
                await self._send_queued()
                return
            conn.send_response(event.message, results, int(time.time()))
            if self._draining:
                await self._send_queued()
                return

    async def _handle(self, event: RequestReceived) -> list[BatchResult] | None:
        """The message's results; None when the certificate was cut off meanwhile."""
        self._busy = True
        try:
            with trio.CancelScope() as self._request_scope:
                return await self.operations.handle_message(
                    Caller(self.identity, None, protocol="kmip"),
                    event.message,
                    self.server.metrics.record_request,
                )
            return None
        finally:
            self._busy = False
            self._request_scope = None

    async def _receive(self) -> bytes | None:
        """Bytes within the deadline that applies; None when it passed or the session was cut.

        Bytes already there are taken without a cancel scope or a scheduler
        pass, as on the native side; only a receive that must wait gets one.
        """
        timeout = (
            self.limits.frame_timeout if self.conn.has_partial_message else self.limits.idle_timeout
        )
        if self._refusal is not None and not self.conn.has_partial_message:
            return None
        data = self.channel.receive_nowait()
        if data is not None:
            return data
        deadline = trio.current_time() + timeout if math.isfinite(timeout) else math.inf
        with trio.CancelScope(deadline=deadline) as scope:
            self._receive_scope = scope
            try:
                return await self.channel.receive_some(after_nowait=True)
            finally:
                self._receive_scope = None
        if self._refusal is not None:
            return None  # logged by the connection that cut it
        log.info("closing KMIP connection from %s: no message within %g s", self.peer, timeout)
        return None

    async def _send_queued(self) -> None:
        if not self.conn.has_data_to_send and not self.channel.has_backlog:
            return
        if self.channel.try_send(self.conn.data_to_send):
            return  # the socket took it all: no wait, so no deadline to keep
        with trio.move_on_after(self.limits.send_timeout) as scope:
            await self.channel.send_pending(self.conn.data_to_send)
        if scope.cancelled_caught:
            log.info("closing KMIP connection from %s: it stopped reading responses", self.peer)
            raise trio.BrokenResourceError("send timeout")
