"""get-secret against get-dek, sequential on one connection, in the same run.

    python bench/bench_secrets.py [--seconds 1] [--rounds 3] [--quick]

Starts ``kmipd serve --dev`` on loopback (software HSM, SQLite), sets a
secret of 32 bytes, 4 KiB and 64 KiB (the default ``secrets.max_size``) and
makes a DEK, then measures each read with the blocking client on one
connection, no cache. The phases alternate for ``--rounds`` rounds so drift
on a shared machine falls on all of them; the median round is printed, as
ops/s and as the ratio to get-dek in the same run. Both reads unwrap once in
the HSM; a secret also reads its version rows and copies its value into
locked pages on the client.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench_client import rate, start_daemon

from kmipd.client import Client

SIZES = {"32 B": 32, "4 KiB": 4096, "64 KiB": 64 * 1024}


def read(kms: Client, name: str) -> None:
    kms.get_secret("bench", name).close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="per phase and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="0.5 s phases, 2 rounds")
    args = parser.parse_args()
    seconds, rounds = (0.5, 2) if args.quick else (args.seconds, args.rounds)

    with tempfile.TemporaryDirectory(prefix="kmipd-bench-") as tmp_name:
        data = Path(tmp_name) / "dev"
        daemon, address = start_daemon(data)
        pki = data / "pki"
        creds = {"ca": pki / "ca.pem", "cert": pki / "admin.pem", "key": pki / "admin-key.pem"}
        results: dict[str, list[float]] = {"get-dek": [], **{f"get-secret {s}": [] for s in SIZES}}
        try:
            with Client(address, **creds, pool_size=1) as kms:  # one connection
                dek_id = kms.create_dek("bench").dek_id
                for size in SIZES.values():
                    kms.set_secret("bench", f"s-{size}", os.urandom(size))
                phases: dict[str, Callable[[], None]] = {
                    "get-dek": lambda: kms.get_dek(dek_id).close()
                }
                for label, size in SIZES.items():
                    phases[f"get-secret {label}"] = functools.partial(read, kms, f"s-{size}")
                for phase in phases.values():
                    phase()  # warm the connection and the daemon's caches
                for _ in range(rounds):
                    for label, phase in phases.items():
                        results[label].append(rate(seconds, phase))
        finally:
            daemon.terminate()
            daemon.wait(30)

    median = {label: round(statistics.median(values), 1) for label, values in results.items()}
    dek = median["get-dek"]
    print(
        json.dumps(
            {
                "seconds_per_phase": seconds,
                "rounds": rounds,
                "per_s": median,
                "over_get_dek": {
                    label: round(value / dek, 2)
                    for label, value in median.items()
                    if label != "get-dek"
                },
                "rounds_per_s": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
