"""Every operation's request and result, declared as data (see _schema).

Why it is long: it declares every message of the protocol, one class each (data).

Wire shape (conformance/protocol.cddl is normative):

    request  = {"id": uint, "op": text, ? "args": {...}}
    response = {"id": uint, "result": {...}}
             / {? "id": uint, "error": {"code": uint, "name": text, "message": text}}

An error without "id" could not be attributed to a request (undecodable
frame, duplicate id) or concerns the whole connection.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import attrs

from kmipd.protocol._errors import ErrorCode, ProtocolError
from kmipd.protocol._schema import (
    Bool,
    Bytes,
    ListOf,
    Struct,
    Text,
    TextMap,
    UInt,
    _quote,
    encode_struct,
    parse_struct,
    redacted,
    wire,
)

PROTOCOL_VERSIONS = (1,)

#: Namespaces are also KEK names: a namespace's DEKs are wrapped by its KEK.
NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
DEK_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
KEY_SIZE = 32

NAMESPACE = Text(max_length=128, pattern=NAMESPACE_PATTERN, description="namespace name")
DEK_ID = Text(max_length=64, pattern=DEK_ID_PATTERN, description="DEK id")
KEY = Bytes(min_length=KEY_SIZE, max_length=KEY_SIZE)
CONTEXT = TextMap(
    max_entries=32, key=Text(max_length=128), value=Text(max_length=1024, min_length=0)
)
BLOB = Bytes(max_length=1024)
TIMESTAMP = UInt()  # seconds since the Unix epoch
IDEMPOTENCY_KEY = Bytes(min_length=16, max_length=32)
#: SHA-256 of a registered key-transport certificate (DER): "seal the key to this".
FINGERPRINT = Bytes(min_length=32, max_length=32)
#: HPKE enc || ct of a 32-byte key (1168 bytes for the ML-KEM-768 hybrid).
SEALED_KEY = Bytes(min_length=32 + 16 + 32, max_length=2048)
CERTIFICATE = Bytes(min_length=1, max_length=8192)
SPIFFE_ID = Text(
    max_length=2048, pattern=re.compile(r"spiffe://[^/]+(/.*)?"), description="SPIFFE ID"
)


def _choice(*names: str, what: str) -> Text:
    return Text(
        max_length=32,
        pattern=re.compile("|".join(re.escape(n) for n in names)),
        description=f"{what} ({', '.join(names)})",
    )


STATE = _choice(
    "pre-active",
    "active",
    "deactivated",
    "compromised",
    "destroyed",
    "destroyed-compromised",
    what="state",
)
KEK_USAGE = _choice("wrap", "unwrap", what="KEK usage")
DEK_USAGE = _choice("encrypt", "decrypt", what="DEK usage")
PURPOSE = _choice("encrypt", "decrypt", "recovery", what="purpose")
REVOCATION_REASON = _choice(
    "unspecified",
    "key-compromise",
    "ca-compromise",
    "affiliation-changed",
    "superseded",
    "cessation-of-operation",
    "privilege-withdrawn",
    what="revocation reason",
)
VERSION = UInt(minimum=1, maximum=2**32 - 1)


# -- hello / status --------------------------------------------------------


@attrs.frozen
class Hello:
    OPERATION: ClassVar[str] = "hello"
    versions: tuple[int, ...] = wire(ListOf(UInt(maximum=2**16), min_items=1, max_items=16))
    client: str | None = wire(Text(max_length=128), default=None)


@attrs.frozen
class HelloResult:
    version: int = wire(UInt(maximum=2**16))
    server: str = wire(Text(max_length=128))
    identity: str = wire(Text(max_length=2048))
    max_frame_size: int = wire(UInt())
    max_in_flight: int = wire(UInt())
    #: Identifies the key store behind this server: servers showing the same
    #: store-id share their keys (a client may fail over between them).
    store_id: str = wire(Text(max_length=64))


@attrs.frozen
class Status:
    OPERATION: ClassVar[str] = "status"


@attrs.frozen
class StatusResult:
    state: str = wire(Text(max_length=32))
    server: str = wire(Text(max_length=128))
    uptime: int = wire(UInt())
    connections: int = wire(UInt())
    hsm: str = wire(Text(max_length=64))
    store: str = wire(Text(max_length=64))
    #: "sqlite", or "postgresql primary at host:port" (or standby, or unreachable).
    store_backend: str | None = wire(Text(max_length=64), default=None)


# -- stored DEKs -------------------------------------------------------------


@attrs.frozen
class CreateDek:
    OPERATION: ClassVar[str] = "create-dek"
    namespace: str = wire(NAMESPACE)
    #: Names one logical create: a retry with the same key returns the DEK the
    #: first attempt made instead of making another (remembered 24 hours).
    idempotency_key: bytes | None = wire(IDEMPOTENCY_KEY, default=None, repr=False)
    #: What the DEK may do, fixed for its life; both unless narrowed.
    usage: tuple[str, ...] | None = wire(ListOf(DEK_USAGE, min_items=1, max_items=2), default=None)
    #: Deliver the key sealed to the caller's registered transport certificate
    #: with this fingerprint (SealedDekResult) instead of in the clear.
    seal_to: bytes | None = wire(FINGERPRINT, default=None)


@attrs.frozen
class GetDek:
    OPERATION: ClassVar[str] = "get-dek"
    dek_id: str = wire(DEK_ID)
    #: "encrypt" needs the DEK before its protect-stop; "decrypt" (default)
    #: before its deactivation; "recovery" (a separate grant) also reads a
    #: deactivated or compromised DEK, to re-encrypt its data.
    purpose: str | None = wire(PURPOSE, default=None)
    seal_to: bytes | None = wire(FINGERPRINT, default=None)


@attrs.frozen
class DekResult:
    dek_id: str = wire(DEK_ID)
    namespace: str = wire(NAMESPACE)
    kek_version: int = wire(VERSION)
    key: bytes = wire(KEY, repr=redacted)


@attrs.frozen
class SealedDekResult:
    """A DekResult whose key is HPKE-sealed to the caller (see kmipd.crypto._delivery)."""

    dek_id: str = wire(DEK_ID)
    namespace: str = wire(NAMESPACE)
    kek_version: int = wire(VERSION)
    sealed_key: bytes = wire(SEALED_KEY, repr=redacted)


# -- stateless data keys (the caller keeps the wrapped blob) -----------------


@attrs.frozen
class GenerateDataKey:
    OPERATION: ClassVar[str] = "generate-data-key"
    kek: str = wire(NAMESPACE)
    context: dict[str, str] = wire(CONTEXT, factory=dict)
    seal_to: bytes | None = wire(FINGERPRINT, default=None)


@attrs.frozen
class DataKeyResult:
    key: bytes = wire(KEY, repr=redacted)
    blob: bytes = wire(BLOB)
    kek: str = wire(NAMESPACE)
    kek_version: int = wire(VERSION)


@attrs.frozen
class SealedDataKeyResult:
    sealed_key: bytes = wire(SEALED_KEY, repr=redacted)
    blob: bytes = wire(BLOB)
    kek: str = wire(NAMESPACE)
    kek_version: int = wire(VERSION)


@attrs.frozen
class DataKeyBlob:
    """The self-describing wrapped data key that generate-data-key returns.

    Opaque to clients; the server parses it on unwrap. ``wrapped`` is the
    HSM's output for the key, authenticated together with the KEK name,
    version and the caller's context (see the service's binding rules).
    """

    format: int = wire(UInt(minimum=1, maximum=1))
    kek: str = wire(NAMESPACE)
    kek_version: int = wire(VERSION)
    wrapped: bytes = wire(Bytes(max_length=512))


@attrs.frozen
class Unwrap:
    OPERATION: ClassVar[str] = "unwrap"
    blob: bytes = wire(BLOB)
    context: dict[str, str] = wire(CONTEXT, factory=dict)
    seal_to: bytes | None = wire(FINGERPRINT, default=None)


@attrs.frozen
class UnwrapResult:
    key: bytes = wire(KEY, repr=redacted)
    kek: str = wire(NAMESPACE)
    kek_version: int = wire(VERSION)


@attrs.frozen
class SealedUnwrapResult:
    sealed_key: bytes = wire(SEALED_KEY, repr=redacted)
    kek: str = wire(NAMESPACE)
    kek_version: int = wire(VERSION)


# -- key-transport certificates (the daemon is their directory) ---------------


@attrs.frozen
class RegisterTransportCert:
    """Register the caller's own key-transport certificate (DER), replacing its previous one."""

    OPERATION: ClassVar[str] = "register-transport-cert"
    certificate: bytes = wire(CERTIFICATE)


