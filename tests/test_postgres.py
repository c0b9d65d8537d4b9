"""The PostgreSQL store with several writers: what SQLite's one writer gave for free.

The store-level behaviour both backends share is tested in test_service.py
and test_lifecycle.py (parametrised over both); here is what only several
daemons on one database can show: concurrent idempotent creates, the feed
numbered in commit order, lifecycle races, eviction by notification, one
maintenance runner, migrations racing, the faults at startup, and three
real daemons with one killed mid-run.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import kmipd.client as km
from kmipd.audit import records, verify
from kmipd.client import Client, KeyCompromisedError
from kmipd.daemon._keyring import StoreKeyring
from kmipd.hsm import SoftwareHsm, create_master_key
from kmipd.lifecycle import DEK_USAGES, Event, Lifecycle, RevocationReason, State
from kmipd.protocol import CreateDek, CreateKek, ErrorCode, GetDek, KeyRef, Revoke, RotateKek
from kmipd.service import Caller, KeyService, ServiceError
from kmipd.store import (
    DekRecord,
    StaleRecordError,
    StoreError,
    StoreUnavailableError,
    _sqlite,
    open_postgres_store,
)
from kmipd.store import _postgres as pg
from kmipd.store._postgres import PostgresStore, glob_to_regex
from tests.conftest import PostgresDatabases, make_policy
from tests.postgres import Cluster, running_cluster
from tests.processes import Daemon, run_kmipd

STORAGE = Caller("spiffe://kmipd.test/storage", 1)
ADMIN = Caller("spiffe://kmipd.test/admin", 2)


def test_migrations_are_numbered_as_sqlite_s() -> None:
    # Migration N is the same change on both backends: a store's version means one thing.
    assert len(pg.MIGRATIONS) == len(_sqlite.MIGRATIONS)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab*?[]^/.%_", max_size=8), st.text(alphabet="ab]^/.%_", max_size=6))
def test_namespace_globs_match_as_in_sqlite(
    postgres_cluster: Cluster, pattern: str, name: str
) -> None:
    with sqlite3.connect(":memory:") as db:
        (expected,) = db.execute("SELECT ? GLOB ?", (name, pattern)).fetchone()
    with psycopg.connect(postgres_cluster.conninfo("postgres")) as db:
        row = db.execute("SELECT %s ~ %s", (name, glob_to_regex(pattern))).fetchone()
    assert row is not None
    assert row[0] is bool(expected), glob_to_regex(pattern)


async def test_namespace_globs_on_the_server(postgres_db: str) -> None:
    cases = [("tenant-a/*", "tenant-a/db", True), ("tenant-a/*", "tenant-ab", False)]
    cases += [("t?n", "tan", True), ("[ab]x", "bx", True), ("[^ab]x", "ax", False)]
    cases += [("a.b", "axb", False), ("50%", "50%", True), ("a_b", "axb", False)]
    with psycopg.connect(postgres_db) as db:
        for pattern, name, matches in cases:
            row = db.execute("SELECT %s ~ %s", (name, glob_to_regex(pattern))).fetchone()
            assert row is not None
            assert row[0] is matches, (pattern, name)


# -- several stores on one database ---------------------------------------------------------


class Daemons:
    """Services over stores on one database: each one stands for a daemon."""

    def __init__(self, data: Path, conninfo: str) -> None:
        self.data, self.conninfo = data, conninfo
        self.services: list[KeyService] = []

    def start(self, **options: Any) -> KeyService:
        store = open_postgres_store(self.conninfo, **options)
        hsm = SoftwareHsm.open(self.data / "master.key", self.data / "keyring.cbor", create=True)
        service = KeyService(store=store, hsm=hsm, policy=make_policy(), create_kek_on_demand=True)
        self.services.append(service)
        return service

    async def start_shared(self, master: Path | None = None) -> KeyService:
        """A daemon whose software HSM keeps its keyring in the store (no keyring file):
        each one then stands for a daemon on its own machine, given the master key."""
        master = master or self.data / "master.key"
        if not master.exists():
            create_master_key(master)
        store = open_postgres_store(self.conninfo)
        try:
            hsm = await SoftwareHsm.open_shared(master, StoreKeyring(store))
        except BaseException:
            store.close()
            raise
        service = KeyService(store=store, hsm=hsm, policy=make_policy(), create_kek_on_demand=True)
        self.services.append(service)
        return service

    def close(self) -> None:
        for service in self.services:
            service.store.close()
            service.hsm.close()


@pytest.fixture
async def daemons(tmp_path: Path, postgres_db: str) -> AsyncIterator[Daemons]:
    group = Daemons(tmp_path, postgres_db)
    yield group
    group.close()


def count(conninfo: str, sql: str) -> int:
    with psycopg.connect(conninfo) as db:
        row = db.execute(sql.encode()).fetchone()
        assert row is not None
        return int(row[0])


async def test_migrations_race_and_apply_once(tmp_path: Path, postgres_db: str) -> None:
    stores: list[PostgresStore] = []
    failures: list[BaseException] = []

    def open_one() -> None:
        try:
            stores.append(PostgresStore.open(postgres_db))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert failures == []
        assert len({store.store_id for store in stores}) == 1  # one store, migrated once
        assert count(postgres_db, "SELECT version FROM kmipd_schema") == pg.SCHEMA_VERSION
        assert count(postgres_db, "SELECT count(*) FROM kmipd_schema") == 1
    finally:
        for store in stores:
            store.close()


async def test_concurrent_creates_with_one_idempotency_key_make_one_key(
    daemons: Daemons,
) -> None:
    services = [daemons.start(), daemons.start(), daemons.start()]
    await services[0].handle(STORAGE, CreateDek(namespace="orders"))  # the KEK exists
    for service in services[1:]:
        await service.store.refresh_if_changed()
    results: list[Any] = []

    async def create(service: KeyService) -> None:
        results.append(
            await service.handle(STORAGE, CreateDek(namespace="orders", idempotency_key=b"k" * 16))
        )

    async with trio.open_nursery() as nursery:
        for n in range(12):
            nursery.start_soon(create, services[n % 3])
    assert len({r.dek_id for r in results}) == 1
    assert len({bytes(r.key) for r in results}) == 1
    assert count(daemons.conninfo, "SELECT count(*) FROM deks") == 2


async def test_the_feed_is_numbered_in_commit_order_under_concurrent_writers(
    daemons: Daemons,
) -> None:
    """A reader that polls as writers commit never sees a number appear behind it."""
    a, b = daemons.start(), daemons.start()
    deks = [(await a.handle(STORAGE, CreateDek(namespace="orders"))) for _ in range(30)]
    seen: list[int] = []
    done = trio.Event()

    async def read_feed() -> None:
        position = 0
        while True:
            finished = done.is_set()
            changes, _, _ = await b.store.changes_since(position, 1000)
            for change in changes:
                assert change.seq == position + 1, "the feed skipped a number"
                position = change.seq
                seen.append(change.seq)
            if finished:
                return
            await trio.lowlevel.checkpoint()

    async def revoke(service: KeyService, dek_id: str) -> None:
        await service.handle(ADMIN, Revoke(key=KeyRef(dek_id=dek_id), reason="superseded"))

    async with trio.open_nursery() as readers:
        readers.start_soon(read_feed)
        async with trio.open_nursery() as writers:
            for n, dek in enumerate(deks):
                writers.start_soon(revoke, (a, b)[n % 2], dek.dek_id)
        done.set()
    assert seen == list(range(1, 31))


async def test_a_lifecycle_change_decided_on_a_stale_row_is_refused(daemons: Daemons) -> None:
    a, b = daemons.start(), daemons.start()
    dek = await a.handle(STORAGE, CreateDek(namespace="orders"))
    seen_by_b = await b.store.get_dek(dek.dek_id)
    assert seen_by_b is not None
    await a.handle(ADMIN, Revoke(key=KeyRef(dek_id=dek.dek_id), reason="key-compromise"))
    # b decided on the row it read before a's change: the store refuses, writes nothing.
    stale = seen_by_b.lifecycle.apply(
        Event.DEACTIVATE, int(time.time()), revocation_reason=RevocationReason.SUPERSEDED
    )
    with pytest.raises(StaleRecordError):
        await b.store.set_dek_lifecycle(seen_by_b, stale)
    fresh = await b.store.get_dek(dek.dek_id)
    assert fresh is not None
    assert fresh.lifecycle.state.value == "compromised"


async def test_a_revocation_on_one_daemon_is_refused_by_another_within_a_second(
    daemons: Daemons,
) -> None:
    a, b = daemons.start(), daemons.start()
    dek = await a.handle(STORAGE, CreateDek(namespace="orders"))
    await b.handle(STORAGE, GetDek(dek_id=dek.dek_id))
    assert b.store.cached_dek(dek.dek_id) is not None  # b serves it from memory now
    await a.handle(ADMIN, Revoke(key=KeyRef(dek_id=dek.dek_id), reason="key-compromise"))
    with trio.fail_after(1):
        while b.store.cached_dek(dek.dek_id) is not None:  # noqa: ASYNC110 - another thread evicts
            await trio.sleep(0.005)  # the notification arrives on b's listener thread
    with pytest.raises(ServiceError) as refused:
        await b.handle(STORAGE, GetDek(dek_id=dek.dek_id))
    assert refused.value.code is ErrorCode.KEY_COMPROMISED


async def test_a_kek_made_on_one_daemon_is_used_by_another(daemons: Daemons) -> None:
    a, b = daemons.start(), daemons.start()
    dek = await a.handle(STORAGE, CreateDek(namespace="fresh"))
    # b has not heard of the KEK (perhaps not even the notification yet): it still
    # finds the DEK's KEK version, and makes no second KEK of its own.
    again = await b.handle(STORAGE, GetDek(dek_id=dek.dek_id))
    assert again.key == dek.key
    await b.handle(STORAGE, CreateDek(namespace="fresh"))
    assert count(daemons.conninfo, "SELECT count(*) FROM keks") == 1


async def test_a_daemon_s_own_kek_writes_and_its_listener_agree(daemons: Daemons) -> None:
    """Its listener reloads KEKs on the daemon's own notification, as the write returns:
    each rotation shows its version once (it once showed up twice, ~1 run in 4)."""
    a, b = daemons.start(), daemons.start()
    await a.handle(ADMIN, CreateKek(name="orders"))
    for n in range(2, 32):
        await a.handle(ADMIN, RotateKek(name="orders"))
        kek = a.store.get_kek("orders")
        assert kek is not None
        assert [v.version for v in kek.versions] == list(range(1, n + 1))
    await b.store.refresh_if_changed()
    deadline = trio.current_time() + 10
    while b.store.get_kek("orders") != a.store.get_kek("orders"):
        assert trio.current_time() < deadline, "b never heard of a's rotations"
        await trio.sleep(0.01)  # b's listener thread reloads on the notification


async def test_one_daemon_at_a_time_runs_maintenance_and_another_takes_over(
    daemons: Daemons,
) -> None:
    a, b = daemons.start(), daemons.start()
    assert await a.store.maintenance_turn()
    assert not await b.store.maintenance_turn()
    assert await a.store.maintenance_turn()  # a keeps its turn
    a.store.close()
    daemons.services.remove(a)
    a.hsm.close()
    assert await b.store.maintenance_turn()  # a's session ended: the lock went with it


# -- faults ------------------------------------------------------------------------------------


def test_a_newer_schema_is_refused(postgres_db: str) -> None:
    PostgresStore.open(postgres_db).close()
    with psycopg.connect(postgres_db) as db:
        db.execute("UPDATE kmipd_schema SET version = 99")
    newer = rf"schema version 99, newer than this kmipd \({pg.SCHEMA_VERSION}\)"
    with pytest.raises(StoreError, match=newer):
        PostgresStore.open(postgres_db)
    assert count(postgres_db, "SELECT count(*) FROM deks") == 0  # and nothing changed


async def test_a_read_only_user_can_read_but_every_write_fails_clearly(
    tmp_path: Path, postgres_db: str, postgres_cluster: Cluster
) -> None:
    writer = Daemons(tmp_path, postgres_db)
    dek = await writer.start().handle(STORAGE, CreateDek(namespace="orders"))
    writer.close()
    dbname = postgres_db.split("dbname=")[1].split(maxsplit=1)[0]
    postgres_cluster.execute(
        "DROP ROLE IF EXISTS kmipd_reader; CREATE ROLE kmipd_reader LOGIN;"
        f" GRANT CONNECT ON DATABASE {dbname} TO kmipd_reader;"
    )
    postgres_cluster.execute(
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO kmipd_reader", dbname=dbname
    )
    reader = Daemons(tmp_path, postgres_db.replace("user=postgres", "user=kmipd_reader"))
    try:
        service = reader.start()
        assert (await service.handle(STORAGE, GetDek(dek_id=dek.dek_id))).key == dek.key
        with pytest.raises(ServiceError) as refused:
            await service.handle(STORAGE, CreateDek(namespace="orders"))
        # The database's condition, not a bug: store-unavailable, not applied, and the
        # store's health names the cause until a probe write goes through.
        assert refused.value.code is ErrorCode.STORE_UNAVAILABLE
        assert "permission denied" in refused.value.message
        assert service.store.health.describe() == (
            "cannot write: PostgreSQL user may not write (permission denied)"
        )
        lifecycle = Lifecycle(state=State.ACTIVE, usage=DEK_USAGES)
        record = DekRecord("dek_x", "orders", 1, b"w" * 40, 0, "me", lifecycle)
        with pytest.raises(StoreUnavailableError, match="permission denied"):
            await service.store.put_dek(record)
        assert not await service.store.probe_write()
        # Reads still work: the database answers, it only refuses this user's writes.
        assert (await service.handle(STORAGE, GetDek(dek_id=dek.dek_id))).key == dek.key
    finally:
        reader.close()
    assert count(postgres_db, "SELECT count(*) FROM deks") == 1  # nothing half-written


def test_postgres_down_at_open_is_one_clear_error(postgres_cluster: Cluster) -> None:
    absent = postgres_cluster.conninfo("postgres").replace(
        f"port={postgres_cluster.port}", "port=1"
    )
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        PostgresStore.open(absent, connect_timeout=1)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert message.startswith("cannot connect to PostgreSQL at host=")
    assert "port=1" in message
    assert "\n" not in message


# -- real daemons ---------------------------------------------------------------------------------


def postgres_config(template: str, conninfo: str, n: int, store: str = "") -> str:
    config = re.sub(r"listen = \[.*\]", 'listen = ["127.0.0.1:0"]', template)
    config = re.sub(
        r'\[store\]\npath = "kmipd.db"\n',
        f'[store]\nbackend = "postgresql"\nconninfo = "{conninfo}"\n{store}',
        config,
    )
    assert 'backend = "postgresql"' in config
    return config + f'\n[audit]\npath = "audit-{n}.log"\n'  # one trail per daemon


def start_on_postgres(
    tmp_path: Path, conninfo: str, how_many: int, store: str = "", extra: str = ""
) -> tuple[list[Daemon], dict[str, Path], Path, Callable[[int], Path]]:
    """``extra``: TOML appended to every daemon's config (whole tables)."""
    data = tmp_path / "dev"
    first = Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=tmp_path / "init.log")
    assert first.stop() == 0  # it made the CA, master key and keyring; now they share them
    template = (data / "kmipd.toml").read_text()

    def config(n: int) -> Path:
        path = data / f"kmipd-{n}.toml"
        path.write_text(postgres_config(template, conninfo, n, store) + extra)
        return path

    daemons = [Daemon("--config", config(n), log=tmp_path / f"d{n}.log") for n in range(how_many)]
    pki = data / "pki"
    creds = {"ca": pki / "ca.pem", "cert": pki / "storage.pem", "key": pki / "storage-key.pem"}
    return daemons, creds, data, config


