"""The service manager's side of the systemd protocols, for tests without PID 1.

* ``NotifySocket``: what systemd binds for ``Type=notify`` services, an
  AF_UNIX datagram socket (a path or an abstract name); the test reads the
  daemon's sd_notify messages from it in order.
* ``ServiceProcess``: ``kmipd serve`` started the way systemd starts it:
  with ``NOTIFY_SOCKET``/``WATCHDOG_USEC`` in its environment, optionally
  through ``systemd-socket-activate`` with the listening socket passed in.
* ``RawConnection``: a blocking mutual-TLS connection that speaks frames by
  hand, so a test knows it is the same connection before and after a reload
  and can read the server certificate it was given.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from kmipd.client import client_context
from kmipd.protocol import FrameReader, decode_item, encode_frame, encode_item

Message = dict[str, str]


class NotifySocket:
    def __init__(self, directory: Path | None = None) -> None:
        """Bound at ``directory/notify.sock``, or in the abstract namespace without one."""
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if directory is None:
            name = f"kmipd-test-{secrets.token_hex(8)}"
            self.socket.bind("\0" + name)
            self.address = "@" + name
        else:
            path = directory / "notify.sock"
            self.socket.bind(str(path))
            self.address = str(path)
        self.messages: list[Message] = []

    def receive(self, timeout: float) -> Message | None:
        readable, _, _ = select.select([self.socket], [], [], max(timeout, 0))
        if not readable:
            return None
        data = self.socket.recv(65536).decode()
        message = dict(line.split("=", 1) for line in data.split("\n") if line)
        self.messages.append(message)
        return message

    def wait_for(self, match: Callable[[Message], bool], timeout: float = 60) -> Message:
        """Read messages until one matches; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is not None and match(message):
                return message
        raise AssertionError(f"no matching sd_notify message; got {self.messages}")

    def wait_for_field(self, key: str, value: str = "1", timeout: float = 60) -> Message:
        return self.wait_for(lambda m: m.get(key) == value, timeout)

    def collect(self, seconds: float) -> list[Message]:
        """Every message within the next ``seconds`` (a bounded window to show an absence)."""
        deadline = time.monotonic() + seconds
        received = []
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is not None:
                received.append(message)
        return received

    def close(self) -> None:
        self.socket.close()


def kmipd_serve(config: Path) -> list[str]:
    return [sys.executable, "-m", "kmipd", "serve", "--config", str(config)]


class ServiceProcess:
    """A daemon started as systemd would start it; stderr goes to ``log``."""

    def __init__(self, argv: list[str], *, log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = log.open("wb")
        environment = dict(os.environ)
        for variable in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS"):
            environment.pop(variable, None)
        environment.update(env or {})
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=self._log, env=environment
        )
        self._terminated = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30) -> str:
        """Bounded polling of the log file: a log line has no event to wait on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the log:\n{self.log()}")

    def signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._terminated = True
        self.process.send_signal(signum)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, once (as systemd does): a second could land after the handlers are gone."""
        if not self._terminated and self.process.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


def socket_activated(
    argv: list[str],
    *,
    log: Path,
    env: dict[str, str],
    name: str = "kmip",
    datagram: bool = False,
) -> tuple[ServiceProcess, int]:
    """``systemd-socket-activate -l 127.0.0.1:PORT`` running ``argv``; the process and PORT.

    The tool wants a fixed port: take a free one, and try another if a
    process elsewhere grabbed it in between.
    """
    for _ in range(5):
        probe = socket.socket(type=socket.SOCK_DGRAM if datagram else socket.SOCK_STREAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        command = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", f"--fdname={name}"]
        if datagram:
            command.append("--datagram")
        for key, value in env.items():
            command.append(f"--setenv={key}={value}")
        service = ServiceProcess([*command, *argv], log=log, env=env)
        try:
            service.wait_for_log(f"Listening on 127.0.0.1:{port}")
        except AssertionError:
            if "Address already in use" in service.log():
                service.close()
                continue
            service.close()
            raise
        return service, port
    raise AssertionError("no free port for systemd-socket-activate")


class RawConnection:
    """One mutual-TLS connection, frames by hand, no reconnects behind the test's back."""

    def __init__(self, address: str, credentials: dict[str, Path]) -> None:
        host, _, port = address.rpartition(":")
        context = client_context(**credentials)
        raw = socket.create_connection((host, int(port)), timeout=30)
        self.socket = context.wrap_socket(raw, server_hostname=host)
        self.reader = FrameReader(1 << 20)
        self._next_id = 1
        assert "result" in self.call("hello", {"versions": [1]})

    def server_certificate(self) -> x509.Certificate:
        der = self.socket.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)

    def frame(self, op: str, args: dict[str, Any]) -> tuple[int, bytes]:
        request_id = self._next_id
        self._next_id += 1
        message = {"id": request_id, "op": op, "args": args}
        return request_id, encode_frame(encode_item(message))

    def send(self, op: str, args: dict[str, Any]) -> int:
        request_id, frame = self.frame(op, args)
        self.socket.sendall(frame)
        return request_id

    def receive(self) -> Any:
        while (frame := self.reader.next_frame()) is None:
            data = self.socket.recv(65536)
            if not data:
                raise EOFError("the server closed the connection")
            self.reader.feed(data)
        return decode_item(frame)

    def call(self, op: str, args: dict[str, Any]) -> Any:
        request_id = self.send(op, args)
        response = self.receive()
        assert response["id"] == request_id, response
        return response

    def close(self) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            self.socket.close()


class PipelinedCreates:
    """create-dek requests kept ``window`` deep on one connection, as a storage system
    writing fast would; like a well-behaved client, it sends no more after the first
    shutting-down, collects what is outstanding and waits for the server to hang up."""

    def __init__(self, connection: RawConnection, *, window: int) -> None:
        self.connection = connection
        self.window = window
        self.acknowledged: dict[str, bytes] = {}
        #: Error codes of refused requests.
        self.refused: list[int] = []
        #: Sent, never answered when the server closed: the server never read them.
        self.unanswered = 0

    def run(self, *, total: int, on_ack: Callable[[int], object]) -> str:
        """Returns how the connection ended: "closed" (close_notify/FIN) or "reset"."""
        outstanding: set[int] = set()
        sent = 0
        try:
            while True:
                batch = []
                while (
                    not self.refused
                    and sent < total
                    and len(outstanding) + len(batch) < (self.window)
                ):
                    batch.append(self.connection.frame("create-dek", {"namespace": "orders"}))
                    sent += 1
                if batch:
                    self.connection.socket.sendall(b"".join(f for _, f in batch))
                    outstanding.update(request_id for request_id, _ in batch)
                response = self.connection.receive()
                assert response["id"] in outstanding, response
                outstanding.discard(response["id"])
                if "result" in response:
                    self.acknowledged[response["result"]["dek-id"]] = response["result"]["key"]
                    on_ack(len(self.acknowledged))
                else:
                    self.refused.append(response["error"]["code"])
        except EOFError:
            self.unanswered = len(outstanding)
            return "closed"
        except (ConnectionError, ssl.SSLError):
            self.unanswered = len(outstanding)
            return "reset"


def server_certificate(address: str, credentials: dict[str, Path]) -> x509.Certificate:
    """The certificate a new connection is given."""
    connection = RawConnection(address, credentials)
    try:
        return connection.server_certificate()
    finally:
        connection.close()


READY_ADDRESS = re.compile(r"serving on (\S+?)(,|;|$)")


def ready_address(message: Message) -> str:
    match = READY_ADDRESS.search(message.get("STATUS", ""))
    assert match, message
    return match.group(1)
