"""kmipd's built-in certificate authority: CA, server and client certificates, CRL.

Its own package: kmipd imports it, never the reverse, and the conformance
suite uses it to make the certificates its probes need. It depends on
``cryptography`` and ``attrs`` only.
"""

from pki._ca import SERVER_VALIDITY_DAYS, CertificateAuthority, IssuedCertificate, KeyType
from pki._errors import PkiError
from pki._files import write_private_file
from pki._load import load_certificate, load_crl_serials

__all__ = [
    "SERVER_VALIDITY_DAYS",
    "CertificateAuthority",
    "IssuedCertificate",
    "KeyType",
    "PkiError",
    "load_certificate",
    "load_crl_serials",
    "write_private_file",
]
