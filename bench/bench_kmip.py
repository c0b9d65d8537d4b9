"""KMIP Get against the native get-dek, on the same daemon in the same run.

    python bench/bench_kmip.py [--seconds 3] [--batch 32] [--quick] [--peer]

Starts ``kmipd serve --dev`` on loopback and prints one JSON document:

Every phase gives ``ops_s`` and ``server_cpu_us``, the daemon's CPU per
operation (utime + stime from /proc over the phase):

* ``native_get_dek``: sequential get-dek on one connection;
* ``kmip_get``: sequential KMIP Get (1.2, one item per message) on one
  TLS 1.2 connection, and ``kmip_get_over_native_cpu`` (the server's cost
  ratio, target <= 1.5);
* ``kmip_batch_get``: Get items in messages of ``--batch`` items (per item);
* ``kmip_new_connection_get``: one Get per new mutual-TLS connection;
* ``kmip_get_pykmip_client``: sequential Get through PyKMIP's own
  ``ProxyKmipClient`` on one connection, the client the peer bench uses.

``--peer`` also runs PyKMIP 0.11's server benchmark
(``../shared/peers/pykmip/bench_pykmip.py``, same machine, same run, after
kmipd's phases) and prints ``pykmip_server_get`` (its get_one_conn, same
client) and ``kmipd_over_pykmip_server``: throughput and server CPU per Get
as ratios (target >= 10 for the server's cost).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_client import start_daemon
from bench_core import cpu_seconds

from kmipd.client import Client
from kmipd.kmip import (
    decode_ttlv,
    encode_ttlv,
    enumeration,
    integer,
    structure,
    text,
    version_item,
)


def measured(pid: int, seconds: float, call: Any) -> dict[str, float]:
    """Operations per second of ``call``, and the daemon's CPU per operation (µs)."""
    count, cpu, start = 0, cpu_seconds(pid), time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        count += 1
    elapsed = time.perf_counter() - start
    return {
        "ops_s": round(count / elapsed, 1),
        "server_cpu_us": round((cpu_seconds(pid) - cpu) / count * 1e6, 1),
    }


def get_message(uid: str, items: int) -> bytes:
    header = structure("RequestHeader", version_item((1, 2)), integer("BatchCount", items))
    item = structure(
        "BatchItem",
        enumeration("Operation", "Get"),
        structure("RequestPayload", text("UniqueIdentifier", uid)),
    )
    return encode_ttlv(structure("RequestMessage", header, *([item] * items)))


def connect(address: str, pki: Path) -> ssl.SSLSocket:
    host, port = address.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # as PyKMIP's client
    context.load_verify_locations(pki / "ca.pem")
    context.load_cert_chain(pki / "admin.pem", pki / "admin-key.pem")
    context.check_hostname = False
    return context.wrap_socket(socket.create_connection((host, int(port))))


def exchange(sock: ssl.SSLSocket, message: bytes) -> bytes:
    sock.sendall(message)
    data = b""
    while len(data) < 8:
        data += sock.recv(65536)
    length = int.from_bytes(data[4:8], "big") + 8
    while len(data) < length:
        data += sock.recv(65536)
    return data


#: The peer bench beside the repository (``../shared`` of its root), or --peer-script.
PEER = (
    Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "pykmip" / "bench_pykmip.py"
)


def pykmip_client(address: str, pki: Path) -> Any:
    """PyKMIP's ProxyKmipClient (what the peer bench measures with), opened."""
    from kmip.pie.client import ProxyKmipClient  # noqa: PLC0415 (a test dependency)

    host, port = address.rsplit(":", 1)
    client = ProxyKmipClient(
        hostname=host,
        port=int(port),
        cert=str(pki / "admin.pem"),
        key=str(pki / "admin-key.pem"),
        ca=str(pki / "ca.pem"),
        config_file="/dev/null",
        ssl_version="PROTOCOL_TLSv1_2",
    )
    client.open()
    return client


def peer_get(script: Path, quick: bool) -> dict[str, float]:
    """PyKMIP's server: its bench's get_one_conn, run with this interpreter."""
    command = [sys.executable, str(script), "--log-level", "WARNING"]
    if quick:
        command.append("--quick")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=True, env=dict(os.environ)
    )
    phase = json.loads(done.stdout.strip().splitlines()[-1])["get_one_conn"]
    return {
        "ops_s": round(float(phase["ops_s"]), 1),
        "server_cpu_us": round(float(phase["server_cpu_ms_per_op"]) * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peer", action="store_true", help="also run PyKMIP's server bench")
    parser.add_argument("--peer-script", type=Path, default=PEER)
    args = parser.parse_args()
    seconds = 0.5 if args.quick else args.seconds
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        process, address = start_daemon(data)
        pki = data / "pki"
        try:
            native = Client(
                address, ca=pki / "ca.pem", cert=pki / "admin.pem", key=pki / "admin-key.pem"
            )
            dek = native.create_dek("kmip")
            results: dict[str, Any] = {}
            pid = process.pid
            results["native_get_dek"] = measured(pid, seconds, lambda: native.get_dek(dek.dek_id))
            native.close()

            one = get_message(dek.dek_id, 1)
            with connect(address, pki) as sock:
                response = decode_ttlv(exchange(sock, one))
                assert "ResultStatus" in str(
                    [c.name for c in response.find_all("BatchItem")[0].children]
                )
                results["kmip_get"] = measured(pid, seconds, lambda: exchange(sock, one))
                batch = get_message(dek.dek_id, args.batch)
                per_message = measured(pid, seconds, lambda: exchange(sock, batch))
                results["kmip_batch_get"] = {
                    "ops_s": round(per_message["ops_s"] * args.batch, 1),
                    "server_cpu_us": round(per_message["server_cpu_us"] / args.batch, 1),
                }

            def fresh() -> None:
                with connect(address, pki) as sock:
                    exchange(sock, one)

            results["kmip_new_connection_get"] = measured(pid, seconds, fresh)
            client = pykmip_client(address, pki)
            try:
                client.get(dek.dek_id)
                results["kmip_get_pykmip_client"] = measured(
                    pid, seconds, lambda: client.get(dek.dek_id)
                )
            finally:
                client.close()
            results["kmip_get_over_native_cpu"] = round(
                results["kmip_get"]["server_cpu_us"] / results["native_get_dek"]["server_cpu_us"],
                2,
            )
            results["batch"] = args.batch
        finally:
            process.terminate()
            process.wait(30)
    if args.peer:  # after kmipd stopped: the two servers never share the CPUs
        peer = results["pykmip_server_get"] = peer_get(args.peer_script, args.quick)
        ours = results["kmip_get_pykmip_client"]
        # The same client (PyKMIP's) against both servers: throughput is mostly the
        # client's; the server's CPU per Get is what compares the servers.
        results["kmipd_over_pykmip_server"] = {
            "ops_s": round(ours["ops_s"] / peer["ops_s"], 2),
            "server_cpu": round(peer["server_cpu_us"] / ours["server_cpu_us"], 2),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