@attrs.frozen
class GetTransportCert:
    """An identity's current key-transport certificate."""

    OPERATION: ClassVar[str] = "get-transport-cert"
    identity: str = wire(SPIFFE_ID)


@attrs.frozen
class TransportCertInfo:
    identity: str = wire(SPIFFE_ID)
    certificate: bytes = wire(CERTIFICATE)
    fingerprint: bytes = wire(FINGERPRINT)
    suite: str = wire(_choice("x25519", "p256", "mlkem768-x25519", what="transport key type"))
    registered: int = wire(TIMESTAMP)
    not_after: int = wire(TIMESTAMP)


# -- KEK administration --------------------------------------------------------


@attrs.frozen
class CreateKek:
    OPERATION: ClassVar[str] = "create-kek"
    name: str = wire(NAMESPACE)
    usage: tuple[str, ...] | None = wire(ListOf(KEK_USAGE, min_items=1, max_items=2), default=None)
    #: A future activation date makes the KEK pre-active until then.
    activation: int | None = wire(TIMESTAMP, default=None)


@attrs.frozen
class KekInfo:
    name: str = wire(NAMESPACE)
    version: int = wire(VERSION)
    created: int = wire(TIMESTAMP)
    #: The newest version's state.
    state: str = wire(STATE)


@attrs.frozen
class ListKeks:
    OPERATION: ClassVar[str] = "list-keks"
    prefix: str | None = wire(Text(max_length=128), default=None)


@attrs.frozen
class ListKeksResult:
    keks: tuple[KekInfo, ...] = wire(ListOf(Struct(KekInfo), max_items=10_000))


# -- lifecycle ---------------------------------------------------------------


@attrs.frozen
class KeyRef:
    """A DEK (``dek-id``) or a KEK version (``kek`` and ``version``)."""

    dek_id: str | None = wire(DEK_ID, default=None)
    kek: str | None = wire(NAMESPACE, default=None)
    version: int | None = wire(VERSION, default=None)


@attrs.frozen
class KeyAttributes:
    kind: str = wire(_choice("dek", "kek", what="kind"))
    namespace: str = wire(NAMESPACE)
    #: The KEK version number; for a DEK, the version that wraps it.
    version: int = wire(VERSION)
    state: str = wire(STATE)
    usage: tuple[str, ...] = wire(ListOf(Text(max_length=16), max_items=4))
    created: int = wire(TIMESTAMP)
    dek_id: str | None = wire(DEK_ID, default=None)
    activation: int | None = wire(TIMESTAMP, default=None)
    protect_stop: int | None = wire(TIMESTAMP, default=None)
    process_start: int | None = wire(TIMESTAMP, default=None)
    deactivation: int | None = wire(TIMESTAMP, default=None)
    compromise_date: int | None = wire(TIMESTAMP, default=None)
    destroy_date: int | None = wire(TIMESTAMP, default=None)
    purge_at: int | None = wire(TIMESTAMP, default=None)
    revocation_reason: str | None = wire(REVOCATION_REASON, default=None)
    revocation_message: str | None = wire(Text(max_length=256), default=None)


@attrs.frozen
class RotateKek:
    OPERATION: ClassVar[str] = "rotate-kek"
    name: str = wire(NAMESPACE)


@attrs.frozen
class Activate:
    OPERATION: ClassVar[str] = "activate"
    key: KeyRef = wire(Struct(KeyRef))


@attrs.frozen
class Revoke:
    OPERATION: ClassVar[str] = "revoke"
    key: KeyRef = wire(Struct(KeyRef))
    reason: str = wire(REVOCATION_REASON)
    message: str | None = wire(Text(max_length=256), default=None)


@attrs.frozen
class Destroy:
    OPERATION: ClassVar[str] = "destroy"
    key: KeyRef = wire(Struct(KeyRef))
    #: Destroy a KEK version even though DEKs still depend on it (they die with it).
    force: bool = wire(Bool(), default=False)
    #: Skip the soft-delete window: erase the material now, beyond recovery.
    purge_now: bool = wire(Bool(), default=False)


