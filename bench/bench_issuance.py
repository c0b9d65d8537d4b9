"""Certificate issuance by the online CA, per second: software keyring against SoftHSM2.

    python bench/bench_issuance.py [--seconds 1] [--rounds 3] [--quick]

In process, no TLS: a KeyService with its online CA's P-256 key in the
software keyring, then on a throwaway SoftHSM2 token (skipped, and said so,
without SoftHSM2), issues client certificates for one CSR through
``service.handle`` (CSR check, grant, build, HSM signature, verification,
SQLite row, audit record), and signs raw 300-byte TBS blobs with the HSM key
alone. Phases alternate for ``--rounds`` rounds; the median is printed, with
issuance as a fraction of the bare signature rate in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization

from kmipd.audit import AuditLog
from kmipd.client import generate_key, make_csr
from kmipd.hsm import HsmBackend, Pkcs11Hsm, Pkcs11Settings, SoftwareHsm
from kmipd.protocol import IssueCertificate
from kmipd.service import Caller, CertificateGrant, KeyService, Policy, open_online_ca
from kmipd.store import KeyStore
from pki import CertificateAuthority, load_certificate

SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
IDENTITY = "spiffe://bench.test/storage"


async def rate(seconds: float, call: Callable[[], Awaitable[Any]]) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        await call()
        count += 1
    return count / (time.perf_counter() - start)


async def measure(hsm: HsmBackend, work: Path, seconds: float, rounds: int) -> dict[str, Any]:
    root = CertificateAuthority.init(work / "root", trust_domain="bench.test", path_length=1)
    handle = await hsm.generate_signing_key("online-ca", "p256")
    public = serialization.load_der_public_key(await hsm.signing_public_key(handle))
    issued = root.issue_intermediate("online-ca", public)  # type: ignore[arg-type]
    ca = await open_online_ca(hsm, load_certificate(issued.cert_path), root.certificate, handle)
    store = KeyStore.open(work / "kmipd.db")
    audit = AuditLog.open(work / "audit.log", work / "audit.key")
    service = KeyService(
        store=store,
        hsm=hsm,
        policy=Policy((), (CertificateGrant(IDENTITY),)),
        audit=audit,
        online_ca=ca,
    )
    csr = make_csr(generate_key(), identity=IDENTITY)
    tbs = os.urandom(300)
    phases = {
        "issue-certificate": lambda: service.handle(
            Caller(IDENTITY), IssueCertificate(csr=csr, profile="client")
        ),
        "sign": lambda: hsm.sign(handle, tbs),
    }
    try:
        return await medians(phases, seconds, rounds)
    finally:
        audit.close()
        store.close()


async def medians(
    phases: dict[str, Callable[[], Awaitable[Any]]], seconds: float, rounds: int
) -> dict[str, float]:
    """Each phase's rate, the phases alternating for ``rounds`` rounds; the medians."""
    results: dict[str, list[float]] = {name: [] for name in phases}
    for call in phases.values():
        await call()  # warm up
    for _ in range(rounds):
        for name, call in phases.items():
            results[name].append(await rate(seconds, call))
    return {name: round(statistics.median(values), 1) for name, values in results.items()}


def _softhsm_token(work: Path) -> Pkcs11Settings | None:
    if not SOFTHSM.exists() or shutil.which("softhsm2-util") is None:
        return None
    tokens = work / "tokens"
    tokens.mkdir(parents=True)
    conf = work / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "bench",
         "--so-pin", "12345678", "--pin", "1234"],
        check=True, capture_output=True,
    )  # fmt: skip
    return Pkcs11Settings(library=SOFTHSM, token_label="bench")


#: measure(hsm, work directory, seconds, rounds) -> figures by phase.
Measure = Callable[[HsmBackend, Path, float, int], Awaitable[dict[str, Any]]]


async def on_both_backends(measure: Measure, seconds: float, rounds: int) -> dict[str, Any]:
    """``measure`` on a fresh software keyring, then on a throwaway SoftHSM2 token."""
    report: dict[str, Any] = {"seconds_per_phase": seconds, "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="kmipd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "soft").mkdir()
        software = SoftwareHsm.open(tmp / "master", tmp / "keyring", create=True)
        try:
            report["software"] = await measure(software, tmp / "soft", seconds, rounds)
        finally:
            software.close()
        settings = _softhsm_token(tmp / "p11")
        if settings is None:
            report["softhsm2"] = "skipped: SoftHSM2 is not installed"
        else:
            token = await Pkcs11Hsm.open(settings, "1234")
            try:
                report["softhsm2"] = await measure(token, tmp / "p11", seconds, rounds)
            finally:
                token.close()
    return report


async def run(seconds: float, rounds: int) -> dict[str, Any]:
    report = await on_both_backends(measure, seconds, rounds)
    for backend in ("software", "softhsm2"):
        found = report[backend]
        if isinstance(found, dict):
            found["issue_over_sign"] = round(found["issue-certificate"] / found["sign"], 3)
    return report


def main(
    run: Callable[[float, int], Awaitable[dict[str, Any]]] = run, doc: str | None = __doc__
) -> None:
    """--seconds/--rounds/--quick, then ``run``'s report as JSON."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="per phase and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="0.5 s phases, 2 rounds")
    args = parser.parse_args()
    seconds, rounds = (0.5, 2) if args.quick else (args.seconds, args.rounds)
    print(json.dumps(trio.run(run, seconds, rounds), indent=2))


if __name__ == "__main__":
    main()
