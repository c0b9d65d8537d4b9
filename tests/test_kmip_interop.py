"""KMIP interop: real KMIP clients nobody here wrote, against a real ``kmipd serve`` subprocess.

PyKMIP 0.11's ProxyKmipClient (KMIP 1.2 over TLS 1.2) for the key lifecycle
and the errors, and its lower-level KMIPProxy for a multi-item batch and for
KMIP 2.0 messages. One dev daemon serves the module; its dev CA issues an
extra "stranger" identity that no grant names.
"""

from __future__ import annotations

import socket
import ssl
import warnings
from typing import Any

import pytest

from kmipd.kmip import (
    Item,
    decode_ttlv,
    encode_ttlv,
    enumeration,
    integer,
    structure,
    text,
    version_item,
)
from tests.kmip_dev import DevDaemon, dev

with warnings.catch_warnings():
    # PyKMIP 0.11 imports SQLAlchemy 1.x names at import time; nothing else is silenced.
    warnings.simplefilter("ignore", DeprecationWarning)
    from kmip.core import enums
    from kmip.core.factories import attributes as attribute_factories
    from kmip.pie import exceptions as pie_exceptions
    from kmip.pie import objects
    from kmip.pie.client import ProxyKmipClient

#: PyKMIP makes its TLS 1.2 context with ssl.PROTOCOL_TLSv1_2 (deprecated since 3.10).
__all__ = ["dev"]  # the module's daemon fixture

pytestmark = pytest.mark.filterwarnings(
    "ignore:ssl.PROTOCOL_TLSv1_2 is deprecated:DeprecationWarning"
)


def _client(dev: DevDaemon, name: str = "admin") -> ProxyKmipClient:
    client: ProxyKmipClient = dev.pykmip_client(name)
    return client


def _name(value: str) -> Any:
    return attribute_factories.AttributeFactory().create_attribute(enums.AttributeType.NAME, value)


def test_pykmip_key_lifecycle(dev: DevDaemon) -> None:
    with _client(dev) as kms:
        uid = kms.create(
            enums.CryptographicAlgorithm.AES,
            256,
            name="orders-key",
            cryptographic_usage_mask=[
                enums.CryptographicUsageMask.ENCRYPT,
                enums.CryptographicUsageMask.DECRYPT,
            ],
        )
        kms.activate(uid)
        key = kms.get(uid)
        assert isinstance(key, objects.SymmetricKey)
        assert len(key.value) == 32
        assert kms.get(uid).value == key.value
        assert kms.locate(attributes=[_name("orders-key")]) == [uid]
        got_uid, attributes = kms.get_attributes(uid)
        assert got_uid == uid
        by_name = {a.attribute_name.value: a.attribute_value for a in attributes}
        assert by_name["State"].value == enums.State.ACTIVE
        assert by_name["Cryptographic Length"].value == 256
        assert by_name["Name"].name_value.value == "orders-key"
        assert "Initial Date" in by_name
        assert "Activation Date" in by_name
        names = kms.get_attribute_list(uid)
        assert {"Name", "State", "Object Type", "Cryptographic Usage Mask"} <= set(names)
        # Destroy of an Active key is refused (KMIP profiles: Permission Denied)...
        with pytest.raises(pie_exceptions.KmipOperationFailure) as refused:
            kms.destroy(uid)
        assert refused.value.reason is enums.ResultReason.PERMISSION_DENIED
        # ...after Revoke it goes (soft delete: it reads Destroyed, Get refuses it).
        kms.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid, "retired")
        kms.destroy(uid)
        _, attributes = kms.get_attributes(uid, ["State"])
        assert attributes[0].attribute_value.value == enums.State.DESTROYED
        with pytest.raises(pie_exceptions.KmipOperationFailure):
            kms.get(uid)
    records = [r for r in dev.audit_records() if r.get("dek_id") == uid]
    assert {r["operation"] for r in records} >= {"create-dek", "activate", "get-dek", "revoke"}
    assert all(r["protocol"] == "kmip" for r in records)
    assert not any("key" in r and r["key"] for r in records)  # no key material in the trail


def test_pykmip_registers_a_symmetric_key_and_a_secret(dev: DevDaemon) -> None:
    material = bytes(range(16))
    with _client(dev) as kms:
        uid = kms.register(objects.SymmetricKey(enums.CryptographicAlgorithm.AES, 128, material))
        key = kms.get(uid)
        assert key.value == material
        assert key.cryptographic_length == 128
        secret = objects.SecretData(b"hunter2-but-longer", enums.SecretDataType.PASSWORD)
        sid = kms.register(secret)
        got = kms.get(sid)
        assert isinstance(got, objects.SecretData)
        assert got.value == b"hunter2-but-longer"
        factory = attribute_factories.AttributeFactory()
        secrets_only = [
            factory.create_attribute(enums.AttributeType.OBJECT_TYPE, enums.ObjectType.SECRET_DATA)
        ]
        found = kms.locate(attributes=secrets_only)
        assert sid in found
        assert uid not in found
    # Stored only wrapped: the plaintext is nowhere in the database file.
    database = (dev.data / "kmipd.db").read_bytes() + (dev.data / "kmipd.db-wal").read_bytes()
    assert material not in database
    assert b"hunter2-but-longer" not in database


