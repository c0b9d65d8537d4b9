"""Authorization: default deny, grants from the config.

A grant names client identities (a glob over the SPIFFE ID taken from the
verified certificate), namespaces (globs; ``*`` also matches ``/``) and
operations. Nothing is allowed unless some grant allows it.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable

import attrs

#: Operations a storage system needs to read and write its data (and to keep
#: its DEK cache honest: changes-since tells it what was revoked; and to seal
#: to another client: get-transport-cert fetches its certificate).
DATA_OPERATIONS = frozenset(
    {
        "create-dek",
        "get-dek",
        "generate-data-key",
        "unwrap",
        "rewrap",
        "changes-since",
        "get-transport-cert",
    }
)
#: Operations that administer keys and their lifecycles. "recovery" lets an
#: administrator still read a deactivated or compromised key, to re-protect data.
ADMIN_OPERATIONS = frozenset(
    {
        "create-kek",
        "list-keks",
        "rotate-kek",
        "activate",
        "revoke",
        "destroy",
        "recover",
        "get-attributes",
        "modify-attributes",
        "locate",
        "dependents",
        "rewrap",
        "start-rewrap",
        "get-job",
        "list-jobs",
        "recovery",
    }
)
#: Reading secret values and their metadata: what a database reads its replication
#: password with. Separate from managing them, so "read secrets under db/*" and
#: "manage secrets" are separate grants.
SECRET_READ_OPERATIONS = frozenset({"get-secret", "list-secrets", "secret-versions"})
#: Writing and administering secrets; reading their metadata, never their values.
SECRET_MANAGE_OPERATIONS = frozenset(
    {
        "set-secret",
        "update-secret",
        "delete-secret",
        "recover-secret",
        "purge-secret",
        "list-secrets",
        "secret-versions",
    }
)
#: Administering the online CA's issued certificates (any namespace grants them).
#: Issuing and renewing are granted by [[certificate_grant]] tables instead
#: (CertificateGrant): what may be asked for is more than an operation name.
CERTIFICATE_ADMIN_OPERATIONS = frozenset({"revoke-certificate", "list-certificates"})
#: Using managed signing keys: signing digests, verifying, reading public keys.
SIGNING_OPERATIONS = frozenset(
    {"sign-digest", "verify-digest", "get-signing-key", "list-signing-keys"}
)
#: Administering signing keys (making, rotating, ending them); no signing.
SIGNING_MANAGE_OPERATIONS = frozenset(
    {
        "create-signing-key",
        "rotate-signing-key",
        "revoke-signing-key",
        "destroy-signing-key",
        "recover-signing-key",
        "get-signing-key",
        "list-signing-keys",
    }
)
#: Reading managed certificates: their chains and metadata, never their private keys.
MANAGED_CERTIFICATE_READ_OPERATIONS = frozenset(
    {"get-managed-certificate", "list-managed-certificates", "managed-certificate-versions"}
)
#: Creating and administering managed certificates. What the online CA signs for them is
#: bounded by the caller's [[certificate_grant]] as well (names, key types, validity).
MANAGED_CERTIFICATE_MANAGE_OPERATIONS = MANAGED_CERTIFICATE_READ_OPERATIONS | frozenset(
    {
        "create-managed-certificate",
        "import-managed-certificate",
        "renew-managed-certificate",
        "revoke-managed-certificate",
        "delete-managed-certificate",
        "recover-managed-certificate",
        "purge-managed-certificate",
    }
)
#: Reading a managed certificate's private key (when its policy made it exportable).
#: In no group, not even "*": it must be granted by name.
MANAGED_CERTIFICATE_KEY_OPERATION = "get-managed-certificate-key"
#: Allowed to every authenticated client: they reveal nothing about keys or
#: other clients (registration concerns only the caller's own certificate; the
#: CA chain and CRL are public).
UNRESTRICTED_OPERATIONS = frozenset(
    {"hello", "status", "register-transport-cert", "get-ca-certificates"}
)
GRANTABLE_OPERATIONS = (
    DATA_OPERATIONS
    | ADMIN_OPERATIONS
    | SECRET_READ_OPERATIONS
    | SECRET_MANAGE_OPERATIONS
    | CERTIFICATE_ADMIN_OPERATIONS
    | SIGNING_OPERATIONS
    | SIGNING_MANAGE_OPERATIONS
    | MANAGED_CERTIFICATE_MANAGE_OPERATIONS
)

#: Names usable in a grant's operations list beside single operation names.
OPERATION_GROUPS = {
    "*": GRANTABLE_OPERATIONS,
    "data": DATA_OPERATIONS,
    "admin": ADMIN_OPERATIONS,
    "secrets-read": SECRET_READ_OPERATIONS,
    "secrets-manage": SECRET_MANAGE_OPERATIONS,
    "certificates-admin": CERTIFICATE_ADMIN_OPERATIONS,
    "signing": SIGNING_OPERATIONS,
    "signing-manage": SIGNING_MANAGE_OPERATIONS,
    "certificates-read": MANAGED_CERTIFICATE_READ_OPERATIONS,
    "certificates-manage": MANAGED_CERTIFICATE_MANAGE_OPERATIONS,
}


class PolicyError(ValueError):
    """A grant that cannot mean anything (unknown operation, empty list)."""


def expand_operations(names: Iterable[str]) -> frozenset[str]:
    expanded: set[str] = set()
    for name in names:
        if name in OPERATION_GROUPS:
            expanded |= OPERATION_GROUPS[name]
        elif name in GRANTABLE_OPERATIONS or name == MANAGED_CERTIFICATE_KEY_OPERATION:
            expanded.add(name)
        else:
            known = ", ".join(
                sorted(
                    GRANTABLE_OPERATIONS
                    | set(OPERATION_GROUPS)
                    | {MANAGED_CERTIFICATE_KEY_OPERATION}
                )
            )
            raise PolicyError(f"unknown operation {name!r} (known: {known})")
    if not expanded:
        raise PolicyError("a grant needs at least one operation")
    return frozenset(expanded)


@attrs.frozen
class Grant:
    identity: str
    namespaces: tuple[str, ...]
    operations: frozenset[str]

    def allows(self, identity: str, operation: str, namespace: str) -> bool:
        return (
            operation in self.operations
            and fnmatch.fnmatchcase(identity, self.identity)
            and any(fnmatch.fnmatchcase(namespace, pattern) for pattern in self.namespaces)
        )


#: Key types a certificate grant allows unless it lists its own.
CERTIFICATE_KEY_TYPES = ("p256", "p384", "rsa3072", "ed25519")
DEFAULT_MAX_VALIDITY_DAYS = 30.0


@attrs.frozen
class CertificateGrant:
    """What identities matching ``identity`` may have the online CA sign.

    ``client``: a clientAuth certificate for the caller's own SPIFFE ID, and its
    renewal. ``server_dns``: globs of DNS names a serverAuth certificate may
    carry (empty: none). Validity at most ``max_validity_days``; keys of
    ``key_types`` only. Managed certificates may also carry URI names matching
    ``uris`` (globs) and IP addresses inside ``ips`` (networks); a clientAuth
    managed certificate needs ``client`` too.
    """

    identity: str
    client: bool = True
    server_dns: tuple[str, ...] = ()
    max_validity_days: float = DEFAULT_MAX_VALIDITY_DAYS
    key_types: tuple[str, ...] = CERTIFICATE_KEY_TYPES
    uris: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()

    def applies_to(self, identity: str) -> bool:
        return fnmatch.fnmatchcase(identity, self.identity)

    def allows_dns(self, name: str) -> bool:
        # DNS names compare case-insensitively (RFC 4343).
        return any(fnmatch.fnmatchcase(name.lower(), p.lower()) for p in self.server_dns)

    def allows_uri(self, uri: str) -> bool:
        return any(fnmatch.fnmatchcase(uri, p) for p in self.uris)

    def allows_ip(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in ipaddress.ip_network(n, strict=False) for n in self.ips)


#: Decisions remembered per policy: a storage node asks the same question per block read.
_DECISION_CACHE_SIZE = 65_536


@attrs.frozen
class Policy:
    grants: tuple[Grant, ...] = ()
    certificate_grants: tuple[CertificateGrant, ...] = ()
    _decisions: dict[tuple[str, str, str], bool] = attrs.field(
        factory=dict, eq=False, repr=False, init=False
    )
    _anywhere: dict[tuple[str, str], bool] = attrs.field(
        factory=dict, eq=False, repr=False, init=False
    )

    def allows(self, identity: str, operation: str, namespace: str) -> bool:
        if operation in UNRESTRICTED_OPERATIONS:
            return True
        question = (identity, operation, namespace)
        answer = self._decisions.get(question)
        if answer is None:
            answer = any(grant.allows(identity, operation, namespace) for grant in self.grants)
            if len(self._decisions) >= _DECISION_CACHE_SIZE:
                self._decisions.clear()  # a policy is replaced whole on reload; this just bounds
            self._decisions[question] = answer
        return answer

    def allows_anywhere(self, identity: str, operation: str) -> bool:
        """Whether some namespace would allow it: a cheap first check before a lookup."""
        if operation in UNRESTRICTED_OPERATIONS:
            return True
        question = (identity, operation)
        answer = self._anywhere.get(question)
        if answer is None:
            answer = any(
                operation in grant.operations and fnmatch.fnmatchcase(identity, grant.identity)
                for grant in self.grants
            )
            if len(self._anywhere) >= _DECISION_CACHE_SIZE:
                self._anywhere.clear()
            self._anywhere[question] = answer
        return answer

    def certificate_grants_for(self, identity: str) -> list[CertificateGrant]:
        return [grant for grant in self.certificate_grants if grant.applies_to(identity)]
