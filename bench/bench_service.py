"""A cached get-dek through the service, in process: µs per call and where they go.

    python bench/bench_service.py [--calls 20000] [--rounds 5]

No TLS, no codec: a KeyService built as the daemon builds it (SQLite store,
software keyring behind MeasuredHsm, an audit trail batching read records
10 ms, ServerMetrics), one DEK read over and over from the row cache through
``handle_now``, the inline path the server answers a cached get-dek on.
Phases (the median of ``--rounds`` rounds is printed, µs per call):

* ``get_dek_us``: ``handle_now`` plus ``record_request``, what the server's
  ``_answer_now`` runs around the codec;
* ``service_only_us``: the same service without an audit trail;
* ``audit_append_us``: ``AuditLog.append`` of a get-dek's record alone;
* ``audit_flush_us``: writing and fsyncing the batched records, per record
  (a worker thread in the daemon, off the event loop but on the server's CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from kmipd.audit import AuditEvent, AuditLog
from kmipd.hsm import SoftwareHsm
from kmipd.metrics import MeasuredHsm, ServerMetrics
from kmipd.protocol import CreateDek, GetDek
from kmipd.service import Caller, Grant, KeyService, Policy
from kmipd.service._policy import expand_operations
from kmipd.store import KeyStore

IDENTITY = "spiffe://bench.test/storage-node"
#: The daemon's default audit.read_batch_ms.
READ_BATCH = 0.010


def per_call_us(calls: int, once: Callable[[int], Any]) -> float:
    start = time.perf_counter()
    for i in range(calls):
        once(i)
    return (time.perf_counter() - start) / calls * 1e6


async def measure(work: Path, calls: int, rounds: int) -> dict[str, Any]:
    store = KeyStore.open(work / "kmipd.db")
    hsm = SoftwareHsm.open(work / "master", work / "keyring", create=True)
    audit = AuditLog.open(work / "audit.log", work / "audit.key", batch_window=READ_BATCH)
    metrics = ServerMetrics()
    grants = (Grant("spiffe://bench.test/*", ("*",), expand_operations(["data"])),)

    def service(with_audit: bool) -> KeyService:
        return KeyService(
            store=store,
            hsm=MeasuredHsm(hsm, metrics),
            policy=Policy(grants),
            create_kek_on_demand=True,
            audit=audit if with_audit else None,
        )

    audited, bare = service(True), service(False)
    try:
        created = await audited.handle(Caller(IDENTITY, 1), CreateDek(namespace="bench/tenant"))
        request = GetDek(dek_id=created.dek_id)
        assert store.cached_dek(created.dek_id) is not None

        def get_dek(svc: KeyService) -> Callable[[int], Any]:
            def once(i: int) -> Any:
                start = time.perf_counter()
                result = svc.handle_now(Caller(IDENTITY, i), request)
                metrics.record_request("get-dek", time.perf_counter() - start, None)
                return result

            return once

        event = AuditEvent(
            identity=IDENTITY,
            operation="get-dek",
            result="ok",
            request_id=7,
            namespace="bench/tenant",
            dek_id=created.dek_id,
            kek="bench/tenant",
            kek_version=1,
            detail="purpose decrypt",
        )
        found: dict[str, list[float]] = {}
        for _ in range(rounds):
            found.setdefault("get_dek_us", []).append(per_call_us(calls, get_dek(audited)))
            await audit.sync(audit._seq)  # the records of the phase, as the flusher would
            found.setdefault("service_only_us", []).append(per_call_us(calls, get_dek(bare)))
            found.setdefault("audit_append_us", []).append(
                per_call_us(calls, lambda i: audit.append(event, time.time()))
            )
            start = time.perf_counter()
            await audit.sync(audit._seq)
            found.setdefault("audit_flush_us", []).append(
                (time.perf_counter() - start) / calls * 1e6
            )
        report: dict[str, Any] = {"calls_per_phase": calls, "rounds": rounds}
        report.update({name: round(statistics.median(v), 2) for name, v in found.items()})
        return report
    finally:
        audit.close()
        hsm.close()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20_000, help="per phase and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kmipd-bench-") as tmp:
        report = trio.run(measure, Path(tmp), args.calls, args.rounds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
