"""Secrets: store and service, with the software HSM, on SQLite files and (where the test
looks at no file) PostgreSQL too."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import cbor2
import pycddl
import pytest
import trio
import trio.testing

from kmipd.audit import AuditLog
from kmipd.hsm import SoftwareHsm
from kmipd.protocol import (
    OPERATIONS,
    CreateDek,
    DeleteSecret,
    Destroy,
    ErrorCode,
    GetSecret,
    KeyRef,
    ListSecrets,
    ProtocolError,
    PurgeSecret,
    RecoverSecret,
    Revoke,
    RotateKek,
    SecretVersions,
    SetSecret,
    StartRewrap,
    UpdateSecret,
    encode_struct,
    error_to_wire,
    parse_request,
    parse_struct,
    request_to_wire,
    result_to_wire,
)
from kmipd.service import Caller, Grant, KeyService, Policy, ServiceError, expand_operations
from kmipd.store import KeyStore, RewrapJob, Store
from kmipd.store._sqlite import MIGRATIONS
from tests.conftest import StoreOpener

DOMAIN = "spiffe://kmipd.test"
ADMIN = Caller(f"{DOMAIN}/admin", 1)
MANAGER = Caller(f"{DOMAIN}/manager", 2)
READER = Caller(f"{DOMAIN}/reader", 3)
STRANGER = Caller(f"{DOMAIN}/stranger", 4)
VALUE = b"replication-password-\x00\xffS3CR3T-9f1c"


def policy() -> Policy:
    return Policy(
        (
            Grant(ADMIN.identity, ("*",), expand_operations(["*"])),
            Grant(MANAGER.identity, ("*",), expand_operations(["secrets-manage"])),
            Grant(READER.identity, ("db", "db/*"), expand_operations(["secrets-read"])),
            Grant(STRANGER.identity, ("*",), expand_operations(["data"])),
        )
    )


def open_sqlite(data: Path, **options: Any) -> Store:
    return KeyStore.open(data / "kmipd.db", **options)


def open_service(
    data: Path,
    *,
    max_size: int = 64 * 1024,
    clock: list[float] | None = None,
    open_store: StoreOpener = open_sqlite,
) -> KeyService:
    """``open_store``: the parametrised backend (conftest) for tests any store passes."""
    now = clock if clock is not None else [1_800_000_000.0]
    store = open_store(data, clock=lambda: now[0])
    hsm = SoftwareHsm.open(data / "master.key", data / "keyring.cbor", create=True)
    audit = AuditLog.open(data / "audit.log", data / "audit.key")
    return KeyService(
        store=store,
        hsm=hsm,
        policy=policy(),
        create_kek_on_demand=True,
        audit=audit,
        clock=lambda: now[0],
        secret_max_size=max_size,
    )


def close_service(service: KeyService) -> None:
    service.store.close()
    service.hsm.close()
    assert service.audit is not None
    service.audit.close()


@pytest.fixture
async def service(tmp_path: Path, open_store: StoreOpener) -> AsyncIterator[KeyService]:
    """On either backend (the open_store parametrisation)."""
    svc = open_service(tmp_path, open_store=open_store)
    yield svc
    close_service(svc)


@pytest.fixture
async def sqlite_service(tmp_path: Path) -> AsyncIterator[KeyService]:
    """For the tests that read the SQLite file itself."""
    svc = open_service(tmp_path)
    yield svc
    close_service(svc)


async def refused(service: KeyService, caller: Caller, request: object) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await service.handle(caller, request)
    assert VALUE not in caught.value.message.encode()
    return caught.value


async def rotate_and_start_rewrap(service: KeyService, namespace: str) -> RewrapJob:
    """Rotate the namespace's KEK and start its rewrap job; the job as stored."""
    await service.handle(ADMIN, RotateKek(name=namespace))
    job = await service.handle(ADMIN, StartRewrap(namespace=namespace))
    stored = await service.store.get_job(job.job_id)
    assert stored is not None
    return stored


async def run_to_end(service: KeyService, job: RewrapJob, batch_size: int = 10) -> RewrapJob:
    while job.state == "running":
        job = await service.run_rewrap_batch(job, batch_size)
    return job


