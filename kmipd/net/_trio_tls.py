"""TLS over a trio stream, for the server and the trio client.

A thin shell over ``ssl.SSLObject`` with memory BIOs, used instead of
``trio.SSLStream`` for two reasons:

* after a failed handshake, OpenSSL has already queued the alert that
  says why (certificate required, unknown CA, revoked, expired...);
  SSLStream drops it (python-trio/trio PR #3413), so the refused peer
  sees a bare EOF. Here it is flushed before the connection closes.
* ``send_pending`` takes the bytes to send from a callback *under the send
  lock*, so responses that finished while another send was in progress go
  out together in one TLS record instead of one record each.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable

import trio

RECEIVE_SIZE = 65536
#: How long a refused peer gets to receive its alert before we hang up.
ALERT_FLUSH_TIMEOUT = 1.0


class TlsHandshakeError(Exception):
    """The handshake failed; ``reason`` is OpenSSL's short reason, when there is one."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class TlsChannel:
    def __init__(
        self,
        transport: trio.abc.Stream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._send_lock = trio.Lock()  # FIFO-fair: bytes leave in the order they were produced
        self._receiving = False

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._tls

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._receive_raw("the peer closed the connection during the handshake")
            except ssl.SSLError as exc:
                with (
                    trio.move_on_after(ALERT_FLUSH_TIMEOUT),
                    contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                ):
                    await self._flush()
                reason = exc.reason
                if isinstance(exc, ssl.SSLCertVerificationError):
                    reason = exc.verify_message  # e.g. "certificate has expired"
                raise TlsHandshakeError(str(exc), reason) from exc
        await self._flush()

    async def _receive_raw(self, eof_message: str) -> None:
        data = await self.transport.receive_some(RECEIVE_SIZE)
        if not data:
            raise TlsHandshakeError(eof_message)
        self._incoming.write(data)

    async def receive_some(self) -> bytes:
        """Decrypted bytes; ``b""`` once the peer has closed (close_notify or EOF)."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        self._receiving = True
        try:
            while True:
                try:
                    data = self._tls.read(RECEIVE_SIZE)
                except ssl.SSLWantReadError:
                    if self._outgoing.pending:  # e.g. a KeyUpdate reply
                        await self._flush()
                    raw = await self.transport.receive_some(RECEIVE_SIZE)
                    if not raw:
                        return b""
                    self._incoming.write(raw)
                    continue
                except ssl.SSLZeroReturnError:
                    return b""
                if self._outgoing.pending:
                    await self._flush()
                return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes) -> None:
        await self.send_pending(lambda: data)

    async def send_pending(self, produce: Callable[[], bytes]) -> None:
        """Encrypt and send what ``produce()`` returns, called once we hold the send lock."""
        async with self._send_lock:
            data = produce()
            if data:
                self._tls.write(data)
            out = self._outgoing.read()
            if out:
                await self.transport.send_all(out)

    async def _flush(self) -> None:
        async with self._send_lock:
            out = self._outgoing.read()
            if out:
                await self.transport.send_all(out)

    async def aclose(self, *, linger: float = 0.0) -> None:
        """Send close_notify (best effort) and close the transport.

        With ``linger``, half-close first and read (and drop) what the peer
        still sends until it closes too, for at most ``linger`` seconds:
        closing a TCP socket with unread data makes the kernel send a reset,
        which can destroy the last answers still on their way to the peer.
        """
        try:
            with trio.move_on_after(ALERT_FLUSH_TIMEOUT):
                with contextlib.suppress(ssl.SSLError):  # want-read: we do not wait for theirs
                    self._tls.unwrap()
                await self._flush()
            if linger > 0 and isinstance(self.transport, trio.abc.HalfCloseableStream):
                with trio.move_on_after(linger):
                    await self.transport.send_eof()
                    while await self.transport.receive_some(RECEIVE_SIZE):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass
        finally:
            await self.transport.aclose()
