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
* ``server_cpu_ms_per_op``: CPU the server process spent per operation, all phases
* ``server_cpu_us`` / ``client_cpu_us`` in each one-connection phase: the
  daemon's CPU (utime + stime from /proc) and this process's, per operation
* ``latency_flatness``: p50/p99 of sequential gets of DEKs the row cache does
  not hold, with 1,000 and with 1,000,000 DEKs stored (the rest bulk-inserted
  through the store class while the daemon is stopped, not over the wire);
  ``--flat-rows`` changes the large count, ``--no-flatness`` skips it
* ``resumption``: new connection + get, full handshake against a resumed
  TLS 1.3 session, on a daemon with ``tls.session_tickets = 2`` (resumption
  re-checks revocation: tests/test_tls.py)
* ``workers``: pipelined get-dek from WORKER_CLIENTS connections (processes x
  threads, each its own connection) against ``server.workers`` = 1 and = 2, the
  aggregate gets/s, the server's CPU per get (supervisor and workers together) and
  ``ratio_2_to_1``; ``--workers-taskset CPUS`` runs the daemon under ``taskset -c``
  (its workers inherit the mask); ``--no-workers`` skips it
* ``kmip``: bench/bench_kmip.py's document (KMIP Get against native get-dek,
  same seconds per phase); ``--no-kmip`` skips it

Numbers, never pass/fail: these machines are shared and noisy, so compare
the ratios within one run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import multiprocessing
import os
import random
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
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from kmipd.client import Client
from kmipd.daemon.config import render_config
from kmipd.protocol import (
    ClientConnection,
    GetDek,
    ResponseReceived,
    encode_frame,
    encode_item,
    request_to_wire,
)
from kmipd.store import KeyStore

HERE = Path(__file__).resolve().parent
_HEADER = struct.Struct(">I")
PIPELINE_BATCH = 512
#: The small store of the latency-flatness phase (the large one is --flat-rows).
FLAT_SMALL = 1_000
DEV_SERVE = [sys.executable, "-m", "kmipd", "serve", "--dev"]
CONCURRENT_PROCESSES, CONCURRENT_THREADS = 4, 4
#: The workers phase's clients: processes x threads, a pipelining connection each.
WORKER_CLIENT_PROCESSES, WORKER_CLIENT_THREADS = 4, 2


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


def timed_loop(
    seconds: float, call: Callable[[], int], server_pid: int | None = None
) -> dict[str, float]:
    """Run ``call`` (which returns how many operations it did) for ``seconds``.

    With ``server_pid``, also the server's and this process's CPU per operation.
    """
    latencies: list[float] = []
    operations = 0
    server_before = cpu_seconds(server_pid) if server_pid is not None else 0.0
    client_before = time.process_time()
    start_time = time.perf_counter()
    deadline = start_time + seconds
    while (now := time.perf_counter()) < deadline:
        operations += call()
        latencies.append(time.perf_counter() - now)
    elapsed = time.perf_counter() - start_time
    client_cpu = time.process_time() - client_before
    latencies.sort()
    result = {
        "ops_per_s": round(operations / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "operations": operations,
        "client_cpu_us": round(client_cpu * 1e6 / max(1, operations), 1),
    }
    if server_pid is not None:
        server_cpu = cpu_seconds(server_pid) - server_before
        result["server_cpu_us"] = round(server_cpu * 1e6 / max(1, operations), 1)
    return result


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
    address: str, creds: dict[str, Path], dek_id: str, seconds: float, pid: int
) -> dict[str, Any]:
    with Client(address, **creds) as kms:
        kms.get_dek(dek_id)
        sequential = timed_loop(seconds, lambda: (kms.get_dek(dek_id), 1)[1], pid)
        # Distinct ids: the client asks once per distinct DEK in a batch.
        batch = [kms.create_dek("bench").dek_id for _ in range(PIPELINE_BATCH)]
        kms.get_deks(batch)
        pipelined = timed_loop(seconds, lambda: len(kms.get_deks(batch)), pid)

    def reconnect() -> int:
        with Client(address, **creds) as fresh:
            fresh.get_dek(dek_id)
        return 1

    connections = timed_loop(seconds, reconnect, pid)
    return {"sequential": sequential, "pipelined": pipelined, "new_connections": connections}