@pytest.mark.slow
def test_three_daemons_on_postgres_one_killed_mid_run_lose_nothing_and_create_nothing_twice(
    tmp_path: Path, postgres_db: str
) -> None:
    daemons, creds, data, _ = start_on_postgres(tmp_path, postgres_db, 3)
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
    daemons[0].kill()  # a daemon dies with requests in flight
    for worker in workers:
        worker.join(120)
    assert failures == [], (failures, [d.stderr()[-4000:] for d in daemons])
    assert len(acknowledged) == 4 * 60  # no request lost

    with Client(addresses[1:], **creds) as kms:  # every DEK readable from the survivors
        fetched = kms.get_deks(list(acknowledged))
        assert {d.dek_id: d.key_bytes() for d in fetched} == acknowledged
    assert count(postgres_db, "SELECT count(*) FROM deks") == len(acknowledged)  # none twice

    # A key revoked through one survivor is refused by the other within a second.
    admin = {**creds, "cert": data / "pki" / "admin.pem", "key": data / "pki" / "admin-key.pem"}
    victim = next(iter(acknowledged))
    with Client(addresses[2], **creds) as other:
        other.get_dek(victim).close()  # cached there now
        with Client(addresses[1], **admin) as one:
            one.revoke("key-compromise", dek_id=victim)
        revoked_at = time.monotonic()
        while True:
            try:
                other.get_dek(victim).close()
            except KeyCompromisedError:
                break
            assert time.monotonic() - revoked_at < 1, "daemon 2 still serves a revoked key"

    for daemon in daemons[1:]:
        assert daemon.stop() == 0
    trails = [data / f"audit-{n}.log" for n in range(3)]
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


