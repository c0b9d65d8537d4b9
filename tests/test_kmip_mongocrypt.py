"""MongoDB client-side field-level encryption against kmipd's KMIP, through pymongocrypt.

pymongocrypt bundles libmongocrypt, which encodes its own KMIP. No MongoDB
server is needed: ExplicitEncrypter runs libmongocrypt's state machine, and
the callback below carries its KMS bytes over our own mutual-TLS socket and
keeps the key vault (the data-key documents) in a list. A fresh client then
has only the key documents, so decrypting makes it fetch the key again.
"""

from __future__ import annotations

import socket
import ssl
import struct
from typing import Any

import pytest
from pymongocrypt.explicit_encrypter import ExplicitEncrypter
from pymongocrypt.options import MongoCryptOptions
from pymongocrypt.synchronous.state_machine import MongoCryptCallback

from tests.kmip_dev import DevDaemon, dev

__all__ = ["dev"]  # the module's daemon fixture

ALGORITHM = "AEAD_AES_256_CBC_HMAC_SHA_512-Deterministic"


def bson(document: dict[str, Any]) -> bytes:
    """The few BSON types these tests send (no bson package needed)."""
    out = b""
    for key, value in document.items():
        name = key.encode() + b"\0"
        if isinstance(value, bool):
            out += b"\x08" + name + (b"\x01" if value else b"\x00")
        elif isinstance(value, int):
            out += b"\x10" + name + struct.pack("<i", value)
        elif isinstance(value, str):
            encoded = value.encode() + b"\0"
            out += b"\x02" + name + struct.pack("<i", len(encoded)) + encoded
        elif isinstance(value, dict):
            out += b"\x03" + name + bson(value)
        else:
            raise TypeError(type(value))
    return struct.pack("<i", len(out) + 5) + out + b"\0"


class KeyVault(MongoCryptCallback):  # type: ignore[misc]
    """Carries libmongocrypt's KMIP over mutual TLS; keeps data keys in a list."""

    def __init__(self, dev: DevDaemon, keys: list[bytes]) -> None:
        self.dev = dev
        self.keys = keys
        self.kms_requests = 0
        ca, cert, key = dev.credentials("admin")
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.tls.load_verify_locations(ca)
        self.tls.load_cert_chain(cert, key)
        self.tls.check_hostname = False  # the dev server certificate names 127.0.0.1 by IP

    def kms_request(self, kms_context: Any) -> None:
        self.kms_requests += 1
        host, port = kms_context.endpoint.rsplit(":", 1)
        with self.tls.wrap_socket(socket.create_connection((host, int(port)))) as sock:
            sock.sendall(kms_context.message)
            while kms_context.bytes_needed > 0:
                data = sock.recv(kms_context.bytes_needed)
                if not data:
                    raise OSError("kmipd closed the connection mid-response")
                kms_context.feed(data)

    def collection_info(self, database: str, filter: bytes) -> None:
        raise AssertionError("explicit encryption lists no collections")

    def mark_command(self, database: str, cmd: bytes) -> None:
        raise AssertionError("explicit encryption marks no commands")

    def fetch_keys(self, filter: bytes) -> list[bytes]:
        return list(self.keys)

    def insert_data_key(self, data_key: bytes) -> bytes:
        self.keys.append(bytes(data_key))
        return b"inserted"

    def bson_encode(self, doc: dict[str, Any]) -> bytes:
        return bson(doc)

    def close(self) -> None:
        pass


def _encrypter(dev: DevDaemon, keys: list[bytes]) -> tuple[ExplicitEncrypter, KeyVault]:
    vault = KeyVault(dev, keys)
    options = MongoCryptOptions({"kmip": {"endpoint": f"{dev.host}:{dev.port}"}})
    return ExplicitEncrypter(vault, options), vault


@pytest.mark.parametrize(
    ("master_key", "operations"),
    [
        ({}, {"register", "activate", "get-dek"}),
        ({"delegated": True}, {"create-dek", "activate", "encrypt", "decrypt"}),
    ],
    ids=["default", "delegated"],
)
def test_field_level_encryption_with_a_kmip_data_key(
    dev: DevDaemon, master_key: dict[str, Any], operations: set[str]
) -> None:
    keys: list[bytes] = []
    before = len(dev.audit_records())
    encrypter, _ = _encrypter(dev, keys)
    try:
        encrypter.create_data_key("kmip", master_key=dict(master_key), key_alt_names=["orders"])
        value = bson({"v": "4111 1111 1111 1111"})
        ciphertext = encrypter.encrypt(value, ALGORITHM, key_alt_name="orders")
    finally:
        encrypter.close()
    assert b"4111" not in bytes(ciphertext)

    fresh, vault = _encrypter(dev, keys)  # only the key documents: it must ask kmipd
    try:
        assert bytes(fresh.decrypt(ciphertext)) == value
    finally:
        fresh.close()
    assert vault.kms_requests >= 1
    records = dev.audit_records()[before:]
    assert operations <= {r["operation"] for r in records}
    assert all(r["protocol"] == "kmip" and r["result"] == "ok" for r in records)
