"""The HSM column: DEK delivery with the software backend vs a SoftHSM2 token.

    python bench/bench_hsm.py [--seconds 3] [--quick] [--library PATH]

Starts two ``kmipd serve`` processes on loopback in the same run, the same
config but for ``[hsm]``: one on the software backend, one on the PKCS#11
backend with a throwaway SoftHSM2 token (``hsm.sessions`` = 4). Measures
both with bench_core's client loops and prints one JSON document:

* ``sequential``: get-dek one at a time on one connection (ops/s, p50/p99 ms)
* ``pipelined``: get-dek of 512 distinct DEKs at once on one connection
* ``concurrent_16``: 16 connections (4 processes x 4 threads), aggregate ops/s
* ``create_dek``: sequential create-dek (a wrap in the HSM and a durable row)
* ``ratio_softhsm2_to_software``: the token's rate divided by the software one's

Numbers, never pass/fail. The software backend unwraps inline (about a
microsecond, no thread handoff); every PKCS#11 call goes to a worker thread
and into the token library, so the ratio is the price of the handoff plus
SoftHSM2's own work. A network HSM adds its round trip on top.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import bench_core

from kmipd.client import Client
from kmipd.daemon._dev import prepare_dev
from kmipd.protocol import GetDek, encode_frame, encode_item, request_to_wire

PIN = "123456"
TOKEN_LABEL = "kmipd-bench"


def softhsm_config(home: Path, library: Path) -> str:
    """A throwaway token under its own SOFTHSM2_CONF; the [hsm] table that uses it."""
    tokens = home / "tokens"
    tokens.mkdir(parents=True)
    conf = home / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # inherited by the daemon
    init = ["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL]
    subprocess.run([*init, "--so-pin", "12345678", "--pin", PIN], check=True, capture_output=True)
    pin_file = home / "pin"
    pin_file.write_text(PIN)
    pin_file.chmod(0o600)
    return (
        f'[hsm]\nbackend = "pkcs11"\nlibrary = "{library}"\ntoken_label = "{TOKEN_LABEL}"\n'
        f'pin_file = "{pin_file}"\nsessions = 4\n'
    )


def start_kmipd(config: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    return bench_core.start([sys.executable, "-m", "kmipd", "serve", "--config", str(config)], log)


def measure(address: str, creds: dict[str, Path], seconds: float) -> dict[str, Any]:
    with Client(address, **creds) as kms:
        dek = kms.create_dek("bench")
        create = bench_core.timed_loop(seconds, lambda: (kms.create_dek("bench"), 1)[1])
    patterns = bench_core.kmipd_patterns(address, creds, dek.dek_id, seconds)
    del patterns["new_connections"]  # TLS handshakes: the same for both backends
    request = encode_frame(encode_item(request_to_wire(123456, GetDek(dek_id=dek.dek_id))))
    patterns["concurrent_16"] = bench_core.concurrent(
        "kmipd", address, creds, dek.dek_id, request, 120, seconds
    )
    patterns["create_dek"] = create
    return patterns


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--quick", action="store_true", help="1 s per measurement")
    parser.add_argument(
        "--library", type=Path, default=Path("/usr/lib/softhsm/libsofthsm2.so"), help="SoftHSM2"
    )
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds

    with tempfile.TemporaryDirectory(prefix="kmipd-bench-hsm-") as tmp_name:
        tmp = Path(tmp_name)
        software_config = prepare_dev(tmp / "software", "127.0.0.1:0")
        token_config = prepare_dev(tmp / "softhsm2", "127.0.0.1:0")
        text = token_config.read_text()
        hsm_table = softhsm_config(tmp / "softhsm", args.library)
        token_config.write_text(re.sub(r"\[hsm\]\n(?:[^\[\n].*\n)*", hsm_table, text))
        results: dict[str, Any] = {}
        for name, config in (("software", software_config), ("softhsm2", token_config)):
            daemon, address = start_kmipd(config, tmp / f"{name}.log")
            pki = config.parent / "pki"
            creds = {
                "ca": pki / "ca.pem",
                "cert": pki / "storage.pem",
                "key": pki / "storage-key.pem",
            }
            try:
                print(f"{name}: kmipd at {address}, {seconds:g} s per phase", file=sys.stderr)
                results[name] = measure(address, creds, seconds)
            finally:
                daemon.terminate()
                daemon.wait(30)

    ratios = {
        pattern: round(
            results["softhsm2"][pattern]["ops_per_s"] / results["software"][pattern]["ops_per_s"],
            3,
        )
        for pattern in ("sequential", "pipelined", "concurrent_16", "create_dek")
    }
    print(
        json.dumps(
            {
                **results,
                "ratio_softhsm2_to_software": ratios,
                "seconds_per_phase": seconds,
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
