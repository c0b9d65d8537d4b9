"""KMIP on the server's port, in-process over real TLS: dispatch, malformed TTLV, floods.

Every malformed message whose framing still holds gets its KMIP error (Result
Status Operation Failed, Result Reason Invalid Message) and the connection
serves the next request; a header that breaks the framing is answered and
the connection closed; other clients are served throughout.
"""

from __future__ import annotations

import os
import ssl

import pytest
import trio

from kmipd.client import client_context
from kmipd.kmip import (
    TAGS,
    Item,
    ItemType,
    ResultReason,
    ResultStatus,
    decode_ttlv,
    encode_ttlv,
    enumeration,
    integer,
    structure,
    text,
    version_item,
)
from kmipd.net._trio_tls import TlsHandshakeError
from kmipd.server import KmipSettings
from tests.conftest import RunningServer, ServerFactory, credentials

KMIP_ON = KmipSettings(max_message_size=4096)


class KmipRaw:
    def __init__(self, raw: object) -> None:
        self.raw = raw
        self.buffer = b""

    @classmethod
    async def open(
        cls, server: RunningServer, name: str = "admin", *, tls12: bool = False
    ) -> KmipRaw:
        from tests.conftest import RawConnection  # noqa: PLC0415

        context = client_context(**credentials(server.ca, name), allow_tls12=tls12)
        if tls12:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        return cls(await RawConnection.open(server.address, server.ca, name, context))

    async def send(self, data: bytes) -> None:
        await self.raw.channel.send_all(data)  # type: ignore[attr-defined]

    async def receive(self) -> Item:
        with trio.fail_after(10):
            while True:
                if len(self.buffer) >= 8:
                    length = int.from_bytes(self.buffer[4:8], "big") + 8
                    if len(self.buffer) >= length:
                        message, self.buffer = self.buffer[:length], self.buffer[length:]
                        return decode_ttlv(message)
                data = await self.raw.channel.receive_some()  # type: ignore[attr-defined]
                if not data:
                    raise EOFError("closed")
                self.buffer += data

    async def closed(self) -> bool:
        with trio.fail_after(10):
            try:
                while await self.raw.channel.receive_some():  # type: ignore[attr-defined]
                    pass
            except (trio.BrokenResourceError, ssl.SSLError):
                pass
        return True

    async def aclose(self) -> None:
        await self.raw.aclose()  # type: ignore[attr-defined]


def query(version: tuple[int, int] = (1, 2)) -> bytes:
    header = structure("RequestHeader", version_item(version), integer("BatchCount", 1))
    item = structure(
        "BatchItem",
        enumeration("Operation", "Query"),
        structure("RequestPayload", enumeration("QueryFunction", "QueryOperations")),
    )
    return encode_ttlv(structure("RequestMessage", header, item))


def only_result(response: Item) -> tuple[int, int | None]:
    assert response.tag == TAGS["ResponseMessage"]
    (item,) = response.find_all("BatchItem")
    status, reason = item.find("ResultStatus"), item.find("ResultReason")
    assert status is not None
    return int(status.value), None if reason is None else int(reason.value)  # type: ignore[arg-type]


