"""Faults of the machine with a real daemon: a full disk, a read-only disk, a damaged store,
a torn audit record. The disks are small filesystems the test mounts (root only)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kmipd.audit import verify
from kmipd.client import (
    Client,
    OutcomeUnknownError,
    StatusResult,
    StoreUnavailableError,
)
from tests.processes import Daemon, run_kmipd


def _require_root() -> None:
    if os.geteuid() == 0:
        return
    reason = "mounting a small filesystem to fill needs root"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI runs as root")
    pytest.skip(reason)


@contextlib.contextmanager
def mounted(directory: Path, *args: str) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *args, str(directory)], check=True, capture_output=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a disk small enough to fill."""
    _require_root()
    with mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs") as path:
        yield path


def prepare(tmp_path: Path, store: Path, audit: Path, *, extra: str = "") -> Path:
    """A dev setup (CA, master key) whose store and audit trail live where the test says."""
    data = tmp_path / "dev"
    first = Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=tmp_path / "init.log")
    assert first.stop() == 0
    config = (data / "kmipd.toml").read_text()
    config = re.sub(r"listen = \[.*\]", 'listen = ["127.0.0.1:0"]', config)
    config = config.replace('path = "kmipd.db"', f'path = "{store}"')
    config += f'\n[audit]\npath = "{audit}"\n{extra}'
    path = data / "faults.toml"
    path.write_text(config)
    return path


def credentials(config: Path) -> dict[str, Path]:
    pki = config.parent / "pki"
    return {"ca": pki / "ca.pem", "cert": pki / "storage.pem", "key": pki / "storage-key.pem"}


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; returns it (delete it to free the space)."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                out.write(chunk)
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 512)
    return filler


