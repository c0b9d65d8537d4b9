"""The CBOR profile and message shapes: what the server must refuse, and what it must accept.

PROTOCOL.md section 3: definite lengths only, no tags, text map keys unique
within a map, no floats or simple values beyond true/false/null, nesting at
most 8 levels, no trailing bytes, unknown fields refused with a bad-request
naming the field; decoders accept any well-formed integer encoding.
"""

from __future__ import annotations

import secrets
from typing import Any

from conformance._case import CaseFailed, Informational, case
from conformance._connection import Connection
from conformance._context import ANY_ID, Context
from conformance._schema import Field
from conformance._wire import cbor_map, encode, frame, head, text

#: Tags a decoder might know and honour (cbor2's, and the registered "self-described" ones).
NOTABLE_TAGS = (
    1004,
    1040,
    22098,
    25441,
    43000,
    55799,
    55800,
    55801,
    2**16 - 1,
    2**32 - 1,
    2**64 - 1,
)
BATCH = 50


def _refusals(
    ctx: Context,
    c: Connection,
    payloads: list[tuple[bytes, str]],
    *,
    request_id: int | object | None = ANY_ID,
) -> None:
    """Each payload (one frame each) gets exactly one bad-request; sent in pipelined batches."""
    for start in range(0, len(payloads), BATCH):
        batch = payloads[start : start + BATCH]
        c.send_quietly(
            b"".join(frame(p) for p, _ in batch), f"{len(batch)} frames: {batch[0][1]}, ..."
        )
        for payload, what in batch:
            reply = c.receive(ctx.options.timeout, quiet=True)
            if reply.error_name != "bad-request":
                c.transcript.add(f"-> {c.label} the frame for {what}: {payload[:24].hex(' ')}")
                raise CaseFailed(f"{what}: expected bad-request, got {reply.summary()}")
            ctx.expect_error(reply, "bad-request", request_id=request_id)
    ctx.expect_usable(c)


@case(
    "CODEC-001",
    "Malformed CBOR (reserved additional information, a stray break byte, an item cut short "
    "inside its frame, a string longer than the frame) gets an unattributed bad-request; the "
    "connection continues.",
    hostile=True,
)
def malformed_cbor(ctx: Context) -> None:
    with ctx.connect() as c:
        _refusals(
            ctx,
            c,
            [
                (b"\x1c", "reserved additional information 28"),
                (b"\xff", "a break byte with no indefinite item"),
                (b"\xa3\x62id\x01", "a map of 3 pairs holding 1"),
                (b"\x7a\x00\x01\x00\x00abc", "a text string announcing 65536 bytes"),
                (b"\x9f\x01\x02", "an indefinite array without its break"),
            ],
            request_id=None,
        )


@case(
    "CODEC-002",
    "A valid request followed by trailing bytes in the same frame is refused with "
    "bad-request and not executed.",
    hostile=True,
)
def trailing_bytes(ctx: Context) -> None:
    with ctx.connect() as c:
        request_id = ctx.next_id()
        payload = encode({"id": request_id, "op": "status"}) + b"\x00"
        c.send_raw(frame(payload), "a status request followed by one 0x00 byte")
        ctx.expect_error(ctx.receive(c), "bad-request")
        ctx.expect_usable(c)


@case(
    "CODEC-003",
    "Duplicate map keys (the top-level id or op, an args field) are refused with bad-request.",
    hostile=True,
)
def duplicate_keys(ctx: Context) -> None:
    request_id = ctx.next_id()
    rid = head(0, request_id)
    namespace = text(ctx.run.namespace())
    with ctx.connect() as c:
        _refusals(
            ctx,
            c,
            [
                (
                    cbor_map((text("id"), rid), (text("op"), text("status")), (text("id"), rid)),
                    "id twice",
                ),
                (
                    cbor_map(
                        (text("id"), rid),
                        (text("op"), text("status")),
                        (text("op"), text("status")),
                    ),
                    "op twice",
                ),
                (
                    cbor_map(
                        (text("id"), rid),
                        (text("op"), text("create-dek")),
                        (
                            text("args"),
                            cbor_map(
                                (text("namespace"), namespace), (text("namespace"), namespace)
                            ),
                        ),
                    ),
                    "args.namespace twice",
                ),
            ],
        )


