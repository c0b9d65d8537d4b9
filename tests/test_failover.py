"""Failover: the sans-IO policy, then three real daemons with one killed mid-run."""

from __future__ import annotations

import random
import re
import sqlite3
import threading
from pathlib import Path

import pytest

from kmipd.audit import records, verify
from kmipd.client import (
    Client,
    DeadlineExceededError,
    OutcomeUnknownError,
    UnavailableError,
)
from kmipd.client._common import make_endpoints
from kmipd.client._failover import FailoverCall, ServerSet
from kmipd.protocol import CreateDek, ErrorCode, ErrorInfo, GetDek
from pki import CertificateAuthority
from tests.processes import Daemon, run_kmipd


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def endpoints(tmp_path: Path) -> list:  # type: ignore[type-arg]
    ca = CertificateAuthority.init(tmp_path / "pki")
    ca.issue_client("c")
    return make_endpoints(
        ["10.0.0.1:5696", "10.0.0.2:5696", "10.0.0.3:5696"],
        ca=ca.ca_cert_path,
        cert=ca.directory / "c.pem",
        key=ca.directory / "c-key.pem",
        ssl_context=None,
        server_hostname=None,
        timeout=5,
        client_name="t",
    )


def test_servers_are_tried_in_order_and_failed_ones_back_off(endpoints: list) -> None:  # type: ignore[type-arg]
    clock = FakeClock()
    servers = ServerSet(endpoints, clock=clock, rng=random.Random(7), backoff_base=1, backoff_cap=8)
    first, _ = servers.choose(set()) or (None, 0)
    assert first is not None
    assert first.address == "10.0.0.1:5696"
    delays = [servers.failed(first) for _ in range(6)]
    ceilings = [1, 2, 4, 8, 8, 8]  # exponential, capped
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) > 1  # jittered
    choice = servers.choose(set())
    assert choice is not None
    assert choice[0].address == "10.0.0.2:5696"  # the primary is backing off
    clock.now += 9
    choice = servers.choose(set())
    assert choice is not None
    assert choice[0].address == "10.0.0.1:5696"  # back after its delay
    servers.succeeded(first, "store-a")
    assert (first.failures, first.store_id) == (0, "store-a")


def test_when_all_back_off_the_soonest_is_offered_with_its_wait(endpoints: list) -> None:  # type: ignore[type-arg]
    clock = FakeClock()
    servers = ServerSet(endpoints, clock=clock, rng=random.Random(1), backoff_base=4)
    for server in servers.servers:
        servers.failed(server)
    choice = servers.choose(set())
    assert choice is not None
    server, wait = choice
    assert wait == min(s.retry_at for s in servers.servers) - clock.now
    assert 0 < wait <= 4


def test_retry_rules_for_each_kind_of_failure(endpoints: list) -> None:  # type: ignore[type-arg]
    clock = FakeClock()
    servers = ServerSet(endpoints, clock=clock, rng=random.Random(3))
    a, b, c = servers.servers
    a.store_id, b.store_id, c.store_id = "one", "two", "one"

    get = FailoverCall(servers, [GetDek(dek_id="d")], 10, clock=clock)
    server, _ = get.next_server()
    get.lost(server, UnavailableError("broken"))  # idempotent: anywhere else
    assert get.next_server()[0] is b

    create = FailoverCall(
        servers, [CreateDek(namespace="n", idempotency_key=b"k" * 16)], 10, clock=clock
    )
    servers.succeeded(a, "one")
    server, _ = create.next_server()
    assert server is a
    create.lost(server, UnavailableError("broken"))  # unknown outcome: same store only
    assert create.next_server()[0] is c
    create.lost(c, UnavailableError("broken too"))
    with pytest.raises(OutcomeUnknownError) as unknown:
        create.next_server()
    assert unknown.value.idempotency_key == b"k" * 16

    bare = FailoverCall(servers, [CreateDek(namespace="n")], 10, clock=clock)
    server, _ = bare.next_server()
    with pytest.raises(UnavailableError, match="broken"):
        bare.lost(server, UnavailableError("broken"))  # no key: cannot be retried blind

    refused = FailoverCall(servers, [CreateDek(namespace="n")], 10, clock=clock)
    server, _ = refused.next_server()
    shutting = ErrorInfo(ErrorCode.SHUTTING_DOWN, "draining")
    assert refused.answered(server, "one", [shutting]) is False  # certainly not applied
    assert refused.next_server()[0] is not server

    late = FailoverCall(servers, [GetDek(dek_id="d")], 1, clock=clock)
    server, _ = late.next_server()
    clock.now += 2
    with pytest.raises(DeadlineExceededError):
        late.lost(server, UnavailableError("slow"))


