"""What systemd hands a service, read and answered without libsystemd.

* ``$NOTIFY_SOCKET``: the service manager's AF_UNIX datagram socket
  (a path, or ``@name`` in the abstract namespace). ``Type=notify`` waits
  for ``READY=1``; ``STATUS=`` is what ``systemctl status`` shows;
  ``WATCHDOG=1`` keeps ``WatchdogSec=`` from restarting us; ``RELOADING=1``
  and ``STOPPING=1`` mark reloads and shutdown. See sd_notify(3).
* ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID``: the watchdog interval, if any.
* ``$LISTEN_FDS`` / ``$LISTEN_PID`` / ``$LISTEN_FDNAMES``: listening sockets
  passed from a ``.socket`` unit (or ``systemd-socket-activate``), starting
  at descriptor 3. See sd_listen_fds(3).

Every reader here checks that a variable is meant for this process (the
``*_PID`` variables) and unsets what must not leak into children. Nothing
in this module blocks: a notification the manager cannot take right now is
dropped with a debug line rather than stalling the event loop.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import attrs

log = logging.getLogger("kmipd.systemd")

#: sd_listen_fds(3): passed descriptors start here.
LISTEN_FDS_START = 3


class SystemdError(Exception):
    """What systemd passed cannot be used; the message says which variable and why."""


class Notifier:
    """sd_notify(3): datagrams of ``KEY=value`` lines to ``$NOTIFY_SOCKET``; a no-op without it."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._target: str | bytes | None = None
        self._socket: socket.socket | None = None
        if address:
            # "@name" is the abstract namespace: a leading NUL byte on the wire.
            self._target = b"\0" + address[1:].encode() if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, **fields: str | int) -> None:
        """Send one message: ``notify(READY=1, STATUS="serving")``."""
        if self._socket is None or self._target is None:
            return
        message = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode(), self._target)
        except OSError as exc:
            # The manager went away or its queue is full: never worth stalling for.
            log.debug("sd_notify to %s failed: %s", self.address, exc)

    def status(self, text: str) -> None:
        self.notify(STATUS=text)

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload (systemd 253+) tell this
        # reload from an earlier one; older managers ignore the field.
        self.notify(
            RELOADING=1,
            MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
            STATUS="reloading the configuration",
        )

    def stopping(self, status: str, *, needs_seconds: float) -> None:
        """Shutdown began; ask for ``needs_seconds`` more, so a drain is not cut short."""
        self.notify(STOPPING=1, STATUS=status, EXTEND_TIMEOUT_USEC=int(needs_seconds * 1_000_000))

    def watchdog(self) -> None:
        self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


@attrs.frozen
class InheritedSocket:
    name: str
    socket: socket.socket


@attrs.define
class ServiceManager:
    """What the service manager gave this process, read once at start."""

    notifier: Notifier = attrs.field(factory=lambda: Notifier(None))
    #: Seconds; None when no watchdog is armed for this process.
    watchdog_interval: float | None = None
    sockets: list[InheritedSocket] = attrs.field(factory=list)
    #: The sockets are a worker supervisor's (server.workers), not systemd's.
    from_supervisor: bool = False
    #: A worker's private metrics socket, scraped by its supervisor (else metrics.listen).
    metrics_socket: Path | None = None

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> ServiceManager:
        """Read (and unset, where sd_listen_fds(3) says so) the variables systemd set."""
        env = os.environ if environ is None else environ
        return cls(
            notifier=Notifier(env.get("NOTIFY_SOCKET") or None),
            watchdog_interval=watchdog_interval(env),
            sockets=inherited_sockets(env),
        )


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """``$WATCHDOG_USEC`` in seconds, if it is meant for this process."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # set for another process (we were started by a wrapper)
    try:
        value = int(usec)
    except ValueError:
        raise SystemdError(f"WATCHDOG_USEC={usec!r} is not a number of microseconds") from None
    if value <= 0:
        return None
    return value / 1_000_000


def inherited_sockets(env: MutableMapping[str, str]) -> list[InheritedSocket]:
    """Listening TCP sockets passed by socket activation, checked and made non-blocking.

    The variables are removed once read, so a child process never believes
    the descriptors are its own.
    """
    count_text = env.get("LISTEN_FDS")
    if not count_text:
        return []
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []  # meant for another process
    try:
        count = int(count_text)
    except ValueError:
        raise SystemdError(f"LISTEN_FDS={count_text!r} is not a number") from None
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for variable in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(variable, None)
    sockets = []
    for index in range(count):
        fd = LISTEN_FDS_START + index
        name = names[index] if index < len(names) else "unknown"
        sockets.append(InheritedSocket(name, _listening_socket(fd, name)))
    return sockets


def _listening_socket(fd: int, name: str) -> socket.socket:
    where = f"socket-activation descriptor {fd} ({name})"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise SystemdError(f"{where}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise SystemdError(f"{where} is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise SystemdError(
            f"{where} is not a TCP socket: kmipd serves TLS over TCP (ListenStream=HOST:PORT)"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise SystemdError(f"{where} is not listening (Accept=no is required)")
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def _one_line(text: str) -> str:
    # A newline would start a new KEY=value assignment in the message.
    return text.replace("\n", " ")
