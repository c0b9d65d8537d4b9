"""Secrets: named, versioned values kept beside the keys, wrapped under the namespace's KEK.

A secret lives in a namespace (a KEK name) under a name; every set adds a
version. A version's value is stored only as AES-GCM under a KEK version of
its namespace, through the HSM backend, with associated data binding it to
namespace, name, version and KEK version (``secret_associated_data``), as
DEKs are bound to their rows. Reads get the newest enabled version or a named
one; a disabled, expired or not-yet-valid version is refused with its own
error code. Delete is soft (recover until the purge date, as keys); purge
erases the rows (``secure_delete``, then a WAL checkpoint).

API for callers other than the native protocol (e.g. KMIP Secret Data): send
the request objects from ``kmipd.protocol`` through ``KeyService.handle`` with
a ``Caller``; authorization, size limit and audit are the same as over the
native protocol::

    info = await service.handle(caller, SetSecret(namespace="db", name="repl",
                                                  value=b"...", content_type="text/plain"))
    got = await service.handle(caller, GetSecret(namespace="db", name="repl"))
    got.value, got.version, got.content_type       # SecretValue (value redacted in repr)

Operations and grants: ``get-secret``, ``list-secrets`` and ``secret-versions``
form the ``secrets-read`` group; ``set-secret``, ``update-secret``,
``delete-secret``, ``recover-secret``, ``purge-secret`` (and the listings) the
``secrets-manage`` group. Audit records name the secret and version, never a value.

``SecretOperations`` is a family of KeyService (see ``kmipd.service._core``);
it joins the key families where secrets depend on KEKs: a rewrap job's last
batch rewraps the namespace's secrets, the maintenance pass purges deleted
secrets whose window ended, and destroying a KEK version that still wraps a
secret version needs ``force``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import attrs

from kmipd.protocol import (
    DeleteSecret,
    ErrorCode,
    GetSecret,
    ListSecrets,
    ListSecretsResult,
    PurgeSecret,
    RecoverSecret,
    SecretInfo,
    SecretSummary,
    SecretValue,
    SecretVersions,
    SecretVersionsResult,
    SetSecret,
    UpdateSecret,
    encode_deterministic,
)
from kmipd.service._core import ServiceError, _Call, _kek_what, _unwrap_errors, handles
from kmipd.service._lifecycle import LifecycleOperations
from kmipd.service._rewrap import RewrapOperations
from kmipd.store import (
    AlreadyExistsError,
    KekVersion,
    RewrapJob,
    SecretDeletedError,
    SecretRecord,
    SecretVersion,
    StaleRecordError,
)

log = logging.getLogger("kmipd.service")

#: secrets.max_size's default: a certificate bundle or a credentials file fits.
DEFAULT_MAX_SECRET_SIZE = 64 * 1024
DEFAULT_CONTENT_TYPE = "application/octet-stream"
LIST_DEFAULT_LIMIT = 100
#: How many versions are rewrapped per transaction when the KEK rotates.
REWRAP_BATCH = 200
#: Attempts at numbering a new version when other sets race for the same number.
_SET_ATTEMPTS = 8


#: KMIP Unique Identifiers of secret versions: ``secret:NAMESPACE:NAME:VERSION``.
#: Namespaces and secret names never hold a colon, so the id parses back.
SECRET_UID_PREFIX = "secret:"  # noqa: S105 - an id prefix


def secret_uid(namespace: str, name: str, version: int) -> str:
    return f"{SECRET_UID_PREFIX}{namespace}:{name}:{version}"


def parse_secret_uid(uid: str) -> tuple[str, str, int] | None:
    """(namespace, name, version) of a secret version's KMIP id; None for any other id."""
    if not uid.startswith(SECRET_UID_PREFIX):
        return None
    parts = uid[len(SECRET_UID_PREFIX) :].split(":")
    if len(parts) != 3 or not parts[2].isdigit() or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1], int(parts[2])


