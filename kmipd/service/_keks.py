"""KEK operations: create-kek, list-keks, rotate-kek, and choosing the KEK version a new wrap uses.

Also ``rotate`` (a KEK's next version) and the on-demand creation of a
namespace's KEK, which the key-delivery and rewrap families call.
"""

from __future__ import annotations

import logging

from kmipd.lifecycle import KEK_USAGES, State, Usage
from kmipd.protocol import (
    CreateKek,
    ErrorCode,
    KekInfo,
    KeyAttributes,
    ListKeks,
    ListKeksResult,
    RotateKek,
)
from kmipd.service._core import (
    ServiceCore,
    ServiceError,
    _Call,
    _kek_what,
    _lifecycle_errors,
    _usage,
    handles,
)
from kmipd.store import AlreadyExistsError, KekRecord, KekVersion

log = logging.getLogger("kmipd.service")


class KekOperations(ServiceCore):
    """KEK administration and the KEK version every new wrap goes under."""

    @handles(CreateKek, changes_state=True)
    async def _create_kek(self, call: _Call, request: CreateKek) -> KekInfo:
        self._authorize(call, "create-kek", request.name)
        call.kek = request.name
        now = self._now()
        if request.activation is not None and request.activation < now:
            raise ServiceError(
                ErrorCode.BAD_REQUEST,
                "args.activation is in the past; omit it to activate the KEK now",
            )
        usage = _usage(request.usage, KEK_USAGES)
        async with self._kek_changes:
            if self.store.get_kek(request.name) is not None:
                raise ServiceError(ErrorCode.ALREADY_EXISTS, f"KEK {request.name!r} already exists")
            kek = await self._make_kek(
                request.name, call.caller.identity, usage, request.activation
            )
        call.kek_version = 1
        log.info("created KEK %r for %s", request.name, call.caller.identity)
        return self._kek_info(kek)

    def _kek_info(self, kek: KekRecord) -> KekInfo:
        return KekInfo(
            name=kek.name,
            version=kek.latest.version,
            created=kek.created_at,
            state=kek.latest.lifecycle.effective(self._clock()).value,
        )

    @handles(ListKeks)
    async def _list_keks(self, call: _Call, request: ListKeks) -> ListKeksResult:
        self._require_some_grant(call, "list-keks")
        return ListKeksResult(
            keks=tuple(
                self._kek_info(kek)
                for kek in self.store.list_keks(request.prefix)
                if self._may(call, "list-keks", kek.name)
            )
        )

    @handles(RotateKek, changes_state=True)
    async def _rotate_kek(self, call: _Call, request: RotateKek) -> KeyAttributes:
        self._authorize(call, "rotate-kek", request.name)
        call.kek = request.name
        kek = await self.rotate(request.name, f"requested by {call.caller.identity}")
        call.kek_version = kek.latest.version
        return self._kek_attributes(kek.latest)

    async def _kek_for_new_key(self, namespace: str, identity: str) -> KekRecord:
        kek = self.store.get_kek(namespace)
        if kek is not None:
            return kek
        if not self._create_kek_on_demand:
            raise ServiceError(
                ErrorCode.NOT_FOUND,
                f"namespace {namespace!r} has no KEK; an administrator creates it "
                f"(kmipd kek create {namespace})",
            )
        async with self._kek_changes:
            kek = self.store.get_kek(namespace)
            if kek is not None:
                return kek
            try:
                kek = await self._make_kek(namespace, identity, KEK_USAGES, None)
            except ServiceError as exc:
                if exc.code is not ErrorCode.ALREADY_EXISTS or not self.store.shared:
                    raise
                # Another daemon sharing the store created it first: use theirs.
                await self.store.refresh_if_changed()
                kek = self.store.get_kek(namespace)
                if kek is None:
                    raise
                return kek
            log.info("created KEK %r on demand for %s", namespace, identity)
            return kek

    async def _make_kek(
        self, name: str, identity: str, usage: frozenset[Usage], activation: int | None
    ) -> KekRecord:
        now = self._now()
        handle = await self.hsm.generate_kek(f"{name}/v1")
        lifecycle = self.lifecycle.new_lifecycle("kek", name, now, usage, activation)
        version = KekVersion(name, 1, handle, now, lifecycle)
        try:
            return await self.store.create_kek(name, version, identity)
        except AlreadyExistsError:
            await self.hsm.destroy_kek(handle)
            raise ServiceError(ErrorCode.ALREADY_EXISTS, f"KEK {name!r} already exists") from None

    async def _version_for_protection(self, call: _Call, kek: KekRecord) -> KekVersion:
        """The newest version that may wrap now; rotate first if it expired and that is on."""
        now = self._now()
        version = kek.for_protection(now)
        if version is None and self.lifecycle.auto_rotate and _rotation_due(kek, now):
            version = (await self.rotate(kek.name, "automatic: protect-stop reached")).latest
        if version is None:
            newest = kek.latest
            with _lifecycle_errors():
                newest.lifecycle.check_protect(Usage.WRAP, now, _kek_what(newest))
            raise ServiceError(ErrorCode.WRONG_STATE, f"KEK {kek.name!r} has no version to wrap")
        with _lifecycle_errors():
            version.lifecycle.check_protect(Usage.WRAP, now, _kek_what(version))
        call.kek, call.kek_version = version.kek, version.version
        return version

    async def rotate(self, name: str, why: str) -> KekRecord:
        """Make the KEK's next version (a new HSM key); new wraps use it from now on."""
        async with self._kek_changes:
            kek = self.store.get_kek(name)
            if kek is None:
                raise ServiceError(ErrorCode.NOT_FOUND, f"no KEK named {name!r}")
            now = self._now()
            latest = kek.latest
            number = latest.version + 1
            handle = await self.hsm.generate_kek(f"{name}/v{number}")
            lifecycle = self.lifecycle.new_lifecycle("kek", name, now, latest.lifecycle.usage, None)
            try:
                kek = await self.store.add_kek_version(
                    KekVersion(name, number, handle, now, lifecycle)
                )
            except AlreadyExistsError:
                await self.hsm.destroy_kek(handle)  # another daemon rotated first
                await self.store.refresh_if_changed()
                return self.store.get_kek(name) or kek
        log.info("rotated KEK %r to version %d (%s)", name, number, why)
        return kek


def _rotation_due(kek: KekRecord, now: float) -> bool:
    """The newest version reached protect-stop without being revoked or destroyed."""
    latest = kek.latest.lifecycle
    return (
        latest.protect_stop is not None
        and now >= latest.protect_stop
        and latest.effective(now) in (State.ACTIVE, State.DEACTIVATED)
        and latest.revocation_reason is None
    )
