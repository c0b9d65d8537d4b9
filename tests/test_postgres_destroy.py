"""Destroy on PostgreSQL: what a purge leaves on disk, and why it is useless.

PostgreSQL keeps a purged row's old version until VACUUM, and every insert
in its WAL (and in replicas and backups): kmipd cannot erase those bytes.
What it erases is small and in the HSM backend: the KEK version that
wrapped them. These tests read the cluster's files (base/ and pg_wal/)
after a purge, find the old wrapped bytes there, and show that nothing the
daemon still holds unwraps them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from kmipd.client import Client
from kmipd.daemon._keyring import StoreKeyring
from kmipd.hsm import (
    HsmError,
    HsmIntegrityError,
    HsmKeyNotFoundError,
    SoftwareHsm,
    create_master_key,
    keyring_handles,
    master_key_opens,
    read_keyring_file,
    read_master_key,
    reseal_entry,
)
from kmipd.protocol import CreateDek, Destroy, GetDek, KeyRef, Revoke, RotateKek
from kmipd.service import KeyService, dek_associated_data
from kmipd.store import open_postgres_store
from kmipd.store._postgres import PostgresStore
from tests.conftest import make_policy
from tests.postgres import Cluster, running_cluster
from tests.processes import Daemon, run_kmipd
from tests.test_postgres import ADMIN, STORAGE, start_on_postgres
from tests.test_postgres_keyring import without_keyring_file


def cluster_bytes(cluster: Cluster) -> dict[str, bytes]:
    """Every byte the cluster wrote: its table files and its WAL, after a checkpoint."""
    cluster.execute("CHECKPOINT")  # the data files hold what the WAL says, too
    found = {}
    for part in ("base", "pg_wal"):
        chunks = [p.read_bytes() for p in sorted((cluster.data / part).rglob("*")) if p.is_file()]
        found[part] = b"".join(chunks)
    return found


async def destroy_version_one(service: KeyService) -> None:
    version = KeyRef(kek="orders", version=1)
    await service.handle(ADMIN, Revoke(key=version, reason="cessation-of-operation"))
    await service.handle(ADMIN, Destroy(key=version, force=True, purge_now=True))


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with running_cluster() as running:  # its own: every byte in it is this test's
        running.execute("CREATE DATABASE kmipd")
        yield running


async def test_after_a_purge_the_wrapped_bytes_left_on_disk_unwrap_with_nothing_left(
    tmp_path: Path, cluster: Cluster
) -> None:
    master, keyring = tmp_path / "master.key", tmp_path / "keyring.cbor"
    store = open_postgres_store(cluster.conninfo("kmipd"))
    hsm = SoftwareHsm.open(master, keyring, create=True)
    service = KeyService(store=store, hsm=hsm, policy=make_policy(), create_kek_on_demand=True)
    try:
        doomed = await service.handle(STORAGE, CreateDek(namespace="orders"))
        record = await store.get_dek(doomed.dek_id)
        assert record is not None
        wrapped, aad = record.wrapped, dek_associated_data(record.dek_id, "orders", 1)
        kek = store.get_kek("orders")
        assert kek is not None
        destroyed_handle = kek.latest.hsm_handle
        await service.handle(ADMIN, RotateKek(name="orders"))
        kept = await service.handle(STORAGE, CreateDek(namespace="orders"))  # under v2
        await service.handle(STORAGE, CreateDek(namespace="other"))  # another KEK

        await destroy_version_one(service)

        # The database no longer holds the wrapped DEK or the KEK's handle...
        row = await store.get_dek(doomed.dek_id)
        assert row is not None
        assert row.wrapped == b""
        destroyed = store.get_kek("orders")
        version_one = destroyed.version(1) if destroyed is not None else None
        assert version_one is not None
        assert version_one.hsm_handle == ""
        # ...but its files do: the insert's WAL record, and the old row version.
        on_disk = cluster_bytes(cluster)
        assert wrapped in on_disk["pg_wal"]
        assert destroyed_handle.encode() in on_disk["pg_wal"]

        # What the daemon holds: the master key and the keyring (what a restart loads).
        sealed = read_keyring_file(keyring)
        assert sealed is not None
        live = keyring_handles(sealed, keyring)
        assert destroyed_handle not in live
        assert len(live) == 2  # orders v2, other v1
        restarted = SoftwareHsm(read_master_key(master), keyring)
        for holder in (hsm, restarted):
            with pytest.raises(HsmKeyNotFoundError):
                await holder.unwrap(destroyed_handle, wrapped, aad)
            for handle in live:  # no KEK left, the right metadata or not
                for data in (aad, b""):
                    with pytest.raises(HsmIntegrityError):
                        await holder.unwrap(handle, wrapped, data)
        restarted.close()
        # What was kept is untouched.
        assert (await service.handle(STORAGE, GetDek(dek_id=kept.dek_id))).key == kept.key
    finally:
        store.close()
        hsm.close()


async def test_with_the_keyring_in_the_store_a_destroyed_kek_is_left_sealed_in_the_wal(
    tmp_path: Path, cluster: Cluster
) -> None:
    """The limit of the shared keyring, as the docs state it: the destroyed KEK's
    entry leaves the table and every daemon's memory, but its sealed bytes stay in
    the WAL (and backups) like any row, sealed under the master key that every
    daemon still holds. Destruction there is as final as the master key is secret,
    until a rekey retires that key (the next test)."""
    master = tmp_path / "master.key"
    create_master_key(master)
    store = open_postgres_store(cluster.conninfo("kmipd"))
    assert isinstance(store, PostgresStore)
    hsm = await SoftwareHsm.open_shared(master, StoreKeyring(store))
    service = KeyService(store=store, hsm=hsm, policy=make_policy(), create_kek_on_demand=True)
    try:
        await service.handle(STORAGE, CreateDek(namespace="orders"))
        kek = store.get_kek("orders")
        assert kek is not None
        handle = kek.latest.hsm_handle
        sealed = await store.keyring_entry("kek", handle)
        assert sealed is not None
        await destroy_version_one(service)
        assert await store.keyring_entry("kek", handle) is None
        with pytest.raises(HsmKeyNotFoundError):
            await hsm.unwrap(handle, b"\0" * 60, b"")
        assert sealed in cluster_bytes(cluster)["pg_wal"]
    finally:
        hsm.close()
        store.close()


@pytest.mark.slow
def test_a_rekey_makes_the_destroyed_kek_left_in_the_wal_useless(
    tmp_path: Path, postgres_db: str, postgres_cluster: Cluster
) -> None:
    """The shared keyring's destroy made final: ``kmipd hsm rekey`` reseals the keyring
    under a new master key; with the old key destroyed, the destroyed KEK's sealed
    entry still in the WAL opens with nothing left."""
    _, creds, data, config = start_on_postgres(tmp_path, postgres_db, 0)
    path = config(0)
    without_keyring_file(path)
    daemon = Daemon("--config", path, log=tmp_path / "d0.log")
    admin = {**creds, "cert": data / "pki" / "admin.pem", "key": data / "pki" / "admin-key.pem"}
    with Client(daemon.address, **creds) as kms, Client(daemon.address, **admin) as root:
        kms.create_dek("orders").close()
        root.rotate_kek("orders")
        with kms.create_dek("orders") as dek:
            kept_id, kept = dek.dek_id, bytes(dek.key)
        with psycopg.connect(postgres_db) as db:
            row = db.execute(
                "SELECT v.hsm_handle, k.sealed FROM kek_versions v"
                " JOIN hsm_keyring k ON k.handle = v.hsm_handle WHERE v.version = 1"
            ).fetchone()
        assert row is not None
        handle, sealed = str(row[0]), bytes(row[1])
        root.revoke("cessation-of-operation", kek="orders", version=1)
        root.destroy(kek="orders", version=1, force=True, purge_now=True)
    new_key = data / "new-master.key"
    # While a daemon is connected it would go on sealing under the old key: refused.
    running = run_kmipd("hsm", "rekey", "--config", path, "--new-master-key", new_key)
    assert running.returncode == 1
    assert "stop every daemon on this store first" in running.stderr
    assert not new_key.exists()
    assert daemon.stop() == 0
    # Bad input, nothing changed: a new key file that exists, a config with a keyring file.
    clash = run_kmipd("hsm", "rekey", "--config", path, "--new-master-key", data / "master.key")
    assert clash.returncode == 1
    assert "already exists; refusing to replace it" in clash.stderr
    with_file = data / "with-file.toml"
    with_file.write_text(path.read_text().replace("[hsm]\n", '[hsm]\nkeyring = "k.cbor"\n'))
    with_file.chmod(0o600)
    wrong = run_kmipd("hsm", "rekey", "--config", with_file, "--new-master-key", new_key)
    assert wrong.returncode == 1
    assert "hsm rekey works on the software keyring in the PostgreSQL store" in wrong.stderr
    assert not new_key.exists()
    with psycopg.connect(postgres_db) as db:
        found = db.execute("SELECT sealed FROM hsm_keyring WHERE kind = 'check'").fetchone()
    assert found is not None
    assert master_key_opens(read_master_key(data / "master.key"), bytes(found[0]))

    rekeyed = run_kmipd("hsm", "rekey", "--config", path, "--new-master-key", new_key)
    assert rekeyed.returncode == 0, rekeyed.stderr
    assert "resealed 2 keyring entries" in rekeyed.stdout  # orders v2 and the check
    old_key = read_master_key(data / "master.key")
    (data / "master.key").unlink()  # "destroy every copy of the old master key"

    # The destroyed KEK's entry is still in the WAL; the new master key does not open
    # it, and the old one, which would, is gone.
    assert sealed in cluster_bytes(postgres_cluster)["pg_wal"]
    with pytest.raises(HsmError, match="does not open with the current master key"):
        reseal_entry(read_master_key(new_key), old_key, "kek", handle, sealed)

    # The daemon, given the new key, serves what was kept; the old key is refused.
    path.write_text(path.read_text().replace('"master.key"', '"new-master.key"'))
    daemon = Daemon("--config", path, log=tmp_path / "d1.log")
    with Client(daemon.address, **creds) as kms, kms.get_dek(kept_id) as again:
        assert bytes(again.key) == kept
    assert daemon.stop() == 0
    old_path = data / "old.key"
    old_path.write_bytes(old_key)
    old_path.chmod(0o600)
    path.write_text(path.read_text().replace('"new-master.key"', '"old.key"'))
    refused = run_kmipd("serve", "--config", path)
    assert refused.returncode == 1
    assert "is sealed under another master key" in refused.stderr