@attrs.frozen
class Recover:
    OPERATION: ClassVar[str] = "recover"
    key: KeyRef = wire(Struct(KeyRef))


@attrs.frozen
class GetAttributes:
    OPERATION: ClassVar[str] = "get-attributes"
    key: KeyRef = wire(Struct(KeyRef))


@attrs.frozen
class Locate:
    OPERATION: ClassVar[str] = "locate"
    kind: str | None = wire(_choice("dek", "kek", what="kind"), default=None)
    #: A namespace name or glob (``*`` matches across ``/``).
    namespace: str | None = wire(Text(max_length=128), default=None)
    state: str | None = wire(STATE, default=None)
    #: Resume after this DEK id (the ``next`` of the previous page).
    after: str | None = wire(Text(max_length=64), default=None)
    limit: int | None = wire(UInt(minimum=1, maximum=1000), default=None)


@attrs.frozen
class LocateResult:
    keys: tuple[KeyAttributes, ...] = wire(ListOf(Struct(KeyAttributes), max_items=10_000))
    next: str | None = wire(Text(max_length=64), default=None)


@attrs.frozen
class Dependents:
    OPERATION: ClassVar[str] = "dependents"
    kek: str = wire(NAMESPACE)
    version: int = wire(VERSION)
    limit: int | None = wire(UInt(minimum=0, maximum=1000), default=None)


@attrs.frozen
class DependentsResult:
    count: int = wire(UInt())
    dek_ids: tuple[str, ...] = wire(ListOf(DEK_ID, max_items=1000))


@attrs.frozen
class RewrapDek:
    OPERATION: ClassVar[str] = "rewrap-dek"
    dek_id: str = wire(DEK_ID)


@attrs.frozen
class RewrapBlob:
    OPERATION: ClassVar[str] = "rewrap-blob"
    blob: bytes = wire(BLOB)
    context: dict[str, str] = wire(CONTEXT, factory=dict)


@attrs.frozen
class RewrapBlobResult:
    blob: bytes = wire(BLOB)
    kek: str = wire(NAMESPACE)
    kek_version: int = wire(VERSION)


@attrs.frozen
class JobInfo:
    job_id: str = wire(Text(max_length=64))
    namespace: str = wire(NAMESPACE)
    target_version: int = wire(VERSION)
    state: str = wire(_choice("running", "done", "failed", what="job state"))
    rewrapped: int = wire(UInt())
    skipped: int = wire(UInt())
    remaining: int = wire(UInt())
    created: int = wire(TIMESTAMP)
    updated: int = wire(TIMESTAMP)


@attrs.frozen
class StartRewrap:
    OPERATION: ClassVar[str] = "start-rewrap"
    namespace: str = wire(NAMESPACE)


@attrs.frozen
class GetJob:
    OPERATION: ClassVar[str] = "get-job"
    job_id: str = wire(Text(max_length=64))


@attrs.frozen
class ListJobs:
    OPERATION: ClassVar[str] = "list-jobs"
    state: str | None = wire(_choice("running", "done", "failed", what="job state"), default=None)


@attrs.frozen
class ListJobsResult:
    jobs: tuple[JobInfo, ...] = wire(ListOf(Struct(JobInfo), max_items=10_000))


@attrs.frozen
class ChangeInfo:
    seq: int = wire(UInt())
    at: int = wire(TIMESTAMP)
    namespace: str = wire(NAMESPACE)
    state: str = wire(STATE)
    dek_id: str | None = wire(DEK_ID, default=None)
    kek_version: int | None = wire(VERSION, default=None)


@attrs.frozen
class ChangesSince:
    """What changed state after ``seq``: clients evict revoked or destroyed keys they cache."""

    OPERATION: ClassVar[str] = "changes-since"
    seq: int = wire(UInt())
    limit: int | None = wire(UInt(minimum=1, maximum=1000), default=None)


@attrs.frozen
class ChangesResult:
    changes: tuple[ChangeInfo, ...] = wire(ListOf(Struct(ChangeInfo), max_items=1000))
    #: The newest change's number: ask again from it.
    seq: int = wire(UInt())
    #: True when changes after the asked ``seq`` were pruned from the feed (it keeps
    #: lifecycle.change_feed_days): the caller must treat every cached key as changed.
    reset: bool | None = wire(Bool(), default=None)


# -- secrets -----------------------------------------------------------------
#
# A secret is a named value kept in a namespace (wrapped under its KEK):
# setting it adds a version; a read gets the newest enabled version, or a
# named one. Values appear only in set-secret requests and secret-value
# results, both redacted in reprs.

SECRET_NAME = Text(max_length=256, pattern=NAMESPACE_PATTERN, description="secret name")
#: The wire limit; the daemon's own limit is secrets.max_size (default 64 KiB).
SECRET_MAX_VALUE_SIZE = 16 * 1024 * 1024
SECRET_VALUE = Bytes(max_length=SECRET_MAX_VALUE_SIZE)
CONTENT_TYPE = Text(max_length=128, min_length=0)
TAGS = TextMap(max_entries=32, key=Text(max_length=128), value=Text(max_length=256, min_length=0))


@attrs.frozen
class SetSecret:
    OPERATION: ClassVar[str] = "set-secret"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SECRET_NAME)
    value: bytes = wire(SECRET_VALUE, repr=redacted)
    content_type: str | None = wire(CONTENT_TYPE, default=None)
    tags: dict[str, str] | None = wire(TAGS, default=None)
    enabled: bool | None = wire(Bool(), default=None)
    not_before: int | None = wire(TIMESTAMP, default=None)
    expires: int | None = wire(TIMESTAMP, default=None)


@attrs.frozen
class GetSecret:
    OPERATION: ClassVar[str] = "get-secret"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SECRET_NAME)
    #: Without it, the newest enabled version.
    version: int | None = wire(VERSION, default=None)


@attrs.frozen
class SecretInfo:
    """One version's metadata: never its value."""

    namespace: str = wire(NAMESPACE)
    name: str = wire(SECRET_NAME)
    version: int = wire(VERSION)
    kek_version: int = wire(VERSION)
    size: int = wire(UInt())
    content_type: str = wire(CONTENT_TYPE)
    tags: dict[str, str] = wire(TAGS)
    enabled: bool = wire(Bool())
    created: int = wire(TIMESTAMP)
    updated: int = wire(TIMESTAMP)
    not_before: int | None = wire(TIMESTAMP, default=None)
    expires: int | None = wire(TIMESTAMP, default=None)