@pytest.mark.slow
def test_a_daemon_pointed_at_a_dead_postgres_exits_with_one_line(
    tmp_path: Path, postgres_databases: PostgresDatabases, postgres_cluster: Cluster
) -> None:
    data = tmp_path / "dev"
    first = Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=tmp_path / "init.log")
    assert first.stop() == 0
    dead = postgres_cluster.conninfo("nothere").replace(f"port={postgres_cluster.port}", "port=1")
    config = data / "dead.toml"
    config.write_text(
        postgres_config((data / "kmipd.toml").read_text(), dead, 0).replace(
            'backend = "postgresql"\n', 'backend = "postgresql"\nconnect_timeout = 1\n'
        )
    )
    result = run_kmipd("serve", "--config", config)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("kmipd: error: cannot connect to PostgreSQL at host="), lines
    assert "port=1" in lines[-1]
    checked = run_kmipd("check-config", config)
    assert checked.returncode != 0
    assert "store.conninfo: cannot connect to PostgreSQL" in checked.stdout + checked.stderr


@pytest.mark.slow
def test_postgres_down_while_serving_answers_store_unavailable_then_recovers(
    tmp_path: Path,
) -> None:
    with running_cluster() as cluster:  # its own: this test stops it
        cluster.execute("CREATE DATABASE kmipd")
        (daemon,), creds, _, _ = start_on_postgres(
            tmp_path, cluster.conninfo("kmipd"), 1, store="connect_timeout = 2\n"
        )
        with Client(daemon.address, **creds, timeout=30) as kms:
            with kms.create_dek("orders") as dek:
                dek_id, key = dek.dek_id, bytes(dek.key)
            up = kms.status()
            assert up.store_backend == f"postgresql primary at {cluster.socket_dir}"
            cluster.stop()
            with pytest.raises(km.StoreUnavailableError, match="store-unavailable"):
                kms.get_dek(dek_id).close()  # not served from memory: nothing vouches for it
            down = kms.status()
            assert (down.state, down.store) == ("degraded", "cannot write: PostgreSQL unreachable")
            assert down.store_backend == "postgresql unreachable"
            # Refused before anything reached the database: not applied, so the client
            # may send it anywhere (here there is nowhere else).
            with pytest.raises(km.StoreUnavailableError):
                kms.create_dek("orders").close()
            cluster.start()
            recovered_at = time.monotonic() + 30
            while True:  # the daemon reconnects by itself: no restart
                try:
                    with kms.get_dek(dek_id) as again:
                        assert bytes(again.key) == key
                    break
                except km.StoreUnavailableError:
                    assert time.monotonic() < recovered_at, "the daemon never reconnected"
            assert kms.status().store == "ok"
            with kms.create_dek("orders") as created:
                assert created.dek_id
        assert daemon.stop() == 0
        assert count(cluster.conninfo("kmipd"), "SELECT count(*) FROM deks") == 2


