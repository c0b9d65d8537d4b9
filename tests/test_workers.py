"""``server.workers``: a supervisor and worker processes on one listening socket, for real."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kmipd.audit import worker_trails
from kmipd.client import Client, KmipdError
from kmipd.daemon._dev import prepare_dev
from kmipd.daemon.config import MAX_WORKERS, load_config
from tests.processes import Daemon, run_kmipd

pytestmark = pytest.mark.slow  # each wait below has its own deadline

WORKER_PID = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def workers_config(tmp_path: Path, workers: str = "2") -> Path:
    data = tmp_path / "dev"
    config = prepare_dev(data, "127.0.0.1:0")
    text = config.read_text()
    config.write_text(text.replace("[server]\n", f"[server]\nworkers = {workers}\n", 1))
    return config


def client(config: Path, address: str) -> Client:
    pki = config.parent / "pki"
    return Client(address, ca=pki / "ca.pem", cert=pki / "storage.pem", key=pki / "storage-key.pem")


def worker_pids(daemon: Daemon) -> dict[int, int]:
    """Worker index -> its latest pid, from the supervisor's log."""
    return {int(i): int(pid) for i, pid in WORKER_PID.findall(daemon.stderr())}


def wait_for(predicate: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    assert callable(predicate)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling a log file the daemon writes, bounded by the deadline


def test_two_workers_serve_many_connections_and_drain(tmp_path: Path) -> None:
    config = workers_config(tmp_path)
    daemon = Daemon("--config", config, log=tmp_path / "d.log")
    created = {}
    for _ in range(24):  # a connection each: the kernel hands them to both workers
        with client(config, daemon.address) as kms:
            dek = kms.create_dek("orders")
            created[dek.dek_id] = dek.key_bytes()
            assert kms.get_dek(dek.dek_id).key_bytes() == dek.key_bytes()
    assert sorted(worker_pids(daemon)) == [0, 1]
    assert daemon.stop() == 0
    log = daemon.stderr()
    assert "draining and stopping 2 workers" in log
    trails = worker_trails(load_config(config).audit_path)
    assert [p.name for p in trails] == ["audit-w0.log", "audit-w1.log"]
    # Both workers answered requests: each trail holds records.
    assert all(p.read_text().count("\n") >= 2 for p in trails), [p.read_text() for p in trails]
    again = Daemon("--config", config, log=tmp_path / "again.log")
    with client(config, again.address) as kms:
        assert {d.dek_id: d.key_bytes() for d in kms.get_deks(list(created))} == created
    assert again.stop() == 0


def test_a_killed_worker_is_restarted_and_clients_keep_working(tmp_path: Path) -> None:
    config = workers_config(tmp_path)
    daemon = Daemon("--config", config, log=tmp_path / "d.log")
    try:
        with client(config, daemon.address) as kms:
            dek = kms.create_dek("orders")
        first = worker_pids(daemon)
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: daemon.stderr().count("worker 0 ready") == 2, "worker 0 ready again")
        assert worker_pids(daemon)[0] != first[0]
        assert "worker 0 exited (killed by SIGKILL)" in daemon.stderr()
        for _ in range(10):
            with client(config, daemon.address) as kms:
                assert kms.get_dek(dek.dek_id).key_bytes() == dek.key_bytes()
        assert worker_pids(daemon)[1] == first[1]  # the other one was never touched
    finally:
        assert daemon.stop() == 0


def test_sighup_reloads_every_worker(tmp_path: Path) -> None:
    config = workers_config(tmp_path)
    daemon = Daemon("--config", config, log=tmp_path / "d.log")
    try:
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: daemon.stderr().count("reloaded: certificates") >= 2, "two reloads")
        with client(config, daemon.address) as kms:
            kms.create_dek("orders")
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", "server.workers: must be 1..8 (got 0)"),
        ("-2", "server.workers: must be 1..8 (got -2)"),
        (str(MAX_WORKERS + 1), f"server.workers: must be 1..8 (got {MAX_WORKERS + 1})"),
        ("'many'", 'server.workers: must be an integer 1..8 or "auto"'),
        ("2.5", "server.workers: expected an integer or text, got a number"),
        ("true", "server.workers: expected an integer or text, got a boolean"),
    ],
)
def test_bad_workers_value_is_refused_by_name(tmp_path: Path, value: str, expected: str) -> None:
    config = workers_config(tmp_path, value)
    before = config.read_text()
    result = run_kmipd("serve", "--config", config)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert config.read_text() == before


def scrape(daemon: Daemon) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Family -> [(labels, value)] of every sample on the daemon's metrics endpoint."""
    [url] = re.findall(r"Prometheus metrics on http://(\S+?)/metrics", daemon.stderr())
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as answer:
        body = answer.read().decode()
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_metrics_are_every_workers_with_a_worker_label(tmp_path: Path) -> None:
    config = workers_config(tmp_path)
    config.write_text(config.read_text() + "\n[metrics]\nlisten = '127.0.0.1:0'\n")
    daemon = Daemon("--config", config, log=tmp_path / "d.log")
    try:
        gets = 0
        for _ in range(24):  # connections spread over both workers by the kernel
            with client(config, daemon.address) as kms:
                kms.get_dek(kms.create_dek("orders").dek_id)
                gets += 1
        metrics = scrape(daemon)
        assert sorted(labels["worker"] for labels, _ in metrics["kmipd_worker_up"]) == ["0", "1"]
        assert all(value == 1 for _, value in metrics["kmipd_worker_up"])
        per_worker = {
            labels["worker"]: value
            for labels, value in metrics["kmipd_requests_total"]
            if labels["operation"] == "get-dek"
        }
        assert set(per_worker) == {"0", "1"} and all(per_worker.values()), per_worker
        assert sum(per_worker.values()) == gets
        pids = worker_pids(daemon)
        os.kill(pids[1], signal.SIGKILL)
        wait_for(lambda: daemon.stderr().count("worker 1 ready") == 2, "worker 1 again")
        restarts = {
            labels["worker"]: value
            for labels, value in scrape(daemon)["kmipd_worker_restarts_total"]
        }
        assert restarts == {"0": 0, "1": 1}
    finally:
        assert daemon.stop() == 0