async def test_set_adds_versions_and_get_reads_newest_or_named(service: KeyService) -> None:
    one = await service.handle(MANAGER, SetSecret(namespace="db", name="repl", value=VALUE))
    two = await service.handle(
        MANAGER,
        SetSecret(namespace="db", name="repl", value=b"second", content_type="text/plain"),
    )
    assert (one.version, two.version, one.size) == (1, 2, len(VALUE))
    assert one.content_type == "application/octet-stream"
    got = await service.handle(READER, GetSecret(namespace="db", name="repl"))
    assert (got.version, got.value, got.content_type) == (2, b"second", "text/plain")
    old = await service.handle(READER, GetSecret(namespace="db", name="repl", version=1))
    assert old.value == VALUE
    assert "second" not in repr(got) and "S3CR3T" not in repr(old)
    versions = await service.handle(READER, SecretVersions(namespace="db", name="repl"))
    assert [v.version for v in versions.versions] == [1, 2]
    listed = await service.handle(READER, ListSecrets())
    assert [(s.namespace, s.name, s.versions) for s in listed.secrets] == [("db", "repl", 2)]
    # Metadata only: the value never appears in a listing's wire form.
    for result in (listed, versions):
        assert b"second" not in repr(encode_struct(result)).encode()


async def test_newest_enabled_version_is_read_and_disabled_named_is_refused(
    service: KeyService,
) -> None:
    await service.handle(MANAGER, SetSecret(namespace="db", name="repl", value=VALUE))
    await service.handle(
        MANAGER, SetSecret(namespace="db", name="repl", value=b"bad", enabled=False)
    )
    got = await service.handle(READER, GetSecret(namespace="db", name="repl"))
    assert got.version == 1
    error = await refused(service, READER, GetSecret(namespace="db", name="repl", version=2))
    assert error.code is ErrorCode.SECRET_DISABLED
    await service.handle(
        MANAGER, UpdateSecret(namespace="db", name="repl", version=1, enabled=False)
    )
    error = await refused(service, READER, GetSecret(namespace="db", name="repl"))
    assert error.code is ErrorCode.SECRET_DISABLED
    await service.handle(MANAGER, UpdateSecret(namespace="db", name="repl", enabled=True))
    assert (await service.handle(READER, GetSecret(namespace="db", name="repl"))).value == b"bad"


async def test_dates_refuse_expired_and_not_yet_valid(
    tmp_path: Path, open_store: StoreOpener
) -> None:
    clock = [1_800_000_000.0]
    svc = open_service(tmp_path, clock=clock, open_store=open_store)
    await svc.handle(
        MANAGER,
        SetSecret(
            namespace="db", name="t", value=VALUE, not_before=1_800_000_100, expires=1_800_000_200
        ),
    )
    assert (await refused(svc, READER, GetSecret(namespace="db", name="t"))).code is (
        ErrorCode.SECRET_NOT_YET_VALID
    )
    clock[0] = 1_800_000_150
    assert (await svc.handle(READER, GetSecret(namespace="db", name="t"))).value == VALUE
    clock[0] = 1_800_000_200
    assert (await refused(svc, READER, GetSecret(namespace="db", name="t"))).code is (
        ErrorCode.SECRET_EXPIRED
    )
    # Clearing the expiry (0) makes it readable again; attributes survive a restart.
    await svc.handle(MANAGER, UpdateSecret(namespace="db", name="t", expires=0, tags={"k": "v"}))
    close_service(svc)
    svc = open_service(tmp_path, clock=clock, open_store=open_store)
    got = await svc.handle(READER, GetSecret(namespace="db", name="t"))
    assert (got.value, got.expires, got.tags) == (VALUE, None, {"k": "v"})
    bad = await refused(
        svc, MANAGER, UpdateSecret(namespace="db", name="t", not_before=5, expires=4)
    )
    assert bad.code is ErrorCode.BAD_REQUEST
    close_service(svc)


async def test_refusals_have_their_codes_and_lose_nothing(
    tmp_path: Path, open_store: StoreOpener
) -> None:
    svc = open_service(tmp_path, max_size=64, open_store=open_store)
    await svc.handle(MANAGER, SetSecret(namespace="db", name="repl", value=VALUE))
    big = await refused(svc, MANAGER, SetSecret(namespace="db", name="repl", value=b"x" * 65))
    assert big.code is ErrorCode.SECRET_TOO_LARGE and "64" in big.message
    unknown = await refused(svc, READER, GetSecret(namespace="db", name="repl", version=9))
    assert unknown.code is ErrorCode.UNKNOWN_SECRET_VERSION
    missing = await refused(svc, READER, GetSecret(namespace="db", name="nope"))
    assert missing.code is ErrorCode.NOT_FOUND
    # Grants: the reader reads under db/* only and cannot write; the manager cannot read
    # values; a data-only client gets nothing.
    for caller, request in (
        (READER, GetSecret(namespace="web", name="repl")),
        (READER, SetSecret(namespace="db", name="repl", value=b"x")),
        (READER, DeleteSecret(namespace="db", name="repl")),
        (MANAGER, GetSecret(namespace="db", name="repl")),
        (STRANGER, GetSecret(namespace="db", name="repl")),
        (STRANGER, ListSecrets()),
    ):
        error = await refused(svc, caller, request)
        assert error.code is ErrorCode.NOT_AUTHORIZED, request
    got = await svc.handle(READER, GetSecret(namespace="db", name="repl"))
    assert (got.version, got.value) == (1, VALUE)  # nothing was lost
    close_service(svc)