#: A deferred constraint trigger runs at COMMIT: the first DEK insert's backend then
#: terminates itself, so the connection breaks while kmipd is committing.
KILL_THE_FIRST_COMMIT = """
CREATE SEQUENCE commit_kills;
CREATE FUNCTION kill_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('commit_kills') = 1 THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER kill_at_commit AFTER INSERT ON deks
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION kill_at_commit();
"""


async def test_a_connection_lost_during_commit_answers_store_outcome_unknown(
    daemons: Daemons,
) -> None:
    service = daemons.start()
    await service.handle(ADMIN, CreateKek(name="orders"))
    with psycopg.connect(daemons.conninfo) as db:
        db.execute(KILL_THE_FIRST_COMMIT.encode())
    with pytest.raises(ServiceError) as unknown:
        await service.handle(STORAGE, CreateDek(namespace="orders"))
    # Not "not applied": the daemon cannot know whether COMMIT took effect.
    assert unknown.value.code is ErrorCode.STORE_OUTCOME_UNKNOWN
    assert "may or may not be applied" in unknown.value.message
    assert count(daemons.conninfo, "SELECT count(*) FROM deks") == 0  # here: it did not
    # The store heals by itself (a probe write on a fresh connection), no restart.
    assert service.store.health.describe() == "cannot write: PostgreSQL unreachable"
    assert await service.store.probe_write()
    assert service.store.health.ok
    dek = await service.handle(STORAGE, CreateDek(namespace="orders"))
    assert (await service.handle(STORAGE, GetDek(dek_id=dek.dek_id))).key == dek.key


