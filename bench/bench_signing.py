"""Managed signing keys: sign-digest/s and verify-digest/s, software keyring against SoftHSM2.

    python bench/bench_signing.py [--seconds 1] [--rounds 3] [--quick]

In process, no TLS: a KeyService (SQLite store, audit trail) with a signing
key of each type in the software keyring, then on a throwaway SoftHSM2 token
(skipped, and said so, without SoftHSM2). Per key type it measures
``sign-digest`` and ``verify-digest`` through ``service.handle`` (grant,
store read, lifecycle and digest checks, the HSM signature or the public-key
verification, audit record), and the HSM's bare ``sign_digest``. Phases
alternate for ``--rounds`` rounds; the median is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from bench_issuance import _softhsm_token, rate

from kmipd.audit import AuditLog
from kmipd.hsm import HsmBackend, Pkcs11Hsm, SoftwareHsm
from kmipd.protocol import CreateSigningKey, SignDigest, VerifyDigest
from kmipd.service import Caller, Grant, KeyService, Policy
from kmipd.service._policy import expand_operations
from kmipd.store import KeyStore

IDENTITY = Caller("spiffe://bench.test/signer")
#: key type -> the algorithm measured with it.
KEY_TYPES = {"p256": "ES256", "p384": "ES384", "rsa3072": "PS256"}


async def measure(hsm: HsmBackend, work: Path, seconds: float, rounds: int) -> dict[str, Any]:
    store = KeyStore.open(work / "kmipd.db")
    audit = AuditLog.open(work / "audit.log", work / "audit.key")
    grants = (Grant(IDENTITY.identity, ("*",), expand_operations(["signing", "signing-manage"])),)
    service = KeyService(store=store, hsm=hsm, policy=Policy(grants), audit=audit)
    phases: dict[str, Callable[[], Awaitable[Any]]] = {}
    try:
        for key_type, algorithm in KEY_TYPES.items():
            await service.handle(
                IDENTITY, CreateSigningKey(namespace="bench", name=key_type, key_type=key_type)
            )
            digest = hashlib.new(f"sha{algorithm[2:]}", b"bench").digest()
            sign = SignDigest(namespace="bench", name=key_type, algorithm=algorithm, digest=digest)
            signed = await service.handle(IDENTITY, sign)
            verify = VerifyDigest(
                namespace="bench", name=key_type, algorithm=algorithm, digest=digest,
                signature=signed.signature,
            )  # fmt: skip
            [version] = await store.signing_key_versions("bench", key_type)

            def bind(request: Any) -> Callable[[], Awaitable[Any]]:
                return lambda: service.handle(IDENTITY, request)

            def bare(handle: str, d: bytes, a: str) -> Callable[[], Awaitable[Any]]:
                return lambda: hsm.sign_digest(handle, d, a)

            phases[f"{key_type} sign-digest/s"] = bind(sign)
            phases[f"{key_type} verify-digest/s"] = bind(verify)
            phases[f"{key_type} bare HSM sign/s"] = bare(version.handle, digest, algorithm)
        results: dict[str, list[float]] = {name: [] for name in phases}
        for _ in range(rounds):
            for name, call in phases.items():
                results[name].append(await rate(seconds, call))
    finally:
        audit.close()
        store.close()
    return {name: round(statistics.median(values), 1) for name, values in results.items()}


async def run(seconds: float, rounds: int) -> dict[str, Any]:
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="per phase and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="0.5 s phases, 2 rounds")
    args = parser.parse_args()
    seconds, rounds = (0.5, 2) if args.quick else (args.seconds, args.rounds)
    print(json.dumps(trio.run(run, seconds, rounds), indent=2))


if __name__ == "__main__":
    main()
