"""KMIP on the server's port: framing, malformed TTLV, batches, versions, authorization.

Skipped as a group when the port does not speak KMIP (kmip.enabled = false).
The suite writes its own TTLV (conformance/_ttlv.py), not the daemon's.
"""

from __future__ import annotations

import secrets
import ssl
import struct

from conformance import _ttlv as t
from conformance._case import CaseFailed, CaseSkipped, case
from conformance._certs import Credentials
from conformance._context import Context


class _Kmip:
    def __init__(self, ctx: Context, creds: Credentials | None = None) -> None:
        self.ctx = ctx
        context = ctx.tls_context(creds or ctx.target.client)
        self.sock: ssl.SSLSocket = context.wrap_socket(ctx.tcp(), server_hostname=ctx.target.host)

    def exchange(self, message: bytes, label: str) -> t.Node:
        self.ctx.transcript.add(f"-> KMIP {label} ({len(message)} bytes)")
        self.sock.sendall(message)
        return self.receive(label)

    def receive(self, label: str) -> t.Node:
        header = self._read(8)
        if header is None:
            raise CaseFailed(f"the server closed the connection instead of answering {label}")
        (length,) = struct.unpack(">I", header[4:8])
        body = self._read(length)
        if body is None:
            raise CaseFailed(f"the answer to {label} was cut short")
        try:
            node = t.parse(header + body)
        except t.TtlvError as exc:
            raise CaseFailed(f"the answer to {label} is not well-formed TTLV: {exc}") from None
        self.ctx.transcript.add(f"<- {t.results(node)}")
        return node

    def _read(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            try:
                chunk = self.sock.recv(count - len(data))
            except (TimeoutError, OSError):
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def _discover(version: tuple[int, int] = (1, 2)) -> bytes:
    return t.request(version, t.batch_item(t.OP_DISCOVER_VERSIONS, b"d"))


def _open(ctx: Context, creds: Credentials | None = None) -> _Kmip:
    kmip = _Kmip(ctx, creds)
    kmip.sock.sendall(_discover())
    header = kmip._read(8)
    if header is None or header[:3] != b"\x42\x00\x7b":
        kmip.close()
        raise CaseSkipped("the port does not answer KMIP (kmip.enabled = false?)")
    (length,) = struct.unpack(">I", header[4:8])
    kmip._read(length)
    return kmip


@case(
    "KMIP-001",
    "A KMIP Discover Versions on the native port is answered with a ResponseMessage that "
    "lists 1.0 to 1.4 and 2.0, and a Query in 2.0 is answered in 2.0.",
)
def discover_versions(ctx: Context) -> None:
    kmip = _open(ctx)
    try:
        response = kmip.exchange(_discover(), "Discover Versions")
        ctx.expect(t.results(response) == [(b"d", t.SUCCESS, None)], "Discover Versions failed")
        (entry,) = t.find_all(response, t.BATCH_ITEM)
        payload = t.find(entry, t.RESPONSE_PAYLOAD)
        ctx.expect(payload is not None, "no Response Payload")
        assert payload is not None
        versions = {
            (t.find(v, t.VERSION_MAJOR)[2], t.find(v, t.VERSION_MINOR)[2])  # type: ignore[index]
            for v in t.find_all(payload, t.PROTOCOL_VERSION)
        }
        wanted = {(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 0)}
        ctx.expect(wanted <= versions, f"versions offered: {sorted(versions)}")
        answer = kmip.exchange(t.request((2, 0), t.batch_item(t.OP_QUERY, b"q")), "Query (2.0)")
        header = t.find(answer, 0x42007A)
        version = None if header is None else t.find(header, t.PROTOCOL_VERSION)
        got = None if version is None else [c[2] for c in version[2]]
        ctx.expect(got == [2, 0], f"a 2.0 request answered in version {got}")
    finally:
        kmip.close()


def _patched(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


@case(
    "KMIP-002",
    "Malformed TTLV inside a sound message length (non-zero padding, a wrong Batch Count, "
    "a wrong fixed length, an unknown item type, an inner length past its structure) is "
    "answered with Operation Failed / Invalid Message, and the connection serves the next "
    "request.",
    hostile=True,
)
def malformed_ttlv(ctx: Context) -> None:
    kmip = _open(ctx)
    good = _discover()
    cases = {
        # Offsets into the message: the header's Protocol Version Major is at 24
        # (its type at 27, its length at 28, its padding at 36..39); Batch Count's value at 64.
        "non-zero padding": _patched(good, 39, b"\x01"),
        "wrong batch count": _patched(good, 64, b"\x00\x00\x00\x07"),
        "integer of length 8": _patched(good, 28, b"\x00\x00\x00\x08"),
        "unknown item type": _patched(good, 27, b"\x7f"),
        "inner length past its structure": _patched(good, 12, b"\x00\x00\x01\x00"),
    }
    try:
        for label, data in cases.items():
            got = t.results(kmip.exchange(data, label))
            ctx.expect(
                got == [(None, t.FAILED, t.INVALID_MESSAGE)],
                f"{label}: answered {got}, not Operation Failed / Invalid Message",
            )
            after = t.results(kmip.exchange(good, f"Discover Versions after {label}"))
            ctx.expect(after == [(b"d", t.SUCCESS, None)], f"after {label}: {after}")
    finally:
        kmip.close()


@case(
    "KMIP-003",
    "A message header announcing more than the server's limit is answered with Invalid "
    "Message and the connection is closed; another client is served.",
    hostile=True,
)
def oversized_message(ctx: Context) -> None:
    kmip = _open(ctx)
    try:
        kmip.sock.sendall(bytes.fromhex("42007801") + struct.pack(">I", 0x7FFFFFF8))
        got = t.results(kmip.receive("a 2 GiB message header"))
        ctx.expect(got == [(None, t.FAILED, t.INVALID_MESSAGE)], f"answered {got}")
        ctx.expect(kmip.closed(), "the connection stayed open after an unbounded header")
    finally:
        kmip.close()
    other = _open(ctx)
    other.close()


@case(
    "KMIP-004",
    "A batch is answered item by item with the Unique Batch Item IDs echoed; a failing "
    "item (an operation not served, a Get of an unknown id) does not fail the others.",
)
def batches(ctx: Context) -> None:
    kmip = _open(ctx)
    unknown = "conformance-" + secrets.token_hex(8)
    message = t.request(
        (1, 4),
        t.batch_item(t.OP_DISCOVER_VERSIONS, b"\x01"),
        t.batch_item(0x09, b"\x02"),  # Check: not served
        t.batch_item(t.OP_GET, b"\x03", t.text(t.UNIQUE_IDENTIFIER, unknown)),
        t.batch_item(t.OP_QUERY, b"\x04", t.enumeration(t.QUERY_FUNCTION, 1)),
    )
    try:
        got = t.results(kmip.exchange(message, "a four-item batch"))
        ids = [uid for uid, _, _ in got]
        ctx.expect(ids == [b"\x01", b"\x02", b"\x03", b"\x04"], f"batch item ids: {ids}")
        statuses = [status for _, status, _ in got]
        ctx.expect(statuses == [t.SUCCESS, t.FAILED, t.FAILED, t.SUCCESS], f"statuses {statuses}")
        ctx.expect(got[1][2] == 0x05, f"an unserved operation got reason {got[1][2]}")
        # Unknown id: Item Not Found, or Permission Denied for a client without a grant.
        ctx.expect(got[2][2] in (t.ITEM_NOT_FOUND, t.PERMISSION_DENIED), f"reason {got[2][2]}")
    finally:
        kmip.close()


def _create_aes_key() -> bytes:
    """A Create (KMIP 1.2) of an AES-256 key for encryption, in the server's default place."""
    template = t.structure(
        t.TEMPLATE_ATTRIBUTE,
        t.attribute("Cryptographic Algorithm", t.enumeration(t.ATTRIBUTE_VALUE, t.AES)),
        t.attribute("Cryptographic Length", t.integer(t.ATTRIBUTE_VALUE, 256)),
        t.attribute("Cryptographic Usage Mask", t.integer(t.ATTRIBUTE_VALUE, 0x0C)),
    )
    return t.request(
        (1, 2),
        t.batch_item(t.OP_CREATE, b"c", t.enumeration(t.OBJECT_TYPE, t.SYMMETRIC_KEY), template),
    )


def _by_id(operation: int, uid: bytes, unique_identifier: str) -> bytes:
    return t.batch_item(operation, uid, t.text(t.UNIQUE_IDENTIFIER, unique_identifier))


@case(
    "KMIP-005",
    "An identity without a grant gets Permission Denied, not Item Not Found, for Get and Get "
    "Attributes of another identity's object and of an id that does not exist, with no "
    "attribute in the answer, and Locate finds nothing for it.",
)
def authorization(ctx: Context) -> None:
    owner = _open(ctx)
    try:
        response = owner.exchange(_create_aes_key(), "Create (AES-256)")
        if t.results(response) != [(b"c", t.SUCCESS, None)]:
            raise CaseSkipped(f"the client may not Create over KMIP: {t.results(response)}")
        (entry,) = t.find_all(response, t.BATCH_ITEM)
        payload = t.find(entry, t.RESPONSE_PAYLOAD)
        found = None if payload is None else t.find(payload, t.UNIQUE_IDENTIFIER)
        if found is None:
            raise CaseFailed("a successful Create answered no Unique Identifier")
        created = bytes(found[2]).decode()
        outsider = _open(ctx, ctx.certs.outsider())
        absent = "conformance-" + secrets.token_hex(8)
        try:
            asked = t.request(
                (1, 2),
                _by_id(t.OP_GET, b"1", created),
                _by_id(t.OP_GET_ATTRIBUTES, b"2", created),
                _by_id(t.OP_GET, b"3", absent),
                _by_id(t.OP_GET_ATTRIBUTES, b"4", absent),
                t.batch_item(t.OP_LOCATE, b"5"),
            )
            answer = outsider.exchange(asked, "Get, Get Attributes and Locate without a grant")
            got = t.results(answer)
            denied = [(uid, t.FAILED, t.PERMISSION_DENIED) for uid in (b"1", b"2", b"3", b"4")]
            ctx.expect(got[:4] == denied, f"an ungranted identity was answered {got[:4]}")
            for item in t.find_all(answer, t.BATCH_ITEM)[:4]:
                leaked = t.find(item, t.RESPONSE_PAYLOAD)
                ctx.expect(leaked is None or not leaked[2], "a refused item carried a payload")
            # Locate: refused, or an empty answer; never the owner's object.
            located = t.find_all(answer, t.BATCH_ITEM)[4]
            ids = [
                bytes(node[2]).decode()
                for payload in t.find_all(located, t.RESPONSE_PAYLOAD)
                for node in t.find_all(payload, t.UNIQUE_IDENTIFIER)
            ]
            ctx.expect(created not in ids, "Locate without a grant found another's object")
        finally:
            outsider.close()
        # The owner still reads it: the refusals were about the outsider, not the object.
        mine = t.results(
            owner.exchange(t.request((1, 2), _by_id(t.OP_GET, b"g", created)), "the owner's Get")
        )
        ctx.expect(mine == [(b"g", t.SUCCESS, None)], f"the owner's Get got {mine}")
        owner.exchange(t.request((1, 2), _by_id(t.OP_DESTROY, b"d", created)), "Destroy")
    finally:
        owner.close()