def test_pykmip_unknown_id_is_item_not_found(dev: DevDaemon) -> None:
    with _client(dev) as kms:
        with pytest.raises(pie_exceptions.KmipOperationFailure) as caught:
            kms.get("dek_doesnotexist")
        assert caught.value.reason is enums.ResultReason.ITEM_NOT_FOUND
        # The connection goes on serving.
        assert kms.create(enums.CryptographicAlgorithm.AES, 128)


def test_pykmip_ungranted_identity_gets_permission_denied(dev: DevDaemon) -> None:
    with _client(dev) as kms:
        uid = kms.create(enums.CryptographicAlgorithm.AES, 256, name="admins-only")
    with _client(dev, "stranger") as stranger:
        for attempt in (
            lambda: stranger.get(uid),
            lambda: stranger.get_attributes(uid),
            lambda: stranger.get("dek_doesnotexist"),  # same answer whether it exists or not
            lambda: stranger.create(enums.CryptographicAlgorithm.AES, 256),
            lambda: stranger.locate(attributes=[_name("admins-only")]),
        ):
            with pytest.raises(pie_exceptions.KmipOperationFailure) as caught:
                attempt()
            assert caught.value.reason is enums.ResultReason.PERMISSION_DENIED


# -- raw messages through PyKMIP's KMIPProxy and our own TTLV ----------------------------


def _tls12_socket(dev: DevDaemon, name: str = "admin") -> ssl.SSLSocket:
    ca, cert, key = dev.credentials(name)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(ca)
    context.load_cert_chain(cert, key)
    context.check_hostname = False
    raw = socket.create_connection((dev.host, dev.port))
    return context.wrap_socket(raw)


def _exchange(sock: ssl.SSLSocket, message: bytes) -> Item:
    sock.sendall(message)
    header = b""
    while len(header) < 8:
        header += sock.recv(8 - len(header))
    length = int.from_bytes(header[4:8], "big")
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return decode_ttlv(header + body)


def _request(version: tuple[int, int], *items: Item) -> bytes:
    header = structure("RequestHeader", version_item(version), integer("BatchCount", len(items)))
    return encode_ttlv(structure("RequestMessage", header, *items))


def _item(operation: str, uid: bytes, *payload: Item) -> Item:
    from kmipd.kmip import byte_string  # noqa: PLC0415

    return structure(
        "BatchItem",
        enumeration("Operation", operation),
        byte_string("UniqueBatchItemId", uid),
        structure("RequestPayload", *payload),
    )


def _results(response: Item) -> list[tuple[bytes, int, Item | None]]:
    out = []
    for item in response.find_all("BatchItem"):
        uid = item.find("UniqueBatchItemId")
        status = item.find("ResultStatus")
        assert uid is not None
        assert status is not None
        out.append((uid.value, status.value, item.find("ResponsePayload")))
    return out  # type: ignore[return-value]


def test_kmip_20_batch_with_id_placeholder(dev: DevDaemon) -> None:
    attributes = structure(
        "Attributes",
        enumeration("CryptographicAlgorithm", "Aes"),
        integer("CryptographicLength", 256),
        integer("CryptographicUsageMask", 0x0C),
        structure("Name", text("NameValue", "batch-20"), enumeration("NameType", 1)),
    )
    message = _request(
        (2, 0),
        _item("Create", b"c", enumeration("ObjectType", "SymmetricKey"), attributes),
        _item("Activate", b"a"),
        _item("Get", b"g"),
        _item("Get", b"x", text("UniqueIdentifier", "dek_nosuchkey")),  # fails alone
        _item("GetAttributes", b"t"),
    )
    with _tls12_socket(dev) as sock:
        response = _exchange(sock, message)
    header = response.find("ResponseHeader")
    assert header is not None
    version = header.find("ProtocolVersion")
    assert version is not None
    assert [c.value for c in version.children] == [2, 0]
    results = _results(response)
    assert [(uid, status) for uid, status, _ in results] == [
        (b"c", 0),
        (b"a", 0),
        (b"g", 0),
        (b"x", 1),
        (b"t", 0),
    ]
    get_payload = results[2][2]
    assert get_payload is not None
    key = get_payload.find("SymmetricKey")
    assert key is not None
    attrs_payload = results[4][2]
    assert attrs_payload is not None
    holder = attrs_payload.find("Attributes")
    assert holder is not None  # 2.0 answers with an Attributes structure
    state = holder.find("State")
    assert state is not None
    assert state.value == 2  # Active


