"""``server.workers``: a supervisor and worker processes on one listening socket, for real."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from kmipd.client import Client
from kmipd.daemon._dev import prepare_dev
from kmipd.daemon._workers import worker_audit_paths
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
    trails = worker_audit_paths(load_config(config).audit_path)
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


def test_metrics_with_several_workers_is_refused_until_aggregated(tmp_path: Path) -> None:
    config = workers_config(tmp_path)
    config.write_text(config.read_text() + "\n[metrics]\nlisten = '127.0.0.1:0'\n")
    result = run_kmipd("serve", "--config", config)
    assert result.returncode == 1
    assert "metrics.listen: not available with server.workers > 1 yet" in result.stderr
    assert "Traceback" not in result.stderr


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