def echo_patterns(
    address: str,
    creds: dict[str, Path],
    request: bytes,
    reply_size: int,
    seconds: float,
    pid: int,
) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(creds["ca"]))
    context.load_cert_chain(creds["cert"], creds["key"])
    echo = EchoClient(address, context, request, reply_size)
    sequential = timed_loop(seconds, lambda: echo.exchange(1), pid)
    pipelined = timed_loop(seconds, lambda: echo.exchange(64), pid)
    echo.close()

    def reconnect() -> int:
        fresh = EchoClient(address, context, request, reply_size)
        fresh.exchange(1)
        fresh.close()
        return 1

    connections = timed_loop(seconds, reconnect, pid)
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


# -- a stopped daemon's store, configured daemons -----------------------------------------


def configured(data: Path, log: Path, overrides: dict[str, dict[str, Any]]) -> Any:
    """Start ``kmipd serve --config`` on a --dev data directory, with config overrides."""
    config = data / "kmipd.toml"
    document = tomllib.loads(config.read_text(encoding="utf-8"))
    grants = document.pop("grant", [])
    for section, values in overrides.items():
        document.setdefault(section, {}).update(values)
    config.write_text(render_config(document, grants), encoding="utf-8")
    return start([sys.executable, "-m", "kmipd", "serve", "--config", str(config)], log)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(60)


def fill_store(database: Path, template_id: str, rows: int) -> float:
    """Bulk-insert ``rows`` DEK rows (copies of one row under fresh random ids) through
    the store class, with the daemon stopped; seconds taken."""
    started = time.perf_counter()
    store = KeyStore.open(database)
    try:

        async def fill() -> None:
            template = await store.get_dek(template_id)
            assert template is not None
            left = rows
            while left:
                chunk = min(left, 100_000)
                ids = (
                    "dek_" + base64.b32encode(os.urandom(16)).decode().rstrip("=").lower()
                    for _ in range(chunk)
                )
                await store.put_deks([attrs.evolve(template, dek_id=i) for i in ids])
                left -= chunk

        trio.run(fill)
    finally:
        store.close()
    return time.perf_counter() - started


def uncached_gets(
    address: str, creds: dict[str, Path], dek_ids: list[str], seconds: float, pid: int
) -> dict[str, float]:
    """Sequential gets cycling through ``dek_ids`` in a shuffled order."""
    order = list(dek_ids)
    random.shuffle(order)
    position = 0

    def one(kms: Client) -> int:
        nonlocal position
        kms.get_dek(order[position % len(order)])
        position += 1
        return 1

    with Client(address, **creds) as kms:
        kms.get_dek(order[0])
        return timed_loop(seconds, lambda: one(kms), pid)


def latency_flatness(tmp: Path, seconds: float, large: int) -> dict[str, Any]:
    """p50/p99 of gets that miss the row cache, with 1,000 and with ``large`` DEKs stored.

    ``store.cache_size = 100`` and 1,000 DEKs read in turn: nearly every get
    reads its row from SQLite, whose index is what grows.
    """
    data = tmp / "flat"
    daemon, address = start(
        [*DEV_SERVE, "--data", str(data), "--listen", "127.0.0.1:0"],
        tmp / "flat-dev.log",
    )
    pki = data / "pki"
    creds = {"ca": pki / "ca.pem", "cert": pki / "storage.pem", "key": pki / "storage-key.pem"}
    try:
        with Client(address, **creds) as kms:
            dek_ids = [kms.create_dek("bench").dek_id for _ in range(FLAT_SMALL)]
    finally:
        stop(daemon)
    overrides = {"store": {"cache_size": 100}}
    result: dict[str, Any] = {}
    for stored in (FLAT_SMALL, large):
        if stored > FLAT_SMALL:
            result["fill_seconds"] = round(
                fill_store(data / "kmipd.db", dek_ids[0], stored - FLAT_SMALL), 1
            )
        daemon, address = configured(data, tmp / f"flat-{stored}.log", overrides)
        try:
            result[f"deks_{stored}"] = uncached_gets(address, creds, dek_ids, seconds, daemon.pid)
        finally:
            stop(daemon)
    small, big = result[f"deks_{FLAT_SMALL}"], result[f"deks_{large}"]
    result["p50_ratio"] = round(big["p50_ms"] / small["p50_ms"], 3)
    result["p99_ratio"] = round(big["p99_ms"] / small["p99_ms"], 3)
    return result


