"""KMIP Secret Data and kmipd secrets are one kind of object, seen through PyKMIP's client.

A named Secret Data registered over KMIP is a secret (a new version when the
name exists); a secret set over the native protocol is found by Locate (Name)
and fetched by Get as Secret Data. Against a real ``kmipd serve --dev``.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from tests.kmip_dev import DevDaemon, dev

with warnings.catch_warnings():
    # PyKMIP 0.11 imports SQLAlchemy 1.x names at import time; nothing else is silenced.
    warnings.simplefilter("ignore", DeprecationWarning)
    from kmip.core import enums
    from kmip.core import exceptions as core_exceptions
    from kmip.core.factories import attributes as attribute_factories
    from kmip.pie import exceptions as pie_exceptions
    from kmip.pie import objects
    from kmip.pie.client import ProxyKmipClient

__all__ = ["dev"]  # the module's daemon fixture

pytestmark = pytest.mark.filterwarnings(
    "ignore:ssl.PROTOCOL_TLSv1_2 is deprecated:DeprecationWarning"
)

_FACTORY = attribute_factories.AttributeFactory()


def _client(dev: DevDaemon, name: str = "admin") -> ProxyKmipClient:
    client: ProxyKmipClient = dev.pykmip_client(name)
    return client


def _name(value: str) -> Any:
    return _FACTORY.create_attribute(enums.AttributeType.NAME, value)


def _group(value: str) -> Any:
    return _FACTORY.create_attribute(enums.AttributeType.OBJECT_GROUP, value)


def _secret(value: bytes, name: str) -> objects.SecretData:
    return objects.SecretData(value, enums.SecretDataType.PASSWORD, name=name)


def test_named_secret_data_is_a_versioned_secret(dev: DevDaemon) -> None:
    with _client(dev) as kms:
        first = kms.register(_secret(b"replication-pass-1", "db-replication"))
        assert first == "secret:kmip:db-replication:1"
        assert kms.get(first).value == b"replication-pass-1"
        # Registering the name again is a new version; Locate finds the current one.
        second = kms.register(_secret(b"replication-pass-2", "db-replication"))
        assert second == "secret:kmip:db-replication:2"
        assert kms.locate(attributes=[_name("db-replication")]) == [second]
        got = kms.get(second)
        assert isinstance(got, objects.SecretData)
        assert got.value == b"replication-pass-2"
        assert kms.get(first).value == b"replication-pass-1"  # older versions by id

        _, attributes = kms.get_attributes(second)
        by_name = {a.attribute_name.value: a.attribute_value for a in attributes}
        assert by_name["State"].value == enums.State.ACTIVE
        assert by_name["Name"].name_value.value == "db-replication"
        assert by_name["Object Group"].value == "kmip"
        assert {"Name", "State", "Object Type"} <= set(kms.get_attribute_list(second))

        # Revoke disables that version: Get refuses it, Locate falls back to version 1.
        kms.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, second)
        with pytest.raises(pie_exceptions.KmipOperationFailure) as refused:
            kms.get(second)
        assert refused.value.reason is enums.ResultReason.PERMISSION_DENIED
        assert "disabled" in str(refused.value)
        assert kms.locate(attributes=[_name("db-replication")]) == [first]
        kms.activate(second)
        assert kms.get(second).value == b"replication-pass-2"

        # Destroy deletes the secret (soft: recoverable over the native protocol).
        kms.destroy(second)
        assert kms.locate(attributes=[_name("db-replication")]) == []
        with pytest.raises(pie_exceptions.KmipOperationFailure) as gone:
            kms.get(first)
        assert gone.value.reason is enums.ResultReason.ITEM_NOT_FOUND
    records = [r for r in dev.audit_records() if "db-replication" in (r.get("detail") or "")]
    assert {r["operation"] for r in records} >= {"set-secret", "get-secret", "update-secret"}
    assert all(r["protocol"] == "kmip" for r in records)
    trail = (dev.data / "audit.log").read_bytes()
    assert b"replication-pass" not in trail


def test_object_group_is_the_namespace_and_attribute_changes_are_refused(dev: DevDaemon) -> None:
    with _client(dev) as kms:
        uid = kms.register(_secret(b"s3-access-key", "backup-target"))
        assert uid == "secret:kmip:backup-target:1"  # kmip.default_namespace
        assert kms.locate(attributes=[_name("backup-target"), _group("kmip")]) == [uid]
        assert kms.locate(attributes=[_name("backup-target"), _group("users")]) == []
        symmetric_only = _FACTORY.create_attribute(
            enums.AttributeType.OBJECT_TYPE, enums.ObjectType.SYMMETRIC_KEY
        )
        assert kms.locate(attributes=[_name("backup-target"), symmetric_only]) == []
        with pytest.raises(core_exceptions.OperationFailure) as refused:
            kms.modify_attribute(uid, attribute=_name("other-name"))
        assert refused.value.reason is enums.ResultReason.ILLEGAL_OPERATION
        assert "update-secret" in str(refused.value)
        assert kms.get(uid).value == b"s3-access-key"  # nothing lost


def test_secret_data_no_secret_can_be_stays_an_anonymous_object(dev: DevDaemon) -> None:
    with _client(dev) as kms:
        # PyKMIP names it "Secret Data" by default: no secret name (a space), so a KMIP object.
        uid = kms.register(objects.SecretData(b"pykmip-default", enums.SecretDataType.SEED))
        assert not uid.startswith("secret:")
        assert kms.get(uid).value == b"pykmip-default"
        assert uid in kms.locate(attributes=[_name("Secret Data")])
        spaced = kms.register(_secret(b"spaced", "has spaces in it"))
        assert not spaced.startswith("secret:")
        assert kms.locate(attributes=[_name("has spaces in it")]) == [spaced]


def test_stranger_finds_no_secrets_and_reads_none(dev: DevDaemon) -> None:
    with _client(dev) as kms:
        uid = kms.register(_secret(b"admins-secret", "admins-secret"))
    with _client(dev, "stranger") as stranger:
        with pytest.raises(pie_exceptions.KmipOperationFailure) as caught:
            stranger.get(uid)
        assert caught.value.reason is enums.ResultReason.PERMISSION_DENIED