@attrs.frozen
class SecretValue:
    namespace: str = wire(NAMESPACE)
    name: str = wire(SECRET_NAME)
    version: int = wire(VERSION)
    content_type: str = wire(CONTENT_TYPE)
    tags: dict[str, str] = wire(TAGS)
    value: bytes = wire(SECRET_VALUE, repr=redacted)
    not_before: int | None = wire(TIMESTAMP, default=None)
    expires: int | None = wire(TIMESTAMP, default=None)


@attrs.frozen
class SecretSummary:
    """A secret as list-secrets shows it: its newest version's metadata, no value."""

    namespace: str = wire(NAMESPACE)
    name: str = wire(SECRET_NAME)
    versions: int = wire(UInt())
    created: int = wire(TIMESTAMP)
    latest: SecretInfo | None = wire(Struct(SecretInfo), default=None)
    deleted: int | None = wire(TIMESTAMP, default=None)
    purge_at: int | None = wire(TIMESTAMP, default=None)


@attrs.frozen
class ListSecrets:
    OPERATION: ClassVar[str] = "list-secrets"
    #: A namespace name or glob (``*`` matches across ``/``); only permitted ones are listed.
    namespace: str | None = wire(Text(max_length=128), default=None)
    #: True: only deleted secrets; false or absent: only live ones.
    deleted: bool | None = wire(Bool(), default=None)
    #: Resume after this (namespace, name): the ``next`` of the previous page.
    after: tuple[str, ...] | None = wire(
        ListOf(Text(max_length=256), min_items=2, max_items=2), default=None
    )
    limit: int | None = wire(UInt(minimum=1, maximum=1000), default=None)


@attrs.frozen
class ListSecretsResult:
    secrets: tuple[SecretSummary, ...] = wire(ListOf(Struct(SecretSummary), max_items=1000))
    next: tuple[str, ...] | None = wire(
        ListOf(Text(max_length=256), min_items=2, max_items=2), default=None
    )


@attrs.frozen
class SecretVersions:
    OPERATION: ClassVar[str] = "secret-versions"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SECRET_NAME)


@attrs.frozen
class SecretVersionsResult:
    versions: tuple[SecretInfo, ...] = wire(ListOf(Struct(SecretInfo), max_items=100_000))


@attrs.frozen
class UpdateSecret:
    """Change a version's attributes (the newest unless ``version``); absent ones stay.

    A not-before or expires of 0 clears that date.
    """

    OPERATION: ClassVar[str] = "update-secret"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SECRET_NAME)
    version: int | None = wire(VERSION, default=None)
    enabled: bool | None = wire(Bool(), default=None)
    not_before: int | None = wire(TIMESTAMP, default=None)
    expires: int | None = wire(TIMESTAMP, default=None)
    tags: dict[str, str] | None = wire(TAGS, default=None)
    content_type: str | None = wire(CONTENT_TYPE, default=None)


@attrs.frozen
class DeleteSecret:
    """Soft delete: recoverable until the purge date (lifecycle.soft_delete_days)."""

    OPERATION: ClassVar[str] = "delete-secret"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SECRET_NAME)


@attrs.frozen
class RecoverSecret:
    OPERATION: ClassVar[str] = "recover-secret"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SECRET_NAME)


@attrs.frozen
class PurgeSecret:
    """Erase a deleted secret's every version now, beyond recovery."""

    OPERATION: ClassVar[str] = "purge-secret"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SECRET_NAME)


# -- certificates from the online CA ------------------------------------------
#
# A client sends a CSR (DER PKCS#10); the daemon's online issuing CA, whose key
# stays in the HSM backend, signs it if the caller's [[certificate_grant]]
# allows what it asks for. Serials are lowercase hex (up to 159 bits).

CSR = Bytes(min_length=1, max_length=16384)
PROFILE = _choice("client", "server", what="certificate profile")
SERIAL = Text(max_length=40, pattern=re.compile(r"[0-9a-f]{1,40}"), description="serial (hex)")
SAN = Text(max_length=2048)
#: Seconds; at least a minute (the grant's max_validity_days bounds it from above).
VALIDITY = UInt(minimum=60, maximum=2**32 - 1)


@attrs.frozen
class IssueCertificate:
    """Sign a CSR: ``client`` for the caller's own SPIFFE ID (clientAuth), ``server``
    for the CSR's DNS names (serverAuth)."""

    OPERATION: ClassVar[str] = "issue-certificate"
    csr: bytes = wire(CSR)
    profile: str = wire(PROFILE)
    validity: int | None = wire(VALIDITY, default=None)


@attrs.frozen
class RenewCertificate:
    """A new certificate like the caller's current one (the TLS peer certificate,
    from the online CA) for the CSR's key, which must differ from the current key."""

    OPERATION: ClassVar[str] = "renew-certificate"
    csr: bytes = wire(CSR)
    validity: int | None = wire(VALIDITY, default=None)


@attrs.frozen
class CertificateResult:
    serial: str = wire(SERIAL)
    certificate: bytes = wire(CERTIFICATE)
    #: The online CA's certificate, then the root's: the leaf's path, in order.
    chain: tuple[bytes, ...] = wire(ListOf(CERTIFICATE, max_items=4))
    not_before: int = wire(TIMESTAMP)
    not_after: int = wire(TIMESTAMP)


@attrs.frozen
class IssuedCertificateInfo:
    serial: str = wire(SERIAL)
    requested_by: str = wire(Text(max_length=2048))
    subject: str = wire(SAN)
    profile: str = wire(PROFILE)
    names: tuple[str, ...] = wire(ListOf(SAN, max_items=100))
    key_type: str = wire(Text(max_length=32))
    not_before: int = wire(TIMESTAMP)
    not_after: int = wire(TIMESTAMP)
    issued: int = wire(TIMESTAMP)
    renewed_from: str | None = wire(SERIAL, default=None)
    revoked: int | None = wire(TIMESTAMP, default=None)
    revocation_reason: str | None = wire(REVOCATION_REASON, default=None)