def wait_for(kms: Client, condition: Callable[[StatusResult], bool], timeout: float = 15) -> None:
    """Poll status until it says what is expected (the probe runs once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        status = kms.status()
        if condition(status):
            return
        assert time.monotonic() < deadline, status
        time.sleep(0.05)  # polling a condition, not waiting for a server to start


def test_a_full_disk_refuses_creates_clearly_keeps_reads_and_recovers(
    tmp_path: Path, disk: Path
) -> None:
    config = prepare(tmp_path, disk / "kmipd.db", tmp_path / "audit.log")
    daemon = Daemon("--config", config, log=tmp_path / "daemon.log")
    acknowledged: dict[str, bytes] = {}
    with Client(daemon.address, **credentials(config), timeout=10) as kms:
        for _ in range(20):
            with kms.create_dek("full") as dek:
                acknowledged[dek.dek_id] = bytes(dek.key)
        assert kms.status().store == "ok"
        log_before = len(daemon.stderr().splitlines())

        filler = fill(disk)
        refused = 0
        for n in range(2000):  # creates until full, then every one refused with the code
            try:
                with kms.create_dek("full") as dek:
                    acknowledged[dek.dek_id] = bytes(dek.key)
            except StoreUnavailableError as exc:
                assert "disk full" in str(exc)
                refused += 1
            if n % 200 == 0 and refused:  # reads keep working meanwhile
                some = next(iter(acknowledged))
                with kms.get_dek(some) as again:
                    assert bytes(again.key) == acknowledged[some]
        assert refused > 1900
        status = kms.status()
        assert (status.state, status.store) == ("degraded", "cannot write: disk full")
        fetched = kms.get_deks(list(acknowledged))  # nothing acknowledged lost
        assert {d.dek_id: d.key_bytes() for d in fetched} == acknowledged

        filler.unlink()  # the operator frees space: no restart needed
        wait_for(kms, lambda s: s.store == "ok" and s.state == "serving")
        with kms.create_dek("full") as dek:
            acknowledged[dek.dek_id] = bytes(dek.key)

    assert daemon.stop() == 0
    log = daemon.stderr().splitlines()[log_before:]
    fault_lines = [line for line in log if "key store" in line]
    assert len(fault_lines) <= 5, fault_lines  # start, a summary or two, the end
    assert any("cannot be written: disk full" in line for line in fault_lines), log
    assert any("can be written again" in line for line in fault_lines), log
    assert not any("Traceback" in line for line in log), log
    assert len(log) < 40, log  # bounded, for thousands of refused requests
    restarted = Daemon("--config", config, log=tmp_path / "again.log")
    with Client(restarted.address, **credentials(config)) as kms:  # durable, too
        fetched = kms.get_deks(list(acknowledged))
        assert {d.dek_id: d.key_bytes() for d in fetched} == acknowledged
    assert restarted.stop() == 0


def test_a_full_audit_disk_refuses_with_its_own_cause_and_recovers(
    tmp_path: Path, disk: Path
) -> None:
    config = prepare(
        tmp_path, tmp_path / "kmipd.db", disk / "audit.log", extra="fail_open_reads = false\n"
    )
    daemon = Daemon("--config", config, log=tmp_path / "daemon.log")
    with Client(daemon.address, **credentials(config), timeout=10) as kms:
        with kms.create_dek("audited") as dek:
            dek_id, key = dek.dek_id, bytes(dek.key)
        filler = fill(disk)
        outcomes = []
        for _ in range(300):
            try:
                with kms.get_dek(dek_id):
                    outcomes.append("served")
            except Exception as exc:  # the refusal is what is checked
                outcomes.append(type(exc).__name__)
        # Never served unaudited: once the trail is full, every read is refused, with
        # the code that sends the client elsewhere (nothing was applied nor served).
        assert outcomes[-1] == "StoreUnavailableError", outcomes[-5:]
        assert "AuditUnavailableError" not in outcomes, outcomes
        assert "cannot write: disk full" in kms.status().store
        filler.unlink()
        with kms.get_dek(dek_id) as again:
            assert bytes(again.key) == key
        assert kms.status().store == "ok"
    assert daemon.stop() == 0
    log = daemon.stderr()
    assert log.count("audit trail") <= 4, log
    assert "Traceback" not in log
    report = verify(disk / "audit.log")
    assert report.ok, report.problem


def test_a_read_only_disk_mid_run_refuses_creates_and_keeps_reads(tmp_path: Path) -> None:
    """Linux refuses ``mount -o remount,ro`` while files are open for writing (EBUSY), so
    the read-only switch under a running daemon is the kernel's own: ext4 with
    errors=remount-ro, made to record an error (as a failing disk would)."""
    _require_root()
    with mounted(tmp_path / "tmp", "-t", "tmpfs", "-o", "size=32m", "tmpfs") as space:
        image = space / "disk.img"
        with image.open("wb") as out:
            out.truncate(16 * 1024 * 1024)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        with mounted(tmp_path / "ext4", "-o", "loop,errors=remount-ro", str(image)) as ext4:
            device = Path(
                subprocess.run(
                    ["findmnt", "-no", "SOURCE", str(ext4)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
            ).name
            config = prepare(tmp_path, ext4 / "kmipd.db", tmp_path / "audit.log")
            daemon = Daemon("--config", config, log=tmp_path / "daemon.log")
            with Client(daemon.address, **credentials(config), timeout=10) as kms:
                with kms.create_dek("ro") as dek:
                    dek_id, key = dek.dek_id, bytes(dek.key)
                Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("kmipd test")
                for _ in range(50):
                    with pytest.raises(StoreUnavailableError, match="read-only"):
                        kms.create_dek("ro")
                with kms.get_dek(dek_id) as again:
                    assert bytes(again.key) == key
                status = kms.status()
                assert (status.state, status.store) == (
                    "degraded",
                    "cannot write: read-only filesystem",
                )
            assert daemon.stop() == 0
            assert "Traceback" not in daemon.stderr()


def test_a_store_on_a_read_only_disk_is_refused_at_startup(tmp_path: Path, disk: Path) -> None:
    config = prepare(tmp_path, disk / "kmipd.db", tmp_path / "audit.log")
    Daemon("--config", config, log=tmp_path / "first.log").stop()  # the store exists
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    result = run_kmipd("serve", "--config", config)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    assert str(disk / "kmipd.db") in errors[0]
    assert "read-only" in errors[0]
    check = run_kmipd("check-config", config)
    assert check.returncode != 0
    assert "cannot be written: read-only filesystem" in check.stdout + check.stderr


def test_a_damaged_store_is_refused_at_startup_and_by_check_config(tmp_path: Path) -> None:
    store = tmp_path / "kmipd.db"
    config = prepare(tmp_path, store, tmp_path / "audit.log")
    daemon = Daemon("--config", config, log=tmp_path / "first.log")
    with Client(daemon.address, **credentials(config)) as kms:
        for _ in range(200):
            kms.create_dek("damaged").close()
    assert daemon.stop() == 0
    data = bytearray(store.read_bytes())
    assert len(data) > 4 * 4096
    data[4096 : 4 * 4096] = os.urandom(3 * 4096)  # pages 2-4, headers and all
    store.write_bytes(bytes(data))
    before = store.read_bytes()

    result = run_kmipd("serve", "--config", config)
    assert result.returncode != 0
    assert f"store {store}" in result.stderr
    assert "integrity check" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    check = run_kmipd("check-config", config)
    assert check.returncode != 0
    assert "integrity check" in check.stdout + check.stderr
    assert store.read_bytes() == before  # never "repaired"


def test_a_torn_audit_record_is_named_and_the_chain_goes_on_after_it(tmp_path: Path) -> None:
    trail = tmp_path / "audit.log"
    config = prepare(tmp_path, tmp_path / "kmipd.db", trail)
    daemon = Daemon("--config", config, log=tmp_path / "first.log")
    with Client(daemon.address, **credentials(config)) as kms:
        kms.create_dek("torn").close()
    assert daemon.stop() == 0
    whole = trail.read_bytes()
    with trail.open("ab") as out:  # what a crash or a full disk leaves: half a record
        out.write(whole.splitlines()[-1][:40])
    records_before = len(whole.splitlines())
    torn_at = f"line {records_before + 1}"
    torn = run_kmipd("audit", "verify", trail)
    assert f"{torn_at}: torn record" in torn.stdout, torn.stdout

    daemon = Daemon("--config", config, log=tmp_path / "second.log")
    with Client(daemon.address, **credentials(config)) as kms:
        kms.create_dek("torn").close()
    assert daemon.stop() == 0
    assert "torn record" in daemon.stderr()
    lines = trail.read_bytes().split(b"\n")
    assert lines[records_before] == whole.splitlines()[-1][:40]  # as it was, not appended to
    report = verify(trail)
    assert report.ok, report.problem
    assert report.torn == (torn_at,)
    assert report.records == records_before + 1
    result = run_kmipd("audit", "verify", trail)
    assert result.returncode == 0
    assert "torn record" in result.stdout


def test_a_daemon_with_a_full_disk_sends_creates_to_the_other(tmp_path: Path, disk: Path) -> None:
    full_config = prepare(tmp_path, disk / "kmipd.db", tmp_path / "audit-full.log")
    other_config = full_config.with_name("other.toml")
    other_config.write_text(
        full_config.read_text()
        .replace(f'"{disk / "kmipd.db"}"', '"other.db"')
        .replace("audit-full.log", "audit-other.log")
    )
    full = Daemon("--config", full_config, log=tmp_path / "full.log")
    other = Daemon("--config", other_config, log=tmp_path / "other.log")
    fill(disk)
    created = []
    with Client([full.address, other.address], **credentials(full_config), timeout=10) as kms:
        for _ in range(100):
            try:
                with kms.create_dek("failover") as dek:
                    created.append(dek.dek_id)
            except OutcomeUnknownError:  # pragma: no cover - the failure this test guards
                pytest.fail("a refused create reported as an unknown outcome")
        assert len(created) == 100
    with Client(other.address, **credentials(full_config)) as kms:  # all made by the other
        assert len(kms.get_deks(created)) == 100
    assert full.stop() == 0
    assert other.stop() == 0