async def test_delete_recover_purge(sqlite_service: KeyService, tmp_path: Path) -> None:
    await sqlite_service.handle(MANAGER, SetSecret(namespace="db", name="repl", value=VALUE))
    early = await refused(sqlite_service, MANAGER, PurgeSecret(namespace="db", name="repl"))
    assert early.code is ErrorCode.WRONG_STATE
    deleted = await sqlite_service.handle(MANAGER, DeleteSecret(namespace="db", name="repl"))
    assert deleted.deleted is not None and deleted.purge_at is not None
    for request in (
        GetSecret(namespace="db", name="repl"),
        SetSecret(namespace="db", name="repl", value=b"x"),
    ):
        caller = READER if isinstance(request, GetSecret) else MANAGER
        assert (await refused(sqlite_service, caller, request)).code is ErrorCode.SECRET_DELETED
    assert (await sqlite_service.handle(READER, ListSecrets())).secrets == ()
    shown = await sqlite_service.handle(MANAGER, ListSecrets(deleted=True))
    assert [s.name for s in shown.secrets] == ["repl"]
    await sqlite_service.handle(MANAGER, RecoverSecret(namespace="db", name="repl"))
    assert (
        await sqlite_service.handle(READER, GetSecret(namespace="db", name="repl"))
    ).value == VALUE
    await sqlite_service.handle(MANAGER, DeleteSecret(namespace="db", name="repl"))
    await sqlite_service.handle(MANAGER, PurgeSecret(namespace="db", name="repl"))
    gone = await refused(sqlite_service, READER, GetSecret(namespace="db", name="repl"))
    assert gone.code is ErrorCode.NOT_FOUND
    with sqlite3.connect(tmp_path / "kmipd.db") as db:
        assert db.execute("SELECT count(*) FROM secret_versions").fetchone() == (0,)


async def test_soft_deleted_secret_is_purged_when_its_window_ends(
    tmp_path: Path, open_store: StoreOpener
) -> None:
    clock = [1_800_000_000.0]
    svc = open_service(tmp_path, clock=clock, open_store=open_store)
    await svc.handle(MANAGER, SetSecret(namespace="db", name="repl", value=VALUE))
    await svc.handle(MANAGER, DeleteSecret(namespace="db", name="repl"))
    assert await svc.purge_due() == 0
    clock[0] += svc.lifecycle.soft_delete_seconds
    assert await svc.purge_due() == 1
    assert await svc.store.get_secret("db", "repl") is None
    close_service(svc)


async def test_values_never_reach_database_or_audit_in_clear(
    sqlite_service: KeyService, tmp_path: Path
) -> None:
    values = [b"VALUE-%03d-" % i + bytes(range(40)) for i in range(20)]
    for i, value in enumerate(values):
        await sqlite_service.handle(MANAGER, SetSecret(namespace="db", name=f"s{i}", value=value))
        await sqlite_service.handle(READER, GetSecret(namespace="db", name=f"s{i}"))
    await sqlite_service.handle(MANAGER, DeleteSecret(namespace="db", name="s0"))
    await sqlite_service.handle(MANAGER, PurgeSecret(namespace="db", name="s0"))
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert not any(value in on_disk for value in values)
    trail = (tmp_path / "audit.log").read_bytes()
    assert b"get-secret" in trail and b"set-secret" in trail and b"'s3'" in trail


async def test_moved_or_edited_rows_fail_to_unwrap(tmp_path: Path) -> None:
    svc = open_service(tmp_path)
    await svc.handle(MANAGER, SetSecret(namespace="db", name="a", value=b"alpha"))
    await svc.handle(MANAGER, SetSecret(namespace="db", name="b", value=b"bravo"))
    close_service(svc)
    with sqlite3.connect(tmp_path / "kmipd.db") as db:
        rows = dict(db.execute("SELECT name, wrapped FROM secret_versions"))
        db.execute("UPDATE secret_versions SET wrapped = ? WHERE name = 'a'", (rows["b"],))
    svc = open_service(tmp_path)
    error = await refused(svc, READER, GetSecret(namespace="db", name="a"))
    assert error.code is ErrorCode.INTEGRITY_FAILURE
    assert (await svc.handle(READER, GetSecret(namespace="db", name="b"))).value == b"bravo"
    close_service(svc)