@attrs.frozen
class RevokeCertificate:
    """Put an issued certificate on the online CA's CRL (the daemon checks it at once)."""

    OPERATION: ClassVar[str] = "revoke-certificate"
    serial: str = wire(SERIAL)
    reason: str | None = wire(REVOCATION_REASON, default=None)


@attrs.frozen
class ListCertificates:
    OPERATION: ClassVar[str] = "list-certificates"
    subject: str | None = wire(SAN, default=None)
    after: str | None = wire(SERIAL, default=None)
    limit: int | None = wire(UInt(minimum=1, maximum=1000), default=None)


@attrs.frozen
class ListCertificatesResult:
    certificates: tuple[IssuedCertificateInfo, ...] = wire(
        ListOf(Struct(IssuedCertificateInfo), max_items=1000)
    )
    next: str | None = wire(SERIAL, default=None)


@attrs.frozen
class GetCaCertificates:
    """The online CA's chain and current CRL: public, for any authenticated client."""

    OPERATION: ClassVar[str] = "get-ca-certificates"


@attrs.frozen
class CaCertificates:
    #: The online CA's certificate, then the root's.
    chain: tuple[bytes, ...] = wire(ListOf(CERTIFICATE, max_items=4))
    crl: bytes = wire(Bytes(min_length=1, max_length=1024 * 1024))


# -- managed signing keys ------------------------------------------------------
#
# A signing key lives in a namespace under a name; rotating adds a version (a
# new key pair in the HSM). The private half never leaves the HSM: clients get
# the public half (SPKI DER) and signatures of digests they computed.

SIGNING_KEY_NAME = Text(max_length=256, pattern=NAMESPACE_PATTERN, description="signing key name")
SIGNING_KEY_TYPE = _choice("p256", "p384", "rsa3072", "rsa4096", what="signing key type")
#: Checked by the service (unsupported-algorithm names the ones the key signs with).
SIGNATURE_ALGORITHM = Text(max_length=16, description="signature algorithm")
#: Checked against the algorithm's hash by the service (digest-length-mismatch).
DIGEST = Bytes(min_length=1, max_length=64)
SIGNATURE = Bytes(min_length=1, max_length=1024)
PUBLIC_KEY = Bytes(min_length=1, max_length=2048)


@attrs.frozen
class CreateSigningKey:
    OPERATION: ClassVar[str] = "create-signing-key"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SIGNING_KEY_NAME)
    key_type: str = wire(SIGNING_KEY_TYPE)
    #: When it starts signing (default now): pre-active until then.
    activation: int | None = wire(TIMESTAMP, default=None)


@attrs.frozen
class GetSigningKey:
    OPERATION: ClassVar[str] = "get-signing-key"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SIGNING_KEY_NAME)
    #: Without it, the current (newest) version.
    version: int | None = wire(VERSION, default=None)


@attrs.frozen
class SigningKeyInfo:
    """One version of a signing key: its public half and lifecycle, never its private half."""

    namespace: str = wire(NAMESPACE)
    name: str = wire(SIGNING_KEY_NAME)
    #: ``sig_...``: the key's id (all versions); a DEK id never looks like it.
    key_id: str = wire(DEK_ID)
    version: int = wire(VERSION)
    versions: int = wire(UInt())
    key_type: str = wire(SIGNING_KEY_TYPE)
    algorithms: tuple[str, ...] = wire(ListOf(SIGNATURE_ALGORITHM, max_items=8))
    public_key: bytes = wire(PUBLIC_KEY)
    state: str = wire(STATE)
    created: int = wire(TIMESTAMP)
    activation: int | None = wire(TIMESTAMP, default=None)
    #: The end of its signing period (protect-stop): after it, verify only.
    sign_until: int | None = wire(TIMESTAMP, default=None)
    #: Deactivation: after it, neither sign nor verify.
    verify_until: int | None = wire(TIMESTAMP, default=None)
    purge_at: int | None = wire(TIMESTAMP, default=None)
    revocation_reason: str | None = wire(REVOCATION_REASON, default=None)


@attrs.frozen
class ListSigningKeys:
    OPERATION: ClassVar[str] = "list-signing-keys"
    #: A namespace name or glob (``*`` matches across ``/``); only permitted ones are listed.
    namespace: str | None = wire(Text(max_length=128), default=None)


@attrs.frozen
class ListSigningKeysResult:
    keys: tuple[SigningKeyInfo, ...] = wire(ListOf(Struct(SigningKeyInfo), max_items=100_000))


@attrs.frozen
class RotateSigningKey:
    OPERATION: ClassVar[str] = "rotate-signing-key"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SIGNING_KEY_NAME)


@attrs.frozen
class SignDigest:
    """Sign a digest the client computed, with the key's current version."""

    OPERATION: ClassVar[str] = "sign-digest"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SIGNING_KEY_NAME)
    algorithm: str = wire(SIGNATURE_ALGORITHM)
    digest: bytes = wire(DIGEST, repr=redacted)


@attrs.frozen
class SignatureResult:
    namespace: str = wire(NAMESPACE)
    name: str = wire(SIGNING_KEY_NAME)
    version: int = wire(VERSION)
    algorithm: str = wire(SIGNATURE_ALGORITHM)
    signature: bytes = wire(SIGNATURE, repr=redacted)


@attrs.frozen
class VerifyDigest:
    """Check a signature server-side: with ``version``, or any version still verifying."""

    OPERATION: ClassVar[str] = "verify-digest"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SIGNING_KEY_NAME)
    algorithm: str = wire(SIGNATURE_ALGORITHM)
    digest: bytes = wire(DIGEST, repr=redacted)
    signature: bytes = wire(SIGNATURE, repr=redacted)
    version: int | None = wire(VERSION, default=None)


@attrs.frozen
class VerifyResult:
    valid: bool = wire(Bool())
    #: The version whose public key verified it.
    version: int | None = wire(VERSION, default=None)


@attrs.frozen
class RevokeSigningKey:
    OPERATION: ClassVar[str] = "revoke-signing-key"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SIGNING_KEY_NAME)
    reason: str = wire(REVOCATION_REASON)
    version: int | None = wire(VERSION, default=None)
    message: str | None = wire(Text(max_length=256, min_length=0), default=None)


