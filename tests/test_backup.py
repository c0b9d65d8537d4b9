"""kmipd backup / kmipd restore against the real daemon: online backups, no plaintext keys."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmipd.client import Client, NotFoundError
from kmipd.daemon._backup import STORE_MEMBER
from kmipd.hsm import create_master_key
from kmipd.hsm._software import NONCE_SIZE, _kek_entry_aad, _parse_keyring
from tests.processes import Daemon, run_kmipd

pytestmark = pytest.mark.slow


def start_dev(data: Path, log: Path) -> Daemon:
    return Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=log)


def dev_client(data: Path, address: str) -> Client:
    pki = data / "pki"
    return Client(address, ca=pki / "ca.pem", cert=pki / "storage.pem", key=pki / "storage-key.pem")


def plaintext_keks(data: Path) -> list[bytes]:
    """The KEKs themselves, unsealed here only to prove they are nowhere in an archive."""
    master = AESGCM((data / "master.key").read_bytes())
    entries = _parse_keyring((data / "keyring.cbor").read_bytes(), data / "keyring.cbor")
    return [
        master.decrypt(e["sealed"][:NONCE_SIZE], e["sealed"][NONCE_SIZE:], _kek_entry_aad(h))
        for h, e in entries.items()
    ]


def state_digest(data: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(data.iterdir())
        if path.is_file() and path.name.startswith(("kmipd.db", "keyring"))
    }


def test_backup_while_serving_then_restore_after_losing_the_state(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    config = data / "kmipd.toml"
    archive = tmp_path / "backups" / "kmipd.tar"
    daemon = start_dev(data, tmp_path / "1.log")
    try:
        with dev_client(data, daemon.address) as kms:
            before = {
                dek.dek_id: bytes(dek.key)
                for dek in (kms.create_dek(ns) for ns in ("orders", "users") for _ in range(15))
            }
            backup = run_kmipd("backup", "--config", config, archive)  # online
            assert backup.returncode == 0, backup.stderr
            assert "30 DEK(s)" in backup.stdout
            assert "keyring with 2 sealed KEK(s)" in backup.stdout
            assert "the master key is not in it" in backup.stdout
            after = {kms.create_dek("orders").dek_id for _ in range(5)}

        assert archive.stat().st_mode & 0o777 == 0o600
        raw = archive.read_bytes()
        secrets = [
            *before.values(),
            *plaintext_keks(data),
            (data / "master.key").read_bytes(),
            (data / "audit.key").read_bytes(),
        ]
        assert len(secrets) == 34
        assert not [secret for secret in secrets if secret in raw]
        assert b"PRIVATE KEY" not in raw

        running = run_kmipd("restore", "--config", config, archive, "--force")
        assert running.returncode == 1
        assert "in use by another kmipd process" in running.stderr
    finally:
        assert daemon.stop() == 0

    untouched = state_digest(data)
    refused = run_kmipd("restore", "--config", config, archive)
    assert refused.returncode == 1
    assert "pass --force to move them aside and restore" in refused.stderr
    assert state_digest(data) == untouched

    for lost in data.glob("kmipd.db*"):  # the disk with the state is gone
        lost.unlink()
    (data / "keyring.cbor").unlink()
    restored = run_kmipd("restore", "--config", config, archive)
    assert restored.returncode == 0, restored.stderr
    assert "30 DEK(s)" in restored.stdout
    assert (data / "kmipd.db").stat().st_mode & 0o777 == 0o600
    assert (data / "keyring.cbor").stat().st_mode & 0o777 == 0o600

    again = start_dev(data, tmp_path / "2.log")
    try:
        with dev_client(data, again.address) as kms:
            assert {d.dek_id: bytes(d.key) for d in kms.get_deks(list(before))} == before
            for dek_id in after:  # made after the backup: not in it
                with pytest.raises(NotFoundError):
                    kms.get_dek(dek_id)
    finally:
        assert again.stop() == 0


def test_restore_with_force_keeps_what_it_replaces(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    config = data / "kmipd.toml"
    daemon = start_dev(data, tmp_path / "1.log")
    try:
        with dev_client(data, daemon.address) as kms:
            kms.create_dek("orders")
            assert run_kmipd("backup", "--config", config, tmp_path / "a.tar").returncode == 0
            kms.create_dek("orders")
    finally:
        assert daemon.stop() == 0
    replaced = state_digest(data)["kmipd.db"]
    result = run_kmipd("restore", "--config", config, tmp_path / "a.tar", "--force")
    assert result.returncode == 0, result.stderr
    assert "the previous kmipd.db is kept as" in result.stdout
    [kept] = data.glob("kmipd.db.before-restore-*")
    assert kept.name.count("-wal") == 0
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == replaced
    assert list(data.glob("keyring.cbor.before-restore-*"))


def test_a_damaged_or_foreign_archive_or_the_wrong_master_key_changes_nothing(
    tmp_path: Path,
) -> None:
    data = tmp_path / "dev"
    config = data / "kmipd.toml"
    archive = tmp_path / "kmipd.tar"
    daemon = start_dev(data, tmp_path / "1.log")
    try:
        with dev_client(data, daemon.address) as kms:
            kms.create_dek("orders")
        assert run_kmipd("backup", "--config", config, archive).returncode == 0
        again = run_kmipd("backup", "--config", config, archive)
        assert again.returncode == 1
        assert "already exists; pass --force" in again.stderr
    finally:
        assert daemon.stop() == 0
    untouched = state_digest(data)

    damaged = tmp_path / "damaged.tar"
    content = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        offset = tar.getmember(STORE_MEMBER).offset_data
    content[offset + 200] ^= 0x01
    damaged.write_bytes(bytes(content))
    result = run_kmipd("restore", "--config", config, damaged, "--force")
    assert result.returncode == 1
    assert f"{STORE_MEMBER} is damaged (checksum mismatch)" in result.stderr

    foreign = tmp_path / "foreign.tar"
    foreign.write_bytes(b"\0" * 10240)
    result = run_kmipd("restore", "--config", config, foreign, "--force")
    assert result.returncode == 1
    assert "not a kmipd backup" in result.stderr or "not a readable kmipd backup" in result.stderr

    (data / "master.key").rename(data / "master.key.real")
    create_master_key(data / "master.key")
    result = run_kmipd("restore", "--config", config, archive, "--force")
    assert result.returncode == 1
    assert "does not open with this master key" in result.stderr
    assert "Traceback" not in result.stderr
    (data / "master.key").unlink()
    (data / "master.key.real").rename(data / "master.key")

    assert state_digest(data) == untouched
    assert not list(data.glob("*before-restore*"))
    assert not list(data.glob(".kmipd-restore-*"))
