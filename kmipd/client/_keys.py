"""What the client hands to a storage system: keys and secrets in protected memory.

``Dek`` (a stored DEK) and ``DataKey`` (a stateless data key with its blob)
hold their key bytes in a ProtectedKey; ``Secret`` (one version of a secret)
holds its value, of any size, in a ProtectedValue. ``key`` is a read-only view, valid
until the object is closed; use the object as a context manager so the key
is zeroed as soon as the caller is done:

    with kms.get_dek(dek_id) as dek:
        plaintext = AESGCM(dek.key).decrypt(nonce, data, aad)
"""

from __future__ import annotations

import hashlib
import logging
import math
from types import TracebackType
from typing import Generic, Self, TypeVar

from kmipd.client._cache import DekCache
from kmipd.client._memory import ProtectedKey, ProtectedValue, _Protected
from kmipd.protocol import ChangeInfo, ChangesResult, DekResult, SecretValue, encode_deterministic

log = logging.getLogger("kmipd.client")

P = TypeVar("P", bound=_Protected)


class _Holds(Generic[P]):
    """An object handed out with protected bytes: ``close()`` or ``with`` zeroes them."""

    __slots__ = ("_protected",)

    def __init__(self, protected: P) -> None:
        self._protected: P = protected

    @property
    def protected(self) -> P:
        return self._protected

    def close(self) -> None:
        """Zero the bytes now."""
        self._protected.wipe()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _HoldsKey(_Holds[ProtectedKey]):
    __slots__ = ()

    @property
    def key(self) -> memoryview:
        """The key bytes (read-only), until close(); raises KeyWipedError after."""
        return self._protected.view

    def key_bytes(self) -> bytes:
        """An unprotected copy of the key, for APIs that need ``bytes``.

        The copy is an ordinary Python object: it may be swapped out and is
        not zeroed. Prefer ``key`` inside a ``with`` block.
        """
        return bytes(self._protected.view)


class Dek(_HoldsKey):
    """A stored DEK: its id, namespace, the KEK version that wraps it, and the key."""

    __slots__ = ("dek_id", "kek_version", "namespace")

    def __init__(self, dek_id: str, namespace: str, kek_version: int, protected: ProtectedKey):
        super().__init__(protected)
        self.dek_id = dek_id
        self.namespace = namespace
        self.kek_version = kek_version

    def __repr__(self) -> str:
        return (
            f"Dek(dek_id={self.dek_id!r}, namespace={self.namespace!r}, "
            f"kek_version={self.kek_version}, key={self._protected!r})"
        )


class DataKey(_HoldsKey):
    """A data key and its wrapped blob (generate-data-key), or a blob's unwrapped key."""

    __slots__ = ("blob", "kek", "kek_version")

    def __init__(self, blob: bytes, kek: str, kek_version: int, protected: ProtectedKey):
        super().__init__(protected)
        self.blob = blob
        self.kek = kek
        self.kek_version = kek_version

    def __repr__(self) -> str:
        return (
            f"DataKey(kek={self.kek!r}, kek_version={self.kek_version}, "
            f"blob=<{len(self.blob)} bytes>, key={self._protected!r})"
        )


class Secret(_Holds[ProtectedValue]):
    """One version of a secret: its name, version, content type, tags, dates, and value.

    The value is copied into its own locked pages at once (the decoded
    ``bytes`` is dropped); ``value`` is a read-only view of them until
    ``close()`` or the end of a ``with`` block zeroes them:

        with kms.get_secret("db", "replication") as secret:
            connect(password=bytes(secret.value))
    """

    __slots__ = ("content_type", "expires", "name", "namespace", "not_before", "tags", "version")

    def __init__(self, result: SecretValue) -> None:
        super().__init__(ProtectedValue(result.value))
        self.namespace = result.namespace
        self.name = result.name
        self.version = result.version
        self.content_type = result.content_type
        self.tags = dict(result.tags)
        self.not_before = result.not_before
        self.expires = result.expires

    @property
    def value(self) -> memoryview:
        """The value (read-only), until close(); raises KeyWipedError after."""
        return self._protected.view

    def value_bytes(self) -> bytes:
        """An unprotected copy, for APIs that need ``bytes`` (not zeroed: see _memory)."""
        return bytes(self._protected.view)

    def __repr__(self) -> str:
        return (
            f"Secret(namespace={self.namespace!r}, name={self.name!r}, version={self.version}, "
            f"content_type={self.content_type!r}, value={self._protected!r})"
        )