def connect_and_get(
    address: str, context: ssl.SSLContext, dek_id: str, session: ssl.SSLSession | None
) -> tuple[ssl.SSLSession | None, bool]:
    """One mutual-TLS connection: hello and one get, pipelined; (its session, resumed)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=host, session=session) as sock:
            protocol = ClientConnection()
            _, hello = protocol.start()
            _, get = protocol.send_request(GetDek(dek_id=dek_id))
            sock.sendall(hello + get)
            answered = 0
            while answered < 2:
                protocol.receive_data(sock.recv(65536))
                while isinstance(protocol.next_event(), ResponseReceived):
                    answered += 1
            return sock.session, sock.session_reused


def resumption(tmp: Path, seconds: float) -> dict[str, Any]:
    """New connection + get: full handshakes against resumed sessions (tickets on)."""
    data = tmp / "dev"
    daemon, address = configured(data, tmp / "tickets.log", {"tls": {"session_tickets": 2}})
    pki = data / "pki"
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.load_cert_chain(pki / "storage.pem", pki / "storage-key.pem")
    try:
        with Client(
            address, ca=pki / "ca.pem", cert=pki / "storage.pem", key=pki / "storage-key.pem"
        ) as kms:
            dek_id = kms.create_dek("bench").dek_id
        full = timed_loop(
            seconds, lambda: (connect_and_get(address, context, dek_id, None), 1)[1], daemon.pid
        )
        session, _ = connect_and_get(address, context, dek_id, None)
        reused: list[bool] = []

        def resume() -> int:
            _, was_reused = connect_and_get(address, context, dek_id, session)
            reused.append(was_reused)
            return 1

        resumed = timed_loop(seconds, resume, daemon.pid)
    finally:
        stop(daemon)
    return {
        "full_handshake": full,
        "resumed": resumed,
        "resumed_share": round(sum(reused) / max(1, len(reused)), 3),
        "resumed_over_full": round(resumed["ops_per_s"] / full["ops_per_s"], 3),
    }


def _pipelined_client(
    address: str,
    creds: dict[str, Path],
    batch: list[str],
    seconds: float,
    barrier: Any,
    results: Any,
) -> None:
    """One process, WORKER_CLIENT_THREADS connections each getting ``batch`` pipelined."""
    counts: list[int] = []

    def run() -> None:
        with Client(address, **creds) as kms:
            kms.get_deks(batch)
            barrier.wait()
            counts.append(timed_loop(seconds, lambda: len(kms.get_deks(batch)))["operations"])

    threads = [threading.Thread(target=run) for _ in range(WORKER_CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(sum(counts))


def family_cpu_seconds(pid: int) -> float:
    """A process's CPU and that of its live children (the supervisor and its workers)."""
    total = cpu_seconds(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:  # its parent is the supervisor: a worker
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def workers_scaling(tmp: Path, seconds: float, taskset: str | None) -> dict[str, Any]:
    """Pipelined gets/s from several connections with server.workers = 1 and = 2."""
    data = tmp / "workers"
    daemon, address = start(
        [*DEV_SERVE, "--data", str(data), "--listen", "127.0.0.1:0"], tmp / "w.log"
    )
    pki = data / "pki"
    creds = {"ca": pki / "ca.pem", "cert": pki / "storage.pem", "key": pki / "storage-key.pem"}
    with Client(address, **creds) as kms:
        batch = [kms.create_dek("bench").dek_id for _ in range(PIPELINE_BATCH)]
    stop(daemon)
    config = data / "kmipd.toml"
    document = tomllib.loads(config.read_text(encoding="utf-8"))
    grants = document.pop("grant", [])
    found: dict[str, Any] = {}
    for workers in (1, 2):
        document["server"].update({"workers": workers, "listen": ["127.0.0.1:0"]})
        config.write_text(render_config(document, grants), encoding="utf-8")
        pinned = ["taskset", "-c", taskset] if taskset else []
        command = [*pinned, sys.executable, "-m", "kmipd", "serve", "--config", str(config)]
        daemon, address = start(command, tmp / f"w{workers}.log")
        try:
            ctx = multiprocessing.get_context("spawn")
            clients = WORKER_CLIENT_PROCESSES * WORKER_CLIENT_THREADS
            barrier = ctx.Barrier(clients + 1)
            results = ctx.Queue()
            processes = [
                ctx.Process(
                    target=_pipelined_client,
                    args=(address, creds, batch, seconds, barrier, results),
                )
                for _ in range(WORKER_CLIENT_PROCESSES)
            ]
            for process in processes:
                process.start()
            barrier.wait(timeout=120)  # every connection open and warm
            cpu_before, started = family_cpu_seconds(daemon.pid), time.perf_counter()
            total = sum(results.get(timeout=seconds + 120) for _ in processes)
            elapsed = time.perf_counter() - started
            server_cpu = family_cpu_seconds(daemon.pid) - cpu_before
            for process in processes:
                process.join()
        finally:
            stop(daemon)
        found[f"workers_{workers}"] = {
            "ops_per_s": round(total / elapsed, 1),
            "server_cpu_us": round(server_cpu * 1e6 / max(1, total), 1),
            "connections": clients,
        }
    found["ratio_2_to_1"] = round(
        found["workers_2"]["ops_per_s"] / found["workers_1"]["ops_per_s"], 3
    )
    found["taskset"] = taskset
    return found


def kmip_bench(seconds: float) -> Any:
    """bench_kmip.py's phases, in a subprocess of their own (their own daemon)."""
    out = subprocess.run(
        [sys.executable, str(HERE / "bench_kmip.py"), "--seconds", f"{seconds:g}"],
        capture_output=True,
        check=True,
    )
    return json.loads(out.stdout)


# -- the run -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--quick", action="store_true", help="1 s per measurement")
    parser.add_argument(
        "--flat-rows", type=int, default=1_000_000, help="DEKs stored in the large flatness run"
    )
    parser.add_argument("--no-flatness", action="store_true", help="skip latency_flatness")
    parser.add_argument("--no-kmip", action="store_true", help="skip the KMIP phases")
    parser.add_argument("--no-workers", action="store_true", help="skip the workers phases")
    parser.add_argument("--only-workers", action="store_true", help="run the workers phases alone")
    parser.add_argument(
        "--workers-taskset", metavar="CPUS", help="run the workers phases' daemon on these CPUs"
    )
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
    if args.only_workers:
        with tempfile.TemporaryDirectory(prefix="kmipd-bench-") as tmp_name:
            scaling = workers_scaling(Path(tmp_name), seconds, args.workers_taskset)
        print(
            json.dumps(
                {"workers": scaling, "seconds_per_phase": seconds, "cpus": os.cpu_count()}, indent=2
            )
        )
        return

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
            kmipd = kmipd_patterns(address, creds, dek.dek_id, seconds, daemon.pid)
            kmipd["concurrent_16"] = concurrent(
                "kmipd", address, creds, dek.dek_id, request, reply_size, seconds
            )
            kmipd_ops = sum(p.get("operations", 0) for p in kmipd.values() if isinstance(p, dict))
            kmipd_ops += int(kmipd["concurrent_16"]["ops_per_s"] * seconds)
            server_cpu = cpu_seconds(daemon.pid) - cpu_before
            ceiling = echo_patterns(echo_address, creds, request, reply_size, seconds, echo.pid)
            ceiling["concurrent_16"] = concurrent(
                "echo", echo_address, creds, dek.dek_id, request, reply_size, seconds
            )
            steal_after = steal_jiffies()
        finally:
            for process in (daemon, echo):
                if process is not None:
                    process.terminate()
                    process.wait(30)
        extra: dict[str, Any] = {"resumption": resumption(tmp, seconds)}
        if not args.no_flatness:
            extra["latency_flatness"] = latency_flatness(tmp, seconds, args.flat_rows)
        if not args.no_workers:
            extra["workers"] = workers_scaling(tmp, seconds, args.workers_taskset)
        if not args.no_kmip:
            extra["kmip"] = kmip_bench(seconds)

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
                **extra,
                "seconds_per_phase": seconds,
                "host_steal_pct": round(steal * 100, 2),
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
