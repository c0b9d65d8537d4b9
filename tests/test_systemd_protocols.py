"""The systemd protocols kmipd speaks itself: sd_notify, sd_listen_fds, the journal."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from kmipd.daemon._logging import (
    EventFormatter,
    JournalHandler,
    configure_logging,
    decode_journal_fields,
    encode_journal_fields,
)
from kmipd.daemon._systemd import Notifier, SystemdError, inherited_sockets, watchdog_interval
from kmipd.hsm import HsmUnavailableError, SoftwareHsm
from tests.systemd_harness import NotifySocket


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_datagrams_to_a_path_or_an_abstract_socket(
    tmp_path: Path, abstract: bool
) -> None:
    manager = NotifySocket(None if abstract else tmp_path)
    notifier = Notifier(manager.address)
    try:
        notifier.ready("serving on 127.0.0.1:5696\nsecond line")
        notifier.reloading()
        notifier.stopping("stopping", needs_seconds=12.5)
        notifier.watchdog()
        ready, reloading, stopping, watchdog = (manager.receive(5) for _ in range(4))
    finally:
        notifier.close()
        manager.close()
    assert ready == {"READY": "1", "STATUS": "serving on 127.0.0.1:5696 second line"}
    assert reloading is not None
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert stopping == {"STOPPING": "1", "STATUS": "stopping", "EXTEND_TIMEOUT_USEC": "12500000"}
    assert watchdog == {"WATCHDOG": "1"}


def test_notifier_without_a_manager_or_with_a_vanished_one_does_nothing(tmp_path: Path) -> None:
    Notifier(None).ready("nobody listens")
    gone = Notifier(str(tmp_path / "nobody.sock"))
    gone.ready("the manager went away")  # logged at debug level, never raised
    gone.close()


def test_watchdog_interval_is_read_only_for_this_process() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    with pytest.raises(SystemdError, match="WATCHDOG_USEC='soon' is not a number"):
        watchdog_interval({"WATCHDOG_USEC": "soon"})


def test_listen_fds_meant_for_another_process_are_left_alone() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "kmip"}
    assert inherited_sockets(env) == []
    assert env == {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "kmip"}
    assert inherited_sockets({}) == []


@pytest.fixture
def descriptor_3() -> Iterator[None]:
    """Whatever occupies descriptor 3 is kept aside and put back after the test."""
    saved = os.dup(3)
    try:
        yield
    finally:
        os.dup2(saved, 3)
        os.close(saved)


def place_at_3(sock: socket.socket) -> None:
    os.dup2(sock.fileno(), 3)
    sock.close()


@pytest.mark.usefixtures("descriptor_3")
def test_an_inherited_listening_socket_is_taken_and_the_variables_unset() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    place_at_3(listener)
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "kmip"}
    [inherited] = inherited_sockets(env)
    assert env == {}  # not passed on to children
    assert inherited.name == "kmip"
    assert inherited.socket.getsockname() == ("127.0.0.1", port)
    assert not inherited.socket.get_inheritable()
    assert inherited.socket.getblocking() is False
    inherited.socket.detach()  # descriptor 3 is put back by the fixture


@pytest.mark.usefixtures("descriptor_3")
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "is not a TCP socket"),
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "is not listening"),
    ],
)
def test_an_unusable_inherited_socket_is_refused_by_name(make: object, message: str) -> None:
    sock = make()  # type: ignore[operator]
    place_at_3(sock)
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "kmip"}
    with pytest.raises(SystemdError, match=rf"descriptor 3 \(kmip\) {message}"):
        inherited_sockets(env)


# -- logging -----------------------------------------------------------------------------------


def record(message: str, *, level: int = logging.INFO, **fields: object) -> logging.LogRecord:
    entry = logging.LogRecord("kmipd.server", level, "/x.py", 7, message, None, None, "run")
    entry.fields = fields
    return entry


def test_a_line_has_the_priority_prefix_the_fields_and_never_a_second_line() -> None:
    formatter = EventFormatter(priority_prefix=True)
    assert (
        formatter.format(record("client refused", level=logging.WARNING, peer="10.0.0.1:4000"))
        == "<4>kmipd.server: client refused peer=10.0.0.1:4000"
    )
    failing = record("request failed", level=logging.ERROR, why='has "quotes" and spaces')
    error = ValueError("first\nsecond")
    failing.exc_info = (ValueError, error, None)
    line = formatter.format(failing)
    assert "\n" not in line
    assert line == (
        '<3>kmipd.server: request failed why="has \\"quotes\\" and spaces"'
        "\\nValueError: first\\nsecond"
    )


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[socket.socket]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "journal.sock"))
    listener.settimeout(5)
    yield listener
    listener.close()


def test_native_journal_protocol_when_journal_stream_is_stderr(
    tmp_path: Path, journal: socket.socket
) -> None:
    stderr = (tmp_path / "stderr").open("w")
    info = os.fstat(stderr.fileno())
    try:
        configure_logging(
            "debug",
            environ={"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"},
            stream=stderr,
            journal_socket=str(tmp_path / "journal.sock"),
        )
        log = logging.getLogger("kmipd.daemon")
        log.info("reloaded: %d grant(s)", 3, extra={"fields": {"config": "/etc/kmipd/kmipd.toml"}})
        log.error("two\nlines")
        first = decode_journal_fields(journal.recv(65536))
        second = decode_journal_fields(journal.recv(65536))
    finally:
        reset_logging()
        stderr.close()
    assert first["MESSAGE"] == "kmipd.daemon: reloaded: 3 grant(s)"
    assert first["PRIORITY"] == "6"
    assert first["SYSLOG_IDENTIFIER"] == "kmipd"
    assert first["LOGGER"] == "kmipd.daemon"
    assert first["KMIPD_CONFIG"] == "/etc/kmipd/kmipd.toml"
    assert second["MESSAGE"] == "kmipd.daemon: two\nlines"  # binary-safe field
    assert second["PRIORITY"] == "3"
    assert (tmp_path / "stderr").read_text() == ""


def test_without_the_journal_socket_records_go_to_stderr(tmp_path: Path) -> None:
    stderr_path = tmp_path / "stderr"
    stderr = stderr_path.open("w")
    info = os.fstat(stderr.fileno())
    try:
        configure_logging(
            environ={"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"},
            stream=stderr,
            journal_socket=str(tmp_path / "missing.sock"),
        )
        logging.getLogger("kmipd.daemon").warning("journal away")
        assert isinstance(logging.getLogger("kmipd").handlers[0], JournalHandler)
    finally:
        reset_logging()
        stderr.close()
    assert stderr_path.read_text() == "<4>kmipd.daemon: journal away\n"


def test_a_terminal_gets_timestamps_and_a_pipe_gets_priorities(tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    terminal = os.fdopen(follower, "w")
    try:
        configure_logging(environ={}, stream=terminal)
        logging.getLogger("kmipd.server").info("hello")
        terminal.flush()
        shown = os.read(leader, 4096).decode()
        assert shown.rstrip().endswith(" INFO kmipd.server: hello")
        assert shown[:4].isdigit()  # the year
    finally:
        reset_logging()
        terminal.close()
        os.close(leader)
    piped = (tmp_path / "log").open("w")
    try:
        configure_logging(environ={}, stream=piped)
        logging.getLogger("kmipd.server").info("hello")
    finally:
        reset_logging()
        piped.close()
    assert (tmp_path / "log").read_text() == "<6>kmipd.server: hello\n"


def reset_logging() -> None:
    """Back to how tests run in-process: no handler of kmipd's own."""
    root = logging.getLogger("kmipd")
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = []
    root.setLevel(logging.NOTSET)
    root.propagate = True


