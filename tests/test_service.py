"""The service over a real SQLite file and the software HSM, without sockets."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from kmipd.audit import AuditLog
from kmipd.hsm import HsmError, HsmIntegrityError, SoftwareHsm
from kmipd.protocol import (
    CreateDek,
    CreateKek,
    DataKeyBlob,
    ErrorCode,
    GenerateDataKey,
    GetDek,
    ListKeks,
    Status,
    Unwrap,
    decode_item,
    encode_item,
    encode_struct,
    parse_struct,
)
from kmipd.service import Caller, KeyService, ServiceError, dek_associated_data
from kmipd.store import IssuedCertificateRecord, KeyStore, StoreError
from tests.conftest import StoreOpener, make_policy

STORAGE = Caller("spiffe://kmipd.test/storage", 1)
ADMIN = Caller("spiffe://kmipd.test/admin", 2)
TENANT = Caller("spiffe://kmipd.test/tenant", 3)


def open_sqlite(data: Path) -> KeyStore:
    return KeyStore.open(data / "kmipd.db")


def open_service(
    data: Path, *, on_demand: bool = True, open_store: StoreOpener = open_sqlite
) -> KeyService:
    """``open_store``: the parametrised backend (conftest) for tests any store passes."""
    store = open_store(data)
    hsm = SoftwareHsm.open(data / "master.key", data / "keyring.cbor", create=True)
    return KeyService(store=store, hsm=hsm, policy=make_policy(), create_kek_on_demand=on_demand)


def close_service(service: KeyService) -> None:
    service.store.close()
    service.hsm.close()


@pytest.fixture
async def service(tmp_path: Path, open_store: StoreOpener) -> AsyncIterator[KeyService]:
    svc = open_service(tmp_path, open_store=open_store)
    yield svc
    close_service(svc)


async def refused(service: KeyService, identity: Caller, request: object) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await service.handle(identity, request)
    return caught.value


async def test_dek_survives_a_restart(tmp_path: Path, open_store: StoreOpener) -> None:
    first = open_service(tmp_path, open_store=open_store)
    dek = await first.handle(STORAGE, CreateDek(namespace="orders"))
    close_service(first)
    second = open_service(tmp_path, open_store=open_store)
    again = await second.handle(STORAGE, GetDek(dek_id=dek.dek_id))
    assert again.key == dek.key
    close_service(second)


async def test_bulk_insert_stores_every_dek_or_none(
    tmp_path: Path, open_store: StoreOpener
) -> None:
    """put_deks (a bulk import; the benchmark fills the store with it): one transaction."""
    service = open_service(tmp_path, open_store=open_store)
    dek = await service.handle(STORAGE, CreateDek(namespace="orders"))
    row = await service.store.get_dek(dek.dek_id)
    assert row is not None
    copies = [attrs.evolve(row, dek_id=f"dek_bulk{i:06d}") for i in range(500)]
    await service.store.put_deks(copies)
    # A batch with one id already stored is refused whole, clearly, and inserts nothing.
    batch = [attrs.evolve(row, dek_id=f"dek_more{i:06d}") for i in range(10)] + [copies[7]]
    with pytest.raises(StoreError, match="already exists"):
        await service.store.put_deks(batch)
    close_service(service)
    reopened = open_service(tmp_path, open_store=open_store)
    for i in (0, 250, 499):
        stored = await reopened.store.get_dek(f"dek_bulk{i:06d}")
        assert stored is not None and stored.wrapped == row.wrapped
    assert await reopened.store.get_dek("dek_more000000") is None
    # The real DEK is untouched and still opens.
    again = await reopened.handle(STORAGE, GetDek(dek_id=dek.dek_id))
    assert again.key == dek.key
    close_service(reopened)


async def test_swapped_store_rows_fail_to_unwrap(tmp_path: Path) -> None:
    svc = open_service(tmp_path)
    one = await svc.handle(STORAGE, CreateDek(namespace="orders"))
    two = await svc.handle(STORAGE, CreateDek(namespace="orders"))
    close_service(svc)
    with sqlite3.connect(tmp_path / "kmipd.db") as db:
        rows = dict(db.execute("SELECT id, wrapped FROM deks"))
        db.execute("UPDATE deks SET wrapped = ? WHERE id = ?", (rows[two.dek_id], one.dek_id))
        db.execute("UPDATE deks SET wrapped = ? WHERE id = ?", (rows[one.dek_id], two.dek_id))
    svc = open_service(tmp_path)
    for dek in (one, two):
        error = await refused(svc, STORAGE, GetDek(dek_id=dek.dek_id))
        assert error.code is ErrorCode.INTEGRITY_FAILURE
        assert dek.dek_id in error.message
        # The row is cached now: the inline path (handle_now) refuses it the same way.
        with pytest.raises(ServiceError) as inline:
            svc.handle_now(STORAGE, GetDek(dek_id=dek.dek_id))
        assert (inline.value.code, inline.value.message) == (error.code, error.message)
    close_service(svc)


@pytest.mark.parametrize(
    ("column", "value"), [("namespace", "orders-copy"), ("wrapped", None), ("id", "dek_moved")]
)
async def test_edited_store_row_fails_to_unwrap(tmp_path: Path, column: str, value: object) -> None:
    svc = open_service(tmp_path)
    dek = await svc.handle(STORAGE, CreateDek(namespace="orders"))
    await svc.handle(STORAGE, CreateDek(namespace="orders-copy"))  # so the KEK exists
    close_service(svc)
    with sqlite3.connect(tmp_path / "kmipd.db") as db:
        if value is None:  # flip one bit of the ciphertext
            (wrapped,) = db.execute(
                "SELECT wrapped FROM deks WHERE id = ?", (dek.dek_id,)
            ).fetchone()
            value = bytes([wrapped[0] ^ 1]) + wrapped[1:]
        db.execute("PRAGMA foreign_keys = OFF")
        db.execute(f"UPDATE deks SET {column} = ? WHERE id = ?", (value, dek.dek_id))
    svc = open_service(tmp_path)
    dek_id = "dek_moved" if column == "id" else dek.dek_id
    error = await refused(svc, STORAGE, GetDek(dek_id=dek_id))
    assert error.code is ErrorCode.INTEGRITY_FAILURE
    close_service(svc)


async def test_plaintext_keys_never_reach_the_database_files(
    service: KeyService, tmp_path: Path
) -> None:
    keys = [(await service.handle(STORAGE, CreateDek(namespace="orders"))).key for _ in range(50)]
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert all(key not in on_disk for key in keys)


async def test_data_key_blob_is_bound_to_context_and_kek(service: KeyService) -> None:
    made = await service.handle(STORAGE, GenerateDataKey(kek="orders", context={"t": "1"}))
    assert (
        await service.handle(STORAGE, Unwrap(blob=made.blob, context={"t": "1"}))
    ).key == made.key
    assert (await refused(service, STORAGE, Unwrap(blob=made.blob, context={"t": "2"}))).code is (
        ErrorCode.INTEGRITY_FAILURE
    )
    await service.handle(STORAGE, CreateDek(namespace="other"))
    blob = parse_struct(DataKeyBlob, decode_item(made.blob), "blob")
    moved = encode_item(
        encode_struct(DataKeyBlob(format=1, kek="other", kek_version=1, wrapped=blob.wrapped))
    )
    assert (await refused(service, STORAGE, Unwrap(blob=moved, context={"t": "1"}))).code is (
        ErrorCode.INTEGRITY_FAILURE
    )
    unknown = encode_item(
        encode_struct(DataKeyBlob(format=1, kek="orders", kek_version=9, wrapped=blob.wrapped))
    )
    assert (await refused(service, STORAGE, Unwrap(blob=unknown, context={"t": "1"}))).code is (
        ErrorCode.NOT_FOUND
    )
    garbage = await refused(service, STORAGE, Unwrap(blob=b"\x00\x01"))
    assert garbage.code is ErrorCode.BAD_REQUEST
    assert "not a kmipd data-key blob" in garbage.message


async def test_without_on_demand_a_namespace_needs_an_admin_created_kek(
    tmp_path: Path, open_store: StoreOpener
) -> None:
    svc = open_service(tmp_path, on_demand=False, open_store=open_store)
    error = await refused(svc, STORAGE, CreateDek(namespace="orders"))
    assert error.code is ErrorCode.NOT_FOUND
    assert "kmipd kek create orders" in error.message
    await svc.handle(ADMIN, CreateKek(name="orders"))
    assert len((await svc.handle(STORAGE, CreateDek(namespace="orders"))).key) == 32
    duplicate = await refused(svc, ADMIN, CreateKek(name="orders"))
    assert duplicate.code is ErrorCode.ALREADY_EXISTS
    close_service(svc)


async def test_concurrent_first_use_creates_one_kek(service: KeyService) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(service.handle, STORAGE, CreateDek(namespace="fresh"))
    listing = await service.handle(ADMIN, ListKeks())
    assert [k.name for k in listing.keks] == ["fresh"]


async def test_list_keks_shows_only_permitted_namespaces(service: KeyService) -> None:
    for namespace in ("orders", "tenant-a", "tenant-a/db"):
        await service.handle(STORAGE, CreateDek(namespace=namespace))
    assert [k.name for k in (await service.handle(ADMIN, ListKeks())).keks] == [
        "orders",
        "tenant-a",
        "tenant-a/db",
    ]
    assert (await refused(service, TENANT, ListKeks())).code is ErrorCode.NOT_AUTHORIZED


async def test_status_reports_backends(service: KeyService) -> None:
    status = await service.handle(STORAGE, Status())
    assert (status.state, status.hsm, status.store) == ("serving", "software: ok", "ok")


# -- the software HSM and the store refuse unsafe or broken files ----------------------


async def test_master_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    SoftwareHsm.open(tmp_path / "m.key", tmp_path / "ring", create=True).close()
    os.chmod(tmp_path / "m.key", 0o644)
    with pytest.raises(HsmError, match="must be 0600"):
        SoftwareHsm.open(tmp_path / "m.key", tmp_path / "ring")


async def test_keyring_with_another_master_key_is_refused(tmp_path: Path) -> None:
    hsm = SoftwareHsm.open(tmp_path / "m.key", tmp_path / "ring", create=True)
    await hsm.generate_kek("k")
    (tmp_path / "m.key").unlink()
    with pytest.raises(HsmError, match="does not open with this master key"):
        SoftwareHsm.open(tmp_path / "m.key", tmp_path / "ring", create=True)


async def test_software_hsm_wraps_and_destroys(tmp_path: Path) -> None:
    hsm = SoftwareHsm.open(tmp_path / "m.key", tmp_path / "ring", create=True)
    handle = await hsm.generate_kek("k")
    wrapped = await hsm.wrap(handle, b"k" * 32, b"aad")
    assert await hsm.unwrap(handle, wrapped, b"aad") == b"k" * 32
    with pytest.raises(HsmIntegrityError):
        await hsm.unwrap(handle, wrapped, b"other aad")
    with pytest.raises(HsmIntegrityError):
        await hsm.unwrap(handle, wrapped[:10], b"aad")
    await hsm.destroy_kek(handle)
    reopened = SoftwareHsm.open(tmp_path / "m.key", tmp_path / "ring")
    with pytest.raises(HsmError, match="no KEK"):
        await reopened.unwrap(handle, wrapped, b"aad")
    assert (tmp_path / "ring").stat().st_mode & 0o777 == 0o600


def test_store_is_locked_against_a_second_daemon(tmp_path: Path) -> None:
    store = KeyStore.open(tmp_path / "kmipd.db")
    with pytest.raises(StoreError, match="in use by another kmipd"):
        KeyStore.open(tmp_path / "kmipd.db")
    store.close()
    KeyStore.open(tmp_path / "kmipd.db").close()


def test_store_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "kmipd.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open store"):
        KeyStore.open(tmp_path / "kmipd.db")


class CancellingAuditLog(AuditLog):
    """Cancels ``scope`` when asked to sync a record: after the write it records."""

    scope: trio.CancelScope | None = None

    async def sync(self, seq: int) -> None:
        if self.scope is not None:
            self.scope.cancel()
        await super().sync(seq)


async def test_a_request_cut_off_by_shutdown_was_either_answered_or_not_applied(
    tmp_path: Path, open_store: StoreOpener
) -> None:
    """The drain bound cancels requests still running, and ``shutting-down`` promises
    "not applied". So a request cancelled before it writes leaves nothing behind, and
    one cancelled after its write (here: while its audit record is synced) still
    finishes and is answered; never stored yet reported as cut off."""
    svc = open_service(tmp_path, open_store=open_store)
    audit = CancellingAuditLog.open(tmp_path / "audit.log", tmp_path / "audit.key")
    assert isinstance(audit, CancellingAuditLog)
    svc.audit = audit
    try:
        with trio.CancelScope() as early:
            early.cancel()
            await svc.handle(STORAGE, CreateDek(namespace="orders"))
        assert early.cancelled_caught
        assert await svc.store.count_deks() == 0
        assert svc.store.get_kek("orders") is None  # not even its KEK, made on demand

        with trio.CancelScope() as late:
            audit.scope = late
            created = await svc.handle(STORAGE, CreateDek(namespace="orders"))
        assert not late.cancelled_caught
        assert await svc.store.get_dek(created.dek_id) is not None
        assert await svc.store.count_deks() == 1
    finally:
        audit.close()
        close_service(svc)


async def test_issued_certificates_are_kept_listed_and_revoked_once(
    tmp_path: Path, open_store: StoreOpener
) -> None:
    """The online CA's records (kmipd.store._certs) on either backend, across a reopen."""
    store = open_store(tmp_path)

    def issued(serial: str, subject: str, not_after: int) -> IssuedCertificateRecord:
        return IssuedCertificateRecord(
            serial=serial,
            requested_by="spiffe://kmipd.test/admin",
            subject=subject,
            profile="client",
            names=(subject,),
            key_type="ec-p256",
            spki_sha256=bytes(32),
            not_before=1000,
            not_after=not_after,
            issued_at=1000,
            renewed_from=None,
            certificate=b"\x30\x82 DER",
        )

    a, b = "spiffe://kmipd.test/a", "spiffe://kmipd.test/b"
    records = [issued("0a", a, 5000), issued("0b", b, 6000), issued("1f", a, 9000)]
    try:
        for record in records:
            await store.put_issued_certificate(record)
        assert await store.revoke_issued_certificate("1f", 2000, "key-compromise")
        assert not await store.revoke_issued_certificate("1f", 3000, "superseded")  # first stands
    finally:
        store.close()
    store = open_store(tmp_path)
    try:
        assert await store.get_issued_certificate("0b") == records[1]
        assert await store.get_issued_certificate("ff") is None
        page = await store.list_issued_certificates(subject=None, after="0a", limit=10)
        assert [r.serial for r in page] == ["0b", "1f"]
        mine = await store.list_issued_certificates(subject=a, after="", limit=1)
        assert [r.serial for r in mine] == ["0a"]
        assert await store.revoked_certificates(4000) == [("1f", 2000, "key-compromise")]
        assert await store.revoked_certificates(9001) == []  # expired: off the CRL
        expiry = await store.issued_expiry_by_subject(4000)
        assert expiry == {(a, "client"): 5000, (b, "client"): 6000}  # 1f is revoked
    finally:
        store.close()


def test_a_dek_s_associated_data_keeps_its_bytes() -> None:
    """Every stored DEK was wrapped under these bytes: a change would orphan them all.

    The CBOR array ["kmipd/dek/v1", "dek_abc", "orders", 3], as written since v1.
    """
    assert dek_associated_data("dek_abc", "orders", 3) == bytes.fromhex(
        "846c6b6d6970642f64656b2f76316764656b5f616263666f726465727303"
    )
