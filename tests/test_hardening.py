"""Issue 13 against a real ``kmipd serve``: revocation and expiry end open sessions."""

from __future__ import annotations

import datetime
import json
import re
import socket
import urllib.request
from pathlib import Path

import pytest
import trio

from kmipd.audit import records
from kmipd.client import CertificateRejectedError, CertificateRevokedError, Client, DekCache
from kmipd.protocol import ErrorCode
from pki import CertificateAuthority
from tests.conftest import RawConnection
from tests.processes import Daemon, run_kmipd

pytestmark = pytest.mark.slow

#: The scan runs every second; a cut must arrive well within this.
CUT_WITHIN = 10.0


def dev_client(data: Path, address: str, name: str = "storage", **kwargs: object) -> Client:
    pki = data / "pki"
    return Client(
        address,
        ca=pki / "ca.pem",
        cert=pki / f"{name}.pem",
        key=pki / f"{name}-key.pem",
        **kwargs,  # type: ignore[arg-type]
    )


async def hello(raw: RawConnection) -> None:
    await raw.send({"id": 0, "op": "hello", "args": {"versions": [1]}})
    assert "result" in await raw.receive()


async def wait_for_cut(raw: RawConnection) -> list[object]:
    """Every message until the server closes; fails if it does not within CUT_WITHIN."""
    with trio.fail_after(CUT_WITHIN):
        while True:
            try:
                messages = await raw.receive_until_closed()
            except trio.TooSlowError:
                continue  # receive()'s own 10 s bound: keep waiting within ours
            return messages


def audit_closings(data: Path) -> list[dict[str, object]]:
    return [r for _, r in records(data / "audit.log") if r["operation"] == "connection-closed"]


async def test_revocation_ends_open_connections(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    daemon = Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=tmp_path / "d.log")
    ca = CertificateAuthority.load(data / "pki")
    raw = await RawConnection.open(daemon.address, ca, "storage")
    await hello(raw)
    cache = DekCache()
    kms = dev_client(data, daemon.address, cache=cache)
    dek = kms.create_dek("orders")
    assert kms.get_dek(dek.dek_id).key_bytes() == dek.key_bytes()
    assert len(cache) == 1
    admin = await RawConnection.open(daemon.address, ca, "admin")
    await hello(admin)

    revoked = run_kmipd("pki", "revoke", data / "pki", "storage")
    assert revoked.returncode == 0, revoked.stderr

    messages = await wait_for_cut(raw)
    [final] = messages
    assert isinstance(final, dict)
    assert "id" not in final
    assert final["error"]["code"] == ErrorCode.CERTIFICATE_REVOKED
    assert final["error"]["name"] == "certificate-revoked"

    # The pooled connection of the client library was cut the same way: the
    # client raises the non-retryable error, and its cache is empty (a create
    # always asks the daemon; a cached get-dek asks at the next revocation check).
    with pytest.raises(CertificateRevokedError) as raised:
        kms.create_dek("orders")
    assert isinstance(raised.value, CertificateRejectedError)
    assert len(cache) == 0
    # A new connection is refused at the handshake: still the same error family.
    with pytest.raises(CertificateRejectedError):
        kms.get_dek(dek.dek_id)
    kms.close()

    # Another identity's open connection is untouched.
    await admin.send({"id": 1, "op": "status", "args": {}})
    assert "result" in await admin.receive()
    await admin.aclose()

    await raw.aclose()
    assert daemon.stop() == 0
    assert "client certificate was revoked" in daemon.stderr()
    closings = audit_closings(data)  # the raw connection and the client's pooled one
    assert len(closings) == 2
    for closing in closings:
        assert str(closing["identity"]).endswith("/storage")
        assert closing["result"] == "certificate-revoked"
        assert str(closing["detail"]).startswith("revoked")


async def test_expiry_ends_open_connections(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    daemon = Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=tmp_path / "d.log")
    ca = CertificateAuthority.load(data / "pki")
    not_after = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_after += datetime.timedelta(seconds=4)
    ca.issue_client("storage", not_after=not_after, force=True)
    raw = await RawConnection.open(daemon.address, ca, "storage")
    await hello(raw)
    # Requests are served until the certificate's notAfter...
    await raw.send({"id": 1, "op": "status", "args": {}})
    assert "result" in await raw.receive()

    messages = await wait_for_cut(raw)
    assert datetime.datetime.now(datetime.UTC) > not_after
    [final] = messages
    assert isinstance(final, dict)
    assert final["error"]["code"] == ErrorCode.CERTIFICATE_REVOKED
    assert "expired" in final["error"]["message"]
    await raw.aclose()
    await raw.aclose()
    assert daemon.stop() == 0
    [closing] = audit_closings(data)
    assert str(closing["detail"]).startswith("expired")


