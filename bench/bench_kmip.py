"""KMIP Get against the native get-dek, on the same daemon in the same run.

    python bench/bench_kmip.py [--seconds 3] [--batch 32] [--quick]

Starts ``kmipd serve --dev`` on loopback and prints one JSON document:

* ``native_get_dek``: sequential get-dek on one connection (ops/s);
* ``kmip_get``: sequential KMIP Get (1.2, one item per message) on one
  TLS 1.2 connection (ops/s), and ``kmip_get_over_native`` (the cost ratio,
  target <= 1.5);
* ``kmip_batch_get``: Get items per second in messages of ``--batch`` items;
* ``kmip_new_connection_get``: one Get per new mutual-TLS connection (ops/s).

PyKMIP's own server is measured by ``../shared/peers/pykmip/bench_pykmip.py``;
run it beside this one for the peer ratio.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_client import rate, start_daemon

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
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
            results["native_get_dek"] = rate(seconds, lambda: native.get_dek(dek.dek_id))
            native.close()

            one = get_message(dek.dek_id, 1)
            with connect(address, pki) as sock:
                response = decode_ttlv(exchange(sock, one))
                assert "ResultStatus" in str(
                    [c.name for c in response.find_all("BatchItem")[0].children]
                )
                results["kmip_get"] = rate(seconds, lambda: exchange(sock, one))
                batch = get_message(dek.dek_id, args.batch)
                results["kmip_batch_get"] = round(
                    rate(seconds, lambda: exchange(sock, batch)) * args.batch, 1
                )

            def fresh() -> None:
                with connect(address, pki) as sock:
                    exchange(sock, one)

            results["kmip_new_connection_get"] = rate(seconds, fresh)
            results["kmip_get_over_native"] = round(
                results["native_get_dek"] / results["kmip_get"], 2
            )
            results["batch"] = args.batch
            print(json.dumps(results, indent=2))
        finally:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
