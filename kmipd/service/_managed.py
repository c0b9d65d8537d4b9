"""Managed certificates, Key Vault style: the daemon makes, keeps, renews and hands out.

A managed certificate lives in a namespace under a name (like a secret). On
create the daemon checks the policy (``CertificatePolicy``: subject, names,
key type, validity, usage, exportable, lifetime action), generates the key,
has its online CA sign the certificate (recorded like any issuance, so a
revocation reaches the CRL) and stores version 1. Each renewal, by request
or by the maintenance pass when the lifetime action says so, is a new
version with a new key. An import brings an existing certificate with its
key (a new certificate, or the next version of one).

The private key is stored only wrapped under the namespace's KEK, through
the HSM backend, bound by associated data to namespace, name, version and KEK
version (``managed_key_associated_data``), as secret values are. It leaves
the daemon only in get-managed-certificate with ``with-key``, and only when
the version is exportable and the caller holds the get-managed-certificate-key
grant, which no group includes. Authorization comes before any lookup: a
caller without the grant learns nothing about the certificate.

What the online CA signs is bounded by the caller's [[certificate_grant]]
(DNS names by ``server_dns``, URIs by ``uris``, IP addresses by ``ips``,
key types, ``max_validity_days``); automatic renewals are held to the grants
of the identity that created the certificate, as they stand at renewal time.

Delete is soft (recover until the purge date); purge erases every version
and wrapped key. Audit records name certificate, version and serial, never
key material.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import logging
import re
import urllib.parse
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from kmipd.crypto._issuing import PrivateKey, describe_key, generate_key, key_type_of, spki_der
from kmipd.protocol import (
    CertificatePolicy,
    CreateManagedCertificate,
    DeleteManagedCertificate,
    ErrorCode,
    GetManagedCertificate,
    ImportManagedCertificate,
    ListManagedCertificates,
    ListManagedCertificatesResult,
    ManagedCertificate,
    ManagedCertificateInfo,
    ManagedCertificateSummary,
    ManagedCertificateVersions,
    ManagedCertificateVersionsResult,
    PurgeManagedCertificate,
    RecoverManagedCertificate,
    RenewManagedCertificate,
    RevokeManagedCertificate,
    encode_deterministic,
    encode_struct,
    parse_struct,
)
from kmipd.service._certs import (
    SERVER_RENEWAL_IDENTITY,
    CertificateOperations,
    OnlineCa,
    _serial_text,
)
from kmipd.service._core import Caller, ServiceError, _Call, _unwrap_errors, handles
from kmipd.service._policy import MANAGED_CERTIFICATE_KEY_OPERATION, CertificateGrant
from kmipd.service._secrets import REWRAP_BATCH, SecretOperations
from kmipd.store import (
    KekVersion,
    ManagedCertificateRecord,
    ManagedCertificateVersion,
    RewrapJob,
    StaleRecordError,
)

log = logging.getLogger("kmipd.service")

#: Key types a managed certificate's policy may ask for.
MANAGED_KEY_TYPES = ("p256", "p384", "rsa3072", "rsa4096", "ed25519")
LIST_DEFAULT_LIMIT = 100
#: Attempts at numbering a new version when others race for the same number.
_ADD_ATTEMPTS = 8
#: A DNS name, or a wildcard name whose first label is "*" (RFC 6125 6.4.3).
_DNS_NAME = re.compile(
    r"(?:\*\.)?(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def managed_key_associated_data(namespace: str, name: str, version: int, kek_version: int) -> bytes:
    """Binds a stored private key to its row: a key moved to another certificate fails."""
    return encode_deterministic(
        ["kmipd/managed-certificate-key/v1", namespace, name, version, kek_version]
    )


@attrs.frozen
class _Plan:
    """A checked policy: what to put into the certificate."""

    subject: x509.Name
    sans: tuple[x509.GeneralName, ...]
    dns: tuple[str, ...]
    uris: tuple[str, ...]
    ips: tuple[str, ...]
    usage: x509.ObjectIdentifier

    @property
    def names(self) -> tuple[str, ...]:
        return self.dns + self.uris + self.ips


class ManagedCertificateOperations(CertificateOperations, SecretOperations):
    """The managed-certificate operations (see the module docstring)."""

    # -- create, renew, import ---------------------------------------------------------

    @handles(CreateManagedCertificate, changes_state=True)
    async def _create_managed(
        self, call: _Call, request: CreateManagedCertificate
    ) -> ManagedCertificateInfo:
        self._authorize(call, "create-managed-certificate", request.namespace)
        call.detail = f"managed certificate {request.name!r}"
        ca = self._require_online_ca()
        plan = check_policy(request.policy)
        existing = await self.store.get_managed_certificate(request.namespace, request.name)
        if existing is not None:
            raise _exists(existing)
        grants = self._managed_grants(call.caller.identity, plan)
        return await self._issue_version(
            call,
            ca,
            namespace=request.namespace,
            name=request.name,
            policy=request.policy,
            plan=plan,
            grants=grants,
            create=True,
        )

    @handles(RenewManagedCertificate, changes_state=True)
    async def _renew_managed(
        self, call: _Call, request: RenewManagedCertificate
    ) -> ManagedCertificateInfo:
        self._authorize(call, "renew-managed-certificate", request.namespace)
        record = await self._live_managed(request.namespace, request.name)
        call.detail = f"managed certificate {record.name!r}"
        return await self._renew_record(call, record, call.caller.identity)

    async def _renew_record(
        self, call: _Call, record: ManagedCertificateRecord, identity: str
    ) -> ManagedCertificateInfo:
        policy = _policy_of(record)
        if policy is None:
            raise ServiceError(
                ErrorCode.CERTIFICATE_NOT_RENEWABLE,
                f"managed certificate {record.name!r} was imported and has no policy: "
                "import its next version instead",
            )
        ca = self._require_online_ca()
        plan = check_policy(policy)
        grants = self._managed_grants(identity, plan)
        return await self._issue_version(
            call,
            ca,
            namespace=record.namespace,
            name=record.name,
            policy=policy,
            plan=plan,
            grants=grants,
            create=False,
        )

    async def _issue_version(
        self,
        call: _Call,
        ca: OnlineCa,
        *,
        namespace: str,
        name: str,
        policy: CertificatePolicy,
        plan: _Plan,
        grants: list[CertificateGrant],
        create: bool,
    ) -> ManagedCertificateInfo:
        key = generate_key(policy.key_type)
        public_key = key.public_key()
        decision = self._decide(grants, public_key, policy.validity, None)
        kek = await self._kek_for_new_key(namespace, call.caller.identity)
        key_der = _pkcs8(key)
        for _ in range(_ADD_ATTEMPTS):
            record = await self.store.get_managed_certificate(namespace, name)
            if record is not None and record.deleted:
                raise _deleted(record)
            latest = record.latest if record is not None else None
            number = latest.version + 1 if latest is not None else 1
            previous = (
                latest.serial if latest is not None and latest.issuer == "online-ca" else None
            )
            result = await self._sign_and_record(
                call,
                ca,
                public_key,
                subject=plan.names[0],
                sans=list(plan.sans),
                usage=plan.usage,
                profile="client" if plan.usage == ExtendedKeyUsageOID.CLIENT_AUTH else "server",
                names=plan.names,
                decision=decision,
                renewed_from=previous,
                subject_name=plan.subject,
            )
            version = await self._wrapped_version(
                call,
                kek.name,
                name,
                number,
                key_der,
                certificate=result.certificate,
                chain=result.chain,
                issuer="online-ca",
                exportable=policy.exportable,
            )
            call.detail = _what(namespace, name, number) + f", serial {result.serial}"
            outcome = await self.store.add_managed_certificate_version(
                version, policy=json.dumps(encode_struct(policy)), create=create
            )
            if outcome == "added":
                log.info("managed certificate: %s (for %s)", call.detail, call.caller.identity)
                return _info(version)
            # The signed certificate stays recorded as issued (it exists); say which.
            log.warning("managed certificate: %s not stored (%s)", call.detail, outcome)
            if outcome != "version-exists":
                raise _add_refused(outcome, namespace, name)
        raise ServiceError(
            ErrorCode.BUSY, f"managed certificate {name!r} is being renewed by others"
        )

    @handles(ImportManagedCertificate, changes_state=True)
    async def _import_managed(
        self, call: _Call, request: ImportManagedCertificate
    ) -> ManagedCertificateInfo:
        self._authorize(call, "import-managed-certificate", request.namespace)
        call.detail = f"managed certificate {request.name!r}"
        cert, key, chain = _check_import(request, self._now())
        kek = await self._kek_for_new_key(request.namespace, call.caller.identity)
        key_der = _pkcs8(key)
        der_chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in chain)
        for _ in range(_ADD_ATTEMPTS):
            record = await self.store.get_managed_certificate(request.namespace, request.name)
            if record is not None and record.deleted:
                raise _deleted(record)
            latest = record.latest if record is not None else None
            number = latest.version + 1 if latest is not None else 1
            version = await self._wrapped_version(
                call,
                kek.name,
                request.name,
                number,
                key_der,
                certificate=cert.public_bytes(serialization.Encoding.DER),
                chain=der_chain,
                issuer="imported",
                exportable=request.exportable,
            )
            call.detail = (
                _what(request.namespace, request.name, number)
                + f", imported serial {version.serial}"
            )
            outcome = await self.store.add_managed_certificate_version(
                version, policy=None, create=record is None
            )
            if outcome == "added":
                return _info(version)
            if outcome not in ("version-exists", "exists", "missing"):
                raise _add_refused(outcome, request.namespace, request.name)
        raise ServiceError(
            ErrorCode.BUSY, f"managed certificate {request.name!r} is being changed by others"
        )

    async def _wrapped_version(
        self,
        call: _Call,
        namespace: str,
        name: str,
        number: int,
        key_der: bytes,
        *,
        certificate: bytes,
        chain: tuple[bytes, ...],
        issuer: str,
        exportable: bool,
    ) -> ManagedCertificateVersion:
        kek = self.store.get_kek(namespace)
        assert kek is not None
        kek_version = await self._version_for_protection(call, kek)
        wrapped = await self.hsm.wrap(
            kek_version.hsm_handle,
            key_der,
            managed_key_associated_data(namespace, name, number, kek_version.version),
        )
        cert = x509.load_der_x509_certificate(certificate)
        return ManagedCertificateVersion(
            namespace=namespace,
            name=name,
            version=number,
            kek_version=kek_version.version,
            wrapped_key=wrapped,
            key_type=_key_type(cert.public_key()),
            exportable=exportable,
            serial=_serial_text(cert.serial_number),
            issuer=issuer,
            subject=cert.subject.rfc4514_string(),
            names=_san_texts(cert),
            not_before=int(cert.not_valid_before_utc.timestamp()),
            not_after=int(cert.not_valid_after_utc.timestamp()),
            certificate=certificate,
            chain=chain,
            created_at=self._now(),
            created_by=call.caller.identity,
        )

    # -- reads -------------------------------------------------------------------------

    @handles(GetManagedCertificate)
    async def _get_managed(self, call: _Call, request: GetManagedCertificate) -> ManagedCertificate:
        # Both grants before any lookup: a caller refused learns nothing of the certificate.
        self._authorize(call, "get-managed-certificate", request.namespace)
        if request.with_key:
            self._authorize(call, MANAGED_CERTIFICATE_KEY_OPERATION, request.namespace)
        record = await self._live_managed(request.namespace, request.name)
        version = _version(record, request.version)
        call.detail = _what(record.namespace, record.name, version.version) + (
            ", with its private key" if request.with_key else ""
        )
        key = None
        if request.with_key:
            if not version.exportable:
                raise ServiceError(
                    ErrorCode.KEY_NOT_EXPORTABLE,
                    f"{_what(record.namespace, record.name, version.version)}: its private key "
                    "is not exportable (the policy keeps it in the daemon)",
                )
            key = await self._unwrap_managed_key(version)
        return ManagedCertificate(
            info=_info(version), certificate=version.certificate, chain=version.chain, key=key
        )

    @handles(ListManagedCertificates)
    async def _list_managed(
        self, call: _Call, request: ListManagedCertificates
    ) -> ListManagedCertificatesResult:
        self._require_some_grant(call, "list-managed-certificates")
        limit = request.limit or LIST_DEFAULT_LIMIT
        after = (request.after[0], request.after[1]) if request.after else ("", "")
        pattern = request.namespace
        exact = pattern if pattern is not None and not _is_glob(pattern) else None
        found: list[ManagedCertificateSummary] = []
        while True:
            records = await self.store.list_managed_certificates(
                namespace=exact, deleted=bool(request.deleted), after=after, limit=limit
            )
            for record in records:
                if pattern is not None and not fnmatch.fnmatchcase(record.namespace, pattern):
                    continue
                if self._may(call, "list-managed-certificates", record.namespace):
                    found.append(_summary(record))
            if len(records) < limit or len(found) >= limit:
                break
            after = (records[-1].namespace, records[-1].name)
        page = found[:limit]
        next_after = (page[-1].namespace, page[-1].name) if len(found) >= limit else None
        return ListManagedCertificatesResult(certificates=tuple(page), next=next_after)

    @handles(ManagedCertificateVersions)
    async def _managed_versions(
        self, call: _Call, request: ManagedCertificateVersions
    ) -> ManagedCertificateVersionsResult:
        self._authorize(call, "managed-certificate-versions", request.namespace)
        record = await self._managed_record(request.namespace, request.name)
        call.detail = f"managed certificate {record.name!r}"
        return ManagedCertificateVersionsResult(versions=tuple(_info(v) for v in record.versions))

    # -- revoke, delete, recover, purge ------------------------------------------------

    @handles(RevokeManagedCertificate, changes_state=True)
    async def _revoke_managed(
        self, call: _Call, request: RevokeManagedCertificate
    ) -> ManagedCertificateInfo:
        self._authorize(call, "revoke-managed-certificate", request.namespace)
        record = await self._managed_record(request.namespace, request.name)
        version = _version(record, request.version)
        reason = request.reason or "unspecified"
        call.detail = (
            _what(record.namespace, record.name, version.version)
            + f", serial {version.serial}, reason {reason}"
        )
        now = self._now()
        await self.store.revoke_managed_certificate_version(
            record.namespace, record.name, version.version, now, reason
        )
        if version.revoked_at is None:
            version = attrs.evolve(version, revoked_at=now, revocation_reason=reason)
        ours = await self.store.get_issued_certificate(version.serial)
        if version.issuer == "online-ca" and ours is not None and self.online_ca is not None:
            # The online CA's own: on its CRL at once, which the daemon itself checks.
            await self.store.revoke_issued_certificate(version.serial, now, reason)
            await self.refresh_crl()
        log.warning("revoked %s for %s", call.detail, call.caller.identity)
        return _info(version)

    @handles(DeleteManagedCertificate, changes_state=True)
    async def _delete_managed(
        self, call: _Call, request: DeleteManagedCertificate
    ) -> ManagedCertificateSummary:
        self._authorize(call, "delete-managed-certificate", request.namespace)
        record = await self._live_managed(request.namespace, request.name)
        now = self._now()
        purge_at = now + self.lifecycle.soft_delete_seconds
        call.detail = f"managed certificate {record.name!r}, purge at {purge_at}"
        await self.store.set_managed_certificate_deleted(
            record.namespace, record.name, now, purge_at
        )
        log.warning("deleted %s for %s", call.detail, call.caller.identity)
        return _summary(attrs.evolve(record, deleted_at=now, purge_at=purge_at))

    @handles(RecoverManagedCertificate, changes_state=True)
    async def _recover_managed(
        self, call: _Call, request: RecoverManagedCertificate
    ) -> ManagedCertificateSummary:
        self._authorize(call, "recover-managed-certificate", request.namespace)
        record = await self._managed_record(request.namespace, request.name)
        call.detail = f"managed certificate {record.name!r}"
        if not record.deleted:
            raise ServiceError(
                ErrorCode.WRONG_STATE, f"managed certificate {record.name!r} is not deleted"
            )
        await self.store.set_managed_certificate_deleted(record.namespace, record.name, None, None)
        return _summary(attrs.evolve(record, deleted_at=None, purge_at=None))

    @handles(PurgeManagedCertificate, changes_state=True)
    async def _purge_managed(
        self, call: _Call, request: PurgeManagedCertificate
    ) -> ManagedCertificateSummary:
        self._authorize(call, "purge-managed-certificate", request.namespace)
        record = await self._managed_record(request.namespace, request.name)
        call.detail = f"managed certificate {record.name!r}"
        if not record.deleted:
            raise ServiceError(
                ErrorCode.WRONG_STATE,
                f"managed certificate {record.name!r} is not deleted; delete it first "
                "(a purge is final)",
            )
        await self.store.purge_managed_certificate(record.namespace, record.name)
        await self.store.checkpoint()  # the erased keys leave the WAL too
        log.warning("purged managed certificate %r in %r", record.name, record.namespace)
        return _summary(attrs.evolve(record, versions=()))

    # -- maintenance -------------------------------------------------------------------

    async def maintain(self) -> None:
        await super().maintain()
        await self.renew_managed_due()

    async def renew_managed_due(self) -> int:
        """Renew every managed certificate whose lifetime action is due; returns how many.

        Each renewal is audited as ``local:kmipd`` and held to the grants of the
        identity that created the certificate; one that is refused is logged and
        tried again at the next pass (metrics and check-config show it ageing).
        """
        if self.online_ca is None:
            return 0
        now = self._now()
        renewed = 0
        for namespace, name, _, _ in await self.store.managed_certificate_expiry():
            record = await self.store.get_managed_certificate(namespace, name)
            if record is None or record.deleted or record.latest is None:
                continue
            due = renew_after(record)
            if due is None or now < due:
                continue
            call = _Call(Caller(SERVER_RENEWAL_IDENTITY), "renew-managed-certificate")
            call.namespace, call.detail = namespace, f"managed certificate {name!r}"
            try:
                await self._renew_record(call, record, record.created_by)
            except ServiceError as exc:
                log.error(
                    "cannot renew managed certificate %r in %r automatically: %s",
                    name,
                    namespace,
                    exc.message,
                )
                self._audit(call, exc.code.wire_name)
                continue
            self._audit(call, "ok")
            renewed += 1
        return renewed

    async def purge_due(self) -> int:
        purged = await super().purge_due()
        count = 0
        for namespace, name in await self.store.managed_certificates_due_for_purge(self._now()):
            try:
                await self.store.purge_managed_certificate(namespace, name)
            except StaleRecordError:
                continue
            count += 1
            log.info("purged managed certificate %r in %r: its window ended", name, namespace)
        if count:
            await self.store.checkpoint()
        return purged + count

    async def run_rewrap_batch(self, job: RewrapJob, batch_size: int) -> RewrapJob:
        """A job's first batch rewraps the namespace's managed keys too (as its secrets)."""
        if not job.cursor:
            target = self._kek_version(job.namespace, job.target)
            rewrapped = await self.rewrap_managed_keys(job.namespace, target)
            if rewrapped:
                log.info("rewrap job %s: %d managed key(s) rewrapped", job.job_id, rewrapped)
        return await super().run_rewrap_batch(job, batch_size)

    async def rewrap_managed_keys(self, namespace: str, target: KekVersion) -> int:
        """Rewrap every managed-certificate key of a namespace under ``target``.

        Batch by batch, each row only if still under the version read; a key that
        does not unwrap (its row altered) is logged and left where it is.
        """
        total = 0
        skipped: set[tuple[str, int]] = set()
        while True:
            batch = await self.store.managed_keys_to_rewrap(
                namespace, target.version, REWRAP_BATCH + len(skipped)
            )
            batch = [v for v in batch if (v.name, v.version) not in skipped]
            if not batch:
                return total
            updates = []
            for version in batch:
                try:
                    key = await self._unwrap_managed_key(version)
                except ServiceError as exc:
                    log.warning("rewrap: skipping the key of %s: %s", version.name, exc.message)
                    skipped.add((version.name, version.version))
                    continue
                wrapped = await self.hsm.wrap(
                    target.hsm_handle,
                    key,
                    managed_key_associated_data(
                        version.namespace, version.name, version.version, target.version
                    ),
                )
                updates.append((version, wrapped))
            total += await self.store.rewrap_managed_keys(target.version, updates)

    async def _destroy_blockers(self, target: KekVersion) -> str | None:
        blockers = await super()._destroy_blockers(target)
        if blockers is not None:
            return blockers
        count = await self.store.count_managed_keys_under(target.kek, target.version)
        if count:
            return (
                f"{count} managed certificate key(s) are wrapped only under this KEK "
                "version; rewrap them first (start-rewrap), or destroy with force to make "
                "them unrecoverable"
            )
        return None

    # -- helpers -----------------------------------------------------------------------

    def _managed_grants(self, identity: str, plan: _Plan) -> list[CertificateGrant]:
        grants = self.policy.certificate_grants_for(identity)
        if not grants:
            raise ServiceError(
                ErrorCode.NOT_AUTHORIZED,
                f"{identity} has no certificate grant ([[certificate_grant]])",
            )
        if plan.usage == ExtendedKeyUsageOID.CLIENT_AUTH:
            grants = [g for g in grants if g.client]
            if not grants:
                raise ServiceError(
                    ErrorCode.CERTIFICATE_NAME_NOT_ALLOWED,
                    f"{identity}'s certificate grant does not allow clientAuth certificates",
                )

        def allows(grant: CertificateGrant, kind: str, value: str) -> bool:
            if kind == "dns":
                return grant.allows_dns(value)
            if kind == "uri":
                return grant.allows_uri(value) or (grant.client and value == identity)
            return grant.allows_ip(value)

        wanted = (
            [("dns", n) for n in plan.dns]
            + [("uri", n) for n in plan.uris]
            + [("ip", n) for n in plan.ips]
        )
        allowed = [g for g in grants if all(allows(g, k, v) for k, v in wanted)]
        if not allowed:
            outside = [(k, v) for k, v in wanted if not any(allows(g, k, v) for g in grants)]
            what = (
                f"the {outside[0][0]} name {outside[0][1]!r}"
                if outside
                else "all these names in one certificate"
            )
            raise ServiceError(
                ErrorCode.CERTIFICATE_NAME_NOT_ALLOWED,
                f"{identity}'s certificate grants do not allow {what} "
                "(server_dns, uris and ips of [[certificate_grant]] bound them)",
            )
        return allowed

    async def _managed_record(self, namespace: str, name: str) -> ManagedCertificateRecord:
        record = await self.store.get_managed_certificate(namespace, name)
        if record is None:
            raise ServiceError(
                ErrorCode.NOT_FOUND, f"no managed certificate {name!r} in namespace {namespace!r}"
            )
        return record

    async def _live_managed(self, namespace: str, name: str) -> ManagedCertificateRecord:
        record = await self._managed_record(namespace, name)
        if record.deleted:
            raise _deleted(record)
        return record

    async def _unwrap_managed_key(self, version: ManagedCertificateVersion) -> bytes:
        kek = self._kek_version(version.namespace, version.kek_version)
        what = _what(version.namespace, version.name, version.version)
        if not kek.hsm_handle:
            raise ServiceError(
                ErrorCode.KEY_DESTROYED, f"the KEK version wrapping the key of {what} is gone"
            )
        with _unwrap_errors(kek, f"the stored key of {what} (its row was altered or moved)"):
            return await self.hsm.unwrap(
                kek.hsm_handle,
                version.wrapped_key,
                managed_key_associated_data(
                    version.namespace, version.name, version.version, version.kek_version
                ),
            )


# -- the policy ----------------------------------------------------------------------------


def check_policy(policy: CertificatePolicy) -> _Plan:
    """The policy's meaning, or CERTIFICATE_POLICY_INVALID naming the field at fault."""
    if policy.key_type not in MANAGED_KEY_TYPES:
        raise _invalid(
            "key-type", f"{policy.key_type!r} is not one of {', '.join(MANAGED_KEY_TYPES)}"
        )
    dns, ips = _check_names(policy)
    names = dns + tuple(policy.uri) + tuple(ips)
    if not names:
        raise _invalid("dns", "a certificate needs at least one name (dns, uri or ip)")
    if policy.subject is not None:
        try:
            subject = x509.Name.from_rfc4514_string(policy.subject)
        except ValueError as exc:
            raise _invalid(
                "subject", f"not an RFC 4514 name ({str(exc) or 'an unknown attribute type'})"
            ) from None
        if not list(subject):
            raise _invalid("subject", "empty")
    else:
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, names[0][:64])])
    if policy.renew_at_percent is not None and policy.renew_before is not None:
        raise _invalid(
            "lifetime action", "give renew-at-percent or renew-before, not both (or neither: none)"
        )
    if policy.renew_before is not None and policy.renew_before >= policy.validity:
        raise _invalid(
            "renew-before",
            f"{policy.renew_before} s before expiry is not within the validity "
            f"({policy.validity} s): it would renew at once, forever",
        )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.UniformResourceIdentifier(u) for u in policy.uri]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    usage = (
        ExtendedKeyUsageOID.CLIENT_AUTH
        if policy.usage == "client"
        else (ExtendedKeyUsageOID.SERVER_AUTH)
    )
    return _Plan(subject, tuple(sans), dns, tuple(policy.uri), tuple(ips), usage)


