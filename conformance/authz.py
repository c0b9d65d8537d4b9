"""Authorization: identity from the certificate only, default deny, admin operations kept apart."""

from __future__ import annotations

from conformance._case import CaseSkipped, case
from conformance._certs import Credentials
from conformance._connection import Connection
from conformance._context import Context, certificate_identity

ADMIN_OPERATIONS = ("create-kek", "list-keks")


def _refused(
    ctx: Context, c: Connection, op: str, args: dict[str, object] | None, *names: str
) -> None:
    """The request is refused with one of ``names`` and the reply carries no key."""
    request_id = ctx.next_id()
    reply = c.request(request_id, op, args)
    ctx.expect(
        reply.error_name in names,
        f"{op} should be refused ({' or '.join(names)}), got {reply.summary()}",
    )
    ctx.expect_error(reply, reply.error_name or names[0], request_id=request_id)


@case(
    "AUTHZ-001",
    "hello reports as the client's identity exactly the SPIFFE ID in its certificate's URI SAN.",
)
def identity_from_certificate(ctx: Context) -> None:
    pairs = [("--cert", ctx.target.client)]
    if ctx.target.admin is not None:
        pairs.append(("--admin-cert", ctx.target.admin))
    for option, creds in pairs:
        expected = certificate_identity(creds.cert)
        if expected is None:
            raise CaseSkipped(f"{option} carries no single URI SAN to compare with")
        with ctx.connect(creds, hello=False) as c:
            result = ctx.expect_result(ctx.hello(c), "hello-result")
        ctx.expect(
            result["identity"] == expected,
            f"{option}: hello says {result['identity']!r}, the certificate says {expected!r}",
        )


@case(
    "AUTHZ-002",
    "Administrative operations (create-kek, list-keks) are refused to the non-admin client "
    "with not-authorized, and the KEK it asked for is not created.",
)
def admin_operations_refused(ctx: Context) -> None:
    name = ctx.run.namespace("not-by-storage")
    with ctx.connect() as c:
        _refused(ctx, c, "create-kek", {"name": name}, "not-authorized")
        _refused(ctx, c, "list-keks", None, "not-authorized")
    if ctx.target.admin is not None:
        with ctx.connect(ctx.target.admin) as admin:
            listed = ctx.expect_result(
                ctx.request(admin, "list-keks", {"prefix": name}), "list-keks-result"
            )
        ctx.expect(not listed["keks"], f"the refused create-kek made a KEK: {listed['keks']}")


def _outsider(ctx: Context) -> Credentials:
    creds = ctx.certs.outsider()
    expected = certificate_identity(creds.cert)
    with ctx.connect(creds, hello=False) as c:
        result = ctx.expect_result(ctx.hello(c), "hello-result")
    ctx.expect(result["identity"] == expected, f"outsider identity {result['identity']!r}")
    return creds


@case(
    "AUTHZ-003",
    "Default deny: a valid certificate whose identity no grant names may say hello and ask "
    "status, and is refused every data and admin operation with not-authorized.",
)
def default_deny(ctx: Context) -> None:
    creds = _outsider(ctx)
    namespace = ctx.run.namespace("outsider")
    with ctx.connect(creds) as c:
        ctx.expect_result(ctx.request(c, "status"), "status-result")
        _refused(ctx, c, "create-dek", {"namespace": namespace}, "not-authorized")
        _refused(ctx, c, "generate-data-key", {"kek": namespace}, "not-authorized")
        _refused(ctx, c, "create-kek", {"name": namespace}, "not-authorized")
        _refused(ctx, c, "list-keks", None, "not-authorized")


@case(
    "AUTHZ-004",
    "Another client's keys stay out of reach: a client without a grant for their namespace "
    "cannot get a DEK or unwrap a data-key blob that --cert made (not-authorized or not-found, "
    "never a key).",
)
def other_clients_namespace(ctx: Context) -> None:
    assert ctx.run.baseline is not None
    creds = _outsider(ctx)
    with ctx.connect() as owner:
        made = ctx.expect_result(
            ctx.request(owner, "generate-data-key", {"kek": ctx.run.namespace("private")}),
            "data-key-result",
        )
    with ctx.connect(creds) as c:
        _refused(ctx, c, "get-dek", {"dek-id": ctx.run.baseline[0]}, "not-authorized", "not-found")
        _refused(ctx, c, "unwrap", {"blob": made["blob"]}, "not-authorized", "not-found")


@case(
    "AUTHZ-005",
    "Identity is never taken from the request: identity-like fields are refused as unknown "
    "fields, and a hello naming the administrator as its client changes neither the "
    "identity reported nor what the client may do.",
    hostile=True,
)
def identity_not_from_request(ctx: Context) -> None:
    admin_id = (
        certificate_identity(ctx.target.admin.cert) if ctx.target.admin is not None else None
    ) or ctx.run.identity.rsplit("/", 1)[0] + "/admin"
    own = ctx.run.identity
    with ctx.connect(hello=False) as c:
        request_id = ctx.next_id()
        c.send({"id": request_id, "op": "hello", "args": {"versions": [1], "client": admin_id}})
        result = ctx.expect_result(ctx.receive(c), "hello-result", request_id=request_id)
        ctx.expect(result["identity"] == own, f"identity became {result['identity']!r}")
        _refused(ctx, c, "create-kek", {"name": ctx.run.namespace("spoof")}, "not-authorized")
        for message in (
            {"id": ctx.next_id(), "op": "list-keks", "identity": admin_id},
            {"id": ctx.next_id(), "op": "list-keks", "args": {"identity": admin_id}},
            {"id": ctx.next_id(), "op": "list-keks", "args": {"as": admin_id}},
            {"id": ctx.next_id(), "op": "create-kek", "args": {"name": "x", "identity": admin_id}},
        ):
            c.send(message)
            ctx.expect_error(ctx.receive(c), "bad-request", request_id=message["id"])
