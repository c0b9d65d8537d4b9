"""Managed signing keys: key pairs whose private half signs inside the HSM backend.

A signing key lives in a namespace under a name, with an id (``sig_...``)
beside the DEK ids; every rotate adds a version, a new key pair in the HSM
backend (the software keyring seals it under the master key; a PKCS#11 token
holds it sensitive, never extractable, sign-only). Clients get the public
half (SPKI DER), signatures of digests they computed (``sign-digest``: the
current version signs), and a server-side ``verify-digest`` that accepts
every version still verifying.

One purpose per key (NIST SP 800-57): a signing key only signs and
verifies (``signing-key-only`` when named where a DEK goes), and a KEK or a
DEK never signs (``not-a-signing-key``). The private half's crypto-period is
the version's protect-stop (``[[crypto_period]] applies_to = "signing-key"``,
``protect_days``): after it ``sign-digest`` is refused with
``signing-period-ended`` while ``verify-digest`` works until deactivation
(``process_days``), revocation or destruction. Revoke, destroy (soft-delete
window, then the HSM object is erased by the maintenance pass) and recover
follow the lifecycle of KEKs and DEKs (kmipd.lifecycle).

Operations and grants: ``sign-digest``, ``verify-digest``,
``get-signing-key`` and ``list-signing-keys`` form the ``signing`` group;
``create-signing-key``, ``rotate-signing-key``, ``revoke-signing-key``,
``destroy-signing-key``, ``recover-signing-key`` (and the reads)
``signing-manage``. Audit records name the key, version, algorithm and the
digest's length: never a digest, a signature or key material.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import logging
import secrets

import attrs

from kmipd.hsm import HsmKeyNotFoundError
from kmipd.hsm._signing import (
    DigestLengthError,
    SignatureAlgorithmError,
    algorithms_for,
    check_signature_request,
    verify_digest,
)
from kmipd.lifecycle import (
    SIGNING_USAGES,
    Event,
    Lifecycle,
    LifecycleError,
    RevocationReason,
    Usage,
    revocation_event,
)
from kmipd.protocol import (
    CreateSigningKey,
    DestroySigningKey,
    ErrorCode,
    GetSigningKey,
    ListSigningKeys,
    ListSigningKeysResult,
    RecoverSigningKey,
    RevokeSigningKey,
    RotateSigningKey,
    SignatureResult,
    SignDigest,
    SigningKeyInfo,
    VerifyDigest,
    VerifyResult,
)
from kmipd.service._core import (
    _LIFECYCLE_CODES,
    SIGNING_KEY_ID_PREFIX,
    ServiceError,
    _Call,
    _lifecycle_errors,
    handles,
)
from kmipd.service._lifecycle import LifecycleOperations
from kmipd.store import SigningKeyVersion, StaleRecordError

log = logging.getLogger("kmipd.service")


def new_signing_key_id() -> str:
    return (
        SIGNING_KEY_ID_PREFIX
        + base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()
    )


class SigningOperations(LifecycleOperations):
    """The signing-key operations (see the module docstring)."""

    # -- create, rotate ------------------------------------------------------------------

    @handles(CreateSigningKey, changes_state=True)
    async def _create_signing_key(self, call: _Call, request: CreateSigningKey) -> SigningKeyInfo:
        self._authorize(call, "create-signing-key", request.namespace)
        call.detail = f"{_what(request.namespace, request.name, 1)} {request.key_type}"
        if await self.store.signing_key_versions(request.namespace, request.name):
            raise ServiceError(
                ErrorCode.ALREADY_EXISTS,
                f"signing key {request.name!r} already exists in {request.namespace!r}; "
                "rotate-signing-key makes a new version",
            )
        return await self._add_version(
            call, namespace=request.namespace, name=request.name, number=1,
            key_id=new_signing_key_id(), key_type=request.key_type, activation=request.activation,
        )  # fmt: skip

    @handles(RotateSigningKey, changes_state=True)
    async def _rotate_signing_key(self, call: _Call, request: RotateSigningKey) -> SigningKeyInfo:
        self._authorize(call, "rotate-signing-key", request.namespace)
        versions = await self._versions(request.namespace, request.name)
        current = versions[-1]
        call.detail = _what(current.namespace, current.name, current.version + 1)
        return await self._add_version(
            call, namespace=current.namespace, name=current.name, number=current.version + 1,
            key_id=current.key_id, key_type=current.key_type, activation=None,
        )  # fmt: skip

    async def _add_version(
        self,
        call: _Call,
        *,
        namespace: str,
        name: str,
        number: int,
        key_id: str,
        key_type: str,
        activation: int | None,
    ) -> SigningKeyInfo:
        now = self._now()
        lifecycle = self.lifecycle.new_lifecycle(
            "signing-key", namespace, now, SIGNING_USAGES, activation
        )
        handle = await self.hsm.generate_signing_key(f"{namespace}/{name}/v{number}", key_type)
        version = SigningKeyVersion(
            namespace=namespace,
            name=name,
            version=number,
            key_id=key_id,
            key_type=key_type,
            handle=handle,
            public_key=await self.hsm.signing_public_key(handle),
            lifecycle=lifecycle,
            created_at=now,
            created_by=call.caller.identity,
        )
        if not await self.store.add_signing_key_version(version):
            await self.hsm.destroy_signing_key(handle)  # another create got there first
            raise ServiceError(
                ErrorCode.ALREADY_EXISTS,
                f"{_what(namespace, name, number)} was just made by another request",
            )
        log.info(
            "made %s (%s) for %s", _what(namespace, name, number), key_type, call.caller.identity
        )
        return self._info(version, number)

    # -- reads ---------------------------------------------------------------------------

    @handles(GetSigningKey)
    async def _get_signing_key(self, call: _Call, request: GetSigningKey) -> SigningKeyInfo:
        self._authorize(call, "get-signing-key", request.namespace)
        versions = await self._versions(request.namespace, request.name)
        version = _pick(versions, request.version)
        return self._info(version, len(versions))

    @handles(ListSigningKeys)
    async def _list_signing_keys(
        self, call: _Call, request: ListSigningKeys
    ) -> ListSigningKeysResult:
        self._require_some_grant(call, "list-signing-keys")
        pattern = request.namespace
        found = tuple(
            self._info(v, v.version)
            for v in await self.store.list_signing_keys()
            if (pattern is None or fnmatch.fnmatchcase(v.namespace, pattern))
            and self._may(call, "list-signing-keys", v.namespace)
        )
        return ListSigningKeysResult(keys=found)

    # -- sign, verify --------------------------------------------------------------------

    @handles(SignDigest)
    async def _sign_digest(self, call: _Call, request: SignDigest) -> SignatureResult:
        self._authorize(call, "sign-digest", request.namespace)
        versions = await self._signing_versions(request.namespace, request.name)
        current = versions[-1]
        call.detail = f"{_what(current.namespace, current.name, current.version)} " + _input(
            request.algorithm, request.digest
        )
        _check_request(current, request.algorithm, request.digest)
        what = _what(current.namespace, current.name, current.version)
        try:
            current.lifecycle.check_protect(Usage.SIGN, self._clock(), what)
        except LifecycleError as exc:
            if exc.reason == "protect-stop-passed":
                raise ServiceError(
                    ErrorCode.SIGNING_PERIOD_ENDED,
                    f"{what}'s signing period ended at {current.lifecycle.protect_stop}: it "
                    "only verifies now; rotate-signing-key makes a version that signs",
                ) from None
            raise ServiceError(*_lifecycle_code(exc)) from None
        signature = await self.hsm.sign_digest(current.handle, request.digest, request.algorithm)
        return SignatureResult(
            namespace=current.namespace,
            name=current.name,
            version=current.version,
            algorithm=request.algorithm,
            signature=signature,
        )

    @handles(VerifyDigest)
    async def _verify_digest(self, call: _Call, request: VerifyDigest) -> VerifyResult:
        self._authorize(call, "verify-digest", request.namespace)
        versions = await self._signing_versions(request.namespace, request.name)
        candidates = (
            [_pick(versions, request.version)]
            if request.version is not None
            else list(reversed(versions))
        )
        call.detail = f"{_what(request.namespace, request.name, request.version)} " + _input(
            request.algorithm, request.digest
        )
        _check_request(candidates[0], request.algorithm, request.digest)
        refusal: LifecycleError | None = None
        usable = 0
        for version in candidates:
            what = _what(version.namespace, version.name, version.version)
            try:
                version.lifecycle.check_process(Usage.VERIFY, self._clock(), what)
            except LifecycleError as exc:
                refusal = refusal or exc
                continue
            usable += 1
            if verify_digest(
                version.public_key, request.algorithm, request.digest, request.signature
            ):
                call.detail += " valid"
                return VerifyResult(valid=True, version=version.version)
        if usable == 0 and refusal is not None:
            raise ServiceError(*_lifecycle_code(refusal))
        call.detail += " invalid"
        return VerifyResult(valid=False)

    # -- lifecycle -----------------------------------------------------------------------

    @handles(RevokeSigningKey, changes_state=True)
    async def _revoke_signing_key(self, call: _Call, request: RevokeSigningKey) -> SigningKeyInfo:
        self._authorize(call, "revoke-signing-key", request.namespace)
        versions = await self._versions(request.namespace, request.name)
        version = _pick(versions, request.version)
        reason = RevocationReason(request.reason)
        call.detail = f"{_what(version.namespace, version.name, version.version)} {reason.value}"
        with _lifecycle_errors():
            lifecycle = version.lifecycle.apply(
                revocation_event(reason),
                self._now(),
                revocation_reason=reason,
                revocation_message=request.message,
            )
        log.warning("revoked %s (%s) for %s", call.detail, reason.value, call.caller.identity)
        return await self._store_lifecycle(version, lifecycle, len(versions))

    @handles(DestroySigningKey, changes_state=True)
    async def _destroy_signing_key(self, call: _Call, request: DestroySigningKey) -> SigningKeyInfo:
        self._authorize(call, "destroy-signing-key", request.namespace)
        versions = await self._versions(request.namespace, request.name)
        version = _pick(versions, request.version)
        now = self._now()
        purge_at = now if request.purge_now else now + self.lifecycle.soft_delete_seconds
        call.detail = (
            f"{_what(version.namespace, version.name, version.version)} purge at {purge_at}"
        )
        with _lifecycle_errors():
            scheduled = version.lifecycle.schedule_destroy(now, purge_at)
        info = await self._store_lifecycle(version, scheduled, len(versions))
        log.warning("destroying %s for %s", call.detail, call.caller.identity)
        if purge_at <= now:
            await self.purge_signing_keys_due()
            versions = await self._versions(request.namespace, request.name)
            return self._info(_pick(versions, version.version), len(versions))
        return info

    @handles(RecoverSigningKey, changes_state=True)
    async def _recover_signing_key(self, call: _Call, request: RecoverSigningKey) -> SigningKeyInfo:
        self._authorize(call, "recover-signing-key", request.namespace)
        versions = await self._versions(request.namespace, request.name)
        version = _pick(versions, request.version)
        call.detail = _what(version.namespace, version.name, version.version)
        with _lifecycle_errors():
            lifecycle = version.lifecycle.cancel_destroy()
        return await self._store_lifecycle(version, lifecycle, len(versions))

    # -- maintenance ---------------------------------------------------------------------

    async def purge_due(self) -> int:
        """The other families' first, then signing key versions whose window ended."""
        return await super().purge_due() + await self.purge_signing_keys_due()

    async def purge_signing_keys_due(self) -> int:
        """Erase the HSM key pair of each version whose soft-delete window ended."""
        now = self._now()
        purged = 0
        for version in await self.store.signing_keys_due_for_destruction(now):
            # Not found: erased before a crash that kept the row; the row still goes destroyed.
            with contextlib.suppress(HsmKeyNotFoundError):
                await self.hsm.destroy_signing_key(version.handle)
            destroyed = version.lifecycle.apply(Event.DESTROY, now)
            if await self.store.update_signing_key_version(_with(version, destroyed)):
                purged += 1
                log.info("destroyed %s: its key pair is erased from the HSM", _of(version))
        return purged

    # -- helpers -------------------------------------------------------------------------

    async def _versions(self, namespace: str, name: str) -> list[SigningKeyVersion]:
        versions = await self.store.signing_key_versions(namespace, name)
        if not versions:
            raise ServiceError(
                ErrorCode.NOT_FOUND, f"no signing key {name!r} in namespace {namespace!r}"
            )
        return versions

    async def _signing_versions(self, namespace: str, name: str) -> list[SigningKeyVersion]:
        """The key's versions, or not-a-signing-key if the name is a KEK's or a DEK's."""
        versions = await self.store.signing_key_versions(namespace, name)
        if versions:
            return versions
        dek = await self.store.get_dek(name) if name.startswith("dek_") else None
        if dek is not None and dek.namespace == namespace:
            raise ServiceError(
                ErrorCode.NOT_A_SIGNING_KEY,
                f"{name} is a data-encryption key (DEK): it encrypts and decrypts, never "
                "signs; only signing keys (create-signing-key) sign",
            )
        if self.store.get_kek(name) is not None:
            raise ServiceError(
                ErrorCode.NOT_A_SIGNING_KEY,
                f"{name!r} is a key-encryption key (KEK): it wraps and unwraps, never signs; "
                "only signing keys (create-signing-key) sign",
            )
        raise ServiceError(
            ErrorCode.NOT_FOUND, f"no signing key {name!r} in namespace {namespace!r}"
        )

    async def _store_lifecycle(
        self, version: SigningKeyVersion, lifecycle: Lifecycle, count: int
    ) -> SigningKeyInfo:
        updated = _with(version, lifecycle)
        if not await self.store.update_signing_key_version(updated):
            raise StaleRecordError(f"{_of(version)} is gone")
        return self._info(updated, count)

    def _info(self, version: SigningKeyVersion, count: int) -> SigningKeyInfo:
        lifecycle = version.lifecycle
        reason = lifecycle.revocation_reason
        return SigningKeyInfo(
            namespace=version.namespace,
            name=version.name,
            key_id=version.key_id,
            version=version.version,
            versions=count,
            key_type=version.key_type,
            algorithms=algorithms_for(version.key_type),
            public_key=version.public_key,
            state=lifecycle.effective(self._clock()).value,
            created=version.created_at,
            activation=lifecycle.activation,
            sign_until=lifecycle.protect_stop,
            verify_until=lifecycle.deactivation,
            purge_at=lifecycle.purge_at,
            revocation_reason=None if reason is None else reason.value,
        )


