"""Read records written in groups: never dropped, never reordered, state changes durable first."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from kmipd.audit import AuditEvent, AuditLog, verify
from kmipd.client import Client
from tests.processes import Daemon, run_kmipd

STORAGE = "spiffe://kmipd.test/storage"


def read(n: int) -> AuditEvent:
    return AuditEvent(identity=STORAGE, operation="get-dek", result="ok", request_id=n)


def change(n: int) -> AuditEvent:
    return AuditEvent(identity=STORAGE, operation="create-dek", result="ok", request_id=n)


def seqs(path: Path) -> list[int]:
    return [json.loads(line)["seq"] for line in path.read_text().splitlines()]


async def test_reads_wait_for_the_window_and_a_state_change_takes_them_along(
    tmp_path: Path,
) -> None:
    log = AuditLog.open(tmp_path / "audit.log", tmp_path / "audit.key", batch_window=3600)
    for n in range(3):
        log.append(read(n), time.time())
    assert seqs(log.path) == []  # held in memory: no write per read
    seq = log.append(change(3), time.time())
    await log.sync(seq)  # the state change is durable, and the reads before it with it
    assert seqs(log.path) == [1, 2, 3, 4]
    log.append(read(4), time.time())
    log.close()  # the drain's last step writes what is left
    assert seqs(log.path) == [1, 2, 3, 4, 5]
    assert verify(log.path).problem is None


async def test_the_flusher_writes_a_batch_within_its_window(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    log = AuditLog.open(tmp_path / "audit.log", tmp_path / "audit.key", batch_window=0.01)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.flush_periodically)
        for n in range(50):
            log.append(read(n), time.time())
        await trio.sleep(0.009)  # trio's virtual clock: within the window, nothing written
        assert seqs(log.path) == []
        await trio.sleep(0.002)  # past it: written (the fsync follows in a thread)
        assert seqs(log.path) == list(range(1, 51))
        nursery.cancel_scope.cancel()
    log.close()
    assert seqs(log.path) == list(range(1, 51))
    assert verify(log.path).problem is None


def test_a_failing_write_refuses_later_records_and_loses_none(tmp_path: Path) -> None:
    """A real write failure (the process's file-size limit, EFBIG) in a subprocess."""
    script = f"""
import json, resource, signal, sys, time
from pathlib import Path
import trio
import trio.testing
from kmipd.audit import AuditError, AuditEvent, AuditLog

def event(n):
    return AuditEvent(identity="x", operation="get-dek", result="ok", request_id=n)

async def main():
    log = AuditLog.open(Path({str(tmp_path / "audit.log")!r}), Path({str(tmp_path / "k")!r}),
                        batch_window=3600)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))
    out = {{}}
    for n in range(5):
        log.append(event(n), time.time())
    try:
        await log.sync(5)
        out["sync"] = "ok"
    except AuditError as exc:
        out["sync"] = str(exc)
    try:
        log.append(event(99), time.time())
        out["append"] = "ok"
    except AuditError as exc:
        out["append"] = str(exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out["after"] = log.append(event(6), time.time())
    await log.sync(out["after"])
    log.close()
    print(json.dumps(out))

trio.run(main)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert "cannot write audit log" in out["sync"] or "short write" in out["sync"]
    assert out["append"] != "ok"  # refused before it joined the chain
    assert out["after"] == 6  # the refused record took no sequence number
    report = verify(tmp_path / "audit.log")
    assert report.problem is None
    assert report.records == 6  # the five batched before the failure, written once it passed


@pytest.mark.slow
def test_kill_9_keeps_every_state_change_and_the_chain(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    daemon = Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=tmp_path / "d.log")
    pki = data / "pki"
    with Client(
        daemon.address, ca=pki / "ca.pem", cert=pki / "storage.pem", key=pki / "storage-key.pem"
    ) as kms:
        created = [kms.create_dek("orders").dek_id for _ in range(20)]
        for _ in range(10):
            for dek_id in created:
                kms.get_dek(dek_id)
        last = kms.create_dek("orders").dek_id
        for dek_id in created:
            kms.get_dek(dek_id)  # reads after the last change: they may be in flight at the kill
    daemon.kill()
    trail = data / "audit.log"
    report = verify(trail)
    assert report.problem is None
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    creates = {r["dek_id"] for r in records if r["operation"] == "create-dek"}
    assert creates == {*created, last}
    reads = [r for r in records if r["operation"] == "get-dek"]
    assert len(reads) >= 200  # every read before the last state change was written with it
    verified = run_kmipd("audit", "verify", trail)
    assert verified.returncode == 0, verified.stderr