class KeyKeeper:
    """Turns wire results into protected keys, through the cache when there is one.

    Shared by both clients so that caching behaves the same in each.
    """

    def __init__(self, cache: DekCache | None, revocation_check: float) -> None:
        self.cache = cache
        self.revocation_check = revocation_check
        #: The change feed position this cache has caught up to (None: not asked yet).
        self.changes_seq: int | None = None
        self.changes_checked_at = -math.inf
        self.changes_allowed = True

    def changes_due(self, now: float) -> bool:
        """Whether to ask the daemon what was revoked since the last check."""
        if self.cache is None or not self.changes_allowed:
            return False
        return self.changes_seq is None or now - self.changes_checked_at >= self.revocation_check

    def apply_changes(self, result: ChangesResult, now: float) -> int:
        """Evict every cached key the daemon revoked, destroyed or otherwise changed."""
        assert self.cache is not None
        evicted = 0
        if self.changes_seq is not None and result.reset:
            # We fell behind the feed's retention: what we missed is unknown, so all goes.
            evicted = len(self.cache)
            self.cache.clear()
            log.warning("the change feed was pruned past this cache's position: cache emptied")
        elif self.changes_seq is not None:  # the first answer only says where the feed is
            for change in result.changes:
                evicted += self._evict(change)
        self.changes_seq = result.seq
        self.changes_checked_at = now
        if evicted:
            log.info("evicted %d cached key(s) after revocations", evicted)
        return evicted

    def _evict(self, change: ChangeInfo) -> int:
        assert self.cache is not None
        if change.dek_id is not None:
            return int(self.cache.evict(("dek", change.dek_id)))
        # A KEK version changed: every key it wraps goes (DEKs and data keys
        # both carry (namespace or KEK, version) as their cache metadata).
        target = (change.namespace, change.kek_version)
        return self.cache.evict_where(lambda key, meta: tuple(meta) == target)

    def disable_changes(self, why: str) -> None:
        self.changes_allowed = False
        log.warning(
            "the DEK cache cannot follow revocations (%s): entries live until their TTL", why
        )

    def cached_dek(self, dek_id: str, *, stale: bool = False) -> Dek | None:
        if self.cache is None:
            return None
        hit = self.cache.lookup(("dek", dek_id), allow_stale=stale)
        if hit is None:
            return None
        (namespace, version), protected = hit
        return Dek(dek_id, namespace, version, protected)

    def keep_dek(self, result: DekResult) -> Dek:
        protected = ProtectedKey(result.key)
        if self.cache is not None:
            meta = (result.namespace, result.kek_version)
            self.cache.store(("dek", result.dek_id), meta, protected)
        return Dek(result.dek_id, result.namespace, result.kek_version, protected)

    def cached_data_key(
        self, blob: bytes, context: dict[str, str], *, stale: bool = False
    ) -> DataKey | None:
        if self.cache is None:
            return None
        hit = self.cache.lookup(blob_cache_key(blob, context), allow_stale=stale)
        if hit is None:
            return None
        (kek, version), protected = hit
        return DataKey(blob, kek, version, protected)

    def keep_data_key(
        self, blob: bytes, context: dict[str, str], kek: str, version: int, key: bytes
    ) -> DataKey:
        protected = ProtectedKey(key)
        if self.cache is not None:
            self.cache.store(blob_cache_key(blob, context), (kek, version), protected)
        return DataKey(blob, kek, version, protected)

    def stale_deks(self, dek_ids: list[str]) -> dict[str, Dek] | None:
        """Every one of ``dek_ids`` from the cache, stale allowed, or None if one is missing."""
        found = {dek_id: self.cached_dek(dek_id, stale=True) for dek_id in dek_ids}
        if any(dek is None for dek in found.values()):
            for dek in found.values():
                if dek is not None:
                    dek.close()
            return None
        log.warning("daemons unreachable: serving %d stale cached DEK(s)", len(found))
        return {dek_id: dek for dek_id, dek in found.items() if dek is not None}

    @staticmethod
    def hand_out(dek_ids: list[str], found: dict[str, Dek]) -> list[Dek]:
        """One Dek per requested id, each owning its key, even when ids repeat."""
        handed_out: set[str] = set()
        answer = []
        for dek_id in dek_ids:
            dek = found[dek_id]
            if dek_id in handed_out:
                dek = Dek(dek.dek_id, dek.namespace, dek.kek_version, dek.protected.copy())
            handed_out.add(dek_id)
            answer.append(dek)
        return answer


def blob_cache_key(blob: bytes, context: dict[str, str]) -> tuple[str, bytes]:
    """A data key is identified by its blob *and* the context it must be unwrapped with."""
    return ("blob", hashlib.sha256(encode_deterministic([blob, context])).digest())