@attrs.frozen
class DestroySigningKey:
    """Schedule a version's destruction (the soft-delete window), or now with purge-now."""

    OPERATION: ClassVar[str] = "destroy-signing-key"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SIGNING_KEY_NAME)
    version: int | None = wire(VERSION, default=None)
    purge_now: bool | None = wire(Bool(), default=None)


@attrs.frozen
class RecoverSigningKey:
    OPERATION: ClassVar[str] = "recover-signing-key"
    namespace: str = wire(NAMESPACE)
    name: str = wire(SIGNING_KEY_NAME)
    version: int | None = wire(VERSION, default=None)


# -- managed certificates (Key Vault style) -----------------------------------
#
# A managed certificate lives in a namespace under a name, like a secret: the
# daemon makes its key, has its online CA sign it as the policy says, and keeps
# every version (each renewal is a new version with a new key). The private key
# is stored only wrapped under the namespace's KEK; it leaves the daemon only in
# a get with ``with-key``, when the policy made it exportable and the caller has
# the get-managed-certificate-key grant. Key bytes appear only in
# import-managed-certificate requests and managed-certificate results, both
# redacted in reprs.

CERTIFICATE_NAME = Text(max_length=256, pattern=NAMESPACE_PATTERN, description="certificate name")
#: PKCS#8 DER; an RSA-8192 key fits.
PRIVATE_KEY = Bytes(min_length=1, max_length=8192)
CERTIFICATE_USAGE = _choice("server", "client", what="certificate usage")
CERTIFICATE_ISSUER = _choice("online-ca", "imported", what="certificate issuer")


@attrs.frozen
class CertificatePolicy:
    """What the daemon makes for a managed certificate, at creation and each renewal.

    ``key-type``: p256, p384, rsa3072, rsa4096 or ed25519. ``validity`` in
    seconds. At most one lifetime action: ``renew-at-percent`` of the lifetime,
    or ``renew-before`` seconds before notAfter; neither means no automatic
    renewal. The service checks the meaning (names, key type, the caller's
    [[certificate_grant]]); this declares only the shapes.
    """

    key_type: str = wire(Text(max_length=32))
    validity: int = wire(VALIDITY)
    #: An RFC 4514 name ("CN=www.example.com,O=Example"); default CN = the first name.
    subject: str | None = wire(Text(max_length=1024), default=None)
    dns: tuple[str, ...] = wire(ListOf(SAN, max_items=100), default=())
    uri: tuple[str, ...] = wire(ListOf(SAN, max_items=100), default=())
    ip: tuple[str, ...] = wire(ListOf(Text(max_length=64), max_items=100), default=())
    usage: str = wire(CERTIFICATE_USAGE, default="server")
    exportable: bool = wire(Bool(), default=False)
    renew_at_percent: int | None = wire(UInt(minimum=1, maximum=99), default=None)
    renew_before: int | None = wire(UInt(minimum=1, maximum=2**32 - 1), default=None)


@attrs.frozen
class ManagedCertificateInfo:
    """One version's metadata: never its key."""

    namespace: str = wire(NAMESPACE)
    name: str = wire(CERTIFICATE_NAME)
    version: int = wire(VERSION)
    serial: str = wire(SERIAL)
    issuer: str = wire(CERTIFICATE_ISSUER)
    subject: str = wire(Text(max_length=1024))
    names: tuple[str, ...] = wire(ListOf(SAN, max_items=300))
    key_type: str = wire(Text(max_length=32))
    exportable: bool = wire(Bool())
    not_before: int = wire(TIMESTAMP)
    not_after: int = wire(TIMESTAMP)
    created: int = wire(TIMESTAMP)
    created_by: str = wire(Text(max_length=2048))
    revoked: int | None = wire(TIMESTAMP, default=None)
    revocation_reason: str | None = wire(REVOCATION_REASON, default=None)


@attrs.frozen
class ManagedCertificateSummary:
    """A managed certificate as the listing shows it: its policy and newest version."""

    namespace: str = wire(NAMESPACE)
    name: str = wire(CERTIFICATE_NAME)
    versions: int = wire(UInt())
    created: int = wire(TIMESTAMP)
    #: None for an imported certificate (renewed only by importing its next version).
    policy: CertificatePolicy | None = wire(Struct(CertificatePolicy), default=None)
    current: ManagedCertificateInfo | None = wire(Struct(ManagedCertificateInfo), default=None)
    #: When the lifetime action renews the current version (none: not automatic).
    renew_after: int | None = wire(TIMESTAMP, default=None)
    deleted: int | None = wire(TIMESTAMP, default=None)
    purge_at: int | None = wire(TIMESTAMP, default=None)


@attrs.frozen
class CreateManagedCertificate:
    OPERATION: ClassVar[str] = "create-managed-certificate"
    namespace: str = wire(NAMESPACE)
    name: str = wire(CERTIFICATE_NAME)
    policy: CertificatePolicy = wire(Struct(CertificatePolicy))


@attrs.frozen
class ImportManagedCertificate:
    """An existing certificate and its key: a new certificate, or the next version."""

    OPERATION: ClassVar[str] = "import-managed-certificate"
    namespace: str = wire(NAMESPACE)
    name: str = wire(CERTIFICATE_NAME)
    certificate: bytes = wire(CERTIFICATE)
    key: bytes = wire(PRIVATE_KEY, repr=redacted)
    #: The issuing CAs above the certificate, nearest first.
    chain: tuple[bytes, ...] = wire(ListOf(CERTIFICATE, max_items=8), default=())
    exportable: bool = wire(Bool(), default=False)


@attrs.frozen
class GetManagedCertificate:
    OPERATION: ClassVar[str] = "get-managed-certificate"
    namespace: str = wire(NAMESPACE)
    name: str = wire(CERTIFICATE_NAME)
    #: Without it, the newest version.
    version: int | None = wire(VERSION, default=None)
    with_key: bool | None = wire(Bool(), default=None)


@attrs.frozen
class ManagedCertificate:
    info: ManagedCertificateInfo = wire(Struct(ManagedCertificateInfo))
    certificate: bytes = wire(CERTIFICATE)
    #: The issuing CAs above it, nearest first (online CA, then root).
    chain: tuple[bytes, ...] = wire(ListOf(CERTIFICATE, max_items=8))
    key: bytes | None = wire(PRIVATE_KEY, repr=redacted, default=None)