def _check_names(policy: CertificatePolicy) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DNS names lowercased, IP addresses normalised); URIs are checked, kept as given."""
    dns = tuple(n.lower() for n in policy.dns)
    for name in dns:
        if len(name) > 253 or _DNS_NAME.fullmatch(name) is None:
            raise _invalid("dns", f"{name!r} is not a DNS name")
    for uri in policy.uri:
        parsed = urllib.parse.urlsplit(uri)
        if not parsed.scheme or not (parsed.netloc or parsed.path) or any(c.isspace() for c in uri):
            raise _invalid("uri", f"{uri!r} is not an absolute URI (scheme:...)")
    ips: list[str] = []
    for text in policy.ip:
        try:
            ips.append(str(ipaddress.ip_address(text)))
        except ValueError:
            raise _invalid("ip", f"{text!r} is not an IPv4 or IPv6 address") from None
    return dns, tuple(ips)


def renew_after(record: ManagedCertificateRecord) -> int | None:
    """When the lifetime action renews the newest version; None: never by itself."""
    policy = _policy_of(record)
    latest = record.latest
    if policy is None or latest is None:
        return None
    if policy.renew_at_percent is not None:
        span = latest.not_after - latest.not_before
        return latest.not_before + span * policy.renew_at_percent // 100
    if policy.renew_before is not None:
        return latest.not_after - policy.renew_before
    return None


def _policy_of(record: ManagedCertificateRecord) -> CertificatePolicy | None:
    if record.policy is None:
        return None
    return parse_struct(CertificatePolicy, json.loads(record.policy), "policy")


# -- imports -------------------------------------------------------------------------------


def _check_import(
    request: ImportManagedCertificate, now: int
) -> tuple[x509.Certificate, PrivateKey, list[x509.Certificate]]:
    try:
        cert = x509.load_der_x509_certificate(request.certificate)
        cert.public_key()
    except (ValueError, TypeError) as exc:
        raise _bad_import(
            f"the certificate is not valid DER X.509 ({type(exc).__name__})"
        ) from None
    try:
        key = serialization.load_der_private_key(request.key, password=None)
    except (ValueError, TypeError) as exc:
        raise _bad_import(
            f"the private key is not an unencrypted PKCS#8 DER key ({type(exc).__name__})"
        ) from None
    if key_type_of(cert.public_key()) is None:
        raise _bad_import(
            f"the certificate's key ({describe_key(cert.public_key())}) is not accepted: "
            "use EC P-256, P-384, RSA of 3072 bits or more, or Ed25519"
        )
    public = key.public_key()
    if spki_der(public) != spki_der(cert.public_key()):  # type: ignore[arg-type]
        raise _bad_import("the private key is not the key of the certificate")
    not_after = int(cert.not_valid_after_utc.timestamp())
    if not_after <= now:
        raise _bad_import(f"the certificate expired at {cert.not_valid_after_utc.isoformat()}")
    chain: list[x509.Certificate] = []
    for index, der in enumerate(request.chain):
        try:
            chain.append(x509.load_der_x509_certificate(der))
        except ValueError:
            raise _bad_import(f"chain[{index}] is not valid DER X.509") from None
    for index, (child, parent) in enumerate(zip([cert, *chain], chain, strict=False)):
        try:
            child.verify_directly_issued_by(parent)
        except (InvalidSignature, ValueError, TypeError):
            what = "the certificate" if index == 0 else f"chain[{index - 1}]"
            raise _bad_import(f"{what} is not signed by chain[{index}]") from None
    assert isinstance(key, PrivateKey)
    return cert, key, chain


# -- small helpers -------------------------------------------------------------------------


def _pkcs8(key: Any) -> bytes:
    der: bytes = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return der


def _key_type(public_key: Any) -> str:
    if key_type_of(public_key) == "rsa3072":
        return f"rsa{public_key.key_size}"
    return key_type_of(public_key) or describe_key(public_key)


def _san_texts(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(n.value) for n in sans)[:300]


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _what(namespace: str, name: str, version: int) -> str:
    return f"managed certificate {name!r} in {namespace!r} version {version}"


def _version(record: ManagedCertificateRecord, number: int | None) -> ManagedCertificateVersion:
    version = record.latest if number is None else record.version(number)
    if version is None:
        raise ServiceError(
            ErrorCode.UNKNOWN_CERTIFICATE_VERSION,
            f"managed certificate {record.name!r} has no version {number}"
            f" (versions 1..{len(record.versions)})",
        )
    return version


def _invalid(field: str, problem: str) -> ServiceError:
    return ServiceError(ErrorCode.CERTIFICATE_POLICY_INVALID, f"policy {field}: {problem}")


def _bad_import(problem: str) -> ServiceError:
    return ServiceError(ErrorCode.CERTIFICATE_IMPORT_INVALID, f"{problem}; nothing was imported")


def _deleted(record: ManagedCertificateRecord) -> ServiceError:
    return ServiceError(
        ErrorCode.MANAGED_CERTIFICATE_DELETED,
        f"managed certificate {record.name!r} in {record.namespace!r} is deleted (purge at "
        f"{record.purge_at}); recover it first",
    )


def _exists(record: ManagedCertificateRecord) -> ServiceError:
    if record.deleted:
        return ServiceError(
            ErrorCode.ALREADY_EXISTS,
            f"managed certificate {record.name!r} in {record.namespace!r} exists, deleted: "
            "recover it, or purge it to reuse the name",
        )
    return ServiceError(
        ErrorCode.ALREADY_EXISTS,
        f"managed certificate {record.name!r} in {record.namespace!r} already exists "
        "(renew it for a new version)",
    )


def _add_refused(outcome: str, namespace: str, name: str) -> ServiceError:
    if outcome == "exists":
        return ServiceError(
            ErrorCode.ALREADY_EXISTS,
            f"managed certificate {name!r} in {namespace!r} was created meanwhile",
        )
    if outcome == "deleted":
        return ServiceError(
            ErrorCode.MANAGED_CERTIFICATE_DELETED,
            f"managed certificate {name!r} was deleted meanwhile",
        )
    return ServiceError(ErrorCode.NOT_FOUND, f"managed certificate {name!r} was purged meanwhile")


def _info(version: ManagedCertificateVersion) -> ManagedCertificateInfo:
    return ManagedCertificateInfo(
        namespace=version.namespace,
        name=version.name,
        version=version.version,
        serial=version.serial,
        issuer=version.issuer,
        subject=version.subject[:1024],
        names=version.names,
        key_type=version.key_type,
        exportable=version.exportable,
        not_before=version.not_before,
        not_after=version.not_after,
        created=version.created_at,
        created_by=version.created_by,
        revoked=version.revoked_at,
        revocation_reason=version.revocation_reason,
    )


def _summary(record: ManagedCertificateRecord) -> ManagedCertificateSummary:
    latest = record.latest
    return ManagedCertificateSummary(
        namespace=record.namespace,
        name=record.name,
        versions=len(record.versions),
        created=record.created_at,
        policy=_policy_of(record),
        current=_info(latest) if latest is not None else None,
        renew_after=renew_after(record),
        deleted=record.deleted_at,
        purge_at=record.purge_at,
    )
