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

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench_issuance import main, medians, on_both_backends

from kmipd.audit import AuditLog
from kmipd.hsm import HsmBackend
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
        return await medians(phases, seconds, rounds)
    finally:
        audit.close()
        store.close()


async def run(seconds: float, rounds: int) -> dict[str, Any]:
    return await on_both_backends(measure, seconds, rounds)


if __name__ == "__main__":
    main(run, __doc__)
