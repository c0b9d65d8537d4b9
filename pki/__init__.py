"""kmipd's built-in certificate authority: CA, server and client certificates, CRL.

Its own package: kmipd imports it, never the reverse, and the conformance
suite uses it to make the certificates its probes need. It depends on
``cryptography`` and ``attrs`` only.
"""

from pki._ca import SERVER_VALIDITY_DAYS, CertificateAuthority, IssuedCertificate, KeyType
from pki._errors import PkiError
from pki._files import write_private_file
from pki._load import load_certificate, load_crl_serials
from pki._transport import (
    HYBRID_X25519_OID,
    TRANSPORT_SUFFIX,
    TransportKem,
    TransportPrivateKey,
    load_transport_keys,
    transport_kem_of_keys,
)

__all__ = [
    "HYBRID_X25519_OID",
    "SERVER_VALIDITY_DAYS",
    "TRANSPORT_SUFFIX",
    "CertificateAuthority",
    "IssuedCertificate",
    "KeyType",
    "PkiError",
    "TransportKem",
    "TransportPrivateKey",
    "load_certificate",
    "load_crl_serials",
    "load_transport_keys",
    "transport_kem_of_keys",
    "write_private_file",
]