def test_pykmip_kmipproxy_multi_item_batch(dev: DevDaemon) -> None:
    """PyKMIP's lower-level KMIPProxy sends several operations in one message."""
    from kmip.core import utils  # noqa: PLC0415
    from kmip.core.messages import contents, messages, payloads  # noqa: PLC0415
    from kmip.services.kmip_client import KMIPProxy  # noqa: PLC0415

    proxy = KMIPProxy(
        host=dev.host,
        port=dev.port,
        certfile=str(dev.pki / "admin.pem"),
        keyfile=str(dev.pki / "admin-key.pem"),
        ca_certs=str(dev.pki / "ca.pem"),
        config_file="/dev/null",
        ssl_version="PROTOCOL_TLSv1_2",
        kmip_version=enums.KMIPVersion.KMIP_1_4,
    )
    proxy.open()
    try:
        result = proxy.discover_versions()
        assert result.result_status.value is enums.ResultStatus.SUCCESS
        offered = [(v.major, v.minor) for v in result.protocol_versions]
        assert (1, 4) in offered
        assert (2, 0) in offered
        query = proxy.query(
            query_functions=[
                enums.QueryFunction.QUERY_OPERATIONS,
                enums.QueryFunction.QUERY_OBJECTS,
            ]
        )
        assert enums.Operation.CREATE in query.operations
        assert enums.ObjectType.SECRET_DATA in query.object_types
        # A batch built with PyKMIP's own message classes: Discover Versions and Query together.
        items = [
            messages.RequestBatchItem(
                operation=contents.Operation(enums.Operation.DISCOVER_VERSIONS),
                unique_batch_item_id=contents.UniqueBatchItemID(b"\x01"),
                request_payload=payloads.DiscoverVersionsRequestPayload(),
            ),
            messages.RequestBatchItem(
                operation=contents.Operation(enums.Operation.QUERY),
                unique_batch_item_id=contents.UniqueBatchItemID(b"\x02"),
                request_payload=payloads.QueryRequestPayload(
                    query_functions=[enums.QueryFunction.QUERY_OBJECTS]
                ),
            ),
            messages.RequestBatchItem(
                operation=contents.Operation(enums.Operation.GET),
                unique_batch_item_id=contents.UniqueBatchItemID(b"\x03"),
                request_payload=payloads.GetRequestPayload(unique_identifier="dek_missing"),
            ),
        ]
        header = messages.RequestHeader(
            protocol_version=contents.ProtocolVersion(1, 4), batch_count=contents.BatchCount(3)
        )
        stream = utils.BytearrayStream()
        messages.RequestMessage(request_header=header, batch_items=items).write(stream)
        proxy.protocol.write(stream.buffer)
        response = messages.ResponseMessage()
        response.read(proxy.protocol.read())
        got = [
            (item.unique_batch_item_id.value, item.result_status.value)
            for item in response.batch_items
        ]
        assert got == [
            (b"\x01", enums.ResultStatus.SUCCESS),
            (b"\x02", enums.ResultStatus.SUCCESS),
            (b"\x03", enums.ResultStatus.OPERATION_FAILED),
        ]
    finally:
        proxy.close()


def test_tls12_carries_kmip_but_never_the_native_protocol(dev: DevDaemon) -> None:
    from kmipd.protocol import FrameReader, decode_item, encode_frame, encode_item  # noqa: PLC0415

    with _tls12_socket(dev) as sock:
        assert sock.version() == "TLSv1.2"
        assert sock.cipher()[0] in (
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        )
        sock.sendall(encode_frame(encode_item({"id": 1, "op": "hello", "args": {"versions": [1]}})))
        reader = FrameReader()
        while (frame := reader.next_frame()) is None:
            data = sock.recv(4096)
            assert data, "closed without the refusal"
            reader.feed(data)
        refusal = decode_item(frame)
        assert refusal["error"]["name"] == "certificate-rejected"
        assert "TLS 1.3" in refusal["error"]["message"]


def test_a_native_dek_is_a_kmip_object_and_back(dev: DevDaemon) -> None:
    from kmipd.client import Client  # noqa: PLC0415

    native = Client(
        dev.daemon.address,
        ca=dev.pki / "ca.pem",
        cert=dev.pki / "admin.pem",
        key=dev.pki / "admin-key.pem",
    )
    try:
        dek = native.create_dek("kmip")
        with _client(dev) as kms:
            assert kms.get(dek.dek_id).value == dek.key_bytes()
            uid = kms.create(enums.CryptographicAlgorithm.AES, 256)
            kms.activate(uid)
            key = kms.get(uid).value
        assert native.get_dek(uid).key_bytes() == key
    finally:
        native.close()