@pytest.mark.slow
def test_the_client_settles_store_outcome_unknown_on_another_daemon_of_the_store(
    tmp_path: Path, postgres_db: str
) -> None:
    daemons, creds, _, _ = start_on_postgres(tmp_path, postgres_db, 2)
    addresses = [d.address for d in daemons]
    with Client(addresses, **creds, timeout=30) as kms:
        with psycopg.connect(postgres_db) as db:
            db.execute(KILL_THE_FIRST_COMMIT.encode())
        # The first daemon answers store-outcome-unknown; the create carries an
        # idempotency key, so the client retries it on the other daemon of this store.
        with kms.create_dek("orders", idempotency_key=b"k" * 16) as dek:
            dek_id = dek.dek_id
        with kms.create_dek("orders", idempotency_key=b"k" * 16) as again:
            assert again.dek_id == dek_id  # and the key forbids a second DEK
    for daemon in daemons:
        assert daemon.stop() == 0
    assert count(postgres_db, "SELECT count(*) FROM deks") == 1
    assert count(postgres_db, "SELECT last_value FROM commit_kills") == 2
    assert "store outcome unknown during create-dek" in daemons[0].stderr()


# -- store failover: a primary, a synchronous streaming replica, the primary killed ---------


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[Cluster, Cluster]]:
    """A primary whose every commit is applied on its streaming replica before it is
    acknowledged (``synchronous_commit = remote_apply``), both running."""
    with running_cluster() as primary:
        primary.execute("CREATE DATABASE kmipd")
        replica = primary.replica()
        try:
            replica.start()
            # Synchronous only now: with no standby yet, CREATE DATABASE would wait for one.
            primary.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            primary.execute("ALTER SYSTEM SET synchronous_commit = 'remote_apply'")
            primary.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 30
            while primary.execute("SELECT sync_state FROM pg_stat_replication") != [("sync",)]:
                assert time.monotonic() < deadline, "the replica never became synchronous"
                time.sleep(0.02)  # polling the primary's view of its standby
            yield primary, replica
        finally:
            replica.destroy()


