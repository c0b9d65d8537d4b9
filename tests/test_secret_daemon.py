"""Secrets in a real daemon: KEK rotation rewraps them, backup/restore carries them, on the
software HSM and on a SoftHSM2 token (PKCS#11). Values are looked for, as bytes, in every
file the daemon and the backup wrote.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from kmipd import client as km
from pki import CertificateAuthority
from tests.conftest import TRUST_DOMAIN, credentials
from tests.processes import Daemon, run_kmipd
from tests.test_backup import dev_client, start_dev
from tests.test_pkcs11 import SoftToken, softhsm, write_config

__all__ = ["softhsm"]  # the PKCS#11 token fixture

pytestmark = pytest.mark.slow

VALUES = [b"rotated-secret-%02d-" % n + os.urandom(24) for n in range(6)]


def admin_client(data: Path, address: str) -> km.Client:
    pki = data / "pki"
    return km.Client(address, ca=pki / "ca.pem", cert=pki / "admin.pem", key=pki / "admin-key.pem")


def set_all(kms: km.Client) -> None:
    """Two versions of three secrets in namespace "db"."""
    for n, value in enumerate(VALUES):
        kms.set_secret("db", f"s{n % 3}", value, tags={"n": str(n)})


def assert_all_read(kms: km.Client) -> None:
    for n, value in enumerate(VALUES):
        with kms.get_secret("db", f"s{n % 3}", version=n // 3 + 1) as got:
            assert got.value == value


def rotate_and_rewrap(kms: km.Client) -> None:
    assert kms.rotate_kek("db").version == 2
    job = kms.start_rewrap("db")
    while job.state == "running":
        job = kms.get_job(job.job_id)
    assert job.state == "done", job
    for name in ("s0", "s1", "s2"):
        assert [v.kek_version for v in kms.secret_versions("db", name)] == [2, 2]


def assert_nowhere_in_the_clear(*files: Path) -> None:
    for path in files:
        data = path.read_bytes()
        assert not [value for value in VALUES if value in data], path


def test_rotation_rewraps_secrets_and_backup_restore_carries_them(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    config = data / "kmipd.toml"
    archive = tmp_path / "kmipd.tar"
    daemon = start_dev(data, tmp_path / "1.log")
    try:
        with admin_client(data, daemon.address) as kms:
            set_all(kms)
            rotate_and_rewrap(kms)
            assert_all_read(kms)
            backup = run_kmipd("backup", "--config", config, archive)  # online
            assert backup.returncode == 0, backup.stderr
            assert "6 secret version(s)" in backup.stdout
            kms.set_secret("db", "after-backup", b"not in the archive")
            kms.delete_secret("db", "s2")
            kms.purge_secret("db", "s2")
    finally:
        assert daemon.stop() == 0
    assert_nowhere_in_the_clear(archive, tmp_path / "1.log", *data.glob("kmipd.db*"))
    assert_nowhere_in_the_clear(data / "audit.log")

    for lost in [*data.glob("kmipd.db*"), data / "keyring.cbor"]:  # the disk is gone
        lost.unlink()
    restored = run_kmipd("restore", "--config", config, archive)
    assert restored.returncode == 0, restored.stderr
    assert "6 secret version(s)" in restored.stdout
    again = start_dev(data, tmp_path / "2.log")
    try:
        with admin_client(data, again.address) as kms:
            assert_all_read(kms)  # the purged s2 is back, as it was at the backup
            with pytest.raises(km.NotFoundError):
                kms.get_secret("db", "after-backup")
            storage = dev_client(data, again.address)  # "data" grants: no secrets
            with storage, pytest.raises(km.NotAuthorizedError):
                storage.get_secret("db", "s0")
    finally:
        assert again.stop() == 0


def write_pkcs11_config(path: Path, ca: CertificateAuthority, token: SoftToken) -> Path:
    """test_pkcs11's daemon config, plus an administrator and a secrets reader."""
    write_config(path, ca, token)
    with path.open("a") as config:
        for name, namespaces, operations in (
            ("admin", ["*"], ["*"]),
            ("reader", ["db"], ["secrets-read"]),
        ):
            config.write(
                f'[[grant]]\nidentity = "spiffe://{TRUST_DOMAIN}/{name}"\n'
                f"namespaces = {json.dumps(namespaces)}\noperations = {json.dumps(operations)}\n"
            )
    return path


def test_secrets_on_a_pkcs11_token(softhsm: SoftToken, ca: CertificateAuthority) -> None:
    ca.issue_client("reader")
    directory = ca.directory.parent
    config = write_pkcs11_config(directory / "kmipd.toml", ca, softhsm)
    daemon = Daemon("--config", config, log=directory / "daemon.log")  # SOFTHSM2_CONF inherited
    try:
        with (
            km.Client(daemon.address, **credentials(ca, "admin")) as admin,
            km.Client(daemon.address, **credentials(ca, "reader")) as reader,
            km.Client(daemon.address, **credentials(ca, "storage")) as storage,
        ):
            admin.create_kek("db")
            set_all(admin)
            assert_all_read(reader)
            rotate_and_rewrap(admin)
            assert_all_read(reader)
            with pytest.raises(km.NotAuthorizedError):
                reader.set_secret("db", "s0", b"x")  # reading is not managing
            with pytest.raises(km.NotAuthorizedError):
                storage.get_secret("db", "s0")
            admin.update_secret("db", "s1", version=2, enabled=False)
            with pytest.raises(km.SecretDisabledError):
                reader.get_secret("db", "s1", version=2)
            assert (admin.status()).hsm == "pkcs11: ok"
    finally:
        assert daemon.stop() == 0
    # The values are on neither the database, the audit trail, the log, nor the token.
    token_files = [p for p in softhsm.tokens.rglob("*") if p.is_file()]
    assert token_files
    assert_nowhere_in_the_clear(*directory.glob("kmipd.db*"), directory / "audit.log")
    assert_nowhere_in_the_clear(directory / "daemon.log", *token_files)
    with sqlite3.connect(directory / "kmipd.db") as db:
        assert db.execute("SELECT count(*) FROM secret_versions").fetchone() == (6,)