def test_auto_is_the_usable_cores_capped(tmp_path: Path) -> None:
    config = load_config(workers_config(tmp_path, "'auto'"))
    assert config.workers == min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    assert load_config(workers_config(tmp_path / "one", "1")).workers == 1


def test_a_worker_that_cannot_start_stops_the_daemon(tmp_path: Path) -> None:
    one = workers_config(tmp_path, "1")
    config = one.with_name("two-workers.toml")  # the same store, data and keys
    config.write_text(one.read_text().replace("workers = 1", "workers = 2"))
    single = Daemon("--config", one, log=tmp_path / "one.log")
    try:  # the store is held by a daemon that does not share it
        result = run_kmipd("serve", "--config", config)
        assert result.returncode == 1
        assert "is in use by a kmipd that does not share it" in result.stderr
        assert "could not start (exit status 1): stopping" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        assert single.stop() == 0


MAINTENANCE = re.compile(r"maintenance: this daemon \(pid (\d+)\) holds the lock")


def test_maintenance_runs_in_one_worker_and_moves_when_it_dies(tmp_path: Path) -> None:
    config = workers_config(tmp_path)
    config.write_text(config.read_text() + "\n[lifecycle]\ncheck_interval = 0.2\n")
    daemon = Daemon("--config", config, log=tmp_path / "d.log")
    try:
        wait_for(lambda: MAINTENANCE.search(daemon.stderr()), "a maintenance holder")
        pids = worker_pids(daemon)
        # Several passes of both workers later, still one holder.
        wait_for(lambda: daemon.stderr().count("worker 1 ready") == 1, "worker 1")
        with client(config, daemon.address) as kms:
            kms.create_dek("orders")
        [holder] = MAINTENANCE.findall(daemon.stderr())
        assert int(holder) in pids.values()
        os.kill(int(holder), signal.SIGKILL)
        wait_for(lambda: len(MAINTENANCE.findall(daemon.stderr())) == 2, "a new holder")
        first, second = MAINTENANCE.findall(daemon.stderr())
        assert first != second
    finally:
        assert daemon.stop() == 0


def test_audit_verify_and_query_take_every_workers_trail(tmp_path: Path) -> None:
    config = workers_config(tmp_path)
    daemon = Daemon("--config", config, log=tmp_path / "d.log")
    deks = []
    for _ in range(16):
        with client(config, daemon.address) as kms:
            deks.append(kms.create_dek("orders").dek_id)
            kms.get_dek(deks[-1])
    assert daemon.stop() == 0
    audit = load_config(config).audit_path
    w0, w1 = worker_trails(audit)
    verified = run_kmipd("audit", "verify", "--workers", audit)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{w0}: " in verified.stdout and f"{w1}: " in verified.stdout
    assert verified.stdout.count("chain intact") == 2
    queried = run_kmipd("audit", "query", "--workers", audit)
    assert queried.returncode == 0, queried.stderr
    records = [json.loads(line) for line in queried.stdout.splitlines()]
    assert {r["dek_id"] for r in records if r["operation"] == "get-dek"} == set(deks)
    times = [r["time"] for r in records]
    assert times == sorted(times)  # merged by time across the chains

    lines = w1.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"result":"ok"', '"result":"no"', 1)
    assert lines[1] != w1.read_text().splitlines(keepends=True)[1]
    w1.write_text("".join(lines))
    tampered = run_kmipd("audit", "verify", "--workers", audit)
    assert tampered.returncode == 1
    assert f"{w0}: " in tampered.stdout and "chain intact" in tampered.stdout
    assert f"{w1}: TAMPERED" in tampered.stdout

    missing = run_kmipd("audit", "verify", "--workers", tmp_path / "none.log")
    assert missing.returncode == 1
    assert "--workers: no worker trails beside" in missing.stderr


def test_a_key_revoked_through_one_worker_is_refused_by_every_worker(tmp_path: Path) -> None:
    """Each worker caches rows; a change made by another worker must reach its cache."""
    config = workers_config(tmp_path)
    daemon = Daemon("--config", config, log=tmp_path / "d.log")
    pki = config.parent / "pki"
    try:
        with client(config, daemon.address) as kms:
            dek = kms.create_dek("orders")
        connections = [client(config, daemon.address) for _ in range(12)]
        try:
            for kms in connections:  # warm: both workers hold the row in their caches
                for _ in range(3):
                    assert kms.get_dek(dek.dek_id).key_bytes() == dek.key_bytes()
            admin = Client(
                daemon.address, ca=pki / "ca.pem", cert=pki / "admin.pem", key=pki / "admin-key.pem"
            )
            with admin:
                admin.revoke("key-compromise", dek_id=dek.dek_id)
            for kms in connections:
                with pytest.raises(KmipdError, match="compromised"):
                    kms.get_dek(dek.dek_id)
        finally:
            for kms in connections:
                kms.close()
        audit = load_config(config).audit_path
    finally:
        assert daemon.stop() == 0
    # Both workers refused it (so both workers' caches were put to the test).
    refusing = {
        trail.name
        for trail in worker_trails(audit)
        for record in map(json.loads, trail.read_text().splitlines())
        if record.get("operation") == "get-dek" and record.get("result") != "ok"
    }
    assert refusing == {"audit-w0.log", "audit-w1.log"}
