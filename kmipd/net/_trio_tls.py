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
* on a socket, ``receive_nowait`` and ``try_send`` make the system call at
  once and never yield: a request answered without waiting costs one recv
  and one send, not the three scheduler passes, two cancel scopes and a lock
  of trio's stream calls (measured: most of a sequential get's server CPU).
  Only a call that would block waits, through the async methods.
"""

from __future__ import annotations

import contextlib
import errno
import os
import ssl
from collections.abc import Awaitable, Callable

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
        #: Encrypted bytes a non-waiting send could not push: older than anything in
        #: the outgoing BIO, so whoever sends next sends them first.
        self._backlog = b""
        #: The trio socket under the transport, for the non-waiting fast path (None:
        #: another kind of stream, which always takes the async path).
        self._socket = transport.socket if isinstance(transport, trio.SocketStream) else None

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

    @property
    def has_backlog(self) -> bool:
        """Encrypted bytes wait to be sent (a non-waiting send found the socket full)."""
        return bool(self._backlog)

    def receive_nowait(self) -> bytes | None:
        """Decrypted bytes available without waiting; ``b""`` once the peer has closed;
        None when only a wait would give more (then call ``receive_some``)."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        while True:
            try:
                data = self._tls.read(RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                raw = self._read_socket_nowait()
                if raw is None:
                    return None
                if not raw:
                    return b""
                self._incoming.write(raw)
                continue
            except ssl.SSLZeroReturnError:
                return b""
            if self._outgoing.pending:  # e.g. a KeyUpdate reply: sent now, or by the next send
                self._push_nowait()
            return data

    async def receive_some(self, *, after_nowait: bool = False) -> bytes:
        """Decrypted bytes; ``b""`` once the peer has closed (close_notify or EOF).

        ``after_nowait``: ``receive_nowait`` just returned None, so wait before
        asking the socket again.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        self._receiving = True
        try:
            while True:
                try:
                    data = self._tls.read(RECEIVE_SIZE)
                except ssl.SSLWantReadError:
                    if self._outgoing.pending or self._backlog:  # e.g. a KeyUpdate reply
                        await self._flush()
                    raw = await self._receive_raw_some(wait_first=after_nowait)
                    after_nowait = False
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

    def try_send(self, produce: Callable[[], bytes]) -> bool:
        """Encrypt and send what ``produce()`` returns without waiting, if that can be done.

        False when it could not: another send holds the lock (``produce`` not
        called), or the socket took only part (the rest is kept, in order, for
        the next send). Either way ``send_pending`` finishes the job.
        """
        if self._socket is None or self._send_lock.locked():
            return False
        data = produce()
        if data:
            self._tls.write(data)
        return self._push_nowait()

    async def send_pending(self, produce: Callable[[], bytes]) -> None:
        """Encrypt and send what ``produce()`` returns, called once we hold the send lock."""
        async with self._send_lock:
            data = produce()
            if data:
                self._tls.write(data)
            await self._send_out()

    async def _flush(self) -> None:
        async with self._send_lock:
            await self._send_out()

    async def _send_out(self) -> None:
        """Send the backlog and the outgoing BIO; the caller holds the send lock."""
        out = self._backlog + self._outgoing.read() if self._backlog else self._outgoing.read()
        self._backlog = b""
        if not out:
            return
        if self._socket is None:
            await self.transport.send_all(out)
            return
        view = memoryview(out)
        while view:
            sent = self._write_socket_nowait(view)
            view = view[sent:]
            if view:
                await self._wait(trio.lowlevel.wait_writable)

    def _push_nowait(self) -> bool:
        """Send what is encrypted as far as the socket takes it now; True if all went."""
        if self._socket is None or self._send_lock.locked():
            return not self._backlog and not self._outgoing.pending
        out = self._backlog + self._outgoing.read() if self._backlog else self._outgoing.read()
        self._backlog = out[self._write_socket_nowait(out) :] if out else b""
        return not self._backlog

    # -- the socket itself: system calls that never wait -----------------------------------

    def _fileno(self) -> int:
        """Looked up on each call: a closed socket's number may already belong to another."""
        assert self._socket is not None
        fd = self._socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        return fd

    def _read_socket_nowait(self) -> bytes | None:
        if self._socket is None:
            return None
        try:
            return os.read(self._fileno(), RECEIVE_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _stream_error(exc) from exc

    def _write_socket_nowait(self, data: bytes | memoryview) -> int:
        try:
            return os.write(self._fileno(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _stream_error(exc) from exc

    async def _receive_raw_some(self, *, wait_first: bool) -> bytes | bytearray:
        if self._socket is None:
            return await self.transport.receive_some(RECEIVE_SIZE)
        if wait_first:
            await self._wait(trio.lowlevel.wait_readable)
        while True:
            raw = self._read_socket_nowait()
            if raw is not None:
                return raw
            await self._wait(trio.lowlevel.wait_readable)

    async def _wait(self, wait: Callable[[trio.socket.SocketType], Awaitable[None]]) -> None:
        assert self._socket is not None
        try:
            await wait(self._socket)
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the socket was closed") from None

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


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """What trio's SocketStream raises for the same failure."""
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")