@case(
    "CODEC-004",
    "Indefinite-length items (the request map, the args map, a text, a byte string, an array) "
    "are refused with bad-request.",
    hostile=True,
)
def indefinite_lengths(ctx: Context) -> None:
    rid = head(0, ctx.next_id())
    op = (text("op"), text("status"))
    with ctx.connect() as c:
        _refusals(
            ctx,
            c,
            [
                (
                    b"\xbf" + text("id") + rid + text("op") + text("status") + b"\xff",
                    "indefinite request map",
                ),
                (
                    cbor_map((text("id"), rid), op, (text("args"), b"\xbf\xff")),
                    "indefinite args map",
                ),
                (
                    cbor_map(
                        (text("id"), rid),
                        (text("op"), b"\x7f" + text("sta") + text("tus") + b"\xff"),
                    ),
                    "indefinite text",
                ),
                (
                    cbor_map(
                        (text("id"), rid),
                        (text("op"), text("unwrap")),
                        (text("args"), cbor_map((text("blob"), b"\x5f\x41\x00\xff"))),
                    ),
                    "indefinite byte string",
                ),
                (
                    cbor_map(
                        (text("id"), rid),
                        (text("op"), text("hello")),
                        (text("args"), cbor_map((text("versions"), b"\x9f\x01\xff"))),
                    ),
                    "indefinite array",
                ),
            ],
        )


@case(
    "CODEC-005",
    "Every CBOR tag number 0..1023 and each notable larger one (1004, 55799, 2**64-1, ...), "
    "on the whole request or on an args value, is refused with bad-request.",
    hostile=True,
)
def every_tag(ctx: Context) -> None:
    request = encode({"id": ctx.next_id(), "op": "status"})
    tags = [*range(1024), *NOTABLE_TAGS]
    payloads = [(head(6, tag) + request, f"tag {tag} on the request") for tag in tags]
    rid = head(0, ctx.next_id())
    for tag in (0, 1, 2, 3, 21, 24, 32, 35, 258, *NOTABLE_TAGS):
        value = head(6, tag) + text(ctx.run.namespace())
        payloads.append(
            (
                cbor_map(
                    (text("id"), rid),
                    (text("op"), text("create-dek")),
                    (text("args"), cbor_map((text("namespace"), value))),
                ),
                f"tag {tag} on args.namespace",
            )
        )
    with ctx.connect() as c:
        _refusals(ctx, c, payloads)
    ctx.note(f"{len(payloads)} tagged frames refused")


@case(
    "CODEC-006",
    "Nesting past the 8-level limit (9 levels, and 60,000 levels in one frame) is refused "
    "with bad-request, without harm to the server.",
    hostile=True,
)
def deep_nesting(ctx: Context) -> None:
    def nested(levels: int) -> bytes:
        return b"\x81" * (levels - 1) + b"\x80"

    rid = head(0, ctx.next_id())
    with ctx.connect() as c:
        _refusals(
            ctx,
            c,
            [
                (
                    cbor_map(
                        (text("id"), rid),
                        (text("op"), text("status")),
                        (text("args"), cbor_map((text("x"), nested(8)))),
                    ),
                    "9 levels",
                ),
                (nested(60_000), "60,000 nested arrays"),
                (b"\xa1\x61a" * 20_000 + b"\x00", "20,000 nested maps"),
            ],
        )