RETRYABLE = (
    km.StoreUnavailableError,
    km.StoreOutcomeUnknownError,
    km.UnavailableError,
    km.BusyError,
    km.ShuttingDownError,
)


@pytest.mark.slow
def test_the_store_fails_over_to_its_replica_and_no_acknowledged_key_is_lost(
    tmp_path: Path, primary_and_replica: tuple[Cluster, Cluster]
) -> None:
    primary, replica = primary_and_replica
    # libpq multi-host: whichever of the two takes writes.
    conninfo = (
        f"host={primary.socket_dir},{replica.socket_dir} port={primary.port},{replica.port}"
        " dbname=kmipd user=postgres target_session_attrs=read-write"
    )
    daemons, creds, data, _ = start_on_postgres(tmp_path, conninfo, 2)
    addresses = [d.address for d in daemons]
    acknowledged: dict[str, bytes] = {}
    retried: list[tuple[float, str]] = []  # (when, error) of every retryable error seen
    failures: list[BaseException] = []
    workers = 4
    before = threading.Barrier(workers + 1)
    promoted = threading.Event()

    def retrying(call: Callable[[], Any]) -> Any:
        while True:
            try:
                return call()
            except RETRYABLE as exc:  # the client backs off between attempts itself
                retried.append((time.monotonic(), type(exc).__name__))
                assert len(retried) < 2000, "the retryable errors never stopped"

    def create_and_read(kms: Client) -> None:
        key = os.urandom(16)  # one idempotency key for every attempt of this create

        def create() -> tuple[str, bytes]:
            with kms.create_dek("failover", idempotency_key=key) as dek:
                return dek.dek_id, bytes(dek.key)

        dek_id, value = retrying(create)
        acknowledged[dek_id] = value

        def read() -> bytes:
            with kms.get_dek(dek_id) as again:
                return bytes(again.key)

        assert retrying(read) == value

    def workload() -> None:
        try:
            with Client(addresses, **creds, timeout=30, backoff_base=0.05) as kms:
                for _ in range(10):
                    create_and_read(kms)
                before.wait(60)
                while not promoted.is_set():  # writes in flight while the primary dies
                    create_and_read(kms)
                for _ in range(10):
                    create_and_read(kms)
        except BaseException as exc:  # collected and asserted below
            failures.append(exc)
            before.abort()

    threads = [threading.Thread(target=workload) for _ in range(workers)]
    for thread in threads:
        thread.start()
    before.wait(60)
    flowing = len(acknowledged) + 2 * workers
    deadline = time.monotonic() + 60
    while len(acknowledged) < flowing:  # kill it with writes in flight, not between them
        assert time.monotonic() < deadline and not failures, failures
        time.sleep(0.001)  # polling the workers' progress
    killed_at = time.monotonic()
    primary.kill()
    replica.promote()
    promoted_at = time.monotonic()
    promoted.set()
    for thread in threads:
        thread.join(120)
    assert failures == [], (failures, [d.stderr()[-4000:] for d in daemons])
    late = [when - promoted_at for when, _ in retried]
    print(
        f"primary killed, replica promoted in {promoted_at - killed_at:.2f} s;"
        f" {len(retried)} retryable errors reached the workers"
        f" ({sorted({name for _, name in retried})}),"
        f" the last {max(late, default=0):.2f} s after the promotion;"
        f" {len(acknowledged)} keys acknowledged"
    )
    assert len(acknowledged) >= workers * 20
    # Every acknowledged key is on the new primary, each once; the daemons serve them
    # without a restart.
    survivor = replica.conninfo("kmipd")
    assert count(survivor, "SELECT count(*) FROM deks") == len(acknowledged)
    with Client(addresses, **creds) as kms:
        fetched = kms.get_deks(list(acknowledged))
        assert {d.dek_id: d.key_bytes() for d in fetched} == acknowledged
    for daemon in daemons:
        assert daemon.stop() == 0
    # What the daemons answered meanwhile (the client library retried it): a burst of
    # retryable refusals while no server took writes, and every audit chain whole.
    trails = [data / f"audit-{n}.log" for n in range(2)]
    answers: dict[str, int] = {}
    for trail in trails:
        report = verify(trail)
        assert report.ok, (trail.name, report.problem)
        for _, record in records(trail):
            answers[record["result"]] = answers.get(record["result"], 0) + 1
    print(f"the daemons' answers: {answers}")
    assert set(answers) <= {"ok", "store-unavailable", "store-outcome-unknown"}, answers
    assert answers.get("store-unavailable", 0) + answers.get("store-outcome-unknown", 0) < 500


