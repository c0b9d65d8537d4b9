"""kmipd on PostgreSQL against kmipd on SQLite, and one PostgreSQL shared by 1-3 daemons.

    python bench/bench_postgres.py [--seconds 3] [--quick]

Starts a throwaway PostgreSQL cluster (as the tests do: tests/postgres.py) and
real daemons on loopback, and prints one JSON document:

* ``one_daemon``: sequential get-dek (warm: the keys were read once) and
  create-dek on one connection, ops/s and p50/p99 ms, for SQLite and for
  PostgreSQL, each measured twice in alternation; ``get_dek_cost_ratio`` is
  PostgreSQL's time per get-dek over SQLite's (the target is <= 1.3: a get is
  served from the daemon's memory of wrapped rows, no database round trip),
  ``create_dek_cost_ratio`` the same for a create (a durable commit each);
The PostgreSQL daemons keep the software HSM's keyring in the store (no
hsm.keyring), as daemons on several machines would.

* ``daemons_on_one_postgres``: aggregate get-dek and create-dek per second
  with 1, 2 and 3 daemons on the same database, CLIENT_THREADS client threads
  per daemon, and each as a ratio to one daemon.

Numbers, never pass/fail: the machine is shared and noisy, so compare the
ratios within one run. On a 2-core machine the daemons, PostgreSQL and the
client threads share the same two cores: more daemons cannot add CPU there,
so the multi-daemon figures show the cost of sharing, not the scaling a
cluster of machines gets.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kmipd.client import Client

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from bench_core import start  # noqa: E402 - a daemon's 'listening on' line, as there

from tests.postgres import Cluster, find_bindir  # noqa: E402 - the tests' throwaway cluster

CLIENT_THREADS = 2
KEYS = 200


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def daemon(config_or_dev: list[str], log: Path) -> Iterator[str]:
    process, address = start([sys.executable, "-m", "kmipd", "serve", *config_or_dev], log)
    try:
        yield address
    finally:
        stop(process)


def timed(seconds: float, call: Callable[[], None]) -> dict[str, float]:
    """Call repeatedly for ``seconds``: ops/s and latency percentiles."""
    latencies: list[float] = []
    began = time.perf_counter()
    while (now := time.perf_counter()) - began < seconds:
        call()
        latencies.append(time.perf_counter() - now)
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "ops_per_s": round(len(latencies) / (time.perf_counter() - began), 1),
        "p50_ms": round(cuts[49] * 1000, 3),
        "p99_ms": round(cuts[98] * 1000, 3),
    }


def one_daemon(address: str, creds: dict[str, Path], seconds: float) -> dict[str, Any]:
    with Client(address, **creds) as kms:
        made = [kms.create_dek("bench").dek_id for _ in range(KEYS)]
        for dek_id in made:  # warm: what a storage system reads again and again
            kms.get_dek(dek_id).close()
        turn = iter(range(1 << 62))

        def get() -> None:
            kms.get_dek(made[next(turn) % KEYS]).close()

        def create() -> None:
            kms.create_dek("bench").close()

        return {"get_dek": timed(seconds, get), "create_dek": timed(seconds, create)}


def aggregate(addresses: list[str], creds: dict[str, Path], seconds: float) -> dict[str, float]:
    """get-dek and create-dek per second over every daemon at once."""
    with Client(addresses[0], **creds) as kms:
        made = [kms.create_dek("shared").dek_id for _ in range(KEYS)]
    counts: dict[str, list[int]] = {"get_dek": [], "create_dek": []}

    def worker(address: str, operation: str, offset: int, start_at: float) -> None:
        with Client(address, **creds) as kms:
            for dek_id in made:
                kms.get_dek(dek_id).close()
            while time.perf_counter() < start_at:  # every thread starts together
                time.sleep(0.001)
            n = 0
            while time.perf_counter() - start_at < seconds:
                if operation == "get_dek":
                    kms.get_dek(made[(offset + n) % KEYS]).close()
                else:
                    kms.create_dek("shared").close()
                n += 1
            counts[operation].append(n)

    result = {}
    for operation, done in counts.items():
        start_at = time.perf_counter() + 2.0  # time to connect and warm up
        threads = [
            threading.Thread(target=worker, args=(address, operation, t * 17, start_at))
            for address in addresses
            for t in range(CLIENT_THREADS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        result[f"{operation}_per_s"] = round(sum(done) / seconds, 1)
    return result


def postgres_config(template: str, conninfo: str, n: int) -> str:
    config = re.sub(r"listen = \[.*\]", 'listen = ["127.0.0.1:0"]', template)
    store = f'[store]\nbackend = "postgresql"\nconninfo = "{conninfo}"\n'
    config = config.replace('[store]\npath = "kmipd.db"\n', store)
    # As a cluster runs: the software keyring in the store, shared by every daemon.
    config = re.sub(r'\nkeyring = "[^"]*"', "", config)
    return config + f'\n[audit]\npath = "audit-pg-{n}.log"\n'


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--quick", action="store_true", help="1 s per measurement")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
    bindir = find_bindir()
    if bindir is None:
        sys.exit("bench_postgres: PostgreSQL is not installed (apt-get install postgresql)")

    with tempfile.TemporaryDirectory(prefix="kmipd-bench-pg-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "dev"
        dev = ["--dev", "--data", str(data), "--listen", "127.0.0.1:0"]
        with daemon(dev, tmp / "init.log"):
            pass  # made the CA, master key, keyring and config that every daemon shares
        pki = data / "pki"
        creds = {"ca": pki / "ca.pem", "cert": pki / "storage.pem", "key": pki / "storage-key.pem"}
        template = (data / "kmipd.toml").read_text()
        # Durable commits, unlike the tests' clusters (fsync off): creates compare fairly.
        cluster = Cluster.create(bindir, fsync="on")
        try:
            cluster.start()
            cluster.execute("CREATE DATABASE kmipd")
            configs = []
            for n in range(3):
                path = data / f"kmipd-pg-{n}.toml"
                path.write_text(postgres_config(template, cluster.conninfo("kmipd"), n))
                configs.append(["--config", str(path)])

            runs: dict[str, list[dict[str, Any]]] = {"sqlite": [], "postgresql": []}
            for _ in range(2):  # alternated, so a noisy neighbour hurts both alike
                with daemon(dev, tmp / "sqlite.log") as address:
                    runs["sqlite"].append(one_daemon(address, creds, seconds))
                with daemon(configs[0], tmp / "pg-0.log") as address:
                    runs["postgresql"].append(one_daemon(address, creds, seconds))
            best = {
                backend: {
                    op: max((r[op] for r in results), key=lambda m: m["ops_per_s"])
                    for op in ("get_dek", "create_dek")
                }
                for backend, results in runs.items()
            }

            def cost_ratio(op: str) -> float:
                return round(
                    best["sqlite"][op]["ops_per_s"] / best["postgresql"][op]["ops_per_s"], 2
                )

            shared: dict[str, dict[str, float]] = {}
            for how_many in (1, 2, 3):
                logs = [tmp / f"shared-{how_many}-{n}.log" for n in range(how_many)]
                processes = [
                    start([sys.executable, "-m", "kmipd", "serve", *configs[n]], logs[n])
                    for n in range(how_many)
                ]
                try:
                    shared[f"{how_many}_daemons"] = aggregate(
                        [address for _, address in processes], creds, seconds
                    )
                finally:
                    for process, _ in processes:
                        stop(process)
            one = shared["1_daemons"]
            for figures in shared.values():
                for op in ("get_dek", "create_dek"):
                    figures[f"{op}_ratio_to_1"] = round(
                        figures[f"{op}_per_s"] / one[f"{op}_per_s"], 2
                    )
        finally:
            cluster.destroy()

    print(
        json.dumps(
            {
                "one_daemon": {
                    **best,
                    "get_dek_cost_ratio": cost_ratio("get_dek"),
                    "create_dek_cost_ratio": cost_ratio("create_dek"),
                    "get_dek_target": "<= 1.3",
                },
                "daemons_on_one_postgres": shared,
                "client_threads_per_daemon": CLIENT_THREADS,
                "seconds_per_measurement": seconds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