def _patched(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


def _deep(levels: int) -> Item:
    item = integer("BatchCount", 1)
    for _ in range(levels):
        item = Item(TAGS["RequestPayload"], ItemType.STRUCTURE, (item,))
    return item


GOOD = query()
#: (label, bytes): each a message with sound framing but broken inside.
MALFORMED = [
    ("non-zero padding", GOOD[:-1] + b"\x01"),
    ("wrong batch count", _patched(GOOD, 0x30 + 8, b"\x00\x00\x00\x05")),
    ("integer with length 8", _patched(GOOD, 0x30 + 4, b"\x00\x00\x00\x08")),
    ("unknown item type", _patched(GOOD, 0x30 + 3, b"\x7f")),
    ("inner length past the message", _patched(GOOD, 0x08 + 4, b"\x00\x00\x01\x00")),
    ("a ResponseMessage sent to the server", _patched(GOOD, 0, b"\x42\x00\x7b")),
    (
        "text that is not UTF-8",
        encode_ttlv(structure("RequestMessage", text("RequestHeader", "x")))[:-8]
        + b"\xff\xfe\x00\x00\x00\x00\x00\x00",
    ),
    (
        "no batch items",
        encode_ttlv(
            structure(
                "RequestMessage",
                structure("RequestHeader", version_item((1, 2)), integer("BatchCount", 0)),
            )
        ),
    ),
    (
        "structures nested too deep",
        encode_ttlv(Item(TAGS["RequestMessage"], ItemType.STRUCTURE, (_deep(40),))),
    ),
]


async def test_every_malformed_message_is_answered_and_the_connection_goes_on(
    start_server: ServerFactory,
) -> None:
    server = await start_server(kmip=KMIP_ON)
    conn = await KmipRaw.open(server)
    try:
        for label, data in MALFORMED:
            await conn.send(data)
            assert only_result(await conn.receive()) == (
                ResultStatus.OPERATION_FAILED,
                ResultReason.INVALID_MESSAGE,
            ), label
            await conn.send(GOOD)
            assert only_result(await conn.receive())[0] == ResultStatus.SUCCESS, label
    finally:
        await conn.aclose()


@pytest.mark.parametrize(
    "header",
    [
        bytes.fromhex("4200780100100000"),  # 1 MiB announced, over the 4 KiB limit
        bytes.fromhex("4200780200000004"),  # a RequestMessage that is no structure
        bytes.fromhex("4300780100000008"),  # not a KMIP tag
    ],
    ids=["oversized", "not-a-structure", "not-kmip"],
)
async def test_broken_framing_is_answered_then_closed_and_others_are_served(
    start_server: ServerFactory, header: bytes
) -> None:
    server = await start_server(kmip=KMIP_ON)
    bystander = await KmipRaw.open(server, "storage")
    victim = await KmipRaw.open(server)
    try:
        await victim.send(GOOD + header + bytes(64))
        assert only_result(await victim.receive())[0] == ResultStatus.SUCCESS
        assert only_result(await victim.receive()) == (
            ResultStatus.OPERATION_FAILED,
            ResultReason.INVALID_MESSAGE,
        )
        assert await victim.closed()
        await bystander.send(GOOD)
        assert only_result(await bystander.receive())[0] == ResultStatus.SUCCESS
    finally:
        await victim.aclose()
        await bystander.aclose()


async def test_a_garbage_flood_leaves_the_daemon_serving(start_server: ServerFactory) -> None:
    server = await start_server(kmip=KMIP_ON)
    async with trio.open_nursery() as nursery:
        for _ in range(4):

            async def flood() -> None:
                conn = await KmipRaw.open(server)
                try:
                    await conn.send(b"\x42" + os.urandom(256 * 1024))
                    await conn.closed()
                except (trio.BrokenResourceError, ssl.SSLError, EOFError):
                    pass
                finally:
                    await conn.aclose()

            nursery.start_soon(flood)
    conn = await KmipRaw.open(server, tls12=True)
    try:
        await conn.send(GOOD)
        assert only_result(await conn.receive())[0] == ResultStatus.SUCCESS
    finally:
        await conn.aclose()
    async with server.async_client("storage") as native:  # the native side too
        await native.create_dek("orders")


async def test_kmip_off_serves_only_the_native_protocol(start_server: ServerFactory) -> None:
    server = await start_server(kmip=KmipSettings(enabled=False))
    conn = await KmipRaw.open(server)
    try:
        await conn.send(GOOD)
        with pytest.raises(EOFError):
            await conn.receive()  # the native side refuses the "frame" and closes
    finally:
        await conn.aclose()
    with pytest.raises(TlsHandshakeError):  # and TLS 1.2 is not accepted at all
        await KmipRaw.open(server, tls12=True)
    async with server.async_client("storage") as native:
        await native.create_dek("orders")


async def test_a_revoked_certificate_ends_its_open_kmip_session(
    start_server: ServerFactory,
) -> None:
    # The CA is shared by the module's tests: revoke an identity of this test's own.
    server = await start_server(kmip=KMIP_ON)
    server.ca.issue_client("kmip-revoked")
    victim = await KmipRaw.open(server, "kmip-revoked")
    bystander = await KmipRaw.open(server, "storage")
    try:
        await victim.send(GOOD)
        assert only_result(await victim.receive())[0] == ResultStatus.SUCCESS
        server.ca.revoke("kmip-revoked")
        # Idle when the scan finds it: closed (KMIP has no unsolicited message), and
        # nothing more is served on it.
        assert await victim.closed()
        assert server.server.metrics.connections_cut["revoked"] == 1
        await bystander.send(GOOD)
        assert only_result(await bystander.receive())[0] == ResultStatus.SUCCESS
    finally:
        await victim.aclose()
        await bystander.aclose()


async def test_a_kmip_connection_over_its_identity_budget_is_answered_general_failure(
    start_server: ServerFactory,
) -> None:
    server = await start_server(kmip=KMIP_ON, max_connections_per_identity=1)
    first = await KmipRaw.open(server, "storage")
    second = await KmipRaw.open(server, "storage")
    try:
        await second.send(GOOD)
        response = await second.receive()
        assert only_result(response) == (
            ResultStatus.OPERATION_FAILED,
            ResultReason.GENERAL_FAILURE,
        )
        (item,) = response.find_all("BatchItem")
        message = item.find("ResultMessage")
        assert message is not None
        assert "too many connections" in str(message.value)
        assert await second.closed()
        await first.send(GOOD)  # the connection within the budget is served as before
        assert only_result(await first.receive())[0] == ResultStatus.SUCCESS
    finally:
        await first.aclose()
        await second.aclose()
