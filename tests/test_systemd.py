"""kmipd under a service manager, without PID 1: real subprocesses, real sockets.

The test plays systemd: it binds the NOTIFY_SOCKET, sets WATCHDOG_USEC,
passes a listening socket through systemd-socket-activate, sends SIGHUP
and SIGTERM, and checks what a real client sees over mutual TLS.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmipd.audit import verify
from kmipd.client import Client, NotAuthorizedError
from kmipd.daemon._dev import prepare_dev
from kmipd.daemon.config import render_config
from pki import CertificateAuthority
from tests.systemd_harness import (
    NotifySocket,
    PipelinedCreates,
    RawConnection,
    ServiceProcess,
    kmipd_serve,
    ready_address,
    server_certificate,
    socket_activated,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("systemd-socket-activate") is None,
        reason="needs systemd's tools (Debian package systemd; .ci/setup installs it)",
    ),
]


def credentials(data: Path, name: str = "storage") -> dict[str, Path]:
    pki = data / "pki"
    return {"ca": pki / "ca.pem", "cert": pki / f"{name}.pem", "key": pki / f"{name}-key.pem"}


def edit_config(path: Path, **sections: dict[str, Any]) -> None:
    """Rewrite the TOML config with some keys changed (section=dict of keys)."""
    document = tomllib.loads(path.read_text())
    grants = document.pop("grant", [])
    for section, values in sections.items():
        document.setdefault(section, {}).update(values)
    path.write_text(render_config(document, grants))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    directory = tmp_path / "dev"
    prepare_dev(directory, "127.0.0.1:0")
    return directory


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    socket = NotifySocket(tmp_path)
    yield socket
    socket.close()


def start(data: Path, notify: NotifySocket, log: Path, **env: str) -> tuple[ServiceProcess, str]:
    """kmipd serve with NOTIFY_SOCKET; returns once READY=1 named its address."""
    service = ServiceProcess(
        kmipd_serve(data / "kmipd.toml"), log=log, env={"NOTIFY_SOCKET": notify.address, **env}
    )
    try:
        ready = notify.wait_for_field("READY")
    except AssertionError:
        service.close()
        raise AssertionError(f"no READY=1; log:\n{service.log()}") from None
    return service, ready_address(ready)


def test_notify_sequence_from_start_to_stop(tmp_path: Path, data: Path) -> None:
    notify = NotifySocket()  # the abstract namespace ("@..."), as systemd's own socket may be
    try:
        service, address = start(data, notify, tmp_path / "kmipd.log", WATCHDOG_USEC="400000")
        # READY=1 came after the listener accepts: a client is served right away.
        with Client(address, **credentials(data)) as kms:
            dek = kms.create_dek("orders")
            key = bytes(dek.key)
        notify.wait_for_field("WATCHDOG")
        service.signal(signal.SIGHUP)
        notify.wait_for_field("RELOADING")
        notify.wait_for_field("READY")
        service.signal(signal.SIGTERM)
        notify.wait_for_field("STOPPING")
        assert service.stop() == 0
        notify.collect(0.2)  # the last messages, sent just before exit
    finally:
        notify.close()

    kinds = [next(iter(m)) for m in notify.messages if "WATCHDOG" not in m]
    statuses = [m["STATUS"] for m in notify.messages if "STATUS" in m]
    assert kinds[0] == "STATUS"  # progress before readiness
    assert any("key store" in s for s in statuses[: kinds.index("READY")])
    assert any("HSM" in s for s in statuses[: kinds.index("READY")])
    order = [k for k in kinds if k in ("READY", "RELOADING", "STOPPING")]
    assert order == ["READY", "RELOADING", "READY", "STOPPING"]
    first_watchdog = next(i for i, m in enumerate(notify.messages) if "WATCHDOG" in m)
    first_ready = next(i for i, m in enumerate(notify.messages) if "READY" in m)
    assert first_ready < first_watchdog
    assert statuses[-1] == "stopped"
    stopping = next(m for m in notify.messages if "STOPPING" in m)
    assert "draining" in stopping["STATUS"]
    assert int(stopping["EXTEND_TIMEOUT_USEC"]) >= 10_000_000  # drain_timeout (10 s) and more
    log = (tmp_path / "kmipd.log").read_text()
    assert key.hex() not in log
    assert all(line.startswith("<") for line in log.splitlines())  # journald priority prefixes


def test_watchdog_pings_stop_while_the_hsm_hangs(
    tmp_path: Path, data: Path, notify: NotifySocket
) -> None:
    service, address = start(data, notify, tmp_path / "kmipd.log", WATCHDOG_USEC="1000000")
    try:
        notify.wait_for_field("WATCHDOG")
        # A real hang: the software HSM's check reads the keyring under its lock,
        # as it would on a dead file system or beside a wedged process holding it.
        lock = os.open(data / "keyring.cbor.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            notify.wait_for(lambda m: "HSM NOT ANSWERING" in m.get("STATUS", ""))
            silent = notify.collect(2.5)  # five ping periods
            assert not [m for m in silent if "WATCHDOG" in m], silent
            assert "withholding watchdog pings" in service.log()
            with Client(address, **credentials(data)) as kms:
                status = kms.status()  # answers, within its own bound, and says why
            assert (status.state, status.hsm) == ("degraded", "software: unavailable")
        finally:
            os.close(lock)  # the HSM answers again
        notify.wait_for_field("WATCHDOG")
        notify.wait_for(lambda m: m.get("STATUS", "").startswith("serving on"))
        assert "HSM backend answers again" in service.log()
    finally:
        assert service.stop() == 0


def test_socket_activation_serves_mutual_tls_on_the_inherited_socket(
    tmp_path: Path, data: Path, notify: NotifySocket
) -> None:
    # server.listen names another port: the socket from systemd is the one served.
    edit_config(data / "kmipd.toml", server={"listen": ["127.0.0.1:1"]})
    service, port = socket_activated(
        kmipd_serve(data / "kmipd.toml"),
        log=tmp_path / "kmipd.log",
        env={"NOTIFY_SOCKET": notify.address},
    )
    try:
        address = f"127.0.0.1:{port}"
        # The first connection is what starts the daemon (systemd-socket-activate
        # execs it then): the client waits in the backlog and is served.
        with Client(address, **credentials(data)) as kms:
            dek = kms.create_dek("orders")
            assert bytes(kms.get_dek(dek.dek_id).key) == bytes(dek.key)
        ready = notify.wait_for_field("READY")
        assert ready_address(ready) == address
        log = service.log()
        assert "socket activation: serving on the 1 socket(s) systemd passed (kmip)" in log
        assert "127.0.0.1:1" not in log
    finally:
        assert service.stop() == 0


def test_a_socket_kmipd_cannot_serve_on_is_refused_with_a_clear_error(
    tmp_path: Path, data: Path
) -> None:
    service, port = socket_activated(
        kmipd_serve(data / "kmipd.toml"), log=tmp_path / "kmipd.log", env={}, datagram=True
    )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"wake up", ("127.0.0.1", port))  # what makes the tool start kmipd
        assert service.process.wait(60) == 1
        assert (
            "kmipd: error: socket-activation descriptor 3 (kmip) is not a TCP socket"
            in service.log()
        )
        assert "Traceback" not in service.log()
    finally:
        service.close()


def test_reload_rotates_the_server_certificate_without_dropping_connections(
    tmp_path: Path, data: Path, notify: NotifySocket
) -> None:
    service, address = start(data, notify, tmp_path / "kmipd.log")
    try:
        with Client(address, **credentials(data)) as kms:
            deks = {d.dek_id: bytes(d.key) for d in (kms.create_dek("orders") for _ in range(20))}
        old_connection = RawConnection(address, credentials(data))
        old_serial = old_connection.server_certificate().serial_number

        # Requests in flight across the reload, pipelined on one connection.
        failures: list[BaseException] = []
        stop = threading.Event()

        def keep_reading() -> None:
            try:
                with Client(address, **credentials(data)) as busy:
                    while not stop.is_set():
                        fetched = busy.get_deks(list(deks))
                        assert {d.dek_id: bytes(d.key) for d in fetched} == deks
            except BaseException as exc:
                failures.append(exc)

        reader = threading.Thread(target=keep_reading)
        reader.start()
        CertificateAuthority.load(data / "pki").issue_server(
            dns_names=("localhost",), ip_addresses=("127.0.0.1", "::1")
        )
        service.signal(signal.SIGHUP)
        notify.wait_for_field("RELOADING")
        notify.wait_for_field("READY")
        stop.set()
        reader.join(60)
        assert not failures

        new_serial = server_certificate(address, credentials(data)).serial_number
        assert new_serial != old_serial
        # The connection made before the reload still has its session, and works.
        dek_id, key = next(iter(deks.items()))
        response = old_connection.call("get-dek", {"dek-id": dek_id})
        assert response["result"]["key"] == key
        assert old_connection.server_certificate().serial_number == old_serial
        old_connection.close()
        assert "reloaded: certificates" in service.log()
    finally:
        assert service.stop() == 0


def test_reload_applies_new_grants_and_crypto_periods(
    tmp_path: Path, data: Path, notify: NotifySocket
) -> None:
    service, address = start(data, notify, tmp_path / "kmipd.log")
    try:
        with (
            Client(address, **credentials(data)) as kms,
            Client(address, **credentials(data, "admin")) as admin,
        ):
            before = admin.create_dek("orders")
            assert admin.get_attributes(dek_id=before.dek_id).protect_stop is None
            kms.create_dek("orders")
            config = data / "kmipd.toml"
            document = tomllib.loads(config.read_text())
            grants = [g for g in document.pop("grant") if "storage" not in g["identity"]]
            config.write_text(
                render_config(document, grants)
                + '[[crypto_period]]\napplies_to = "dek"\nprotect_days = 30\n'
            )
            service.signal(signal.SIGHUP)
            notify.wait_for_field("RELOADING")
            notify.wait_for_field("READY")
            with pytest.raises(NotAuthorizedError):
                kms.create_dek("orders")  # same client, same connection: the new grants rule
            after = admin.get_attributes(dek_id=admin.create_dek("orders").dek_id)
            assert after.protect_stop == after.created + 30 * 86400
        assert "reloaded: certificates, CRL, 1 grant(s)" in service.log()
    finally:
        assert service.stop() == 0


@pytest.mark.parametrize(
    ("breakage", "logged"),
    [
        ("syntax", "not valid TOML"),
        ("foreign-certificate", "does not chain to the CA"),
        ("mismatched-key", "is not the key of the certificate"),
    ],
)
def test_reload_with_a_broken_config_changes_nothing(
    tmp_path: Path, data: Path, notify: NotifySocket, breakage: str, logged: str
) -> None:
    service, address = start(data, notify, tmp_path / "kmipd.log")
    try:
        serial = server_certificate(address, credentials(data)).serial_number
        config = data / "kmipd.toml"
        document = tomllib.loads(config.read_text())
        grants = [g for g in document.pop("grant") if "storage" not in g["identity"]]
        if breakage == "syntax":
            broken = render_config(document, grants) + "\n[server\n"
        elif breakage == "foreign-certificate":
            other = CertificateAuthority.init(tmp_path / "other-ca", trust_domain="kmipd.test")
            document["tls"].update(cert=str(other.server_cert_path), key=str(other.server_key_path))
            broken = render_config(document, grants)
        else:
            other = CertificateAuthority.init(tmp_path / "other-ca", trust_domain="kmipd.test")
            document["tls"]["key"] = str(other.server_key_path)
            broken = render_config(document, grants)
        config.write_text(broken)  # also drops storage's grant: that must not apply either
        service.signal(signal.SIGHUP)
        notify.wait_for_field("RELOADING")
        ready = notify.wait_for_field("READY")
        assert "last reload refused" in ready["STATUS"]
        log = service.log()
        assert "reload refused, the running configuration stays in force" in log
        assert logged in log
        assert server_certificate(address, credentials(data)).serial_number == serial
        with Client(address, **credentials(data)) as kms:
            kms.create_dek("orders")  # the old grants are still in force
    finally:
        assert service.stop() == 0


def test_sigterm_during_a_pipelined_burst_loses_no_acknowledged_dek(
    tmp_path: Path, data: Path, notify: NotifySocket
) -> None:
    edit_config(data / "kmipd.toml", server={"drain_timeout": 0.5})
    service, address = start(data, notify, tmp_path / "kmipd.log")
    connection = RawConnection(address, credentials(data))
    burst = PipelinedCreates(connection, window=64)
    ended = burst.run(
        total=100_000, on_ack=lambda acks: acks == 100 and service.signal(signal.SIGTERM)
    )
    notify.wait_for_field("STOPPING")
    assert service.stop() == 0
    connection.close()

    assert len(burst.acknowledged) >= 100
    # Every request the daemon read got an answer: a DEK or shutting-down (301).
    assert set(burst.refused) <= {301}, set(burst.refused)
    assert ended == "closed", ended  # close_notify and FIN, not a reset
    log = (tmp_path / "kmipd.log").read_text()
    assert "draining" in log
    assert not any(key.hex() in log for key in burst.acknowledged.values())

    again, address = start(data, notify, tmp_path / "again.log")
    try:
        with Client(address, **credentials(data)) as kms:
            fetched = kms.get_deks(list(burst.acknowledged))
        assert {d.dek_id: bytes(d.key) for d in fetched} == burst.acknowledged
        # shutting-down means "not applied": nothing was stored beyond what was answered.
        with Client(address, **credentials(data, "admin")) as admin:
            stored, after = 0, None
            while True:
                page = admin.locate(kind="dek", namespace="orders", after=after)
                stored += len(page.keys)
                if page.next is None:
                    break
                after = page.next
        assert stored == len(burst.acknowledged)
    finally:
        assert again.stop() == 0


def test_sighup_after_rotation_continues_the_audit_chain_in_a_new_file(
    tmp_path: Path, data: Path, notify: NotifySocket
) -> None:
    """logrotate's way: rename the trail, then reload; nothing is lost or unchained."""
    service, address = start(data, notify, tmp_path / "kmipd.log")
    try:
        with Client(address, **credentials(data)) as kms:
            dek = kms.create_dek("orders")
            dek_id = dek.dek_id
            (data / "audit.log").rename(data / "audit.log.1")
            kms.get_dek(dek_id)  # written to the renamed file: the daemon still has it open
            service.signal(signal.SIGHUP)
            notify.wait_for_field("RELOADING")
            notify.wait_for_field("READY")
            kms.get_dek(dek_id)  # into the new file
        assert "audit trail rotated" in service.log()
    finally:
        assert service.stop() == 0
    old, new = data / "audit.log.1", data / "audit.log"
    assert verify(old, new).ok
    in_old = [json.loads(line)["operation"] for line in old.read_text().splitlines()]
    in_new = [json.loads(line)["operation"] for line in new.read_text().splitlines()]
    assert in_old[-2:] == ["create-dek", "get-dek"] and in_new == ["get-dek"]
