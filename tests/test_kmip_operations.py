"""KMIP operations through KeyService, over a real store (SQLite, PostgreSQL) and the software HSM.

Messages are built with our TTLV writer, encoded and decoded (so they are
what a client's bytes would parse to), and handed to KmipOperations.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kmipd.kmip import (
    ENUMS,
    BatchResult,
    Item,
    ResultReason,
    ResultStatus,
    boolean,
    byte_string,
    date_time,
    decode_ttlv,
    encode_ttlv,
    enumeration,
    integer,
    parse_request,
    structure,
    text,
    version_item,
)
from kmipd.protocol import CreateDek, GetDek
from kmipd.service import Caller, KeyService, KmipOperations
from kmipd.store import UNCACHED, KeyStore, ObjectRecord
from tests.conftest import StoreOpener
from tests.test_service import close_service, open_service

ADMIN = Caller("spiffe://kmipd.test/admin", None, protocol="kmip")
STORAGE = Caller("spiffe://kmipd.test/storage", None, protocol="kmip")
TENANT = Caller("spiffe://kmipd.test/tenant", None, protocol="kmip")
STRANGER = Caller("spiffe://kmipd.test/stranger", None, protocol="kmip")


@pytest.fixture
async def service(tmp_path: Path, open_store: StoreOpener) -> AsyncIterator[KeyService]:
    svc = open_service(tmp_path, open_store=open_store)  # both backends: see conftest
    yield svc
    close_service(svc)


@pytest.fixture
def ops(service: KeyService) -> KmipOperations:
    return KmipOperations(service)


def attr(name: str, value: Item, index: int | None = None) -> Item:
    """A KMIP 1.x Attribute; ``value`` is any item, retagged AttributeValue."""
    value = Item(0x42000B, value.type, value.value)
    return structure(
        "Attribute",
        text("AttributeName", name),
        None if index is None else integer("AttributeIndex", index),
        value,
    )


def name_attr(value: str) -> Item:
    return attr("Name", structure("Name", text("NameValue", value), enumeration("NameType", 1)))


def batch_item(operation: str, *payload: Item | None, uid: bytes | None = None) -> Item:
    return structure(
        "BatchItem",
        enumeration("Operation", operation),
        None if uid is None else byte_string("UniqueBatchItemId", uid),
        structure("RequestPayload", *payload),
    )


async def run(
    ops: KmipOperations,
    caller: Caller,
    *items: Item,
    version: tuple[int, int] = (1, 4),
    header_extra: tuple[Item, ...] = (),
) -> list[BatchResult]:
    header = structure(
        "RequestHeader", version_item(version), *header_extra, integer("BatchCount", len(items))
    )
    message = parse_request(decode_ttlv(encode_ttlv(structure("RequestMessage", header, *items))))
    return await ops.handle_message(caller, message)


async def one(ops: KmipOperations, caller: Caller, item: Item, **kwargs: object) -> Item:
    (result,) = await run(ops, caller, item, **kwargs)  # type: ignore[arg-type]
    assert result.status is ResultStatus.SUCCESS, (result.reason, result.message)
    assert result.payload is not None
    return result.payload


async def failure(ops: KmipOperations, caller: Caller, item: Item) -> tuple[ResultReason, str]:
    (result,) = await run(ops, caller, item)
    assert result.status is ResultStatus.OPERATION_FAILED
    assert result.reason is not None
    assert result.message is not None
    return result.reason, result.message


def create(length: int = 256, *extra: Item) -> Item:
    return batch_item(
        "Create",
        enumeration("ObjectType", "SymmetricKey"),
        structure(
            "TemplateAttribute",
            attr("Cryptographic Algorithm", enumeration("CryptographicAlgorithm", "Aes")),
            attr("Cryptographic Length", integer("CryptographicLength", length)),
            *extra,
        ),
    )


def uid_of(payload: Item) -> str:
    item = payload.find("UniqueIdentifier")
    assert item is not None
    assert isinstance(item.value, str)
    return item.value


def by_uid(operation: str, uid: str, *extra: Item) -> Item:
    return batch_item(operation, text("UniqueIdentifier", uid), *extra)


def key_of(payload: Item) -> bytes:
    key = payload.find("SymmetricKey")
    assert key is not None
    block = key.find("KeyBlock")
    assert block is not None
    value = block.find("KeyValue")
    assert value is not None
    material = value.find("KeyMaterial")
    assert material is not None
    assert isinstance(material.value, bytes)
    return material.value


def attributes_of(payload: Item) -> dict[str, list[Item]]:
    found: dict[str, list[Item]] = {}
    for item in payload.find_all("Attribute"):
        name, value = item.find("AttributeName"), item.find("AttributeValue")
        assert name is not None
        assert value is not None
        found.setdefault(str(name.value), []).append(value)
    return found


@pytest.mark.parametrize("length", [128, 192, 256])
async def test_create_activate_get_each_aes_length(ops: KmipOperations, length: int) -> None:
    uid = uid_of(await one(ops, ADMIN, create(length)))
    await one(ops, ADMIN, by_uid("Activate", uid))
    payload = await one(ops, ADMIN, by_uid("Get", uid))
    assert len(key_of(payload)) == length // 8
    transparent = await one(
        ops,
        ADMIN,
        by_uid("Get", uid, enumeration("KeyFormatType", "TransparentSymmetricKey")),
    )
    assert "SymmetricKey" in str([c.name for c in transparent.children])


async def test_lengths_and_algorithms_not_served_are_refused(ops: KmipOperations) -> None:
    reason, message = await failure(ops, ADMIN, create(512))
    assert reason is ResultReason.INVALID_FIELD
    assert "128, 192 or 256" in message
    des = batch_item(
        "Create",
        enumeration("ObjectType", "SymmetricKey"),
        structure(
            "TemplateAttribute",
            attr("Cryptographic Algorithm", enumeration("CryptographicAlgorithm", "TripleDes")),
            attr("Cryptographic Length", integer("CryptographicLength", 168)),
        ),
    )
    assert (await failure(ops, ADMIN, des))[0] is ResultReason.INVALID_FIELD


async def test_object_group_is_the_namespace_and_grants_decide(
    ops: KmipOperations, service: KeyService
) -> None:
    # The tenant is granted only tenant-a: the default namespace "kmip" is refused...
    reason, _ = await failure(ops, TENANT, create())
    assert reason is ResultReason.PERMISSION_DENIED
    # ...its own group is not.
    group = attr("Object Group", text("ObjectGroup", "tenant-a"))
    uid = uid_of(await one(ops, TENANT, create(256, group)))
    record = await service.store.get_dek(uid)
    assert record is not None
    assert record.namespace == "tenant-a"
    # Another identity's object: Permission Denied, as for an id that does not exist.
    admins = uid_of(await one(ops, ADMIN, create()))
    for target in (admins, "dek_doesnotexist"):
        assert (await failure(ops, TENANT, by_uid("GetAttributes", target)))[0] is (
            ResultReason.PERMISSION_DENIED
        )
    assert (await failure(ops, STRANGER, by_uid("Get", admins)))[0] is (
        ResultReason.PERMISSION_DENIED
    )
    bad_group = attr("Object Group", text("ObjectGroup", "../etc"))
    assert (await failure(ops, ADMIN, create(256, bad_group)))[0] is ResultReason.INVALID_FIELD


async def test_attributes_are_reported_added_modified_deleted(ops: KmipOperations) -> None:
    mask = attr("Cryptographic Usage Mask", integer("CryptographicUsageMask", 0x0C))
    custom = attr("x-owner", text("AttributeValue", "orders-team"))
    uid = uid_of(await one(ops, ADMIN, create(256, name_attr("first"), mask, custom)))
    found = attributes_of(await one(ops, ADMIN, by_uid("GetAttributes", uid)))
    assert found["x-owner"][0].value == "orders-team"
    assert found["Cryptographic Usage Mask"][0].value == 0x0C
    assert found["State"][0].value == ENUMS["State"]["PreActive"]
    assert {"Initial Date", "Last Change Date"} <= set(found)

    await one(ops, ADMIN, by_uid("AddAttribute", uid, name_attr("second")))
    await one(
        ops, ADMIN, by_uid("ModifyAttribute", uid, attr("x-owner", text("AttributeValue", "ops")))
    )
    await one(
        ops,
        ADMIN,
        by_uid("DeleteAttribute", uid, text("AttributeName", "Name"), integer("AttributeIndex", 0)),
    )
    found = attributes_of(await one(ops, ADMIN, by_uid("GetAttributes", uid)))
    assert [n.find("NameValue").value for n in found["Name"]] == ["second"]  # type: ignore[union-attr]
    assert found["x-owner"][0].value == "ops"
    # Server-maintained attributes are read only; bad requests change nothing.
    state = attr("State", enumeration("State", "Active"))
    assert (await failure(ops, ADMIN, by_uid("AddAttribute", uid, state)))[0] is (
        ResultReason.ILLEGAL_OPERATION
    )
    delete_state = by_uid("DeleteAttribute", uid, text("AttributeName", "State"))
    assert (await failure(ops, ADMIN, delete_state))[0] is ResultReason.PERMISSION_DENIED
    names = await one(ops, ADMIN, by_uid("GetAttributeList", uid))
    assert "x-owner" in [item.value for item in names.find_all("AttributeName")]
    # The data-plane identity may read keys but not change their attributes.
    assert (await failure(ops, STORAGE, by_uid("AddAttribute", uid, name_attr("x"))))[0] is (
        ResultReason.PERMISSION_DENIED
    )


async def test_locate_filters_maximum_and_offset(ops: KmipOperations) -> None:
    group = attr("Object Group", text("ObjectGroup", "locate-me"))
    uids = [uid_of(await one(ops, ADMIN, create(128, group, name_attr("same")))) for _ in range(3)]
    other = uid_of(await one(ops, ADMIN, create(256, name_attr("same"))))

    async def locate(*items: Item) -> tuple[int | None, list[str]]:
        payload = await one(ops, ADMIN, batch_item("Locate", *items))
        located = payload.find("LocatedItems")
        return (
            None if located is None else int(located.value),  # type: ignore[arg-type]
            [str(i.value) for i in payload.find_all("UniqueIdentifier")],
        )

    assert await locate(name_attr("same")) == (4, [*uids, other])
    assert await locate(group) == (3, uids)
    length = attr("Cryptographic Length", integer("CryptographicLength", 256))
    assert await locate(name_attr("same"), length) == (1, [other])
    assert await locate(group, integer("MaximumItems", 2)) == (3, uids[:2])
    assert await locate(group, integer("OffsetItems", 2)) == (3, uids[2:])
    await one(ops, ADMIN, by_uid("Activate", uids[1]))
    active = attr("State", enumeration("State", "Active"))
    assert await locate(group, active) == (1, [uids[1]])
    # Locate needs a grant of its own.
    reason, _ = await failure(ops, TENANT, batch_item("Locate", group))
    assert reason is ResultReason.PERMISSION_DENIED


async def test_rekey_links_old_and_new(ops: KmipOperations) -> None:
    uid = uid_of(await one(ops, ADMIN, create(192, name_attr("rotating"))))
    new = uid_of(await one(ops, ADMIN, by_uid("ReKey", uid)))
    assert new != uid
    old_links = attributes_of(await one(ops, ADMIN, by_uid("GetAttributes", uid)))["Link"]
    new_attrs = attributes_of(await one(ops, ADMIN, by_uid("GetAttributes", new)))
    assert old_links[0].find("LinkedObjectIdentifier").value == new  # type: ignore[union-attr]
    assert new_attrs["Link"][0].find("LinkedObjectIdentifier").value == uid  # type: ignore[union-attr]
    assert new_attrs["Cryptographic Length"][0].value == 192
    assert new_attrs["State"][0].value == ENUMS["State"]["Active"]


async def test_encrypt_decrypt_gcm_with_aad(ops: KmipOperations) -> None:
    uid = uid_of(await one(ops, ADMIN, create()))
    params = structure("CryptographicParameters", enumeration("BlockCipherMode", "Gcm"))
    plain = b"card 4111 1111 1111 1111"
    aad = byte_string("AuthenticatedEncryptionAdditionalData", b"row 7")
    # Pre-Active: not yet usable for protection.
    refused = by_uid("Encrypt", uid, params, byte_string("Data", plain))
    assert (await failure(ops, ADMIN, refused))[0] is ResultReason.PERMISSION_DENIED
    await one(ops, ADMIN, by_uid("Activate", uid))
    sealed = await one(ops, ADMIN, by_uid("Encrypt", uid, params, byte_string("Data", plain), aad))
    data, iv, tag = (
        sealed.find(n) for n in ("Data", "IvCounterNonce", "AuthenticatedEncryptionTag")
    )
    assert data is not None
    assert iv is not None
    assert tag is not None
    assert plain not in bytes(data.value)  # type: ignore[arg-type]
    opened = await one(
        ops,
        ADMIN,
        by_uid(
            "Decrypt",
            uid,
            params,
            byte_string("Data", data.value),  # type: ignore[arg-type]
            byte_string("IvCounterNonce", iv.value),  # type: ignore[arg-type]
            aad,
            byte_string("AuthenticatedEncryptionTag", tag.value),  # type: ignore[arg-type]
        ),
    )
    assert opened.find("Data").value == plain  # type: ignore[union-attr]
    wrong_aad = by_uid(
        "Decrypt",
        uid,
        params,
        byte_string("Data", data.value),  # type: ignore[arg-type]
        byte_string("IvCounterNonce", iv.value),  # type: ignore[arg-type]
        byte_string("AuthenticatedEncryptionAdditionalData", b"row 8"),
        byte_string("AuthenticatedEncryptionTag", tag.value),  # type: ignore[arg-type]
    )
    reason, message = await failure(ops, ADMIN, wrong_aad)
    assert reason is ResultReason.CRYPTOGRAPHIC_FAILURE
    assert plain.decode() not in message


async def test_batch_items_fail_alone_and_the_placeholder_carries_ids(ops: KmipOperations) -> None:
    results = await run(
        ops,
        ADMIN,
        create(),
        batch_item("Activate", uid=b"2"),
        batch_item("Check", uid=b"3"),  # not served
        batch_item("Get", text("UniqueIdentifier", "dek_missing"), uid=b"4"),
        batch_item("Get", uid=b"5"),
    )
    statuses = [(r.unique_id, r.status, r.reason) for r in results]
    assert statuses[1:] == [
        (b"2", ResultStatus.SUCCESS, None),
        (b"3", ResultStatus.OPERATION_FAILED, ResultReason.OPERATION_NOT_SUPPORTED),
        (b"4", ResultStatus.OPERATION_FAILED, ResultReason.ITEM_NOT_FOUND),
        (b"5", ResultStatus.SUCCESS, None),
    ]
    stop = (enumeration("BatchErrorContinuationOption", "Stop"),)
    results = await run(
        ops,
        ADMIN,
        batch_item("Get", text("UniqueIdentifier", "dek_missing")),
        create(),
        header_extra=stop,
    )
    assert len(results) == 1


async def test_versions_query_and_refusals(ops: KmipOperations) -> None:
    payload = await one(ops, ADMIN, batch_item("DiscoverVersions"))
    versions = [tuple(c.value for c in v.children) for v in payload.find_all("ProtocolVersion")]
    assert versions[0] == (2, 0)
    assert (1, 0) in versions
    query = await one(
        ops,
        ADMIN,
        batch_item(
            "Query",
            enumeration("QueryFunction", "QueryOperations"),
            enumeration("QueryFunction", "QueryObjects"),
        ),
    )
    served = {item.value for item in query.find_all("Operation")}
    assert {ENUMS["Operation"][n] for n in ("Create", "Get", "Locate", "Destroy")} <= served
    (result,) = await run(ops, ADMIN, batch_item("Query"), version=(3, 0))
    assert result.reason is ResultReason.INVALID_MESSAGE
    (result,) = await run(
        ops, ADMIN, batch_item("Query"), header_extra=(boolean("AsynchronousIndicator", True),)
    )
    assert result.reason is ResultReason.FEATURE_NOT_SUPPORTED


async def test_kmip_20_attributes_and_activation_date(ops: KmipOperations) -> None:
    attributes = structure(
        "Attributes",
        enumeration("CryptographicAlgorithm", "Aes"),
        integer("CryptographicLength", 128),
        date_time("ActivationDate", 1_000_000),  # in the past: Active at once
        structure("Name", text("NameValue", "v2"), enumeration("NameType", 1)),
    )
    payload = await one(
        ops,
        ADMIN,
        batch_item("Create", enumeration("ObjectType", "SymmetricKey"), attributes),
        version=(2, 0),
    )
    uid = uid_of(payload)
    got = await one(ops, ADMIN, by_uid("GetAttributes", uid), version=(2, 0))
    holder = got.find("Attributes")
    assert holder is not None
    assert holder.find("State").value == ENUMS["State"]["Active"]  # type: ignore[union-attr]
    assert holder.find("CryptographicLength").value == 128  # type: ignore[union-attr]


async def test_native_and_kmip_keys_are_the_same_objects(
    ops: KmipOperations, service: KeyService
) -> None:
    native = Caller("spiffe://kmipd.test/admin", 1)
    dek = await service.handle(native, CreateDek(namespace="kmip"))
    assert key_of(await one(ops, ADMIN, by_uid("Get", dek.dek_id))) == dek.key
    uid = uid_of(await one(ops, ADMIN, create()))
    await one(ops, ADMIN, by_uid("Activate", uid))
    key = key_of(await one(ops, ADMIN, by_uid("Get", uid)))
    assert (await service.handle(native, GetDek(dek_id=uid))).key == key


async def test_destroy_is_the_native_soft_delete(ops: KmipOperations) -> None:
    uid = uid_of(await one(ops, ADMIN, create()))
    await one(ops, ADMIN, by_uid("Activate", uid))
    assert (await failure(ops, ADMIN, by_uid("Destroy", uid)))[0] is (
        ResultReason.PERMISSION_DENIED
    )
    reason = structure("RevocationReason", enumeration("RevocationReasonCode", "KeyCompromise"))
    await one(ops, ADMIN, by_uid("Revoke", uid, reason))
    found = attributes_of(await one(ops, ADMIN, by_uid("GetAttributes", uid)))
    assert found["State"][0].value == ENUMS["State"]["Compromised"]
    assert "Compromise Date" in found
    await one(ops, ADMIN, by_uid("Destroy", uid))
    found = attributes_of(await one(ops, ADMIN, by_uid("GetAttributes", uid)))
    assert found["State"][0].value == ENUMS["State"]["DestroyedCompromised"]
    assert (await failure(ops, ADMIN, by_uid("Get", uid)))[0] is ResultReason.ITEM_NOT_FOUND


async def test_warm_gets_are_checked_like_cold_ones_and_see_every_change(
    ops: KmipOperations, service: KeyService
) -> None:
    # A Get of a key whose row and attributes the store has cached is answered inline
    # (no store round trip): the same grants, states and answers as the first one.
    uid = uid_of(await one(ops, ADMIN, create(128, name_attr("warm"))))
    await one(ops, ADMIN, by_uid("Activate", uid))
    key = key_of(await one(ops, ADMIN, by_uid("Get", uid)))
    assert service.store.cached_dek(uid) is not None
    assert service.store.cached_object(uid) is not UNCACHED
    assert key_of(await one(ops, ADMIN, by_uid("Get", uid))) == key
    payload = await one(ops, ADMIN, by_uid("Get", uid))
    assert payload.find("SymmetricKey").find("KeyBlock").find("CryptographicLength").value == 128  # type: ignore[union-attr]
    assert (await failure(ops, STRANGER, by_uid("Get", uid)))[0] is (ResultReason.PERMISSION_DENIED)
    # An attribute change is what the next read sees.
    await one(ops, ADMIN, by_uid("AddAttribute", uid, name_attr("warmer")))
    names = attributes_of(await one(ops, ADMIN, by_uid("GetAttributes", uid)))["Name"]
    assert [n.find("NameValue").value for n in names] == ["warm", "warmer"]  # type: ignore[union-attr]
    # A state change too: a destroyed key is refused even though it was cached.
    reason = structure(
        "RevocationReason", enumeration("RevocationReasonCode", "CessationOfOperation")
    )
    await one(ops, ADMIN, by_uid("Revoke", uid, reason))
    await one(ops, ADMIN, by_uid("Destroy", uid))
    assert (await failure(ops, ADMIN, by_uid("Get", uid)))[0] is ResultReason.ITEM_NOT_FOUND


async def test_the_attribute_cache_never_says_what_the_file_does_not(tmp_path: Path) -> None:
    service = open_service(tmp_path)
    uid = uid_of(await one(KmipOperations(service), ADMIN, create(256, name_attr("a"))))
    close_service(service)
    first = KeyStore.open(tmp_path / "kmipd.db", shared=True)
    second = KeyStore.open(tmp_path / "kmipd.db", shared=True)
    try:
        assert (await second.get_object(uid)).names == ("a",)  # type: ignore[union-attr]
        # Shared: another daemon changes the attributes; this one reads them afresh.
        await first.put_object(ObjectRecord(dek_id=uid, names=("b",)))
        assert second.cached_object(uid) is UNCACHED
        assert (await second.get_object(uid)).names == ("b",)  # type: ignore[union-attr]
    finally:
        first.close()
        second.close()
    store = KeyStore.open(tmp_path / "kmipd.db")
    try:
        assert await store.get_object("dek_nothere") is None
        # A write that fails (no such key: the foreign key refuses it) is not remembered.
        with pytest.raises(sqlite3.IntegrityError):
            await store.put_object(ObjectRecord(dek_id="dek_nothere", names=("ghost",)))
        assert store.cached_object("dek_nothere") is UNCACHED
        assert await store.get_object("dek_nothere") is None
        assert await store.locate_objects(name="ghost") == []
        # One that succeeds is what the cache and the file both say.
        await store.put_object(ObjectRecord(dek_id=uid, names=("c",)))
        assert (await store.get_object(uid)).names == ("c",)  # type: ignore[union-attr]
        assert await store.locate_objects(name="c") == [uid]
    finally:
        store.close()
