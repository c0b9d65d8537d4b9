"""The optional Prometheus endpoint: a loopback-only HTTP listener apart from KMIP.

``[metrics] listen = "127.0.0.1:9696"`` turns it on; the config refuses any
address that is not loopback, so the numbers (key counts, error rates,
client activity) are only for a scraper on the same host, or one that
reaches it through an authenticated tunnel. ``GET /metrics`` answers with
the Prometheus text format, written by prometheus-client from the
daemon's own counters (``kmipd.metrics._counters``) when a scrape asks.

What needs I/O is gathered before each scrape, bounded: key counts by
state from the store (at most every ``KEY_COUNT_MAX_AGE`` seconds: a
count over millions of rows is not free) and whether the HSM answers.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import time
from collections.abc import Iterator
from typing import Protocol

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from kmipd.hsm import HsmError
from kmipd.metrics._counters import LATENCY_BUCKETS, Histogram
from kmipd.server import KmipServer
from kmipd.store import StoreError

log = logging.getLogger("kmipd.metrics")

KEY_COUNT_MAX_AGE = 30.0
HSM_CHECK_TIMEOUT = 2.0
#: A scraper gets this long to send its request and read the answer.
REQUEST_TIMEOUT = 10.0
MAX_REQUEST_HEAD = 8192
#: After an error answer, what a scraper is still sending is read (this long, this many
#: reads at most) so that closing does not reset the connection under the answer.
LINGER_TIMEOUT = 1.0
LINGER_READS = 16
#: Scrapes answered at once; a connection beyond them is closed unanswered.
MAX_SCRAPERS = 8


class Exporter(Protocol):
    """What a scrape renders: this daemon's registry, or the workers' merged."""

    async def refresh(self) -> None: ...

    def render(self) -> bytes: ...


class MetricsExporter:
    """The registry a scrape renders, and what must be fetched before rendering it."""

    def __init__(self, server: KmipServer) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_KmipdCollector(self))
        self.key_counts: dict[tuple[str, str], int] = {}
        #: (subject, profile) -> when its online-CA certificates run out.
        self.issued_expiry: dict[tuple[str, str], int] = {}
        #: (namespace, name, newest version, its notAfter) of each managed certificate.
        self.managed_expiry: list[tuple[str, str, int, int]] = []
        self.hsm_up: bool | None = None
        self._counted_at = -math.inf

    async def refresh(self) -> None:
        service = self.server.service
        now = trio.current_time()
        if now - self._counted_at >= KEY_COUNT_MAX_AGE:
            try:
                self.key_counts = await service.store.count_by_state()
                self.managed_expiry = await service.store.managed_certificate_expiry()
                if service.online_ca is not None:
                    self.issued_expiry = await service.store.issued_expiry_by_subject(
                        int(time.time())
                    )
                self._counted_at = now
            except StoreError as exc:
                log.warning("metrics: cannot count keys: %s", exc)
        self.hsm_up = False
        with trio.move_on_after(HSM_CHECK_TIMEOUT):
            try:
                await service.hsm.check()
                self.hsm_up = True
            except HsmError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _version() -> str:
    try:
        return importlib.metadata.version("kmipd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _KmipdCollector(Collector):
    def __init__(self, exporter: MetricsExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._connections()
        yield from self._backends()

    def _requests(self) -> Iterator[Metric]:
        server = self.exporter.server
        metrics = server.metrics
        info = InfoMetricFamily("kmipd_build", "kmipd version and server name")
        info.add_metric([], {"version": _version(), "server": server.service.info.name})
        yield info

        requests = CounterMetricFamily(
            "kmipd_requests", "Requests answered, by operation", labels=["operation"]
        )
        latency = HistogramMetricFamily(
            "kmipd_request_duration_seconds",
            "Time from a request's arrival to its answer, by operation",
            labels=["operation"],
        )
        for operation, histogram in sorted(metrics.request_latency.items()):
            requests.add_metric([operation], histogram.count)
            _add_histogram(latency, [operation], histogram)
        yield requests
        yield latency

        errors = CounterMetricFamily(
            "kmipd_request_errors",
            "Requests answered with an error, by operation and wire error code",
            labels=["operation", "code"],
        )
        for (operation, code), count in sorted(metrics.request_errors.items()):
            errors.add_metric([operation, code.wire_name], count)
        yield errors
        protocol = CounterMetricFamily(
            "kmipd_protocol_errors",
            "Errors the protocol layer sent (bad frames, no hello, refusals while draining)",
            labels=["code"],
        )
        for code, count in sorted(metrics.protocol_errors.items()):
            protocol.add_metric([code.wire_name], count)
        yield protocol

    def _connections(self) -> Iterator[Metric]:
        server = self.exporter.server
        metrics = server.metrics
        yield GaugeMetricFamily(
            "kmipd_connections", "Client connections open now", value=server.connection_count
        )
        yield CounterMetricFamily(
            "kmipd_connections_accepted",
            "Client connections accepted",
            value=metrics.connections_accepted,
        )
        yield CounterMetricFamily(
            "kmipd_connections_refused",
            "Connections closed at once because server.max_connections was reached",
            value=metrics.connections_refused,
        )
        handshakes = CounterMetricFamily(
            "kmipd_tls_handshake_failures",
            "Failed TLS handshakes and refused client certificates, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(metrics.handshake_failures.items()):
            handshakes.add_metric([reason], count)
        yield handshakes
        yield GaugeMetricFamily(
            "kmipd_connections_handshaking",
            "Client connections in the TLS handshake now",
            value=server.handshaking_count,
        )
        yield CounterMetricFamily(
            "kmipd_handshakes_shed",
            "Handshaking connections closed to admit a newer one (handshake budget full)",
            value=metrics.handshakes_shed,
        )
        per_identity = CounterMetricFamily(
            "kmipd_connections_refused_identity",
            "Authenticated connections refused (busy): the identity's connection budget is used up",
            labels=["grant"],
        )
        for grant, count in sorted(metrics.connections_refused_identity.items()):
            per_identity.add_metric([grant], count)
        yield per_identity
        cut = CounterMetricFamily(
            "kmipd_connections_cut",
            "Open connections closed with certificate-revoked: peer certificate revoked, "
            "expired or no longer trusted",
            labels=["reason"],
        )
        for reason, count in sorted(metrics.connections_cut.items()):
            cut.add_metric([reason], count)
        yield cut

    def _backends(self) -> Iterator[Metric]:
        server = self.exporter.server
        metrics = server.metrics
        hsm = HistogramMetricFamily(
            "kmipd_hsm_call_duration_seconds", "HSM backend call latency, by call", labels=["call"]
        )
        for call, histogram in sorted(metrics.hsm_latency.items()):
            _add_histogram(hsm, [call], histogram)
        yield hsm
        yield from self._store()
        if self.exporter.hsm_up is not None:
            yield GaugeMetricFamily(
                "kmipd_hsm_up",
                "1 if the HSM backend answered a check during this scrape",
                value=int(self.exporter.hsm_up),
            )

        keys = GaugeMetricFamily(
            "kmipd_keys",
            f"Keys in the store by kind and state (counted at most every {KEY_COUNT_MAX_AGE:g} s)",
            labels=["kind", "state"],
        )
        for (kind, state), count in sorted(self.exporter.key_counts.items()):
            keys.add_metric([kind, state], count)
        yield keys
        yield from self._certificates()

        writers = [("store", server.service.store.health)]
        if server.service.audit is not None:
            writers.append(("audit", server.service.audit.health))
        writable = GaugeMetricFamily(
            "kmipd_writable",
            "1 if the writer (store, audit trail) can write, 0 while a fault refuses writes;"
            " the cause label says why",
            labels=["writer", "cause"],
        )
        refused = CounterMetricFamily(
            "kmipd_write_refused",
            "Requests refused because the writer could not write (disk full, read-only...)",
            labels=["writer"],
        )
        for name, health in writers:
            writable.add_metric([name, health.cause or ""], int(health.ok))
            refused.add_metric([name], health.refused_total)
        yield writable
        yield refused

        reloads = CounterMetricFamily(
            "kmipd_reloads", "Configuration reloads (SIGHUP), by result", labels=["result"]
        )
        for result, count in sorted(metrics.reloads.items()):
            reloads.add_metric([result], count)
        yield reloads

    def _store(self) -> Iterator[Metric]:
        store = self.exporter.server.service.store
        latency = HistogramMetricFamily(
            "kmipd_store_transaction_duration_seconds",
            "Store database transactions (a worker thread's round trip included), by kind;"
            " reads served from memory are not among them",
            labels=["kind"],
        )
        for kind, histogram in sorted(self.exporter.server.metrics.store_latency.items()):
            _add_histogram(latency, [kind], histogram)
        yield latency
        pool = store.pool_stats()  # PostgreSQL's connection pool; SQLite has none
        if not pool:
            return
        yield GaugeMetricFamily(
            "kmipd_store_pool_size", "Store pool connections open", value=pool.get("pool_size", 0)
        )
        yield GaugeMetricFamily(
            "kmipd_store_pool_max",
            "Store pool connections at most (store.pool_size)",
            value=pool.get("pool_max", 0),
        )
        yield GaugeMetricFamily(
            "kmipd_store_pool_idle",
            "Store pool connections open and not in use",
            value=pool.get("pool_available", 0),
        )
        yield GaugeMetricFamily(
            "kmipd_store_pool_waiting",
            "Transactions waiting for a pool connection now",
            value=pool.get("requests_waiting", 0),
        )
        yield CounterMetricFamily(
            "kmipd_store_pool_queued",
            "Transactions that had to wait for a pool connection",
            value=pool.get("requests_queued", 0),
        )
        yield CounterMetricFamily(
            "kmipd_store_pool_wait_seconds",
            "Time transactions spent waiting for a pool connection",
            value=pool.get("requests_wait_ms", 0) / 1000,
        )
        yield CounterMetricFamily(
            "kmipd_store_pool_connections_lost",
            "Pool connections found broken (server restart, failover, network)",
            value=pool.get("connections_lost", 0) + pool.get("returns_bad", 0),
        )
        yield CounterMetricFamily(
            "kmipd_store_pool_connect_errors",
            "Failed attempts to open a pool connection",
            value=pool.get("connections_errors", 0),
        )

    def _certificates(self) -> Iterator[Metric]:
        server = self.exporter.server
        expiry = GaugeMetricFamily(
            "kmipd_certificate_expiry_timestamp_seconds",
            "notAfter of the daemon's own certificates (server, online-ca), Unix time",
            labels=["certificate"],
        )
        expiry.add_metric(["server"], server.tls.server_not_after)
        if server.service.online_ca is not None:
            not_after = server.service.online_ca.certificate.not_valid_after_utc
            expiry.add_metric(["online-ca"], not_after.timestamp())
        yield expiry
        issued = GaugeMetricFamily(
            "kmipd_issued_certificate_expiry_timestamp_seconds",
            "Per subject and profile, the latest notAfter of its unrevoked certificates from "
            f"the online CA: when it runs out (counted at most every {KEY_COUNT_MAX_AGE:g} s)",
            labels=["subject", "profile"],
        )
        for (subject, profile), when in sorted(self.exporter.issued_expiry.items()):
            issued.add_metric([subject, profile], when)
        yield issued
        managed = GaugeMetricFamily(
            "kmipd_managed_certificate_expiry_timestamp_seconds",
            "Per managed certificate, the notAfter of its newest version "
            f"(counted at most every {KEY_COUNT_MAX_AGE:g} s)",
            labels=["namespace", "name"],
        )
        earliest: dict[str, int] = {}
        for namespace, name, _, when in self.exporter.managed_expiry:
            managed.add_metric([namespace, name], when)
            earliest[namespace] = min(when, earliest.get(namespace, when))
        yield managed
        per_namespace = GaugeMetricFamily(
            "kmipd_managed_certificate_earliest_expiry_timestamp_seconds",
            "Per namespace, the earliest notAfter among its managed certificates' newest versions",
            labels=["namespace"],
        )
        for namespace, when in sorted(earliest.items()):
            per_namespace.add_metric([namespace], when)
        yield per_namespace


def _add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    cumulative = 0
    buckets = []
    for bound, count in zip((*LATENCY_BUCKETS, math.inf), histogram.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
    family.add_metric(labels, buckets, histogram.sum)


# -- the HTTP listener ----------------------------------------------------------------------


async def serve_metrics(
    listeners: list[trio.SocketListener],
    exporter: Exporter,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer scrapes until cancelled; one request per connection, HTTP/1.1 by h11."""
    scrapers = trio.Semaphore(MAX_SCRAPERS)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            if scrapers.value == 0:
                return  # a scraper is one process: more at once is a flood, not a scrape
            async with scrapers:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    await _answer(stream, exporter)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("metrics: scraper went away: %r", exc)
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(trio.serve_listeners, handle, [listener])
        task_status.started()


