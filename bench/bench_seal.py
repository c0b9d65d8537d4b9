"""The asymmetric flow: sealed envelopes in bounded memory, sealed DEK delivery cost.

    python bench/bench_seal.py [--sizes 16,256,1024] [--gets 2000] [--quick]

Starts ``kmipd serve --dev`` on loopback, issues key-transport certificates
from its CA and prints one JSON document:

* ``seal_open``: per file size, peak RSS (MiB) of the ``kmipd seal --to`` and
  ``kmipd open`` subprocesses and their throughput (MiB/s, wall time of the
  whole command, so start-up and the certificate fetch included): bounded
  memory shows as a flat peak whatever the size;
* ``get_dek_p50_ms``: sequential get-dek on one connection, no cache, in the
  clear and sealed to a transport key of each type (the daemon's HPKE seal
  plus the client's open), median and p99 latency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_client import digest, peak_rss_of, start_daemon

from kmipd.client import Client, TransportKey


def latencies(kms: Client, dek_id: str, count: int) -> dict[str, float]:
    for _ in range(50):  # warm up: connection, caches
        kms.get_dek(dek_id).close()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        kms.get_dek(dek_id).close()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {
        "p50": round(statistics.median(samples), 3),
        "p99": round(samples[int(len(samples) * 0.99) - 1], 3),
    }


def timed_peak_rss(command: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    rss = peak_rss_of(command)
    return rss, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="16,256,1024", help="file sizes in MiB")
    parser.add_argument("--gets", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="16 and 64 MiB, 500 gets")
    args = parser.parse_args()
    sizes = [16, 64] if args.quick else [int(s) for s in args.sizes.split(",")]
    gets = 500 if args.quick else args.gets
    cli = [sys.executable, "-m", "kmipd"]

    with tempfile.TemporaryDirectory(prefix="kmipd-bench-seal-") as tmp_name:
        tmp = Path(tmp_name)
        daemon, address = start_daemon(tmp / "dev")
        pki = tmp / "dev" / "pki"

        def creds(name: str) -> dict[str, Path]:
            return {
                "ca": pki / "ca.pem",
                "cert": pki / f"{name}.pem",
                "key": pki / f"{name}-key.pem",
            }

        def issue(name: str, kem: str) -> TransportKey:
            subprocess.run(
                [*cli, "pki", "issue-transport", str(pki), name, "--kem", kem, "--force"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            return TransportKey.from_files(
                pki / f"{name}-transport.pem", pki / f"{name}-transport-key.pem"
            )

        results: dict[str, object] = {}
        try:
            per_kem: dict[str, dict[str, float]] = {}
            with Client(address, **creds("storage")) as kms:
                dek_id = kms.create_dek("bench").dek_id
                per_kem["clear"] = latencies(kms, dek_id, gets)
            for kem in ("x25519", "p256", "mlkem768-x25519"):
                key = issue("storage", kem)
                with Client(address, **creds("storage"), transport=key) as kms:
                    kms.register_transport_certificate()
                    per_kem[f"sealed-{kem}"] = latencies(kms, dek_id, gets)
            results["get_dek_ms"] = per_kem

            storage = issue("storage", "x25519")
            with Client(address, **creds("storage"), transport=storage) as kms:
                kms.register_transport_certificate()
            connection = ["--server", address, "--ca", str(pki / "ca.pem")]
            connection += ["--cert", str(pki / "admin.pem"), "--key", str(pki / "admin-key.pem")]
            key_args = ["--transport-cert", str(pki / "storage-transport.pem")]
            key_args += ["--transport-key", str(pki / "storage-transport-key.pem")]
            runs = {}
            for mib in sizes:
                plain, sealed, back = tmp / "plain", tmp / "plain.sealed", tmp / "back"
                with plain.open("wb") as out:
                    for _ in range(mib):
                        out.write(os.urandom(1 << 20))
                seal_rss, seal_s = timed_peak_rss(
                    [*cli, "seal", "--to", "storage", str(plain), "-o", str(sealed), *connection]
                )
                open_rss, open_s = timed_peak_rss(
                    [*cli, "open", str(sealed), "-o", str(back), *key_args]
                )
                assert digest(back) == digest(plain)
                runs[f"{mib} MiB"] = {
                    "seal_peak_rss_mib": seal_rss,
                    "open_peak_rss_mib": open_rss,
                    "seal_mib_per_s": round(mib / seal_s, 1),
                    "open_mib_per_s": round(mib / open_s, 1),
                    "overhead_bytes": sealed.stat().st_size - plain.stat().st_size,
                }
                for path in (plain, sealed, back):
                    path.unlink()
            results["seal_open"] = runs
            results["kmipd_help_peak_rss_mib"] = peak_rss_of([*cli, "--help"])
        finally:
            daemon.terminate()
            daemon.wait(30)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