@attrs.frozen
class LocateSecrets:
    """KMIP Locate's view of the secrets: the current version of each match.

    Only secrets the caller may list are seen (others are not even counted), and
    a caller with no secret grant at all simply finds none: a key-only KMIP
    client's Locate still works.
    """

    OPERATION: ClassVar[str] = "list-secrets"
    name: str | None = None
    namespace: str | None = None


@attrs.frozen
class LocatedSecrets:
    #: The newest enabled version of each matching secret (KMIP's Name goes to it).
    versions: tuple[SecretInfo, ...]


def secret_associated_data(namespace: str, name: str, version: int, kek_version: int) -> bytes:
    """Binds a stored value to its row: a value moved to another secret or version fails."""
    return encode_deterministic(["kmipd/secret/v1", namespace, name, version, kek_version])


class SecretOperations(RewrapOperations, LifecycleOperations):
    """The secret operations (see the module docstring)."""

    def __init__(self, *, secret_max_size: int = DEFAULT_MAX_SECRET_SIZE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: secrets.max_size: the largest value set-secret accepts (a reload changes it).
        self.secret_max_size = secret_max_size

    # -- writes ------------------------------------------------------------------------

    @handles(SetSecret, changes_state=True)
    async def _set_secret(self, call: _Call, request: SetSecret) -> SecretInfo:
        svc = self
        svc._authorize(call, "set-secret", request.namespace)
        if len(request.value) > self.secret_max_size:
            raise _error(
                ErrorCode.SECRET_TOO_LARGE,
                f"the value is {len(request.value)} bytes; the daemon's secrets.max_size "
                f"is {self.secret_max_size}",
            )
        _check_dates(request.not_before, request.expires)
        kek = await svc._kek_for_new_key(request.namespace, call.caller.identity)
        for _ in range(_SET_ATTEMPTS):
            existing = await svc.store.get_secret(request.namespace, request.name)
            if existing is not None and existing.deleted:
                raise _deleted(existing)
            latest = existing.latest if existing is not None else None
            number = latest.version + 1 if latest is not None else 1
            kek_version = await svc._version_for_protection(call, kek)
            call.detail = _what(request.namespace, request.name, number)
            wrapped = await svc.hsm.wrap(
                kek_version.hsm_handle,
                request.value,
                secret_associated_data(
                    request.namespace, request.name, number, kek_version.version
                ),
            )
            now = svc._now()
            version = SecretVersion(
                namespace=request.namespace,
                name=request.name,
                version=number,
                kek_version=kek_version.version,
                wrapped=wrapped,
                size=len(request.value),
                content_type=request.content_type
                if request.content_type is not None
                else (latest.content_type if latest is not None else DEFAULT_CONTENT_TYPE),
                tags=dict(request.tags) if request.tags is not None else {},
                enabled=request.enabled if request.enabled is not None else True,
                not_before=request.not_before,
                expires=request.expires,
                created_at=now,
                created_by=call.caller.identity,
                updated_at=now,
            )
            try:
                await svc.store.add_secret_version(version)
            except AlreadyExistsError:
                continue  # another set took this number: wrap again under the next
            except SecretDeletedError:
                raise _error(
                    ErrorCode.SECRET_DELETED, f"secret {request.name!r} was deleted meanwhile"
                ) from None
            return _info(version)
        raise _error(ErrorCode.BUSY, f"secret {request.name!r} is being set by others; retry")

    @handles(UpdateSecret, changes_state=True)
    async def _update_secret(self, call: _Call, request: UpdateSecret) -> SecretInfo:
        svc = self
        svc._authorize(call, "update-secret", request.namespace)
        record = await self._live_secret(request.namespace, request.name)
        version = self._secret_version(record, request.version)
        call.detail = _what(record.namespace, record.name, version.version)
        changes: dict[str, object] = {}
        if request.enabled is not None:
            changes["enabled"] = request.enabled
        if request.not_before is not None:
            changes["not_before"] = request.not_before or None  # 0 clears
        if request.expires is not None:
            changes["expires"] = request.expires or None
        if request.tags is not None:
            changes["tags"] = dict(request.tags)
        if request.content_type is not None:
            changes["content_type"] = request.content_type
        updated = attrs.evolve(version, updated_at=svc._now(), **changes)  # type: ignore[arg-type]
        _check_dates(updated.not_before, updated.expires)
        await svc.store.update_secret_version(updated)
        return _info(updated)

    @handles(DeleteSecret, changes_state=True)
    async def _delete_secret(self, call: _Call, request: DeleteSecret) -> SecretSummary:
        svc = self
        svc._authorize(call, "delete-secret", request.namespace)
        record = await self._live_secret(request.namespace, request.name)
        now = svc._now()
        purge_at = now + svc.lifecycle.soft_delete_seconds
        call.detail = f"secret {record.name!r}, purge at {purge_at}"
        await svc.store.set_secret_deleted(record.namespace, record.name, now, purge_at)
        log.warning(
            "deleted secret %r in %r for %s", record.name, record.namespace, call.caller.identity
        )
        return _summary(attrs.evolve(record, deleted_at=now, purge_at=purge_at))

    @handles(RecoverSecret, changes_state=True)
    async def _recover_secret(self, call: _Call, request: RecoverSecret) -> SecretSummary:
        svc = self
        svc._authorize(call, "recover-secret", request.namespace)
        record = await self._secret_record(request.namespace, request.name)
        call.detail = f"secret {record.name!r}"
        if not record.deleted:
            raise _error(ErrorCode.WRONG_STATE, f"secret {record.name!r} is not deleted")
        await svc.store.set_secret_deleted(record.namespace, record.name, None, None)
        return _summary(attrs.evolve(record, deleted_at=None, purge_at=None))

    @handles(PurgeSecret, changes_state=True)
    async def _purge_secret(self, call: _Call, request: PurgeSecret) -> SecretSummary:
        svc = self
        svc._authorize(call, "purge-secret", request.namespace)
        record = await self._secret_record(request.namespace, request.name)
        call.detail = f"secret {record.name!r}"
        if not record.deleted:
            raise _error(
                ErrorCode.WRONG_STATE,
                f"secret {record.name!r} is not deleted; delete it first (a purge is final)",
            )
        await svc.store.purge_secret(record.namespace, record.name)
        await svc.store.checkpoint()  # the erased bytes leave the WAL too
        log.warning("purged secret %r in %r", record.name, record.namespace)
        return _summary(attrs.evolve(record, versions=()))

    # -- reads -------------------------------------------------------------------------

    @handles(GetSecret)
    async def _get_secret(self, call: _Call, request: GetSecret) -> SecretValue:
        svc = self
        svc._authorize(call, "get-secret", request.namespace)
        record = await self._live_secret(request.namespace, request.name)
        if request.version is not None:
            version = self._secret_version(record, request.version)
            if not version.enabled:
                raise _error(
                    ErrorCode.SECRET_DISABLED,
                    f"{_what(record.namespace, record.name, version.version)} is disabled",
                )
        else:
            enabled = [v for v in record.versions if v.enabled]
            if not enabled:
                raise _error(
                    ErrorCode.SECRET_DISABLED,
                    f"secret {record.name!r} in {record.namespace!r} has no enabled version",
                )
            version = enabled[-1]
        call.detail = _what(record.namespace, record.name, version.version)
        call.kek, call.kek_version = version.namespace, version.kek_version
        now = svc._now()
        if version.not_before is not None and now < version.not_before:
            raise _error(
                ErrorCode.SECRET_NOT_YET_VALID,
                f"{call.detail} is not valid before {version.not_before}",
            )
        if version.expires is not None and now >= version.expires:
            raise _error(ErrorCode.SECRET_EXPIRED, f"{call.detail} expired at {version.expires}")
        value = await self._unwrap_secret(version)
        return SecretValue(
            namespace=version.namespace,
            name=version.name,
            version=version.version,
            content_type=version.content_type,
            tags=version.tags,
            value=value,
            not_before=version.not_before,
            expires=version.expires,
        )

    @handles(ListSecrets)
    async def _list_secrets(self, call: _Call, request: ListSecrets) -> ListSecretsResult:
        svc = self
        svc._require_some_grant(call, "list-secrets")
        limit = request.limit or LIST_DEFAULT_LIMIT
        after = (request.after[0], request.after[1]) if request.after else ("", "")
        records = await svc.store.list_secrets(
            namespace=request.namespace, deleted=bool(request.deleted), after=after, limit=limit
        )
        found = tuple(_summary(r) for r in records if svc._may(call, "list-secrets", r.namespace))
        next_after = (records[-1].namespace, records[-1].name) if len(records) == limit else None
        return ListSecretsResult(secrets=found, next=next_after)

    @handles(SecretVersions)
    async def _secret_versions(self, call: _Call, request: SecretVersions) -> SecretVersionsResult:
        self._authorize(call, "secret-versions", request.namespace)
        record = await self._secret_record(request.namespace, request.name)
        call.detail = f"secret {record.name!r}"
        return SecretVersionsResult(versions=tuple(_info(v) for v in record.versions))

    @handles(LocateSecrets)
    async def _locate_secrets(self, call: _Call, request: LocateSecrets) -> LocatedSecrets:
        if not self.policy.allows_anywhere(call.caller.identity, "list-secrets"):
            return LocatedSecrets(())
        found: list[SecretInfo] = []
        after = ("", "")
        while True:
            records = await self.store.list_secrets(
                namespace=request.namespace,
                deleted=False,
                after=after,
                limit=LIST_DEFAULT_LIMIT,
                name=request.name,
            )
            for record in records:
                if not self._may(call, "list-secrets", record.namespace):
                    continue
                current = [v for v in record.versions if v.enabled]
                if current:
                    found.append(_info(current[-1]))
            if len(records) < LIST_DEFAULT_LIMIT:
                return LocatedSecrets(tuple(found))
            after = (records[-1].namespace, records[-1].name)

    # -- KEK rotation ------------------------------------------------------------------

    async def rewrap_secrets(self, namespace: str, target: KekVersion) -> int:
        """Rewrap every secret version of a namespace under ``target``; returns how many.

        Each batch commits in one transaction, each row only if still under the
        version read, so a crash mid-way loses nothing and a rerun continues.
        A version that does not unwrap (its row altered) is logged and left
        under its old KEK version, which then cannot be destroyed without force.
        """
        svc = self
        total = 0
        skipped: set[tuple[str, int]] = set()
        while True:
            batch = await svc.store.secret_versions_to_rewrap(
                namespace, target.version, REWRAP_BATCH + len(skipped)
            )
            batch = [v for v in batch if (v.name, v.version) not in skipped]
            if not batch:
                return total
            updates = []
            for version in batch:
                try:
                    value = await self._unwrap_secret(version)
                except ServiceError as exc:
                    log.warning("rewrap: skipping %s: %s", _of(version), exc.message)
                    skipped.add((version.name, version.version))
                    continue
                wrapped = await svc.hsm.wrap(
                    target.hsm_handle,
                    value,
                    secret_associated_data(
                        version.namespace, version.name, version.version, target.version
                    ),
                )
                updates.append((version, wrapped))
            total += await svc.store.rewrap_secret_versions(target.version, updates)

    async def run_rewrap_batch(self, job: RewrapJob, batch_size: int) -> RewrapJob:
        """A job's first batch rewraps the namespace's secrets, then each batch its DEKs.

        Secrets first: the batch that finds no more DEKs commits the job as
        done, and a job seen done must mean its secrets are rewrapped too.
        Versions set after the job started are wrapped under its target already.
        """
        if not job.cursor:  # no DEK batch committed yet: this is the job's start (or restart)
            target = self._kek_version(job.namespace, job.target)
            rewrapped = await self.rewrap_secrets(job.namespace, target)
            if rewrapped:
                log.info("rewrap job %s: %d secret version(s) rewrapped", job.job_id, rewrapped)
        return await super().run_rewrap_batch(job, batch_size)

    async def _destroy_blockers(self, target: KekVersion) -> str | None:
        blockers = await super()._destroy_blockers(target)
        if blockers is not None:
            return blockers
        count = await self.store.count_secret_versions_under(target.kek, target.version)
        if count:
            return (
                f"{count} secret version(s) are wrapped only under {_kek_what(target)}; "
                "rewrap them first (start-rewrap), or destroy with force to make them "
                "unrecoverable"
            )
        return None

    # -- maintenance -------------------------------------------------------------------

    async def purge_due(self) -> int:
        """Keys first (kmipd.service._maintenance), then deleted secrets whose window ended."""
        purged = await super().purge_due()
        secrets_purged = await self.purge_secrets_due()
        if secrets_purged:
            await self.store.checkpoint()  # the erased bytes leave the WAL too
        return purged + secrets_purged

    async def purge_secrets_due(self) -> int:
        """Erase deleted secrets whose soft-delete window ended."""
        svc = self
        due = await svc.store.secrets_due_for_purge(svc._now())
        purged = 0
        for namespace, name in due:
            try:
                await svc.store.purge_secret(namespace, name)
            except StaleRecordError:
                continue  # recovered on another daemon (PostgreSQL) since it was listed
            purged += 1
            log.info("purged secret %r in %r: its soft-delete window ended", name, namespace)
        return purged

    # -- helpers -----------------------------------------------------------------------

    async def _secret_record(self, namespace: str, name: str) -> SecretRecord:
        record = await self.store.get_secret(namespace, name)
        if record is None:
            raise _error(ErrorCode.NOT_FOUND, f"no secret {name!r} in namespace {namespace!r}")
        return record

    async def _live_secret(self, namespace: str, name: str) -> SecretRecord:
        record = await self._secret_record(namespace, name)
        if record.deleted:
            raise _deleted(record)
        return record

    @staticmethod
    def _secret_version(record: SecretRecord, number: int | None) -> SecretVersion:
        version = record.latest if number is None else record.version(number)
        if version is None:
            raise _error(
                ErrorCode.UNKNOWN_SECRET_VERSION,
                f"secret {record.name!r} has no version {number}"
                f" (versions 1..{len(record.versions)})",
            )
        return version

    async def _unwrap_secret(self, version: SecretVersion) -> bytes:
        svc = self
        kek = svc._kek_version(version.namespace, version.kek_version)
        if not kek.hsm_handle:
            raise _error(
                ErrorCode.KEY_DESTROYED, f"the KEK version wrapping {_of(version)} is gone"
            )
        with _unwrap_errors(kek, f"stored {_of(version)} (its row was altered or moved)"):
            return await svc.hsm.unwrap(
                kek.hsm_handle,
                version.wrapped,
                secret_associated_data(
                    version.namespace, version.name, version.version, version.kek_version
                ),
            )


def _error(code: ErrorCode, message: str) -> ServiceError:
    return ServiceError(code, message)


def _deleted(record: SecretRecord) -> ServiceError:
    return _error(
        ErrorCode.SECRET_DELETED,
        f"secret {record.name!r} in {record.namespace!r} is deleted (purge at "
        f"{record.purge_at}); recover it first",
    )


def _check_dates(not_before: int | None, expires: int | None) -> None:
    if not_before is not None and expires is not None and expires <= not_before:
        raise _error(ErrorCode.BAD_REQUEST, "expires must be after not-before")


def _what(namespace: str, name: str, version: int) -> str:
    return f"secret {name!r} in {namespace!r} version {version}"


def _of(version: SecretVersion) -> str:
    return _what(version.namespace, version.name, version.version)


def _info(version: SecretVersion) -> SecretInfo:
    return SecretInfo(
        namespace=version.namespace,
        name=version.name,
        version=version.version,
        kek_version=version.kek_version,
        size=version.size,
        content_type=version.content_type,
        tags=version.tags,
        enabled=version.enabled,
        created=version.created_at,
        updated=version.updated_at,
        not_before=version.not_before,
        expires=version.expires,
    )


def _summary(record: SecretRecord) -> SecretSummary:
    latest = record.latest
    return SecretSummary(
        namespace=record.namespace,
        name=record.name,
        versions=len(record.versions),
        created=record.created_at,
        latest=_info(latest) if latest is not None else None,
        deleted=record.deleted_at,
        purge_at=record.purge_at,
    )