def _pick(versions: list[SigningKeyVersion], number: int | None) -> SigningKeyVersion:
    if number is None:
        return versions[-1]
    for version in versions:
        if version.version == number:
            return version
    first = versions[0]
    raise ServiceError(
        ErrorCode.NOT_FOUND,
        f"signing key {first.name!r} in {first.namespace!r} has no version {number} "
        f"(it has 1..{versions[-1].version})",
    )


def _check_request(version: SigningKeyVersion, algorithm: str, digest: bytes) -> None:
    try:
        check_signature_request(version.key_type, algorithm, digest)
    except SignatureAlgorithmError as exc:
        raise ServiceError(ErrorCode.UNSUPPORTED_ALGORITHM, str(exc)) from None
    except DigestLengthError as exc:
        raise ServiceError(ErrorCode.DIGEST_LENGTH_MISMATCH, str(exc)) from None


def _lifecycle_code(exc: LifecycleError) -> tuple[ErrorCode, str]:
    return _LIFECYCLE_CODES[exc.reason], exc.message


def _with(version: SigningKeyVersion, lifecycle: Lifecycle) -> SigningKeyVersion:
    return attrs.evolve(version, lifecycle=lifecycle)


def _input(algorithm: str, digest: bytes) -> str:
    """What the audit trail says of a sign/verify input: the algorithm and digest length."""
    return f"{algorithm[:16]} digest {len(digest)} bytes"


def _what(namespace: str, name: str, version: int | None) -> str:
    suffix = "" if version is None else f" version {version}"
    return f"signing key {name!r} in {namespace!r}{suffix}"


def _of(version: SigningKeyVersion) -> str:
    return _what(version.namespace, version.name, version.version)