@case(
    "CODEC-007",
    "Floats, undefined and other simple values are refused with bad-request, as a request id "
    "and as an args value.",
    hostile=True,
)
def floats_and_simple_values(ctx: Context) -> None:
    rid = head(0, ctx.next_id())
    values = {
        "half float": b"\xf9\x3c\x00",
        "single float": b"\xfa\x3f\x80\x00\x00",
        "double float": b"\xfb\x3f\xf0\x00\x00\x00\x00\x00\x00",
        "undefined": b"\xf7",
        "simple(16)": b"\xf0",
        "simple(255)": b"\xf8\xff",
    }
    payloads = []
    for name, value in values.items():
        payloads.append(
            (cbor_map((text("id"), value), (text("op"), text("status"))), f"{name} as id")
        )
        payloads.append(
            (
                cbor_map(
                    (text("id"), rid),
                    (text("op"), text("get-dek")),
                    (text("args"), cbor_map((text("dek-id"), value))),
                ),
                f"{name} as args.dek-id",
            )
        )
    with ctx.connect() as c:
        _refusals(ctx, c, payloads)


@case(
    "CODEC-008",
    "Map keys that are not text (integer, byte string, array) are refused with bad-request.",
    hostile=True,
)
def non_text_keys(ctx: Context) -> None:
    rid = head(0, ctx.next_id())
    with ctx.connect() as c:
        _refusals(
            ctx,
            c,
            [
                (
                    cbor_map(
                        (text("id"), rid), (text("op"), text("status")), (head(0, 1), head(0, 1))
                    ),
                    "an integer key",
                ),
                (
                    cbor_map((text("id"), rid), (text("op"), text("status")), (b"\x42id", rid)),
                    "a byte-string key",
                ),
                (
                    cbor_map(
                        (text("id"), rid),
                        (text("op"), text("get-dek")),
                        (text("args"), cbor_map((b"\x80", text("x")))),
                    ),
                    "an array key in args",
                ),
            ],
        )


@case(
    "CODEC-009",
    "A text string that is not valid UTF-8 is refused with bad-request.",
    hostile=True,
)
def invalid_utf8(ctx: Context) -> None:
    rid = head(0, ctx.next_id())
    with ctx.connect() as c:
        _refusals(
            ctx,
            c,
            [
                (cbor_map((text("id"), rid), (text("op"), b"\x62\xff\xfe")), "op as invalid UTF-8"),
                (
                    cbor_map(
                        (text("id"), rid),
                        (text("op"), text("get-dek")),
                        (text("args"), cbor_map((text("dek-id"), b"\x63a\xc3\x28"))),
                    ),
                    "args.dek-id with a broken two-byte sequence",
                ),
            ],
        )


# -- message shapes, from the CDDL's request rules -------------------------------------------


def category(field: Field) -> str:
    """The CBOR kind the field's CDDL type asks for: text, bytes, uint, bool, array or map."""
    return field.kind


WRONG_VALUES: dict[str, list[Any]] = {
    "text": [1, b"text", [], {}, True, None],
    "bytes": ["bytes", 1, [], {}, False, None],
    "uint": ["1", -1, b"\x01", [], {}, True, None],
    "array": ["1", 1, b"", {}, True, None],
    "map": ["k=v", 1, b"", [], True, None],
    "bool": ["true", 1, b"", [], {}, None],
}


def valid_value(ctx: Context, field: Field) -> Any:
    """A value the server accepts for ``field`` (so only the field under test is wrong)."""
    assert ctx.run.baseline is not None
    known = {
        "versions": [1],
        "namespace": ctx.run.namespace(),
        "kek": ctx.run.namespace(),
        "name": ctx.run.namespace("kek"),
        "dek-id": ctx.run.baseline[0],
        "idempotency-key": secrets.token_bytes(16),
        "context": {},
        "blob": b"",
        "prefix": "conformance",
        "client": "kmipd-conformance",
        # Lifecycle fields (their operations are the administrator's; --cert is refused them).
        "key": {"dek-id": ctx.run.baseline[0]},
        "reason": "unspecified",
        "version": 1,
        "seq": 0,
        "job-id": "conformance",
        # Certificates: a CSR of the right shape (the server parses it only after the
        # schema check) and a profile from its choice.
        "csr": b"\x30\x00",
        "profile": "client",
        "serial": "1",
        # Signing keys: a key type from its choice, a digest and a signature of a valid
        # size (the server checks the algorithm and the digest's length after the schema).
        "key-type": "p256",
        "algorithm": "ES256",
        "digest": bytes(32),
        "signature": b"\x30\x00",
        # Managed certificates: a policy with its required fields, DER of the right shape.
        "policy": {"key-type": "p256", "validity": 86400},
        "certificate": b"\x30\x00",
    }
    if field.name == "key" and category(field) == "bytes":
        return b"\x30\x00"  # import-managed-certificate's PKCS#8 key, not a key reference
    if field.name in known:
        return known[field.name]
    defaults = {"text": "conformance", "bytes": b"", "uint": 1, "array": [], "map": {}}
    return defaults.get(category(field), False)


