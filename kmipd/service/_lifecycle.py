"""Lifecycle operations: activate, revoke, destroy, recover, and the queries get-attributes,
locate, dependents and changes-since.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

from kmipd.lifecycle import Event, Lifecycle, RevocationReason, State, revocation_event
from kmipd.protocol import (
    Activate,
    ChangeInfo,
    ChangesResult,
    ChangesSince,
    Dependents,
    DependentsResult,
    Destroy,
    ErrorCode,
    GetAttributes,
    KeyAttributes,
    KeyRef,
    Locate,
    LocateResult,
    Recover,
    Revoke,
)
from kmipd.service._core import (
    ServiceError,
    _Call,
    _dek_attributes,
    _kek_what,
    _lifecycle_errors,
    handles,
)
from kmipd.service._maintenance import MaintenanceOperations
from kmipd.store import DekRecord, KekVersion

log = logging.getLogger("kmipd.service")

LOCATE_DEFAULT_LIMIT = 100


class LifecycleOperations(MaintenanceOperations):
    """State transitions of DEKs and KEK versions (NIST SP 800-57), and the queries over them.

    Destroy with purge-now purges at once (MaintenanceOperations.purge_due).
    """

    async def _transition(
        self, call: _Call, target: DekRecord | KekVersion, event: Event, **changes: Any
    ) -> KeyAttributes:
        with _lifecycle_errors():
            lifecycle = target.lifecycle.apply(event, self._now(), **changes)
        return await self._record(target, lifecycle)

    async def _record(self, target: DekRecord | KekVersion, lifecycle: Lifecycle) -> KeyAttributes:
        now = self._now()
        if isinstance(target, DekRecord):
            updated = await self.store.set_dek_lifecycle(target, lifecycle)
            return _dek_attributes(updated, now)
        await self.store.set_kek_version_lifecycle(target, lifecycle)
        return self._kek_attributes(self._kek_version(target.kek, target.version))

    @handles(Activate, changes_state=True)
    async def _activate(self, call: _Call, request: Activate) -> KeyAttributes:
        target = await self._resolve(call, "activate", request.key)
        return await self._transition(call, target, Event.ACTIVATE)

    @handles(Revoke, changes_state=True)
    async def _revoke(self, call: _Call, request: Revoke) -> KeyAttributes:
        target = await self._resolve(call, "revoke", request.key)
        reason = RevocationReason(request.reason)
        call.detail = f"reason {reason.value}"
        attributes = await self._transition(
            call,
            target,
            revocation_event(reason),
            revocation_reason=reason,
            revocation_message=request.message,
        )
        log.warning("revoked %s (%s) for %s", _what(target), reason.value, call.caller.identity)
        return attributes

    @handles(Destroy, changes_state=True)
    async def _destroy(self, call: _Call, request: Destroy) -> KeyAttributes:
        target = await self._resolve(call, "destroy", request.key)
        if isinstance(target, KekVersion) and not request.force:
            blockers = await self._destroy_blockers(target)
            if blockers is not None:
                raise ServiceError(ErrorCode.DEPENDENTS_EXIST, blockers)
        now = self._now()
        purge_at = now if request.purge_now else now + self.lifecycle.soft_delete_seconds
        call.detail = "purge now" if request.purge_now else f"purge at {purge_at}"
        with _lifecycle_errors():
            scheduled = target.lifecycle.schedule_destroy(now, purge_at)
        attributes = await self._record(target, scheduled)
        log.warning("destroying %s for %s (%s)", _what(target), call.caller.identity, call.detail)
        if purge_at <= now:
            await self.purge_due()
            return await self._attributes_of(call, request.key)
        return attributes

    async def _destroy_blockers(self, target: KekVersion) -> str | None:
        """Why the KEK version may not be destroyed without force (None: it may).

        Families whose objects a KEK version wraps (secrets) add theirs.
        """
        count, ids = await self.store.dependents(target.kek, target.version, 5)
        if count:
            return (
                f"{count} DEK(s) are wrapped only under {_kek_what(target)} "
                f"(e.g. {', '.join(ids)}); rewrap them first, or destroy with force "
                "to make them unrecoverable"
            )
        return None

    @handles(Recover, changes_state=True)
    async def _recover(self, call: _Call, request: Recover) -> KeyAttributes:
        target = await self._resolve(call, "recover", request.key)
        with _lifecycle_errors():
            lifecycle = target.lifecycle.cancel_destroy()
        return await self._record(target, lifecycle)

    # -- queries ---------------------------------------------------------------------------

    async def _attributes_of(self, call: _Call, ref: KeyRef) -> KeyAttributes:
        target = await self._resolve(call, "get-attributes", ref)
        if isinstance(target, DekRecord):
            return _dek_attributes(target, self._clock())
        return self._kek_attributes(target)

    @handles(GetAttributes)
    async def _get_attributes(self, call: _Call, request: GetAttributes) -> KeyAttributes:
        return await self._attributes_of(call, request.key)

    @handles(Locate)
    async def _locate(self, call: _Call, request: Locate) -> LocateResult:
        self._require_some_grant(call, "locate")
        now = self._clock()
        state = None if request.state is None else State(request.state)
        limit = request.limit or LOCATE_DEFAULT_LIMIT
        found: list[KeyAttributes] = []
        if request.kind in (None, "kek"):
            for kek in self.store.list_keks():
                if not self._namespace_matches(kek.name, request.namespace):
                    continue
                if not self._may(call, "locate", kek.name):
                    continue
                found.extend(
                    self._kek_attributes(version)
                    for version in kek.versions
                    if state is None or version.lifecycle.effective(now) is state
                )
        next_after = None
        if request.kind in (None, "dek"):
            records = await self.store.locate_deks(
                namespace=request.namespace, state=None, after=request.after or "", limit=limit
            )
            for record in records:
                if state is not None and record.lifecycle.effective(now) is not state:
                    continue
                if self._may(call, "locate", record.namespace):
                    found.append(_dek_attributes(record, now))
            if len(records) == limit:
                next_after = records[-1].dek_id
        return LocateResult(keys=tuple(found), next=next_after)

    @staticmethod
    def _namespace_matches(name: str, pattern: str | None) -> bool:
        return pattern is None or fnmatch.fnmatchcase(name, pattern)

    @handles(Dependents)
    async def _dependents(self, call: _Call, request: Dependents) -> DependentsResult:
        self._authorize(call, "dependents", request.kek)
        call.kek, call.kek_version = request.kek, request.version
        self._kek_version(request.kek, request.version)
        count, ids = await self.store.dependents(
            request.kek,
            request.version,
            LOCATE_DEFAULT_LIMIT if request.limit is None else request.limit,
        )
        return DependentsResult(count=count, dek_ids=tuple(ids))

    @handles(ChangesSince)
    async def _changes_since(self, call: _Call, request: ChangesSince) -> ChangesResult:
        self._require_some_grant(call, "changes-since")
        changes, newest, pruned = await self.store.changes_since(request.seq, request.limit or 1000)
        visible = tuple(
            ChangeInfo(
                seq=c.seq,
                at=c.at,
                namespace=c.namespace,
                state=c.state,
                dek_id=c.dek_id,
                kek_version=c.kek_version,
            )
            for c in changes
            if self._may(call, "changes-since", c.namespace)
        )
        # Fewer than the limit means the caller has everything up to ``newest``.
        seq = newest if len(changes) < (request.limit or 1000) else changes[-1].seq
        # Behind the pruned part of the feed: what it missed is gone, so say so.
        return ChangesResult(changes=visible, seq=seq, reset=True if request.seq < pruned else None)


def _what(target: DekRecord | KekVersion) -> str:
    return f"DEK {target.dek_id}" if isinstance(target, DekRecord) else _kek_what(target)
