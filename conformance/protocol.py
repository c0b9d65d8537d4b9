"""Version negotiation, every operation's success path, every error a client can provoke,
request ids, pipelining, the in-flight limit, and the drain on shutdown."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from conformance._case import CaseFailed, CaseSkipped, Informational, When, case
from conformance._connection import Connection, ConnectionClosed, Message
from conformance._context import Context
from conformance._wire import encode, frame, request_frame

#: Codes only the server's own condition produces; no client can provoke them from outside
#: (protect-stop-passed needs a crypto-period to run out, audit-unavailable a broken audit file).
SERVER_CONDITIONS = {
    "busy",
    "shutting-down",
    "hsm-unavailable",
    "internal",
    "protect-stop-passed",
    "audit-unavailable",
    "store-outcome-unknown",
    # Only where the server's configuration requires sealed delivery (transport.require_sealed).
    "sealed-delivery-required",
}


# -- hello ---------------------------------------------------------------------------------------


@case(
    "PROTO-001",
    "hello offering version 1 succeeds: the result matches hello-result, picks version 1 and "
    "announces positive max-frame-size and max-in-flight.",
)
def hello_supported(ctx: Context) -> None:
    with ctx.connect(hello=False) as c:
        result = ctx.expect_result(ctx.hello(c, [1]), "hello-result")
        ctx.expect(result["version"] == 1, f"version {result['version']} chosen from [1]")
        ctx.expect(result["max-frame-size"] > 0 and result["max-in-flight"] > 0, "zero limits")


@case(
    "PROTO-002",
    "hello offering several versions gets the highest one both sides speak.",
)
def hello_picks_highest_common(ctx: Context) -> None:
    with ctx.connect(hello=False) as c:
        result = ctx.expect_result(ctx.hello(c, [65535, 7, 1]), "hello-result")
        ctx.expect(result["version"] == 1, f"version {result['version']} chosen from [65535, 7, 1]")


@case(
    "PROTO-003",
    "hello offering only unsupported versions gets unsupported-version (id echoed, message "
    "naming the versions spoken); a second hello on the same connection then succeeds.",
)
def hello_unsupported(ctx: Context) -> None:
    with ctx.connect(hello=False) as c:
        request_id = ctx.next_id()
        reply = c.request(request_id, "hello", {"versions": [2, 65535]})
        ctx.expect_error(reply, "unsupported-version", request_id=request_id, mentions="1")
        ctx.expect_result(ctx.hello(c, [1]), "hello-result")


@case(
    "PROTO-004",
    "hello without versions (no args, empty args, an empty list) gets bad-request, not a "
    "hang; the connection still negotiates afterwards.",
    hostile=True,
)
def hello_versions_absent(ctx: Context) -> None:
    with ctx.connect(hello=False) as c:
        attempts: list[dict[str, Any] | None] = [None, {}, {"versions": []}]
        for args in attempts:
            request_id = ctx.next_id()
            reply = c.request(request_id, "hello", args)
            ctx.expect_error(reply, "bad-request", request_id=request_id)
        ctx.expect_result(ctx.hello(c), "hello-result")


@case(
    "PROTO-005",
    "A request before hello gets hello-required with its id echoed; hello then works.",
)
def hello_required(ctx: Context) -> None:
    with ctx.connect(hello=False) as c:
        request_id = ctx.next_id()
        ctx.expect_error(c.request(request_id, "status"), "hello-required", request_id=request_id)
        ctx.expect_result(ctx.hello(c), "hello-result")
        ctx.expect_usable(c)


@case(
    "PROTO-006",
    "A second hello after a successful one gets bad-request; the connection continues.",
)
def hello_twice(ctx: Context) -> None:
    with ctx.connect() as c:
        request_id = ctx.next_id()
        ctx.expect_error(
            c.request(request_id, "hello", {"versions": [1]}), "bad-request", request_id=request_id
        )
        ctx.expect_usable(c)


@case(
    "PROTO-007",
    "Requests pipelined behind the hello in the same write are all answered.",
)
def pipelined_behind_hello(ctx: Context) -> None:
    with ctx.connect(hello=False) as c:
        c.send_raw(
            request_frame(1, "hello", {"versions": [1]})
            + request_frame(2, "status")
            + request_frame(3, "status"),
            "hello, status, status in one write",
        )
        replies = {m.id: m for m in (ctx.receive(c) for _ in range(3))}
        ctx.expect(set(replies) == {1, 2, 3}, f"answered ids {sorted(replies, key=str)}")
        ctx.expect_result(replies[1], "hello-result")
        ctx.expect_result(replies[2], "status-result")


# -- every operation's success path ------------------------------------------------------------


@case(
    "PROTO-010",
    "status succeeds for any authenticated client; its result matches status-result.",
)
def status_success(ctx: Context) -> None:
    with ctx.connect() as c:
        result = ctx.expect_result(ctx.request(c, "status"), "status-result")
        ctx.expect(result["state"] == "serving", f"state is {result['state']!r} on an idle server")


@case(
    "PROTO-011",
    "create-dek returns a dek-result for a new 256-bit key in the namespace asked; get-dek "
    "of its id returns the same key from any connection.",
)
def create_and_get_dek(ctx: Context) -> None:
    namespace = ctx.run.namespace("deks")
    with ctx.connect() as c:
        created = ctx.expect_result(
            ctx.request(c, "create-dek", {"namespace": namespace}), "dek-result"
        )
        ctx.expect(created["namespace"] == namespace, f"namespace {created['namespace']!r}")
        again = ctx.expect_result(
            ctx.request(c, "create-dek", {"namespace": namespace}), "dek-result"
        )
        ctx.expect(again["dek-id"] != created["dek-id"], "two create-dek calls returned one id")
        ctx.expect(again["key"] != created["key"], "two create-dek calls returned one key")
    with ctx.connect() as other:
        got = ctx.expect_result(
            ctx.request(other, "get-dek", {"dek-id": created["dek-id"]}), "dek-result"
        )
    ctx.expect(got == created, "get-dek returned something other than what create-dek made")


@case(
    "PROTO-012",
    "create-dek with an idempotency-key returns the same DEK when retried with that key, and "
    "a new one for another key.",
)
def create_dek_idempotent(ctx: Context) -> None:
    field = next(
        (f for f in ctx.schema.requests["create-dek"].args or () if f.name == "idempotency-key"),
        None,
    )
    if field is None:
        raise CaseSkipped("protocol.cddl has no create-dek idempotency-key")
    namespace = ctx.run.namespace("idempotent")
    token = secrets.token_bytes(16)
    with ctx.connect() as c:
        first = ctx.expect_result(
            ctx.request(c, "create-dek", {"namespace": namespace, "idempotency-key": token}),
            "dek-result",
        )
    with ctx.connect() as c:
        retry = ctx.expect_result(
            ctx.request(c, "create-dek", {"namespace": namespace, "idempotency-key": token}),
            "dek-result",
        )
        other = ctx.expect_result(
            ctx.request(
                c,
                "create-dek",
                {"namespace": namespace, "idempotency-key": secrets.token_bytes(16)},
            ),
            "dek-result",
        )
    ctx.expect(retry == first, "a retry with the same idempotency-key made another DEK")
    ctx.expect(other["dek-id"] != first["dek-id"], "another idempotency-key returned the same DEK")


@case(
    "PROTO-013",
    "generate-data-key returns a key and a blob; unwrap of the blob with the same context "
    "returns the same key and KEK version.",
)
def data_key_round_trip(ctx: Context) -> None:
    kek = ctx.run.namespace("data-keys")
    context = {"volume": "v7", "purpose": "conformance"}
    with ctx.connect() as c:
        made = ctx.expect_result(
            ctx.request(c, "generate-data-key", {"kek": kek, "context": context}), "data-key-result"
        )
        ctx.expect(made["kek"] == kek, f"kek {made['kek']!r}")
        blob_problem = ctx.schema.validate("data-key-blob", made["blob"])
        ctx.expect(blob_problem is None, f"the blob is not a data-key-blob: {blob_problem}")
        back = ctx.expect_result(
            ctx.request(
                c, "unwrap", {"blob": made["blob"], "context": dict(reversed(context.items()))}
            ),
            "unwrap-result",
        )
    ctx.expect(back["key"] == made["key"], "unwrap returned another key")
    ctx.expect(
        (back["kek"], back["kek-version"]) == (made["kek"], made["kek-version"]),
        "unwrap named another KEK version",
    )


@case(
    "PROTO-014",
    "An administrator's create-kek returns kek-info for the new KEK; list-keks then lists it "
    "(and honours the prefix).",
)
def admin_operations(ctx: Context) -> None:
    admin = ctx.need_admin()
    name = ctx.run.namespace("admin-kek")
    with ctx.connect(admin) as c:
        info = ctx.expect_result(ctx.request(c, "create-kek", {"name": name}), "kek-info")
        ctx.expect(info["name"] == name and info["version"] >= 1, f"kek-info {info}")
        listed = ctx.expect_result(
            ctx.request(c, "list-keks", {"prefix": name}), "list-keks-result"
        )
        names = [k["name"] for k in listed["keks"]]
        ctx.expect(name in names, f"list-keks with prefix {name!r} returned {names}")
        ctx.expect(all(n.startswith(name) for n in names), f"prefix not honoured: {names}")
        everything = ctx.expect_result(ctx.request(c, "list-keks"), "list-keks-result")
        ctx.expect(
            name in [k["name"] for k in everything["keks"]], "list-keks without prefix misses it"
        )


# -- errors a client can provoke ---------------------------------------------------------------


@case(
    "PROTO-020",
    "An unknown operation gets unknown-operation with the id echoed; the connection continues.",
)
def unknown_operation(ctx: Context) -> None:
    with ctx.connect() as c:
        request_id = ctx.next_id()
        ctx.expect_error(
            c.request(request_id, "conformance-no-such-op"),
            "unknown-operation",
            request_id=request_id,
        )
        ctx.expect_usable(c)


@case(
    "PROTO-021",
    "get-dek of an id that does not exist gets not-found with the id echoed.",
)
def dek_not_found(ctx: Context) -> None:
    with ctx.connect() as c:
        request_id = ctx.next_id()
        reply = c.request(request_id, "get-dek", {"dek-id": "conformance-" + secrets.token_hex(8)})
        ctx.expect_error(reply, "not-found", request_id=request_id)


@case(
    "PROTO-022",
    "unwrap with a context other than the one given at generation, or of a blob with a "
    "flipped bit, gets integrity-failure and no key.",
)
def integrity_failure(ctx: Context) -> None:
    kek = ctx.run.namespace("integrity")
    with ctx.connect() as c:
        made = ctx.expect_result(
            ctx.request(c, "generate-data-key", {"kek": kek, "context": {"volume": "v1"}}),
            "data-key-result",
        )
        for context in ({"volume": "v2"}, {}, {"volume": "v1", "extra": ""}):
            request_id = ctx.next_id()
            reply = c.request(request_id, "unwrap", {"blob": made["blob"], "context": context})
            ctx.expect_error(reply, "integrity-failure", request_id=request_id)
        tampered = bytearray(made["blob"])
        tampered[-1] ^= 0x01  # the last byte is inside the wrapped key's GCM tag
        request_id = ctx.next_id()
        reply = c.request(
            request_id, "unwrap", {"blob": bytes(tampered), "context": {"volume": "v1"}}
        )
        ctx.expect_error(reply, "integrity-failure", request_id=request_id)


@case(
    "PROTO-023",
    "create-kek of a KEK that exists gets already-exists (administrator).",
)
def already_exists(ctx: Context) -> None:
    admin = ctx.need_admin()
    name = ctx.run.namespace("twice")
    with ctx.connect(admin) as c:
        ctx.expect_result(ctx.request(c, "create-kek", {"name": name}), "kek-info")
        request_id = ctx.next_id()
        ctx.expect_error(
            c.request(request_id, "create-kek", {"name": name}),
            "already-exists",
            request_id=request_id,
        )


@case(
    "PROTO-024",
    "A request id reused while its request is in flight gets an unattributed "
    "duplicate-request-id; the original request is still answered once.",
)
def duplicate_request_id(ctx: Context) -> None:
    with ctx.connect() as c:
        request_id = ctx.next_id()
        first = request_frame(request_id, "create-dek", {"namespace": ctx.run.namespace("dup")})
        c.send_raw(first + first, "the same create-dek twice in one write")
        replies = [ctx.receive(c), ctx.receive(c)]
        duplicates = [r for r in replies if r.error_name == "duplicate-request-id"]
        answered = [r for r in replies if r.id == request_id]
        if not duplicates:
            raise CaseFailed(
                "the second frame reused an id in flight but got no duplicate-request-id: "
                + "; ".join(r.summary() for r in replies)
            )
        ctx.expect_error(duplicates[0], "duplicate-request-id", request_id=None)
        ctx.expect(len(answered) == 1, f"the original request was answered {len(answered)} times")
        ctx.expect_result(answered[0], "dek-result")
        ctx.expect_usable(c)


@case(
    "PROTO-025",
    "Invalid values (a namespace breaking the name rules or over 128 characters, a bad dek-id, "
    "a blob over 1024 bytes, too many context entries) get bad-request naming the field.",
    hostile=True,
)
def invalid_values(ctx: Context) -> None:
    bad: list[tuple[str, dict[str, Any], str]] = [
        ("create-dek", {"namespace": "../etc"}, "namespace"),
        ("create-dek", {"namespace": "/leading"}, "namespace"),
        ("create-dek", {"namespace": "a" * 129}, "namespace"),
        ("create-dek", {"namespace": ""}, "namespace"),
        ("get-dek", {"dek-id": "has space"}, "dek-id"),
        ("get-dek", {"dek-id": "x" * 65}, "dek-id"),
        ("unwrap", {"blob": b"\0" * 1025}, "blob"),
        (
            "generate-data-key",
            {"kek": ctx.run.namespace(), "context": {str(i): "" for i in range(33)}},
            "context",
        ),
        (
            "create-dek",
            {"namespace": ctx.run.namespace(), "idempotency-key": b"short"},
            "idempotency-key",
        ),
    ]
    with ctx.connect() as c:
        for op, args, field in bad:
            request_id = ctx.next_id()
            ctx.expect_error(
                c.request(request_id, op, args),
                "bad-request",
                request_id=request_id,
                mentions=field,
            )
        ctx.expect_usable(c)


@case(
    "PROTO-026",
    "Error messages never echo more than a short piece of the client's input.",
    hostile=True,
)
def short_error_messages(ctx: Context) -> None:
    marker = "conformance-echo-" + "x" * 2000
    with ctx.connect() as c:
        replies = [
            ctx.request(c, "create-dek", {"namespace": marker}),
            ctx.request(c, marker),
            ctx.request(c, "get-dek", {"dek-id": marker}),
        ]
        c.send({"id": ctx.next_id(), "op": "status", marker: 1})
        replies.append(ctx.receive(c))
    for reply in replies:
        ctx.expect(reply.is_error, f"expected an error, got {reply.summary()}")
        ctx.expect(
            "x" * 100 not in reply.error_message,
            f"the error message echoes {len(reply.error_message)} characters of input",
        )


# -- key lifecycle (PROTOCOL.md 4.3), where protocol.cddl defines it --------------------------


def _need_ops(ctx: Context, *ops: str) -> None:
    missing = [op for op in ops if op not in ctx.schema.requests]
    if missing:
        raise CaseSkipped(f"protocol.cddl defines no {', '.join(missing)}")


def _expect_code(
    ctx: Context, c: Connection, op: str, args: dict[str, Any] | None, name: str
) -> None:
    request_id = ctx.next_id()
    ctx.expect_error(c.request(request_id, op, args), name, request_id=request_id)


def _state(ctx: Context, c: Connection, key: dict[str, Any]) -> str:
    attributes = ctx.expect_result(ctx.request(c, "get-attributes", {"key": key}), "key-attributes")
    return str(attributes["state"])


@case(
    "PROTO-040",
    "rotate-kek makes a new KEK version that new DEKs use, while DEKs under the old one still "
    "come back unchanged; get-attributes describes both (administrator).",
)
def rotate_kek(ctx: Context) -> None:
    _need_ops(ctx, "rotate-kek", "get-attributes")
    admin = ctx.need_admin()
    namespace = ctx.run.namespace("rotate")
    with ctx.connect() as data, ctx.connect(admin) as c:
        old = ctx.expect_result(
            ctx.request(data, "create-dek", {"namespace": namespace}), "dek-result"
        )
        rotated = ctx.expect_result(
            ctx.request(c, "rotate-kek", {"name": namespace}), "key-attributes"
        )
        ctx.expect(
            rotated["version"] == old["kek-version"] + 1, f"rotated to version {rotated['version']}"
        )
        new = ctx.expect_result(
            ctx.request(data, "create-dek", {"namespace": namespace}), "dek-result"
        )
        ctx.expect(
            new["kek-version"] == rotated["version"], "a new DEK is not under the new version"
        )
        again = ctx.expect_result(
            ctx.request(data, "get-dek", {"dek-id": old["dek-id"]}), "dek-result"
        )
        ctx.expect(again == old, "the DEK under the old KEK version changed")
        dek = ctx.expect_result(
            ctx.request(c, "get-attributes", {"key": {"dek-id": old["dek-id"]}}), "key-attributes"
        )
        ctx.expect((dek["kind"], dek["state"]) == ("dek", "active"), f"DEK attributes {dek}")
        kek = ctx.expect_result(
            ctx.request(c, "get-attributes", {"key": {"kek": namespace, "version": 1}}),
            "key-attributes",
        )
        ctx.expect(kek["kind"] == "kek", f"KEK attributes {kek}")


@case(
    "PROTO-041",
    "revoke (superseded) deactivates a DEK (key-deactivated); destroying an active DEK is "
    "wrong-state; destroy schedules it (destroy-pending), recover cancels that, and purge-now "
    "destroys it for good (key-destroyed) (administrator).",
)
def revoke_destroy_recover(ctx: Context) -> None:
    _need_ops(ctx, "revoke", "destroy", "recover", "get-attributes")
    admin = ctx.need_admin()
    with ctx.connect() as data, ctx.connect(admin) as c:
        made = ctx.expect_result(
            ctx.request(data, "create-dek", {"namespace": ctx.run.namespace("revoke")}),
            "dek-result",
        )
        key = {"dek-id": made["dek-id"]}
        _expect_code(ctx, c, "destroy", {"key": key}, "wrong-state")
        revoked = ctx.expect_result(
            ctx.request(
                c, "revoke", {"key": key, "reason": "superseded", "message": "conformance"}
            ),
            "key-attributes",
        )
        ctx.expect(revoked["state"] == "deactivated", f"revoked (superseded) -> {revoked['state']}")
        _expect_code(ctx, data, "get-dek", key, "key-deactivated")
        pending = ctx.expect_result(ctx.request(c, "destroy", {"key": key}), "key-attributes")
        ctx.expect(
            pending["state"] == "deactivated" and "purge-at" in pending,
            f"a scheduled destroy -> state {pending['state']}, purge-at {pending.get('purge-at')}",
        )
        _expect_code(ctx, data, "get-dek", key, "destroy-pending")
        recovered = ctx.expect_result(ctx.request(c, "recover", {"key": key}), "key-attributes")
        ctx.expect("purge-at" not in recovered, "recover left the destroy scheduled")
        ctx.expect(
            _state(ctx, c, key) == recovered["state"], "get-attributes disagrees with recover"
        )
        destroyed = ctx.expect_result(
            ctx.request(c, "destroy", {"key": key, "purge-now": True}), "key-attributes"
        )
        ctx.expect(destroyed["state"] == "destroyed", f"purge-now -> {destroyed['state']}")
        _expect_code(ctx, data, "get-dek", key, "key-destroyed")


@case(
    "PROTO-042",
    "revoke for key-compromise marks a DEK compromised: get-dek then gets key-compromised "
    "(administrator).",
)
def revoke_compromised(ctx: Context) -> None:
    _need_ops(ctx, "revoke")
    admin = ctx.need_admin()
    with ctx.connect() as data, ctx.connect(admin) as c:
        made = ctx.expect_result(
            ctx.request(data, "create-dek", {"namespace": ctx.run.namespace("compromise")}),
            "dek-result",
        )
        key = {"dek-id": made["dek-id"]}
        result = ctx.expect_result(
            ctx.request(c, "revoke", {"key": key, "reason": "key-compromise"}), "key-attributes"
        )
        ctx.expect(
            result["state"] == "compromised", f"revoked (key-compromise) -> {result['state']}"
        )
        _expect_code(ctx, data, "get-dek", key, "key-compromised")


@case(
    "PROTO-043",
    "A KEK created with a future activation date is pre-active: wrapping under it gets "
    "key-not-active until activate makes it active (administrator).",
)
def activate_pre_active(ctx: Context) -> None:
    _need_ops(ctx, "activate")
    admin = ctx.need_admin()
    name = ctx.run.namespace("pre-active")
    with ctx.connect() as data, ctx.connect(admin) as c:
        created = ctx.expect_result(
            ctx.request(c, "create-kek", {"name": name, "activation": int(time.time()) + 86400}),
            "kek-info",
        )
        _expect_code(ctx, data, "create-dek", {"namespace": name}, "key-not-active")
        active = ctx.expect_result(
            ctx.request(c, "activate", {"key": {"kek": name, "version": created["version"]}}),
            "key-attributes",
        )
        ctx.expect(active["state"] == "active", f"activate -> {active['state']}")
        ctx.expect_result(ctx.request(data, "create-dek", {"namespace": name}), "dek-result")


@case(
    "PROTO-044",
    "Usage is fixed at creation: a decrypt-only DEK fetched for encryption, and wrapping under "
    "an unwrap-only KEK, get usage-not-permitted.",
)
def usage_not_permitted(ctx: Context) -> None:
    with ctx.connect() as data:
        made = ctx.expect_result(
            ctx.request(
                data, "create-dek", {"namespace": ctx.run.namespace("usage"), "usage": ["decrypt"]}
            ),
            "dek-result",
        )
        _expect_code(
            ctx,
            data,
            "get-dek",
            {"dek-id": made["dek-id"], "purpose": "encrypt"},
            "usage-not-permitted",
        )
        ctx.expect_result(
            ctx.request(data, "get-dek", {"dek-id": made["dek-id"], "purpose": "decrypt"}),
            "dek-result",
        )
    if ctx.target.admin is not None:
        name = ctx.run.namespace("unwrap-only")
        with ctx.connect(ctx.target.admin) as c, ctx.connect() as data:
            ctx.expect_result(
                ctx.request(c, "create-kek", {"name": name, "usage": ["unwrap"]}), "kek-info"
            )
            _expect_code(ctx, data, "create-dek", {"namespace": name}, "usage-not-permitted")


@case(
    "PROTO-045",
    "dependents counts the DEKs under a KEK version; destroying a revoked version that still "
    "has dependents gets dependents-exist (administrator).",
)
def dependents_exist(ctx: Context) -> None:
    _need_ops(ctx, "dependents", "rotate-kek", "revoke", "destroy")
    admin = ctx.need_admin()
    namespace = ctx.run.namespace("dependents")
    with ctx.connect() as data, ctx.connect(admin) as c:
        made = [
            ctx.expect_result(
                ctx.request(data, "create-dek", {"namespace": namespace}), "dek-result"
            )
            for _ in range(3)
        ]
        result = ctx.expect_result(
            ctx.request(c, "dependents", {"kek": namespace, "version": 1}), "dependents-result"
        )
        ctx.expect(result["count"] == 3, f"dependents counted {result['count']} of 3")
        ctx.expect(
            set(result["dek-ids"]) == {m["dek-id"] for m in made}, "dependents named other DEKs"
        )
        ctx.expect_result(ctx.request(c, "rotate-kek", {"name": namespace}), "key-attributes")
        version_1 = {"kek": namespace, "version": 1}
        ctx.expect_result(
            ctx.request(c, "revoke", {"key": version_1, "reason": "superseded"}), "key-attributes"
        )
        _expect_code(ctx, c, "destroy", {"key": version_1}, "dependents-exist")


@case(
    "PROTO-046",
    "rewrap-dek and rewrap-blob move a DEK and a data-key blob to the newest KEK version "
    "without changing the key.",
)
def rewrap(ctx: Context) -> None:
    _need_ops(ctx, "rewrap-dek", "rewrap-blob", "rotate-kek")
    admin = ctx.need_admin()
    namespace = ctx.run.namespace("rewrap")
    with ctx.connect() as data, ctx.connect(admin) as c:
        dek = ctx.expect_result(
            ctx.request(data, "create-dek", {"namespace": namespace}), "dek-result"
        )
        made = ctx.expect_result(
            ctx.request(data, "generate-data-key", {"kek": namespace, "context": {"v": "1"}}),
            "data-key-result",
        )
        rotated = ctx.expect_result(
            ctx.request(c, "rotate-kek", {"name": namespace}), "key-attributes"
        )
        moved = ctx.expect_result(
            ctx.request(data, "rewrap-dek", {"dek-id": dek["dek-id"]}), "key-attributes"
        )
        ctx.expect(
            moved["version"] == rotated["version"], f"rewrap-dek -> version {moved['version']}"
        )
        again = ctx.expect_result(
            ctx.request(data, "get-dek", {"dek-id": dek["dek-id"]}), "dek-result"
        )
        ctx.expect(again["key"] == dek["key"], "rewrap-dek changed the key")
        ctx.expect(
            again["kek-version"] == rotated["version"], "get-dek still names the old version"
        )
        blob = ctx.expect_result(
            ctx.request(data, "rewrap-blob", {"blob": made["blob"], "context": {"v": "1"}}),
            "rewrap-blob-result",
        )
        ctx.expect(blob["kek-version"] == rotated["version"], "rewrap-blob kept the old version")
        back = ctx.expect_result(
            ctx.request(data, "unwrap", {"blob": blob["blob"], "context": {"v": "1"}}),
            "unwrap-result",
        )
        ctx.expect(back["key"] == made["key"], "rewrap-blob changed the key")


@case(
    "PROTO-047",
    "start-rewrap runs a job over a namespace that get-job and list-jobs report, through to "
    "done (administrator).",
)
def rewrap_job(ctx: Context) -> None:
    _need_ops(ctx, "start-rewrap", "get-job", "list-jobs", "rotate-kek")
    admin = ctx.need_admin()
    namespace = ctx.run.namespace("job")
    with ctx.connect() as data, ctx.connect(admin) as c:
        for _ in range(5):
            ctx.expect_result(
                ctx.request(data, "create-dek", {"namespace": namespace}), "dek-result"
            )
        ctx.expect_result(ctx.request(c, "rotate-kek", {"name": namespace}), "key-attributes")
        job = ctx.expect_result(
            ctx.request(c, "start-rewrap", {"namespace": namespace}), "job-info"
        )
        deadline = time.monotonic() + 30
        while job["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.1)  # a background job: no event to wait on
            job = ctx.expect_result(
                ctx.request(c, "get-job", {"job-id": job["job-id"]}), "job-info"
            )
        ctx.expect(job["state"] == "done", f"the job ended {job['state']}: {job}")
        ctx.expect(job["rewrapped"] + job["skipped"] == 5, f"job counts {job}")
        jobs = ctx.expect_result(ctx.request(c, "list-jobs"), "list-jobs-result")
        ctx.expect(job["job-id"] in [j["job-id"] for j in jobs["jobs"]], "list-jobs misses the job")


@case(
    "PROTO-048",
    "locate finds the DEKs of a namespace, page by page with limit and next (administrator).",
)
def locate(ctx: Context) -> None:
    _need_ops(ctx, "locate")
    admin = ctx.need_admin()
    namespace = ctx.run.namespace("locate")
    with ctx.connect() as data, ctx.connect(admin) as c:
        ids = {
            ctx.expect_result(
                ctx.request(data, "create-dek", {"namespace": namespace}), "dek-result"
            )["dek-id"]
            for _ in range(3)
        }
        found: set[str] = set()
        args: dict[str, Any] = {"kind": "dek", "namespace": namespace, "limit": 2}
        for _ in range(5):
            page = ctx.expect_result(ctx.request(c, "locate", args), "locate-result")
            found |= {k["dek-id"] for k in page["keys"]}
            if "next" not in page:
                break
            args = {**args, "after": page["next"]}
        ctx.expect(found == ids, f"locate found {len(found & ids)} of 3 DEKs")


@case(
    "PROTO-049",
    "changes-since reports a revocation to data clients, with a sequence number to resume from.",
)
def changes_since(ctx: Context) -> None:
    _need_ops(ctx, "changes-since", "revoke")
    admin = ctx.need_admin()
    with ctx.connect() as data, ctx.connect(admin) as c:
        start = ctx.expect_result(ctx.request(data, "changes-since", {"seq": 0}), "changes-result")
        made = ctx.expect_result(
            ctx.request(data, "create-dek", {"namespace": ctx.run.namespace("changes")}),
            "dek-result",
        )
        ctx.expect_result(
            ctx.request(c, "revoke", {"key": {"dek-id": made["dek-id"]}, "reason": "superseded"}),
            "key-attributes",
        )
        later = ctx.expect_result(
            ctx.request(data, "changes-since", {"seq": start["seq"]}), "changes-result"
        )
        ctx.expect(later["seq"] > start["seq"], "the sequence number did not move")
        ctx.expect(
            made["dek-id"] in [change.get("dek-id") for change in later["changes"]],
            "changes-since does not report the revocation",
        )


# -- ids, pipelining, in-flight ------------------------------------------------------------------


@case(
    "PROTO-030",
    "Every response echoes its request's id, for ids across the whole uint64 range, "
    "pipelined in one write.",
)
def ids_echoed(ctx: Context) -> None:
    ids = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**53 + 1, 2**63, 2**64 - 1]
    with ctx.connect() as c:
        c.send_quietly(b"".join(request_frame(i, "status") for i in ids), f"status with ids {ids}")
        replies = c.receive_many(len(ids), ctx.options.timeout)
    got = sorted(r.id for r in replies if r.id is not None)
    ctx.expect(got == sorted(ids), f"ids echoed {got}, sent {sorted(ids)}")
    for reply in replies:
        ctx.expect_result(reply, "status-result")


@case(
    "PROTO-031",
    "Pipelined requests of different cost are each answered exactly once; whether answers "
    "came back out of order is reported.",
)
def pipelining_out_of_order(ctx: Context) -> None:
    assert ctx.run.baseline is not None
    dek_id = ctx.run.baseline[0]
    with ctx.connect() as c:
        frames = [request_frame(1, "create-dek", {"namespace": ctx.run.namespace("slow")})]
        frames += [request_frame(i, "get-dek", {"dek-id": dek_id}) for i in range(2, 12)]
        frames += [request_frame(i, "status") for i in range(12, 16)]
        c.send_quietly(b"".join(frames), "create-dek, 10 get-dek, 4 status in one write")
        replies = c.receive_many(len(frames), ctx.options.timeout)
    order = [r.id for r in replies]
    ctx.expect(sorted(order, key=lambda i: i or 0) == list(range(1, 16)), f"answered ids {order}")
    for reply in replies:
        ctx.expect(not reply.is_error, f"unexpected error {reply.summary()}")
    ctx.measurements["answer_order"] = order
    ctx.note(
        "answered out of order (as the protocol allows)"
        if order != sorted(order, key=lambda i: i or 0)
        else "answered in request order this time"
    )


@case(
    "PROTO-032",
    "Past max-in-flight the server applies back-pressure, not refusals: max-in-flight + 200 "
    "requests written without reading are all answered, none with busy.",
)
def in_flight_limit(ctx: Context) -> None:
    count = ctx.run.max_in_flight + 200
    namespace = ctx.run.namespace("in-flight")
    with ctx.connect() as c:
        data = b"".join(
            request_frame(i, "create-dek", {"namespace": namespace}) for i in range(1, count + 1)
        )
        c.sock.settimeout(ctx.options.timeout * 3)
        c.send_quietly(data, f"{count} create-dek requests without reading")
        replies = c.receive_many(count, ctx.options.timeout * 3)
    errors = [r.summary() for r in replies if r.is_error]
    ctx.expect(not errors, f"{len(errors)} refused: {errors[:3]}")
    ids = sorted(r.id for r in replies if r.id is not None)
    ctx.expect(ids == list(range(1, count + 1)), "not every request was answered exactly once")


@case(
    "PROTO-033",
    "Bad requests in a pipeline (wrong type, invalid CBOR, unknown operation, unknown field) "
    "get their errors while the good requests between them are served.",
    hostile=True,
)
def bad_request_in_pipeline(ctx: Context) -> None:
    assert ctx.run.baseline is not None
    dek_id, key = ctx.run.baseline

    def good(request_id: int) -> bytes:
        return request_frame(request_id, "get-dek", {"dek-id": dek_id})

    frames = [
        good(1),
        request_frame(2, "get-dek", {"dek-id": 42}),
        good(3),
        frame(b"\x1c\x00"),
        good(4),
        request_frame(5, "conformance-no-such-op"),
        good(6),
        frame(encode({"id": 7, "op": "status", "extra": 1})),
        good(8),
    ]
    with ctx.connect() as c:
        c.send_quietly(b"".join(frames), "get-dek pipelined with four bad requests")
        replies = c.receive_many(len(frames), ctx.options.timeout)
        by_id: dict[int | None, Message] = {r.id: r for r in replies}
        for i in (1, 3, 4, 6, 8):
            ctx.expect(i in by_id, f"good request {i} was not answered")
            result = ctx.expect_result(by_id[i], "dek-result")
            ctx.expect(result["key"] == key, f"request {i} got another key")
        ctx.expect_error(by_id[2], "bad-request", request_id=2)
        ctx.expect_error(by_id[None], "bad-request", request_id=None)
        ctx.expect_error(by_id[5], "unknown-operation", request_id=5)
        ctx.expect_error(by_id[7], "bad-request", request_id=7)
        ctx.expect_usable(c)


@case(
    "PROTO-034",
    "Coverage: every error code protocol.cddl documents was provoked by some case, except "
    "those only the server's own condition produces (busy, hsm-unavailable, internal, "
    "audit-unavailable, protect-stop-passed, and shutting-down outside the self-test).",
    when=When.LAST,
)
def error_coverage(ctx: Context) -> None:
    documented = set(ctx.schema.error_codes.values())
    seen = ctx.run.observed_errors
    missing = sorted(documented - seen - SERVER_CONDITIONS)
    ctx.measurements["observed"] = sorted(seen)
    if missing:
        raise Informational(
            f"not provoked in this run: {', '.join(missing)} (cases skipped, or codes this "
            "suite does not know yet)"
        )
    ctx.note(f"provoked {len(seen)} of {len(documented)} documented codes")


@case(
    "PROTO-036",
    "Coverage: every operation protocol.cddl defines returned a result to some case in this "
    "run (an operation the suite does not know yet is reported, not failed).",
    when=When.LAST,
)
def operation_coverage(ctx: Context) -> None:
    defined = set(ctx.schema.requests)
    served = ctx.run.served_operations
    ctx.measurements["served"] = sorted(served)
    missing = sorted(defined - served)
    if missing:
        raise Informational(
            f"no success path exercised for: {', '.join(missing)} (cases skipped, or operations "
            "this suite does not know yet)"
        )
    ctx.note(f"all {len(defined)} operations served")


@case(
    "PROTO-035",
    "On SIGTERM the server drains: every request already received is answered (a result or "
    "shutting-down), nothing is lost, and the connection then closes (self-test only).",
    when=When.LAST,
)
def drain_on_shutdown(ctx: Context) -> None:
    server = ctx.need_self_test()
    count = ctx.run.max_in_flight * 4
    namespace = ctx.run.namespace("drain")
    with ctx.connect() as c:
        data = b"".join(
            request_frame(i, "create-dek", {"namespace": namespace}) for i in range(1, count + 1)
        )
        c.send_quietly(data, f"{count} create-dek requests")
        first = ctx.receive(c)  # the server is working on the burst
        server.terminate()
        replies = [first]
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                replies.append(c.receive(max(0.0, deadline - time.monotonic()), quiet=True))
        except ConnectionClosed:
            pass
    answered = {r.id for r in replies}
    outcomes = {"result": 0, "shutting-down": 0}
    for reply in replies:
        if reply.is_error:
            ctx.expect_error(reply, "shutting-down")
            outcomes["shutting-down"] += 1
        else:
            ctx.expect_result(reply, "dek-result")
            outcomes["result"] += 1
    ctx.measurements.update(outcomes)
    unanswered = count - len(answered)
    ctx.note(
        f"{outcomes['result']} created, {outcomes['shutting-down']} shutting-down, "
        f"{unanswered} never read"
    )
    # Requests the server never read are not lost: the client knows they were never answered.
    ctx.expect(len(answered) == len(replies), "a request was answered twice")


# -- key transport (PROTOCOL.md 4.5) ---------------------------------------------------------


@case(
    "PROTO-050",
    "Key transport refusals: the client's own TLS certificate is refused as a transport "
    "certificate (transport-certificate-rejected), an identity without one is "
    "no-transport-certificate, and a create-dek sealed to an unregistered fingerprint is "
    "no-transport-certificate and creates nothing.",
)
def transport_refusals(ctx: Context) -> None:
    _need_ops(ctx, "register-transport-cert", "get-transport-cert")
    own = x509.load_pem_x509_certificate(ctx.run.target.client.cert.read_bytes())
    with ctx.connect() as c:
        reply = ctx.request(
            c,
            "register-transport-cert",
            {"certificate": own.public_bytes(serialization.Encoding.DER)},
        )
        ctx.expect_error(reply, "transport-certificate-rejected")
        stranger = ctx.run.identity.rsplit("/", 1)[0] + f"/nobody-{secrets.token_hex(4)}"
        reply = ctx.request(c, "get-transport-cert", {"identity": stranger})
        ctx.expect_error(reply, "no-transport-certificate")
        namespace = ctx.run.namespace("transport-refused")
        reply = ctx.request(
            c, "create-dek", {"namespace": namespace, "seal-to": secrets.token_bytes(32)}
        )
        ctx.expect_error(reply, "no-transport-certificate")
        listed = ctx.request(c, "locate", {"kind": "dek", "namespace": namespace})
        if not listed.is_error:
            ctx.expect(not listed.result["keys"], "a refused sealed create-dek created a DEK")


@case(
    "PROTO-051",
    "Sealed delivery: a key-transport certificate from the server's CA registers and is "
    "fetched back; create-dek and get-dek with seal-to answer sealed-dek-result whose "
    "sealed-key opens with HPKE (RFC 9180) and the documented info, to the same key.",
)
def sealed_delivery(ctx: Context) -> None:
    _need_ops(ctx, "register-transport-cert", "get-transport-cert")
    if not ctx.certs.can_mint:
        raise CaseSkipped("needs the server's CA key (--ca-key or --ca-dir)")
    tls, transport = ctx.certs.with_transport(ctx.run.identity)
    cert = x509.load_pem_x509_certificate(transport.cert.read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    private = serialization.load_pem_private_key(transport.key.read_bytes(), password=None)
    if not isinstance(private, x25519.X25519PrivateKey):
        raise CaseFailed("the built-in CA's default transport key is not X25519")
    fingerprint = hashlib.sha256(der).digest()
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    with ctx.connect(tls) as c:
        info = ctx.expect_result(
            ctx.request(c, "register-transport-cert", {"certificate": der}), "transport-cert-info"
        )
        ctx.expect(info["fingerprint"] == fingerprint, "registered fingerprint differs")
        fetched = ctx.expect_result(
            ctx.request(c, "get-transport-cert", {"identity": ctx.run.identity}),
            "transport-cert-info",
        )
        ctx.expect(fetched["certificate"] == der, "fetched another certificate")
        namespace = ctx.run.namespace("sealed")
        created = _open_sealed(
            ctx,
            c,
            suite=suite,
            private=private,
            fingerprint=fingerprint,
            op="create-dek",
            args={"namespace": namespace},
        )
        again = _open_sealed(
            ctx,
            c,
            suite=suite,
            private=private,
            fingerprint=fingerprint,
            op="get-dek",
            args={"dek-id": created[0]},
        )
        keys = [created[1], again[1]]
        ctx.expect(len(keys[0]) == 32 and keys[0] == keys[1], "sealed keys differ")


def _open_sealed(
    ctx: Context,
    c: Connection,
    *,
    suite: hpke.Suite,
    private: x25519.X25519PrivateKey,
    fingerprint: bytes,
    op: str,
    args: dict[str, Any],
) -> tuple[str, bytes]:
    """Send ``op`` with seal-to; open the sealed key with the info PROTOCOL.md 4.5 gives."""
    request_id = ctx.next_id()
    reply = c.request(request_id, op, {**args, "seal-to": fingerprint}, ctx.options.timeout)
    result = ctx.expect_result(reply, "sealed-dek-result", request_id=request_id)
    binding = [result["dek-id"], result["namespace"], result["kek-version"]]
    info = cbor2.dumps(
        ["kmipd/sealed-key/v1", op, request_id, ctx.run.identity, fingerprint, binding]
    )
    try:
        key = suite.decrypt(result["sealed-key"], private, info=info)
    except Exception:
        raise CaseFailed(f"the {op} sealed-key does not open with the documented info") from None
    try:
        suite.decrypt(result["sealed-key"], private, info=info + b"x")
    except Exception:
        return str(result["dek-id"]), bytes(key)
    raise CaseFailed("a sealed-key opened with another info: the info is not bound")
