"""What the metrics cost on the hot path: per call, and per get-dek served.

    python bench/bench_metrics.py [--rounds 4] [--seconds 2]

Two parts, one JSON document:

* ``per_call_ns``: the bookkeeping itself, in process: recording one
  request (``ServerMetrics.record_request``, plus two ``perf_counter``
  calls), and what ``MeasuredHsm`` adds to an inline unwrap of the software
  HSM (nothing: it hands out the backend's own method).
* ``daemon``: ``kmipd serve --dev`` as shipped against the same daemon with
  the metrics bookkeeping patched out (a bench-only bootstrap), in
  alternating rounds on the same data: sequential and pipelined get-dek
  throughput and server CPU per get, medians, and the difference.

Numbers, never pass/fail: this machine is shared and noisy, which is why
the rounds alternate and the server's own CPU time per get is reported
beside the throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import trio
from bench_core import cpu_seconds, start, timed_loop

from kmipd.client import Client
from kmipd.hsm import SoftwareHsm
from kmipd.metrics._counters import MeasuredHsm, ServerMetrics
from kmipd.protocol import ErrorCode

#: Runs kmipd with the metrics bookkeeping replaced by no-ops: the baseline.
WITHOUT_METRICS = """
import sys
import kmipd.metrics._counters as metrics
import kmipd.daemon._assembly as daemon
metrics.ServerMetrics.record_request = lambda *args: None
daemon.MeasuredHsm = lambda backend, _metrics: backend
from kmipd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def per_call_ns(tmp: Path) -> dict[str, float]:
    metrics = ServerMetrics()
    record = timeit.Timer(lambda: metrics.record_request("get-dek", 0.00004, None))
    record_error = timeit.Timer(
        lambda: metrics.record_request("get-dek", 0.00004, ErrorCode.NOT_FOUND)
    )
    hsm = SoftwareHsm.open(tmp / "master.key", tmp / "keyring.cbor", create=True)
    handle = trio.run(hsm.generate_kek, "bench")
    wrapped = trio.run(hsm.wrap, handle, b"k" * 32, b"ad")
    measured = MeasuredHsm(hsm, metrics)
    raw = timeit.Timer(lambda: hsm.unwrap_now(handle, wrapped, b"ad"))
    timed = timeit.Timer(lambda: measured.unwrap_now(handle, wrapped, b"ad"))
    clock = timeit.Timer(time.perf_counter)

    def best(timer: timeit.Timer, number: int = 200_000) -> float:
        return min(timer.repeat(repeat=5, number=number)) / number * 1e9

    raw_unwrap, timed_unwrap = best(raw, 50_000), best(timed, 50_000)
    return {
        "record_request": round(best(record), 1),
        "record_request_with_error": round(best(record_error), 1),
        "perf_counter_call": round(best(clock), 1),
        "software_unwrap_now": round(raw_unwrap, 1),
        "measured_hsm_adds": round(timed_unwrap - raw_unwrap, 1),
    }


def one_round(
    command: list[str], data: Path, log: Path, seconds: float, batch_ids: list[str]
) -> dict[str, float]:
    process, address = start(command, log)
    try:
        pki = data / "pki"
        creds = {"ca": pki / "ca.pem", "cert": pki / "storage.pem", "key": pki / "storage-key.pem"}
        with Client(address, **creds) as kms:
            # Distinct ids, made once: the client asks once per distinct DEK in a batch.
            if not batch_ids:
                batch_ids.extend(kms.create_dek("bench").dek_id for _ in range(512))
            kms.get_deks(batch_ids)  # into the server's row cache: the hot path
            before = cpu_seconds(process.pid)
            sequential = timed_loop(seconds, lambda: (kms.get_dek(batch_ids[0]), 1)[1])
            pipelined = timed_loop(seconds, lambda: len(kms.get_deks(batch_ids)))
            used = cpu_seconds(process.pid) - before
        operations = sequential["operations"] + pipelined["operations"]
        return {
            "sequential_per_s": sequential["ops_per_s"],
            "pipelined_per_s": pipelined["ops_per_s"],
            "server_us_per_get": used * 1e6 / operations,
        }
    finally:
        process.terminate()
        process.wait(30)


def daemon_comparison(tmp: Path, rounds: int, seconds: float) -> dict[str, object]:
    data = tmp / "dev"
    serve = ["serve", "--dev", "--data", str(data), "--listen", "127.0.0.1:0"]
    variants = {
        "with_metrics": [sys.executable, "-m", "kmipd", *serve],
        "without_metrics": [sys.executable, "-c", WITHOUT_METRICS, *serve],
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    batch_ids: list[str] = []  # the same DEKs in every round
    for number in range(rounds):
        order = list(variants) if number % 2 == 0 else list(reversed(variants))
        for name in order:
            results[name].append(
                one_round(variants[name], data, tmp / f"{name}-{number}.log", seconds, batch_ids)
            )
    medians = {
        name: {
            key: round(statistics.median(r[key] for r in runs), 2)
            for key in ("sequential_per_s", "pipelined_per_s", "server_us_per_get")
        }
        for name, runs in results.items()
    }
    with_, without = medians["with_metrics"], medians["without_metrics"]
    return {
        **medians,
        "difference_pct": {
            key: round((with_[key] - without[key]) / without[key] * 100, 1) for key in with_
        },
        "rounds": rounds,
        "seconds_per_phase": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds per variant (alternating)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kmipd-bench-metrics-") as name:
        tmp = Path(name)
        (tmp / "hsm").mkdir()
        micro = per_call_ns(tmp / "hsm")
        # --dev makes its data on the first run; both variants then share it.
        daemon = daemon_comparison(tmp, args.rounds, args.seconds)
    print(json.dumps({"per_call_ns": micro, "daemon": daemon}, indent=2))


if __name__ == "__main__":
    main()