def _request(ctx: Context, op: str, args: Any) -> tuple[int, bytes]:
    request_id = ctx.next_id()
    message: dict[str, Any] = {"id": request_id, "op": op}
    if args is not None:
        message["args"] = args
    return request_id, encode(message)


def _attributed_refusals(ctx: Context, cases: list[tuple[str, Any, str, str]]) -> int:
    """(op, args, field the message must name, what) -> a bad-request echoing the id."""
    checked = 0
    with ctx.connect(hello=False, label="pre-hello") as fresh, ctx.connect() as ready:
        for op, args, field, what in cases:
            c = fresh if op == "hello" else ready
            request_id, payload = _request(ctx, op, args)
            c.send_raw(frame(payload), what)
            reply = ctx.receive(c)
            ctx.expect_error(reply, "bad-request", request_id=request_id, mentions=field)
            checked += 1
        ctx.expect_usable(ready)
        ctx.expect_result(ctx.hello(fresh), "hello-result")
    return checked


@case(
    "CODEC-010",
    "Each args field of each operation in protocol.cddl, given a value of a wrong type, gets "
    "a bad-request that echoes the id and names the field.",
    hostile=True,
)
def wrong_types(ctx: Context) -> None:
    cases: list[tuple[str, Any, str, str]] = []
    for op, shape in ctx.schema.requests.items():
        for field in shape.args or ():
            base = {f.name: valid_value(ctx, f) for f in shape.args or () if not f.optional}
            for wrong in WRONG_VALUES[category(field)]:
                cases.append(
                    (op, {**base, field.name: wrong}, field.name, f"{op}: {field.name}={wrong!r}")
                )
        cases.append((op, [], "args", f"{op}: args as an array"))
    checked = _attributed_refusals(ctx, cases)
    with ctx.connect() as c:
        wrong_ops: list[Any] = [1, b"status", [], None]
        for wrong_op in wrong_ops:
            request_id = ctx.next_id()
            c.send({"id": request_id, "op": wrong_op})
            ctx.expect_error(ctx.receive(c), "bad-request", request_id=request_id, mentions="op")
        ids = ["1", -1, b"\x01", [1], {}, True, None]
        _refusals(
            ctx, c, [(encode({"id": i, "op": "status"}), f"id={i!r}") for i in ids], request_id=None
        )
    ctx.note(f"{checked + 4 + len(ids)} wrongly typed requests refused")


@case(
    "CODEC-011",
    "A request missing a required field (each required args field of each operation, args "
    "itself, op) gets a bad-request naming it; one missing its id gets an unattributed one.",
    hostile=True,
)
def missing_fields(ctx: Context) -> None:
    cases: list[tuple[str, Any, str, str]] = []
    for op, shape in ctx.schema.requests.items():
        required = [f for f in shape.args or () if not f.optional]
        base = {f.name: valid_value(ctx, f) for f in required}
        for field in required:
            cases.append(
                (
                    op,
                    {k: v for k, v in base.items() if k != field.name},
                    field.name,
                    f"{op} without {field.name}",
                )
            )
        if shape.args is not None and not shape.args_optional and required:
            cases.append((op, None, required[0].name, f"{op} without args"))
    checked = _attributed_refusals(ctx, cases)
    with ctx.connect() as c:
        request_id = ctx.next_id()
        c.send({"id": request_id, "args": {}})
        ctx.expect_error(ctx.receive(c), "bad-request", request_id=request_id, mentions="op")
        _refusals(ctx, c, [(encode({"op": "status"}), "no id")], request_id=None)
    ctx.note(f"{checked + 2} incomplete requests refused")