@attrs.frozen
class ListManagedCertificates:
    OPERATION: ClassVar[str] = "list-managed-certificates"
    #: A namespace name or glob; only permitted ones are listed.
    namespace: str | None = wire(Text(max_length=128), default=None)
    deleted: bool | None = wire(Bool(), default=None)
    after: tuple[str, ...] | None = wire(
        ListOf(Text(max_length=256), min_items=2, max_items=2), default=None
    )
    limit: int | None = wire(UInt(minimum=1, maximum=1000), default=None)


@attrs.frozen
class ListManagedCertificatesResult:
    certificates: tuple[ManagedCertificateSummary, ...] = wire(
        ListOf(Struct(ManagedCertificateSummary), max_items=1000)
    )
    next: tuple[str, ...] | None = wire(
        ListOf(Text(max_length=256), min_items=2, max_items=2), default=None
    )


@attrs.frozen
class ManagedCertificateVersions:
    OPERATION: ClassVar[str] = "managed-certificate-versions"
    namespace: str = wire(NAMESPACE)
    name: str = wire(CERTIFICATE_NAME)


@attrs.frozen
class ManagedCertificateVersionsResult:
    versions: tuple[ManagedCertificateInfo, ...] = wire(
        ListOf(Struct(ManagedCertificateInfo), max_items=100_000)
    )


@attrs.frozen
class RenewManagedCertificate:
    """A new version now, with a new key, from the certificate's policy."""

    OPERATION: ClassVar[str] = "renew-managed-certificate"
    namespace: str = wire(NAMESPACE)
    name: str = wire(CERTIFICATE_NAME)


@attrs.frozen
class RevokeManagedCertificate:
    """Revoke a version (the newest unless ``version``); the online CA's ones go on its CRL."""

    OPERATION: ClassVar[str] = "revoke-managed-certificate"
    namespace: str = wire(NAMESPACE)
    name: str = wire(CERTIFICATE_NAME)
    version: int | None = wire(VERSION, default=None)
    reason: str | None = wire(REVOCATION_REASON, default=None)


@attrs.frozen
class DeleteManagedCertificate:
    """Soft delete: recoverable until the purge date (lifecycle.soft_delete_days)."""

    OPERATION: ClassVar[str] = "delete-managed-certificate"
    namespace: str = wire(NAMESPACE)
    name: str = wire(CERTIFICATE_NAME)


@attrs.frozen
class RecoverManagedCertificate:
    OPERATION: ClassVar[str] = "recover-managed-certificate"
    namespace: str = wire(NAMESPACE)
    name: str = wire(CERTIFICATE_NAME)


@attrs.frozen
class PurgeManagedCertificate:
    """Erase a deleted certificate's every version and wrapped key now."""

    OPERATION: ClassVar[str] = "purge-managed-certificate"
    namespace: str = wire(NAMESPACE)
    name: str = wire(CERTIFICATE_NAME)


# -- the operation table -----------------------------------------------------


@attrs.frozen
class Operation:
    name: str
    request: type[Any]
    result: type[Any]
    #: Safe to send again after an unknown outcome (the client may retry it).
    idempotent: bool
    #: The result when the request asks for sealed delivery (``seal-to``).
    sealed_result: type[Any] | None = None


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("hello", Hello, HelloResult, idempotent=True),
        Operation("status", Status, StatusResult, idempotent=True),
        Operation("create-dek", CreateDek, DekResult, False, SealedDekResult),
        Operation("get-dek", GetDek, DekResult, True, SealedDekResult),
        Operation("generate-data-key", GenerateDataKey, DataKeyResult, True, SealedDataKeyResult),
        Operation("unwrap", Unwrap, UnwrapResult, True, SealedUnwrapResult),
        Operation("create-kek", CreateKek, KekInfo, idempotent=False),
        Operation("list-keks", ListKeks, ListKeksResult, idempotent=True),
        Operation("rotate-kek", RotateKek, KeyAttributes, idempotent=False),
        Operation("activate", Activate, KeyAttributes, idempotent=True),
        Operation("revoke", Revoke, KeyAttributes, idempotent=True),
        Operation("destroy", Destroy, KeyAttributes, idempotent=True),
        Operation("recover", Recover, KeyAttributes, idempotent=True),
        Operation("get-attributes", GetAttributes, KeyAttributes, idempotent=True),
        Operation("locate", Locate, LocateResult, idempotent=True),
        Operation("dependents", Dependents, DependentsResult, idempotent=True),
        Operation("rewrap-dek", RewrapDek, KeyAttributes, idempotent=True),
        Operation("rewrap-blob", RewrapBlob, RewrapBlobResult, idempotent=True),
        Operation("start-rewrap", StartRewrap, JobInfo, idempotent=False),
        Operation("get-job", GetJob, JobInfo, idempotent=True),
        Operation("list-jobs", ListJobs, ListJobsResult, idempotent=True),
        Operation("changes-since", ChangesSince, ChangesResult, idempotent=True),
        # Appended: the operations above keep their places in the table.
        Operation(
            "register-transport-cert", RegisterTransportCert, TransportCertInfo, idempotent=True
        ),
        Operation("get-transport-cert", GetTransportCert, TransportCertInfo, idempotent=True),
        Operation("set-secret", SetSecret, SecretInfo, idempotent=False),
        Operation("get-secret", GetSecret, SecretValue, idempotent=True),
        Operation("list-secrets", ListSecrets, ListSecretsResult, idempotent=True),
        Operation("secret-versions", SecretVersions, SecretVersionsResult, idempotent=True),
        Operation("update-secret", UpdateSecret, SecretInfo, idempotent=True),
        Operation("delete-secret", DeleteSecret, SecretSummary, idempotent=True),
        Operation("recover-secret", RecoverSecret, SecretSummary, idempotent=True),
        Operation("purge-secret", PurgeSecret, SecretSummary, idempotent=True),
        # Issuing twice makes two certificates: harmless, but not "the same outcome".
        Operation("issue-certificate", IssueCertificate, CertificateResult, idempotent=False),
        Operation("renew-certificate", RenewCertificate, CertificateResult, idempotent=False),
        Operation("revoke-certificate", RevokeCertificate, IssuedCertificateInfo, idempotent=True),
        Operation("list-certificates", ListCertificates, ListCertificatesResult, idempotent=True),
        Operation("get-ca-certificates", GetCaCertificates, CaCertificates, idempotent=True),
        Operation("create-signing-key", CreateSigningKey, SigningKeyInfo, idempotent=False),
        Operation("get-signing-key", GetSigningKey, SigningKeyInfo, idempotent=True),
        Operation("list-signing-keys", ListSigningKeys, ListSigningKeysResult, idempotent=True),
        Operation("rotate-signing-key", RotateSigningKey, SigningKeyInfo, idempotent=False),
        Operation("sign-digest", SignDigest, SignatureResult, idempotent=True),
        Operation("verify-digest", VerifyDigest, VerifyResult, idempotent=True),
        Operation("revoke-signing-key", RevokeSigningKey, SigningKeyInfo, idempotent=True),
        Operation("destroy-signing-key", DestroySigningKey, SigningKeyInfo, idempotent=True),
        Operation("recover-signing-key", RecoverSigningKey, SigningKeyInfo, idempotent=True),
        # Creating or renewing twice makes two versions: not "the same outcome".
        Operation(
            "create-managed-certificate",
            CreateManagedCertificate,
            ManagedCertificateInfo,
            idempotent=False,
        ),
        Operation(
            "import-managed-certificate",
            ImportManagedCertificate,
            ManagedCertificateInfo,
            idempotent=False,
        ),
        Operation(
            "get-managed-certificate", GetManagedCertificate, ManagedCertificate, idempotent=True
        ),
        Operation(
            "list-managed-certificates",
            ListManagedCertificates,
            ListManagedCertificatesResult,
            idempotent=True,
        ),
        Operation(
            "managed-certificate-versions",
            ManagedCertificateVersions,
            ManagedCertificateVersionsResult,
            idempotent=True,
        ),
        Operation(
            "renew-managed-certificate",
            RenewManagedCertificate,
            ManagedCertificateInfo,
            idempotent=False,
        ),
        Operation(
            "revoke-managed-certificate",
            RevokeManagedCertificate,
            ManagedCertificateInfo,
            idempotent=True,
        ),
        Operation(
            "delete-managed-certificate",
            DeleteManagedCertificate,
            ManagedCertificateSummary,
            idempotent=True,
        ),
        Operation(
            "recover-managed-certificate",
            RecoverManagedCertificate,
            ManagedCertificateSummary,
            idempotent=True,
        ),
        Operation(
            "purge-managed-certificate",
            PurgeManagedCertificate,
            ManagedCertificateSummary,
            idempotent=True,
        ),
    )
}

