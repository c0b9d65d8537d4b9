"""DEK delivery throughput and latency, against the echo ceiling of the same stack.

    python bench/bench_core.py [--seconds 3] [--quick]

Starts ``kmipd serve --dev`` and the bare trio mutual-TLS echo server
(bench/echo_server.py) as subprocesses on loopback, measures both with the
same client style in the same run, and prints one JSON document:

* ``sequential``: get-dek one at a time on one connection (ops/s, p50/p99 ms)
* ``pipelined``: get-dek with up to max-in-flight outstanding on one connection
* ``concurrent_16``: 16 connections (4 processes x 4 threads), aggregate ops/s
* ``new_connections``: full mutual-TLS connect + hello + one get + close, per second
* ``ratio_to_echo``: kmipd divided by the echo ceiling for the same pattern
* ``server_cpu_ms_per_op``: CPU the server process spent per operation

Numbers, never pass/fail: these machines are shared and noisy, so compare
the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kmipd.client import Client
from kmipd.protocol import GetDek, encode_frame, encode_item, request_to_wire

HERE = Path(__file__).resolve().parent
_HEADER = struct.Struct(">I")
PIPELINE_BATCH = 512
CONCURRENT_PROCESSES, CONCURRENT_THREADS = 4, 4


# -- processes under test ------------------------------------------------------------------


def start(command: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server process and wait for its 'listening on HOST:PORT' line."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("wb"))
    assert process.stdout is not None
    for raw in process.stdout:
        match = re.search(r"listening on (\S+?)(,|$)", raw.decode())
        if match:
            return process, match.group(1)
    raise RuntimeError(f"{command[0]} did not start; see {log}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steal_jiffies() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[7], sum(values)


# -- the measured loops ----------------------------------------------------------------------


def timed_loop(seconds: float, call: Callable[[], int]) -> dict[str, float]:
    """Run ``call`` (which returns how many operations it did) for ``seconds``."""
    latencies: list[float] = []
    operations = 0
    start_time = time.perf_counter()
    deadline = start_time + seconds
    while (now := time.perf_counter()) < deadline:
        operations += call()
        latencies.append(time.perf_counter() - now)
    elapsed = time.perf_counter() - start_time
    latencies.sort()
    return {
        "ops_per_s": round(operations / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "operations": operations,
    }


class EchoClient:
    """The same framing over a plain ssl socket: the blocking client minus kmipd."""

    def __init__(self, address: str, context: ssl.SSLContext, request: bytes, reply_size: int):
        host, port = address.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname=host)
        self.request = request
        self.reply_frame = 4 + reply_size

    def exchange(self, count: int) -> int:
        self.sock.sendall(self.request * count)
        remaining = self.reply_frame * count
        while remaining:
            remaining -= len(self.sock.recv(min(remaining, 1 << 20)))
        return count

    def close(self) -> None:
        self.sock.close()


def kmipd_patterns(
    address: str, creds: dict[str, Path], dek_id: str, seconds: float
) -> dict[str, Any]:
    with Client(address, **creds) as kms:
        kms.get_dek(dek_id)
        sequential = timed_loop(seconds, lambda: (kms.get_dek(dek_id), 1)[1])
        # Distinct ids: the client asks once per distinct DEK in a batch.
        batch = [kms.create_dek("bench").dek_id for _ in range(PIPELINE_BATCH)]
        pipelined = timed_loop(seconds, lambda: len(kms.get_deks(batch)))

    def reconnect() -> int:
        with Client(address, **creds) as fresh:
            fresh.get_dek(dek_id)
        return 1

    connections = timed_loop(seconds, reconnect)
    return {"sequential": sequential, "pipelined": pipelined, "new_connections": connections}


def echo_patterns(
    address: str, creds: dict[str, Path], request: bytes, reply_size: int, seconds: float
) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(creds["ca"]))
    context.load_cert_chain(creds["cert"], creds["key"])
    echo = EchoClient(address, context, request, reply_size)
    sequential = timed_loop(seconds, lambda: echo.exchange(1))
    pipelined = timed_loop(seconds, lambda: echo.exchange(64))
    echo.close()

    def reconnect() -> int:
        fresh = EchoClient(address, context, request, reply_size)
        fresh.exchange(1)
        fresh.close()
        return 1

    connections = timed_loop(seconds, reconnect)
    return {"sequential": sequential, "pipelined": pipelined, "new_connections": connections}


def _concurrent_worker(
    kind: str,
    address: str,
    creds: dict[str, Path],
    target: str,
    request: bytes,
    reply_size: int,
    seconds: float,
    barrier: Any,
    results: Any,
) -> None:
    """One process with CONCURRENT_THREADS connections, each doing sequential gets."""
    counts: list[int] = []

    def run() -> None:
        if kind == "kmipd":
            with Client(address, **creds) as kms:
                kms.get_dek(target)
                barrier.wait()
                counts.append(
                    timed_loop(seconds, lambda: (kms.get_dek(target), 1)[1])["operations"]
                )
        else:
            context = ssl.create_default_context(cafile=str(creds["ca"]))
            context.load_cert_chain(creds["cert"], creds["key"])
            echo = EchoClient(address, context, request, reply_size)
            barrier.wait()
            counts.append(timed_loop(seconds, lambda: echo.exchange(1))["operations"])
            echo.close()

    threads = [threading.Thread(target=run) for _ in range(CONCURRENT_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(sum(counts))


def concurrent(
    kind: str,
    address: str,
    creds: dict[str, Path],
    target: str,
    request: bytes,
    reply_size: int,
    seconds: float,
) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(CONCURRENT_PROCESSES * CONCURRENT_THREADS)
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=_concurrent_worker,
            args=(kind, address, creds, target, request, reply_size, seconds, barrier, results),
        )
        for _ in range(CONCURRENT_PROCESSES)
    ]
    for worker in workers:
        worker.start()
    total = sum(results.get(timeout=seconds + 120) for _ in workers)
    for worker in workers:
        worker.join()
    return {
        "ops_per_s": round(total / seconds, 1),
        "connections": CONCURRENT_PROCESSES * CONCURRENT_THREADS,
    }


# -- the run -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--quick", action="store_true", help="1 s per measurement")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds

    with tempfile.TemporaryDirectory(prefix="kmipd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        daemon, address = start(
            [
                sys.executable,
                "-m",
                "kmipd",
                "serve",
                "--dev",
                "--data",
                str(tmp / "dev"),
                "--listen",
                "127.0.0.1:0",
            ],
            tmp / "kmipd.log",
        )
        pki = tmp / "dev" / "pki"
        creds = {"ca": pki / "ca.pem", "cert": pki / "storage.pem", "key": pki / "storage-key.pem"}
        echo = None
        try:
            with Client(address, **creds) as kms:
                dek = kms.create_dek("bench")
            request = encode_frame(encode_item(request_to_wire(123456, GetDek(dek_id=dek.dek_id))))
            reply_size = 120  # a get-dek response: id, dek-id, namespace, version, 32-byte key
            echo, echo_address = start(
                [
                    sys.executable,
                    str(HERE / "echo_server.py"),
                    "--pki",
                    str(pki),
                    "--reply-size",
                    str(reply_size),
                ],
                tmp / "echo.log",
            )
            print(
                f"kmipd at {address}, echo ceiling at {echo_address}; {seconds:g} s per phase",
                file=sys.stderr,
            )

            steal_before = steal_jiffies()
            cpu_before = cpu_seconds(daemon.pid)
            kmipd = kmipd_patterns(address, creds, dek.dek_id, seconds)
            kmipd["concurrent_16"] = concurrent(
                "kmipd", address, creds, dek.dek_id, request, reply_size, seconds
            )
            kmipd_ops = sum(p.get("operations", 0) for p in kmipd.values() if isinstance(p, dict))
            kmipd_ops += int(kmipd["concurrent_16"]["ops_per_s"] * seconds)
            server_cpu = cpu_seconds(daemon.pid) - cpu_before
            ceiling = echo_patterns(echo_address, creds, request, reply_size, seconds)
            ceiling["concurrent_16"] = concurrent(
                "echo", echo_address, creds, dek.dek_id, request, reply_size, seconds
            )
            steal_after = steal_jiffies()
        finally:
            for process in (daemon, echo):
                if process is not None:
                    process.terminate()
                    process.wait(30)

    ratios = {
        pattern: round(kmipd[pattern]["ops_per_s"] / ceiling[pattern]["ops_per_s"], 3)
        for pattern in ("sequential", "pipelined", "concurrent_16", "new_connections")
    }
    steal = (steal_after[0] - steal_before[0]) / max(1, steal_after[1] - steal_before[1])
    print(
        json.dumps(
            {
                "kmipd": kmipd,
                "echo_ceiling": ceiling,
                "ratio_to_echo": ratios,
                "server_cpu_ms_per_op": round(server_cpu * 1000 / max(1, kmipd_ops), 4),
                "seconds_per_phase": seconds,
                "host_steal_pct": round(steal * 100, 2),
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
