"""Sealed DEK delivery: what a sealed key is bound to (the HPKE ``info``).

    info = deterministic CBOR ["kmipd/sealed-key/v1", op, request-id, identity,
                               fingerprint, binding]

``binding`` is ``[dek-id, namespace, kek-version]`` for a stored DEK and
``[blob, kek, kek-version]`` for a data key. The daemon seals with the
request's own id and op and the caller's identity; the client opens with
what it sent and who it is. A sealed key replayed into another request,
to another identity, for another key or to another certificate therefore
fails to open instead of yielding a key.
"""

from __future__ import annotations

from kmipd.protocol import encode_deterministic

SEALED_KEY_LABEL = "kmipd/sealed-key/v1"


def dek_binding(dek_id: str, namespace: str, kek_version: int) -> list[object]:
    return [dek_id, namespace, kek_version]


def data_key_binding(blob: bytes, kek: str, kek_version: int) -> list[object]:
    return [blob, kek, kek_version]


def delivery_info(
    operation: str, request_id: int, identity: str, fingerprint: bytes, binding: list[object]
) -> bytes:
    return encode_deterministic(
        [SEALED_KEY_LABEL, operation, request_id, identity, fingerprint, binding]
    )