_OPERATION_FOR_REQUEST = {op.request: op for op in OPERATIONS.values()}


def result_type(request: object) -> type[Any]:
    operation = _OPERATION_FOR_REQUEST[type(request)]
    if operation.sealed_result is not None and getattr(request, "seal_to", None) is not None:
        return operation.sealed_result
    return operation.result


# -- envelopes -----------------------------------------------------------------

_REQUEST_KEYS = frozenset({"id", "op", "args"})
REQUEST_ID = UInt()


def parse_request(item: object) -> tuple[int, Any]:
    """Turn a decoded request map into (request id, typed request).

    The ProtocolError raised for a bad request carries the request id
    whenever the "id" field itself was valid, so the error can be echoed.
    """
    if type(item) is not dict:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a request must be a CBOR map")
    raw_id = item.get("id")
    if type(raw_id) is not int or not 0 <= raw_id < 2**64:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "request.id: missing or not an unsigned 64-bit integer"
        )
    request_id: int = raw_id
    try:
        return request_id, _parse_request_body(item)
    except ProtocolError as exc:
        exc.request_id = request_id
        raise


def _parse_request_body(item: dict[Any, Any]) -> Any:
    unknown = [key for key in item if key not in _REQUEST_KEYS]
    if unknown:
        # PROTOCOL.md: the message names the field (cut short: it is peer input).
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"request: unknown top-level field {_quote(unknown[0])}"
        )
    op_name = item.get("op")
    if type(op_name) is not str:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "request.op: missing or not text")
    operation = OPERATIONS.get(op_name)
    if operation is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_OPERATION,
            f"unknown operation (known: {', '.join(sorted(OPERATIONS))})",
        )
    return parse_struct(operation.request, item.get("args", {}), "args")


def request_to_wire(request_id: int, request: Any) -> dict[str, object]:
    message: dict[str, object] = {"id": request_id, "op": request.OPERATION}
    args = encode_struct(request)
    if args:
        message["args"] = args
    return message


def result_to_wire(request_id: int, result: Any) -> dict[str, object]:
    return {"id": request_id, "result": encode_struct(result)}


def error_to_wire(request_id: int | None, code: ErrorCode, message: str) -> dict[str, object]:
    error = {"code": int(code), "name": code.wire_name, "message": message}
    return {"error": error} if request_id is None else {"id": request_id, "error": error}


@attrs.frozen
class ErrorInfo:
    """An error response as the client sees it."""

    code: ErrorCode
    message: str


def parse_response(item: object, result_for: dict[int, type[Any]]) -> tuple[int | None, Any]:
    """Turn a decoded response into (request id or None, typed result or ErrorInfo).

    ``result_for`` maps the ids of requests in flight to their result type;
    a response for an id not in it is a protocol error by the server.
    """
    if type(item) is not dict:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a response must be a CBOR map")
    request_id = item.get("id")
    if request_id is not None and (type(request_id) is not int or request_id not in result_for):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "response for a request not in flight")
    if "error" in item:
        if set(item) - {"id", "error"}:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "error response: unknown field")
        return request_id, _parse_error(item["error"])
    if request_id is None or len(item) != 2 or "result" not in item:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "response: needs id and result or error")
    return request_id, parse_struct(result_for[request_id], item["result"], "result")


def _parse_error(raw: object) -> ErrorInfo:
    if type(raw) is not dict:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "error: expected a map")
    code, message = raw.get("code"), raw.get("message")
    if type(code) is not int or type(message) is not str:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "error: needs integer code and text message")
    try:
        known = ErrorCode(code)
    except ValueError:
        # A newer server's code: keep the message, classify as internal.
        return ErrorInfo(ErrorCode.INTERNAL, f"unknown error code {code}: {message}")
    return ErrorInfo(known, message)
