"""Public-key pieces shared by the daemon, the clients and the CLI (HPKE, RFC 9180).

Key-transport certificates and their rules (_transport_cert), HPKE with one
suite per key type (_hpke), the binding of a sealed DEK to its request
(_delivery) and the client-to-client sealed envelope (_envelope).
"""

from kmipd.crypto._delivery import (
    SEALED_KEY_LABEL,
    data_key_binding,
    dek_binding,
    delivery_info,
)
from kmipd.crypto._envelope import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    SealedEnvelopeError,
    SealedEnvelopeHeader,
    open_stream,
    read_header,
    seal_stream,
)
from kmipd.crypto._hpke import (
    SUITE_IDS,
    SUITE_NAMES,
    HpkeError,
    Opener,
    TransportKey,
    open_sealed,
    seal,
    seal_to_certificate,
    suite,
)
from kmipd.crypto._transport_cert import (
    MAX_CERTIFICATE_SIZE,
    TransportCertError,
    TransportTrust,
    certificate_fingerprint,
    certificate_identity,
    check_transport_certificate,
    parse_certificate,
    transport_kem,
    transport_public_key,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CERTIFICATE_SIZE",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "SEALED_KEY_LABEL",
    "SUITE_IDS",
    "SUITE_NAMES",
    "HpkeError",
    "Opener",
    "SealedEnvelopeError",
    "SealedEnvelopeHeader",
    "TransportCertError",
    "TransportKey",
    "TransportTrust",
    "certificate_fingerprint",
    "certificate_identity",
    "check_transport_certificate",
    "data_key_binding",
    "dek_binding",
    "delivery_info",
    "open_sealed",
    "open_stream",
    "parse_certificate",
    "read_header",
    "seal",
    "seal_stream",
    "seal_to_certificate",
    "suite",
    "transport_kem",
    "transport_public_key",
]