@case(
    "CODEC-012",
    "Unknown fields, at the top level and inside each operation's args, are refused with a "
    "bad-request that echoes the id and names the field (the documented behaviour).",
    hostile=True,
)
def unknown_fields(ctx: Context) -> None:
    cases = []
    for op, shape in ctx.schema.requests.items():
        base = {f.name: valid_value(ctx, f) for f in shape.args or () if not f.optional}
        cases.append(
            (op, {**base, "conformance-extra": 1}, "conformance-extra", f"{op}: unknown args field")
        )
    checked = _attributed_refusals(ctx, cases)
    with ctx.connect() as c:
        request_id = ctx.next_id()
        c.send({"id": request_id, "op": "status", "conformance-extra": True})
        ctx.expect_error(
            ctx.receive(c), "bad-request", request_id=request_id, mentions="conformance-extra"
        )
    ctx.note(f"{checked + 1} requests with unknown fields refused")


@case(
    "CODEC-013",
    "Well-formed but non-preferred encodings (an 8-byte id, long-form lengths, unsorted map "
    "keys) are accepted: decoders accept any well-formed integer encoding.",
)
def non_preferred_accepted(ctx: Context) -> None:
    with ctx.connect() as c:
        request_id = ctx.next_id()
        payload = (
            head(5, 2, width=1)
            + text("op")
            + head(3, 6, width=2)
            + b"status"
            + text("id")
            + head(0, request_id, width=8)
        )
        c.send_raw(frame(payload), "status with a 1-byte map length, 2-byte text length, 8-byte id")
        ctx.expect_result(ctx.receive(c), "status-result", request_id=request_id)


@case(
    "CODEC-014",
    "A request that is not a map (array, integer, text, bytes, null, true) gets an "
    "unattributed bad-request.",
    hostile=True,
)
def request_not_a_map(ctx: Context) -> None:
    values: list[Any] = [[1, "status"], 1, "status", b"status", None, True]
    with ctx.connect() as c:
        _refusals(ctx, c, [(encode(v), f"{v!r} as the request") for v in values], request_id=None)


@case(
    "CODEC-015",
    "Request ids 0 and 2**64-1 are echoed exactly; -1 and 2**64 (a bignum tag) get an "
    "unattributed bad-request.",
)
def id_boundaries(ctx: Context) -> None:
    with ctx.connect() as c:
        for request_id in (0, 2**64 - 1):
            c.send({"id": request_id, "op": "status"})
            ctx.expect_result(ctx.receive(c), "status-result", request_id=request_id)
        _refusals(
            ctx,
            c,
            [
                (encode({"id": -1, "op": "status"}), "id -1"),
                (
                    cbor_map(
                        (text("id"), b"\xc2\x49\x01" + b"\x00" * 8), (text("op"), text("status"))
                    ),
                    "id 2**64",
                ),
            ],
            request_id=None,
        )


@case(
    "CODEC-016",
    "The server's responses use preferred (shortest) serialization, as encoders should.",
)
def responses_preferred(ctx: Context) -> None:
    assert ctx.run.baseline is not None
    with ctx.connect() as c:
        replies = [
            ctx.request(c, "status"),
            ctx.request(c, "get-dek", {"dek-id": ctx.run.baseline[0]}),
            ctx.request(c, "no-such-operation"),
        ]
    offenders = [r.summary() for r in replies if r.non_preferred]
    if offenders:
        raise Informational(f"non-preferred encodings in: {offenders} (a 'should', not a 'must')")