async def _answer(stream: trio.SocketStream, exporter: Exporter) -> None:
    http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        request = await _receive_request(stream, http)
    except h11.RemoteProtocolError as exc:
        # h11's hint: 431 for a head over MAX_REQUEST_HEAD, 400 for anything malformed.
        status = exc.error_status_hint
        body = b"request head too large\n" if status == 431 else b"bad request\n"
        await _respond(stream, http, status, body)
        await _discard_rest(stream)
        return
    if request is None:
        return
    method, target = request.method.decode("latin-1"), request.target.split(b"?", 1)[0]
    if method not in ("GET", "HEAD"):
        await _respond(stream, http, 405, b"GET /metrics only\n", allow="GET, HEAD")
        return
    if target != b"/metrics":
        await _respond(stream, http, 404, b"the metrics are at /metrics\n")
        return
    await exporter.refresh()
    body = exporter.render()
    await _respond(
        stream, http, 200, body, content_type=CONTENT_TYPE_LATEST, head_only=method == "HEAD"
    )


async def _receive_request(stream: trio.SocketStream, http: h11.Connection) -> h11.Request | None:
    """The request's head, or None if the scraper closed first; raises RemoteProtocolError."""
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            http.receive_data(await stream.receive_some(4096))
        elif isinstance(event, h11.Request):
            return event
        else:  # ConnectionClosed: nothing was asked
            return None


async def _discard_rest(stream: trio.SocketStream) -> None:
    """Read what the scraper still sends, bounded, before closing.

    Closing a socket with unread input makes the kernel answer with a reset,
    which can destroy the error answer before the scraper reads it.
    """
    await stream.send_eof()
    with trio.move_on_after(LINGER_TIMEOUT):
        for _ in range(LINGER_READS):
            if not await stream.receive_some(65536):
                return


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


async def _respond(
    stream: trio.SocketStream,
    http: h11.Connection,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    allow: str | None = None,
    head_only: bool = False,
) -> None:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("Connection", "close"),
    ]
    if allow:
        headers.append(("Allow", allow))
    # An answer to HEAD says the length of what GET would get, and h11 refuses its body.
    data = [http.send(h11.Response(status_code=status, headers=headers, reason=_REASONS[status]))]
    if not head_only:
        data.append(http.send(h11.Data(data=body)))
    data.append(http.send(h11.EndOfMessage()))
    await stream.send_all(b"".join(chunk for chunk in data if chunk))