@pytest.mark.slow
def test_maintenance_runs_on_one_daemon_and_moves_to_another_when_it_dies(
    tmp_path: Path, postgres_db: str
) -> None:
    """Purges (like rotations and rewrap jobs) run where the maintenance lock is held."""
    daemons, creds, data, _ = start_on_postgres(
        tmp_path,
        postgres_db,
        2,
        extra="\n[lifecycle]\nsoft_delete_days = 0\ncheck_interval = 0.05\n",
    )
    admin = {**creds, "cert": data / "pki" / "admin.pem", "key": data / "pki" / "admin-key.pem"}
    addresses = [d.address for d in daemons]

    def purged_by(dek_ids: list[str]) -> list[set[int]]:
        """For each key, which daemons logged erasing it, once some daemon did."""
        deadline = time.monotonic() + 30
        while True:
            logs = [d.stderr() for d in daemons]
            erased = [f"destroyed DEK {k}: its wrapped material is erased" for k in dek_ids]
            found = [{n for n, text in enumerate(logs) if line in text} for line in erased]
            if all(found):
                return found
            assert time.monotonic() < deadline, "nothing purged the destroyed keys"
            time.sleep(0.02)  # polling the daemons' logs

    def destroy_some(kms: Client, admin_kms: Client, n: int) -> list[str]:
        made = [kms.create_dek("maintained").dek_id for _ in range(n)]
        for dek_id in made:
            admin_kms.revoke("superseded", dek_id=dek_id)
            admin_kms.destroy(dek_id=dek_id)  # soft-deleted: due for purge at once
        return made

    with Client(addresses, **creds) as kms, Client(addresses, **admin) as admin_kms:
        holders = purged_by(destroy_some(kms, admin_kms, 12))
        assert len(set().union(*holders)) == 1, holders  # one daemon erased them all, alone
        (holder,) = holders[0]
        daemons[holder].kill()  # its session ends, and the lock with it
        survivor = 1 - holder
        assert purged_by(destroy_some(kms, admin_kms, 3)) == [{survivor}] * 3
    assert daemons[survivor].stop() == 0


@pytest.mark.slow
def test_metrics_show_the_pool_and_the_store_latency(tmp_path: Path, postgres_db: str) -> None:
    (daemon,), creds, _, _ = start_on_postgres(
        tmp_path, postgres_db, 1, extra='\n[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    with Client(daemon.address, **creds) as kms:
        kms.create_dek("metered").close()
    [url] = re.findall(r"Prometheus metrics on (http://\S+?/metrics)", daemon.stderr())
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("kmipd_store_pool_max", ())] == 8  # store.pool_size's default
    assert 1 <= samples[("kmipd_store_pool_size", ())] <= 8
    assert ("kmipd_store_pool_waiting", ()) in samples
    assert ("kmipd_store_pool_connections_lost_total", ()) in samples
    writes = samples[("kmipd_store_transaction_duration_seconds_count", (("kind", "write"),))]
    assert writes >= 1  # the create's commit, at least
    assert daemon.stop() == 0