async def test_rotation_and_rewrap_job_rewrap_secrets(service: KeyService, tmp_path: Path) -> None:
    await service.handle(MANAGER, SetSecret(namespace="db", name="repl", value=VALUE))
    await service.handle(MANAGER, SetSecret(namespace="db", name="repl", value=b"v2"))
    await run_to_end(service, await rotate_and_start_rewrap(service, "db"))
    versions = await service.handle(READER, SecretVersions(namespace="db", name="repl"))
    assert [v.kek_version for v in versions.versions] == [2, 2]
    assert (
        await service.handle(READER, GetSecret(namespace="db", name="repl", version=1))
    ).value == VALUE
    assert await service.store.count_secret_versions_under("db", 1) == 0


def test_every_secret_message_round_trips_without_showing_the_value() -> None:
    request = SetSecret(namespace="db", name="a/b", value=VALUE, tags={"team": "x"})
    assert "S3CR3T" not in repr(request)
    assert parse_struct(SetSecret, encode_struct(request), "args") == request
    for name in ("set-secret", "get-secret", "list-secrets", "secret-versions", "update-secret"):
        assert name in OPERATIONS


def test_migration_adds_the_secret_tables_to_an_older_store(tmp_path: Path) -> None:
    path = tmp_path / "kmipd.db"
    with sqlite3.connect(path) as db:
        db.executescript("".join(MIGRATIONS[:4]) + " PRAGMA user_version = 4;")
        db.execute("INSERT INTO keks VALUES ('db', 1, 'x')")
    store = KeyStore.open(path)
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert db.execute("SELECT name FROM keks").fetchall() == [("db",)]
        assert db.execute("SELECT count(*) FROM secrets").fetchone() == (0,)


async def test_real_secret_messages_match_the_cddl(service: KeyService) -> None:
    schema = pycddl.Schema(
        (Path(__file__).parent.parent / "conformance" / "protocol.cddl").read_text()
    )
    requests: list[object] = [
        SetSecret(
            namespace="db",
            name="app/repl",
            value=VALUE,
            content_type="text/plain",
            tags={"team": "storage"},
            not_before=1,
            expires=2_000_000_000,
        ),
        GetSecret(namespace="db", name="app/repl"),
        GetSecret(namespace="db", name="app/repl", version=1),
        ListSecrets(namespace="d*", limit=10),
        SecretVersions(namespace="db", name="app/repl"),
        UpdateSecret(namespace="db", name="app/repl", enabled=True, expires=0),
        DeleteSecret(namespace="db", name="app/repl"),
        ListSecrets(deleted=True, after=("a", "b")),
        RecoverSecret(namespace="db", name="app/repl"),
        DeleteSecret(namespace="db", name="app/repl"),
        PurgeSecret(namespace="db", name="app/repl"),
    ]
    for number, request in enumerate(requests):
        schema.validate_cbor(cbor2.dumps(request_to_wire(number, request)))
        result = await service.handle(ADMIN, request)
        schema.validate_cbor(cbor2.dumps(result_to_wire(number, result)))
    for code in (ErrorCode.SECRET_EXPIRED, ErrorCode.SECRET_DELETED):
        schema.validate_cbor(cbor2.dumps(error_to_wire(1, code, "x")))
    for bad in (
        {"id": 1, "op": "get-secret", "args": {"namespace": "db", "name": "a//b"}},
        {"id": 1, "op": "set-secret", "args": {"namespace": "db", "name": "a"}},
        {"id": 1, "op": "get-secret", "args": {"namespace": "db", "name": "a", "version": 0}},
    ):
        with pytest.raises(pycddl.ValidationError):
            schema.validate_cbor(cbor2.dumps(bad))
        with pytest.raises(ProtocolError):
            parse_request(bad)


