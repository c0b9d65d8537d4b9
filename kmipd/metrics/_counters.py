"""What the daemon counts while it serves: plain integers, cheap on the hot path.

A cached get-dek is answered in tens of microseconds, so the per-request
cost of measuring it must stay well under one: no locks, no label lookups,
no objects made per request; a dict lookup, a bisect and a few integer
increments. ``kmipd.daemon._prometheus`` turns these numbers into the Prometheus
exposition on scrape, through prometheus-client's collector interface.
"""

from __future__ import annotations

import bisect
import collections
import time

from kmipd.hsm import HsmBackend
from kmipd.protocol import ErrorCode

#: Upper bounds (seconds) of the latency histograms; one more bucket is +Inf.
#: Fine at the bottom: a cached get-dek takes ~0.05 ms of server time.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """Per-bucket counts (not cumulative) and the sum, as Prometheus histograms need."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)


class ServerMetrics:
    """Counters the server, the HSM wrapper and the daemon update; read on scrape."""

    def __init__(self) -> None:
        #: operation -> latency of its requests (the count is the number of requests).
        self.request_latency: dict[str, Histogram] = {}
        #: (operation, error code) -> requests answered with that error.
        self.request_errors: collections.Counter[tuple[str, ErrorCode]] = collections.Counter()
        #: Errors the protocol layer sent on its own (bad frames, no hello, drain refusals...).
        self.protocol_errors: collections.Counter[ErrorCode] = collections.Counter()
        self.connections_accepted = 0
        #: Closed at once because max_connections was reached.
        self.connections_refused = 0
        #: Handshaking connections closed to make room for a newer one (budget full).
        self.handshakes_shed = 0
        #: "granted" / "ungranted" -> authenticated connections refused (busy)
        #: because their identity used up its connection budget.
        self.connections_refused_identity: collections.Counter[str] = collections.Counter()
        #: reason -> TLS handshakes (or post-handshake identity checks) that failed.
        self.handshake_failures: collections.Counter[str] = collections.Counter()
        #: "revoked" / "expired" / "untrusted" -> open connections closed because
        #: their peer certificate stopped holding (certificate-revoked sent).
        self.connections_cut: collections.Counter[str] = collections.Counter()
        #: HSM call -> latency.
        self.hsm_latency: dict[str, Histogram] = {}
        #: "read" / "write" -> latency of the store's database transactions.
        self.store_latency: dict[str, Histogram] = {}
        #: "applied" / "refused" -> reloads.
        self.reloads: collections.Counter[str] = collections.Counter()

    def record_request(self, operation: str, seconds: float, error: ErrorCode | None) -> None:
        histogram = self.request_latency.get(operation)
        if histogram is None:
            histogram = self.request_latency[operation] = Histogram()
        histogram.observe(seconds)
        if error is not None:
            self.request_errors[(operation, error)] += 1

    def record_hsm(self, call: str, seconds: float) -> None:
        histogram = self.hsm_latency.get(call)
        if histogram is None:
            histogram = self.hsm_latency[call] = Histogram()
        histogram.observe(seconds)

    def record_store(self, kind: str, seconds: float) -> None:
        """The store's observer (kmipd.store.Store.observer)."""
        histogram = self.store_latency.get(kind)
        if histogram is None:
            histogram = self.store_latency[kind] = Histogram()
        histogram.observe(seconds)


class MeasuredHsm:
    """Any HSM backend, with the latency of each call that may wait recorded."""

    def __init__(self, backend: HsmBackend, metrics: ServerMetrics) -> None:
        self.backend = backend
        self.name = backend.name
        self._record = metrics.record_hsm
        # Not timed: an inline unwrap takes about a microsecond (the software
        # backend) and is the hot path; a backend that must wait answers None
        # here and goes through unwrap(), which is timed.
        self.unwrap_now = backend.unwrap_now

    def __repr__(self) -> str:
        return f"MeasuredHsm({self.backend!r})"

    async def generate_kek(self, label: str) -> str:
        start = time.perf_counter()
        try:
            return await self.backend.generate_kek(label)
        finally:
            self._record("generate-kek", time.perf_counter() - start)

    async def import_kek(self, label: str, material: bytes) -> str:
        start = time.perf_counter()
        try:
            return await self.backend.import_kek(label, material)
        finally:
            self._record("import-kek", time.perf_counter() - start)

    async def wrap(self, handle: str, key: bytes, associated_data: bytes) -> bytes:
        start = time.perf_counter()
        try:
            return await self.backend.wrap(handle, key, associated_data)
        finally:
            self._record("wrap", time.perf_counter() - start)

    async def unwrap(self, handle: str, wrapped: bytes, associated_data: bytes) -> bytes:
        start = time.perf_counter()
        try:
            return await self.backend.unwrap(handle, wrapped, associated_data)
        finally:
            self._record("unwrap", time.perf_counter() - start)

    async def destroy_kek(self, handle: str) -> None:
        start = time.perf_counter()
        try:
            await self.backend.destroy_kek(handle)
        finally:
            self._record("destroy-kek", time.perf_counter() - start)

    async def generate_signing_key(self, label: str, curve: str) -> str:
        return await self.backend.generate_signing_key(label, curve)

    async def import_signing_key(self, label: str, private_key_der: bytes) -> str:
        return await self.backend.import_signing_key(label, private_key_der)

    async def signing_public_key(self, handle: str) -> bytes:
        return await self.backend.signing_public_key(handle)

    async def sign(self, handle: str, data: bytes) -> bytes:
        start = time.perf_counter()
        try:
            return await self.backend.sign(handle, data)
        finally:
            self._record("sign", time.perf_counter() - start)

    async def sign_digest(self, handle: str, digest: bytes, algorithm: str) -> bytes:
        start = time.perf_counter()
        try:
            return await self.backend.sign_digest(handle, digest, algorithm)
        finally:
            self._record("sign-digest", time.perf_counter() - start)

    async def destroy_signing_key(self, handle: str) -> None:
        start = time.perf_counter()
        try:
            await self.backend.destroy_signing_key(handle)
        finally:
            self._record("destroy-signing-key", time.perf_counter() - start)

    async def check(self) -> None:
        start = time.perf_counter()
        try:
            await self.backend.check()
        finally:
            self._record("check", time.perf_counter() - start)

    def close(self) -> None:
        self.backend.close()