# -- three real daemons sharing one store ------------------------------------------------


def start_three(tmp_path: Path) -> tuple[list[Daemon], dict[str, Path], Path]:
    data = tmp_path / "dev"
    first = Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=tmp_path / "init.log")
    assert first.stop() == 0  # it made the CA, master key and store; now three share them
    template = (data / "kmipd.toml").read_text()
    daemons = []
    for n in range(3):
        config = re.sub(r"listen = \[.*\]", 'listen = ["127.0.0.1:0"]', template)
        config = config.replace("[store]\n", "[store]\nshared = true\n")
        config += f'\n[audit]\npath = "audit-{n}.log"\n'  # one trail per daemon
        path = data / f"kmipd-{n}.toml"
        path.write_text(config)
        daemons.append(Daemon("--config", path, log=tmp_path / f"d{n}.log"))
    pki = data / "pki"
    creds = {"ca": pki / "ca.pem", "cert": pki / "storage.pem", "key": pki / "storage-key.pem"}
    return daemons, creds, data / "kmipd.db"


@pytest.mark.slow
def test_three_daemons_one_killed_mid_run_loses_nothing_and_creates_nothing_twice(
    tmp_path: Path,
) -> None:
    daemons, creds, db = start_three(tmp_path)
    addresses = [d.address for d in daemons]
    acknowledged: dict[str, bytes] = {}
    failures: list[BaseException] = []
    half_way = threading.Event()

    def workload(worker: int) -> None:
        try:
            with Client(addresses, **creds, timeout=20, backoff_base=0.05) as kms:
                for n in range(60):
                    with kms.create_dek(f"failover-{worker % 2}") as dek:
                        acknowledged[dek.dek_id] = bytes(dek.key)
                    with kms.get_dek(dek.dek_id) as again:
                        assert bytes(again.key) == acknowledged[dek.dek_id]
                    if n == 20:
                        half_way.set()
        except BaseException as exc:  # collected and asserted below
            failures.append(exc)

    workers = [threading.Thread(target=workload, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    assert half_way.wait(60)
    daemons[0].kill()  # the primary dies with requests in flight
    for worker in workers:
        worker.join(120)
    # On failure, show the daemons' logs: an internal error's traceback is there.
    assert failures == [], (failures, [d.stderr()[-4000:] for d in daemons])
    assert len(acknowledged) == 4 * 60  # no request lost

    with Client(addresses[1:], **creds) as kms:  # every DEK readable from the survivors
        fetched = kms.get_deks(list(acknowledged))
        assert {d.dek_id: d.key_bytes() for d in fetched} == acknowledged
    with sqlite3.connect(db) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM deks").fetchone()
    assert rows == len(acknowledged)  # no create applied twice
    for daemon in daemons[1:]:
        assert daemon.stop() == 0
    trails = [db.parent / f"audit-{n}.log" for n in range(3)]
    for trail in trails:  # each daemon's chain is whole, the killed one's too
        report = verify(trail)
        assert report.ok, (trail.name, report.problem)
    created = [
        record["dek_id"]
        for trail in trails
        for _, record in records(trail)
        if record["operation"] == "create-dek" and record["result"] == "ok"
    ]
    assert set(created) == set(acknowledged)


def test_a_second_daemon_on_the_same_audit_trail_is_refused(tmp_path: Path) -> None:
    """Two writers would fork the hash chain: the second daemon says so and stops,
    and the first one's trail stays whole."""
    daemons, creds, db = start_three(tmp_path)
    for daemon in daemons:
        daemon.stop()
    config = db.parent / "kmipd-1.toml"
    config.write_text(config.read_text().replace("audit-1.log", "audit-0.log"))
    first = Daemon("--config", db.parent / "kmipd-0.toml", log=tmp_path / "first.log")
    try:
        with Client(first.address, **creds) as kms:
            kms.create_dek("orders")
        second = run_kmipd("serve", "--config", config, timeout=60)
        assert second.returncode != 0
        assert "audit-0.log is in use by another kmipd process" in second.stderr, second.stderr
        with Client(first.address, **creds) as kms:
            kms.create_dek("orders")
    finally:
        assert first.stop() == 0
    assert verify(db.parent / "audit-0.log").ok