async def test_a_rewrap_job_rewraps_secrets_before_it_can_be_seen_done(
    service: KeyService,
) -> None:
    await service.handle(MANAGER, SetSecret(namespace="db", name="repl", value=VALUE))
    for _ in range(3):
        await service.handle(ADMIN, CreateDek(namespace="db", idempotency_key=os.urandom(16)))
    stored = await rotate_and_start_rewrap(service, "db")
    # After the first batch (of 2 DEKs: still running), the secret is done already, so
    # whoever sees the job done next never sees a secret under the old version.
    stored = await service.run_rewrap_batch(stored, 2)
    assert stored.state == "running"
    assert await service.store.count_secret_versions_under("db", 1) == 0
    stored = await run_to_end(service, stored, 2)
    assert (stored.rewrapped, stored.skipped) == (3, 0)


async def test_a_secret_row_that_no_longer_unwraps_is_skipped_and_keeps_its_kek(
    tmp_path: Path,
) -> None:
    svc = open_service(tmp_path)
    for name, value in (("a", b"alpha"), ("b", b"bravo"), ("c", b"charlie")):
        await svc.handle(MANAGER, SetSecret(namespace="db", name=name, value=value))
    close_service(svc)
    with sqlite3.connect(tmp_path / "kmipd.db") as db:
        rows = dict(db.execute("SELECT name, wrapped FROM secret_versions"))
        db.execute("UPDATE secret_versions SET wrapped = ? WHERE name = 'a'", (rows["b"],))
    svc = open_service(tmp_path)
    await run_to_end(svc, await rotate_and_start_rewrap(svc, "db"))
    versions = {}
    for name in ("a", "b", "c"):
        found = await svc.handle(READER, SecretVersions(namespace="db", name=name))
        versions[name] = [v.kek_version for v in found.versions]
    assert versions == {"a": [1], "b": [2], "c": [2]}
    assert (await svc.handle(READER, GetSecret(namespace="db", name="c"))).value == b"charlie"
    # The old KEK version still wraps "a": destroying it is refused, naming why.
    await svc.handle(ADMIN, Revoke(key=KeyRef(kek="db", version=1), reason="superseded"))
    blocked = await refused(svc, ADMIN, Destroy(key=KeyRef(kek="db", version=1)))
    assert "1 secret version(s)" in blocked.message
    close_service(svc)


async def writes_are_seen_at_once(service: KeyService) -> None:
    store = service.store
    await service.handle(MANAGER, SetSecret(namespace="db", name="c", value=VALUE))
    await service.handle(READER, GetSecret(namespace="db", name="c"))  # now cached
    await service.handle(MANAGER, SetSecret(namespace="db", name="c", value=b"two"))
    assert (await service.handle(READER, GetSecret(namespace="db", name="c"))).value == b"two"
    await service.handle(MANAGER, UpdateSecret(namespace="db", name="c", enabled=False))
    got = await service.handle(READER, GetSecret(namespace="db", name="c"))
    assert (got.version, got.value) == (1, VALUE)
    await run_to_end(service, await rotate_and_start_rewrap(service, "db"))
    record = await store.get_secret("db", "c")
    assert record is not None and [v.kek_version for v in record.versions] == [2, 2]
    await service.handle(MANAGER, DeleteSecret(namespace="db", name="c"))
    assert (await refused(service, READER, GetSecret(namespace="db", name="c"))).code is (
        ErrorCode.SECRET_DELETED
    )
    await service.handle(MANAGER, PurgeSecret(namespace="db", name="c"))
    assert await store.get_secret("db", "c") is None


async def test_every_secret_write_is_seen_by_the_next_read(service: KeyService) -> None:
    """On either backend (PostgreSQL has no secret cache: each get-secret is a read)."""
    await writes_are_seen_at_once(service)


async def test_the_store_never_serves_a_secret_its_writes_changed(
    sqlite_service: KeyService,
) -> None:
    """get-secret reads through an in-memory cache of rows: every change is seen at once."""
    service = sqlite_service
    store = service.store
    assert isinstance(store, KeyStore)  # below: what the SQLite store's cache does
    await writes_are_seen_at_once(service)

    # A read that a write overtook is not remembered: the cache only keeps what no
    # write has changed since the read began.
    await service.handle(MANAGER, SetSecret(namespace="db", name="r", value=VALUE))
    record = await store.get_secret("db", "r")
    assert record is not None
    store._secrets.clear()
    async with trio.open_nursery() as nursery, store._read_limiter:
        nursery.start_soon(store.get_secret, "db", "r")  # waits for the reader connection
        await trio.testing.wait_all_tasks_blocked()
        await store.update_secret_version(attrs.evolve(record.versions[0], enabled=False))
    assert ("db", "r") not in store._secrets
    error = await refused(service, READER, GetSecret(namespace="db", name="r"))
    assert error.code is ErrorCode.SECRET_DISABLED