def test_revoked_error_is_documented() -> None:
    root = Path(__file__).parent.parent
    assert "certificate-revoked: 102" in (root / "conformance" / "protocol.cddl").read_text()
    assert "| 102 | `certificate-revoked` |" in (root / "conformance" / "PROTOCOL.md").read_text()
    assert json.dumps(ErrorCode.CERTIFICATE_REVOKED.wire_name) == '"certificate-revoked"'


# -- connection budgets ----------------------------------------------------------------

LIMITS = {
    "max_connections": 40,
    "max_handshaking": 8,
    "max_handshaking_per_address": 6,
    "max_connections_per_identity": 5,
    "max_connections_ungranted": 2,
    "handshake_timeout": 30.0,
}


def start_limited(tmp_path: Path) -> tuple[Daemon, Path, str]:
    """A daemon with small budgets (the test holds a few hundred sockets, not thousands)."""
    data = tmp_path / "dev"
    first = Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=tmp_path / "0.log")
    assert first.stop() == 0
    limits = "".join(f"{key} = {value}\n" for key, value in LIMITS.items())
    config = data / "kmipd-limited.toml"
    config.write_text(
        re.sub(
            r"listen = \[.*\]\n",
            f'listen = ["127.0.0.1:0"]\n{limits}',
            (data / "kmipd.toml").read_text(),
        )
        + '\n[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    daemon = Daemon("--config", config, log=tmp_path / "1.log")
    [metrics] = re.findall(r"Prometheus metrics on (http://\S+)", daemon.stderr())
    return daemon, data, metrics


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    }


def test_a_flood_of_bare_connections_does_not_lock_out_a_granted_client(tmp_path: Path) -> None:
    daemon, data, metrics = start_limited(tmp_path)
    host, _, port = daemon.address.rpartition(":")
    flood = [socket.create_connection((host, int(port))) for _ in range(3 * 40)]
    try:
        with dev_client(data, daemon.address) as kms:
            dek = kms.create_dek("orders")
            assert kms.get_dek(dek.dek_id).key_bytes() == dek.key_bytes()
        seen = scrape(metrics)
        assert seen["kmipd_handshakes_shed_total"] >= 3 * 40 - LIMITS["max_handshaking"]
        assert seen["kmipd_connections_handshaking"] <= LIMITS["max_handshaking"]
        assert seen.get("kmipd_connections_refused_total", 0) == 0
    finally:
        for sock in flood:
            sock.close()
    assert daemon.stop() == 0
    assert "shed for a newer one" in daemon.stderr()


async def test_idle_connections_of_one_identity_leave_room_for_others(tmp_path: Path) -> None:
    daemon, data, metrics = start_limited(tmp_path)
    ca = CertificateAuthority.load(data / "pki")
    ca.issue_client("stranger")  # from the CA, but no grant at all
    held: list[RawConnection] = []
    refused = 0
    try:
        for _ in range(10):
            raw = await RawConnection.open(daemon.address, ca, "stranger")
            await raw.send({"id": 0, "op": "hello", "args": {"versions": [1]}})
            answer = await raw.receive()
            if "result" in answer:
                held.append(raw)
                continue
            assert "id" not in answer
            assert answer["error"]["name"] == "busy"
            assert await raw.receive_until_closed() == []
            await raw.aclose()
            refused += 1
        assert (len(held), refused) == (2, 8)
        # What the ungranted identity holds still answers hello and status.
        await held[0].send({"id": 1, "op": "status", "args": {}})
        assert "result" in await held[0].receive()
        # A granted identity has its own, larger budget, bounded too.
        for _ in range(LIMITS["max_connections_per_identity"]):
            raw = await RawConnection.open(daemon.address, ca, "admin")
            await hello(raw)
            held.append(raw)
        extra = await RawConnection.open(daemon.address, ca, "admin")
        await extra.send({"id": 0, "op": "hello", "args": {"versions": [1]}})
        assert (await extra.receive())["error"]["name"] == "busy"
        await extra.aclose()
        # ...and the storage identity is served all the while.
        with dev_client(data, daemon.address) as kms:
            kms.create_dek("orders")
        seen = scrape(metrics)
        assert seen['kmipd_connections_refused_identity_total{grant="ungranted"}'] == 8
        assert seen['kmipd_connections_refused_identity_total{grant="granted"}'] == 1
    finally:
        for raw in held:
            await raw.aclose()
    assert daemon.stop() == 0
