"""The storage-system client: cached vs uncached gets, envelope throughput and memory.

    python bench/bench_client.py [--seconds 3] [--mib 256] [--quick]

Starts ``kmipd serve --dev`` on loopback and prints one JSON document:

* ``get_uncached`` / ``get_cached``: sequential get-dek on one connection,
  without and with a DekCache (ops/s), and their ratio;
* ``envelope``: ``encrypt_stream`` / ``decrypt_stream`` of a file (MiB/s);
* ``envelope_cli_peak_rss_mib``: peak RSS of ``kmipd encrypt`` and ``kmipd
  decrypt`` subprocesses on that file, against the file's size: constant
  memory shows as a peak far below the file size, whatever the size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kmipd.client import Client, DekCache


def start_daemon(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kmipd",
            "serve",
            "--dev",
            "--data",
            str(data),
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    for raw in process.stdout:
        match = re.search(r"listening on (\S+?)(,|$)", raw.decode())
        if match:
            return process, match.group(1)
    raise RuntimeError("kmipd did not start")


def rate(seconds: float, call: Any) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        count += 1
    return round(count / (time.perf_counter() - start), 1)


def digest(path: Path) -> str:
    """SHA-256 of a file, read in chunks (the benchmark must stay small itself)."""
    sha = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def peak_rss_of(command: list[str]) -> float:
    """Run a command; its peak resident memory in MiB (from wait4's rusage).

    Linux starts a child's high-water mark at its parent's, so this process
    keeps itself small (files are hashed in chunks, never read whole).
    """
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[3]} failed")
    return round(usage.ru_maxrss / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--mib", type=int, default=256, help="envelope file size")
    parser.add_argument("--quick", action="store_true", help="1 s phases, 64 MiB file")
    args = parser.parse_args()
    seconds, mib = (1.0, 64) if args.quick else (args.seconds, args.mib)

    with tempfile.TemporaryDirectory(prefix="kmipd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        daemon, address = start_daemon(tmp / "dev")
        pki = tmp / "dev" / "pki"
        creds = {"ca": pki / "ca.pem", "cert": pki / "storage.pem", "key": pki / "storage-key.pem"}
        try:
            with Client(address, **creds) as kms:
                dek_id = kms.create_dek("bench").dek_id
                uncached = rate(seconds, lambda: kms.get_dek(dek_id).close())
            with Client(address, **creds, cache=DekCache(ttl=600)) as kms:
                kms.get_dek(dek_id).close()
                cached = rate(seconds, lambda: kms.get_dek(dek_id).close())

            plain, sealed, back = tmp / "plain", tmp / "plain.kmpe", tmp / "back"
            with plain.open("wb") as out:
                for _ in range(mib):
                    out.write(os.urandom(1 << 20))
            with Client(address, **creds) as kms:
                start = time.perf_counter()
                with plain.open("rb") as src, sealed.open("wb") as dst:
                    kms.encrypt_stream(src, dst, "bench")
                encrypt_s = time.perf_counter() - start
                start = time.perf_counter()
                with sealed.open("rb") as src, back.open("wb") as dst:
                    kms.decrypt_stream(src, dst)
                decrypt_s = time.perf_counter() - start
            assert digest(back) == digest(plain)

            cli = [sys.executable, "-m", "kmipd"]
            common = [
                "--server",
                address,
                "--ca",
                str(creds["ca"]),
                "--cert",
                str(creds["cert"]),
                "--key",
                str(creds["key"]),
            ]
            encrypt_rss = peak_rss_of(
                [
                    *cli,
                    "encrypt",
                    str(plain),
                    "-o",
                    str(tmp / "cli.kmpe"),
                    "--kek",
                    "bench",
                    *common,
                ]
            )
            decrypt_rss = peak_rss_of(
                [*cli, "decrypt", str(tmp / "cli.kmpe"), "-o", str(tmp / "cli.out"), *common]
            )
            baseline_rss = peak_rss_of([*cli, "--help"])
        finally:
            daemon.terminate()
            daemon.wait(30)

    print(
        json.dumps(
            {
                "get_uncached_per_s": uncached,
                "get_cached_per_s": cached,
                "cached_over_uncached": round(cached / uncached, 1),
                "envelope_mib": mib,
                "encrypt_mib_per_s": round(mib / encrypt_s, 1),
                "decrypt_mib_per_s": round(mib / decrypt_s, 1),
                "envelope_cli_peak_rss_mib": {
                    "encrypt": encrypt_rss,
                    "decrypt": decrypt_rss,
                    "kmipd_help_baseline": baseline_rss,
                },
                "self_peak_rss_mib": round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