def test_journal_fields_round_trip() -> None:
    fields = {"MESSAGE": "a\nb", "PRIORITY": "6", "KMIPD_PEER": "x=y"}
    assert decode_journal_fields(encode_journal_fields(fields)) == fields


# -- the HSM check the watchdog relies on -------------------------------------------------------


async def test_a_hung_hsm_check_is_shared_by_later_checks_not_repeated(tmp_path: Path) -> None:
    hsm = SoftwareHsm.open(tmp_path / "master.key", tmp_path / "keyring.cbor", create=True)
    await hsm.check()
    lock = os.open(tmp_path / "keyring.cbor.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the keyring's lock, held by a wedged writer
        threads = threading.active_count()
        runs = set()
        for _ in range(5):
            with trio.move_on_after(0.05) as waited:
                await hsm.check()
            assert waited.cancelled_caught
            runs.add(id(hsm._check_run))
        assert len(runs) == 1  # one read, hanging; the others waited on it
        assert threading.active_count() <= threads + 1
    finally:
        os.close(lock)
    with trio.fail_after(10):
        await hsm.check()  # the hung read finishes, and checks pass again
    (tmp_path / "keyring.cbor").write_bytes(b"garbage")
    with pytest.raises(HsmUnavailableError, match="is malformed"):
        await hsm.check()
    hsm.close()
