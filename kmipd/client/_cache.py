"""The client-side DEK cache (step 8 of the flow): bounded, expiring, protected.

A storage node reads the same DEKs over and over; the cache spares it a
round trip per block and carries it through short daemon outages. Entries
live in protected memory (see _memory), bounded by count and TTL, and are
zeroed when evicted, expired, dropped or when the cache is cleared.

Serving stale entries is off by default: with ``stale_grace`` > 0, an entry
past its TTL may still be served for that long, but only while the daemons
cannot be reached, and every such use is logged.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import attrs

from kmipd.client._memory import ProtectedKey


@attrs.define
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale_hits: int = 0
    evictions: int = 0
    expirations: int = 0


@attrs.define
class _Entry:
    meta: Any
    protected: ProtectedKey
    fetched_at: float


class DekCache:
    """Thread-safe; shared by all threads of a Client (or tasks of an AsyncClient)."""

    def __init__(
        self,
        *,
        max_entries: int = 1024,
        ttl: float = 300.0,
        stale_grace: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or ttl <= 0 or stale_grace < 0:
            raise ValueError("max_entries >= 1, ttl > 0 and stale_grace >= 0 are required")
        self.max_entries = max_entries
        self.ttl = ttl
        self.stale_grace = stale_grace
        self.stats = CacheStats()
        self._clock = clock
        self._entries: collections.OrderedDict[Hashable, _Entry] = collections.OrderedDict()
        #: (fetched_at, key) in fetch order, so expired entries are found at the front.
        self._fetch_order: collections.deque[tuple[float, Hashable]] = collections.deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"DekCache({len(self._entries)}/{self.max_entries} entries, ttl={self.ttl:g}s)"

    def lookup(
        self, key: Hashable, *, allow_stale: bool = False
    ) -> tuple[Any, ProtectedKey] | None:
        """A fresh entry's metadata and a *copy* of its key (the caller owns and wipes it)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            age = self._clock() - entry.fetched_at
            if age > self.ttl + self.stale_grace:
                self._drop(key, expired=True)
                self.stats.misses += 1
                return None
            if age > self.ttl and not allow_stale:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            if age > self.ttl:
                self.stats.stale_hits += 1
            else:
                self.stats.hits += 1
            return entry.meta, entry.protected.copy()

    def store(self, key: Hashable, meta: Any, material: ProtectedKey | bytes | memoryview) -> None:
        """Keep a copy of ``material`` (the caller's object is left alone)."""
        protected = ProtectedKey(material.view if isinstance(material, ProtectedKey) else material)
        with self._lock:
            if key in self._entries:
                self._drop(key)
            now = self._clock()
            self._entries[key] = _Entry(meta, protected, now)
            self._fetch_order.append((now, key))
            self._purge_expired(now)
            while len(self._entries) > self.max_entries:
                self._drop(next(iter(self._entries)))

    def evict(self, key: Hashable) -> bool:
        with self._lock:
            if key not in self._entries:
                return False
            self._drop(key)
            return True

    def evict_where(self, predicate: Callable[[Hashable, Any], bool]) -> int:
        """Evict every entry whose (key, metadata) matches, e.g. all DEKs of a KEK version."""
        with self._lock:
            doomed = [k for k, e in self._entries.items() if predicate(k, e.meta)]
            for key in doomed:
                self._drop(key)
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._drop(key)
            self._fetch_order.clear()

    def _purge_expired(self, now: float) -> None:
        limit = now - self.ttl - self.stale_grace
        while self._fetch_order and self._fetch_order[0][0] < limit:
            fetched_at, key = self._fetch_order.popleft()
            entry = self._entries.get(key)
            if entry is not None and entry.fetched_at == fetched_at:  # not refreshed since
                self._drop(key, expired=True)

    def _drop(self, key: Hashable, *, expired: bool = False) -> None:
        self._entries.pop(key).protected.wipe()
        if expired:
            self.stats.expirations += 1
        else:
            self.stats.evictions += 1
