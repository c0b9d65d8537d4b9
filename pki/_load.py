"""The reading side: what a verifier (the daemon, the conformance suite) loads from the CA."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from pki._errors import PkiError
from pki._files import read_file

#: Clocks on the CA host and the verifier may disagree by this much.
CLOCK_SKEW = datetime.timedelta(minutes=5)


def load_certificate(path: str | os.PathLike[str], what: str = "certificate") -> x509.Certificate:
    """Parse one PEM certificate, or raise PkiError naming the file."""
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(read_file(path, what))
    except ValueError:
        raise PkiError(f"{what} {path} is not a PEM certificate") from None


def load_crl_serials(
    crl_path: str | os.PathLike[str], ca_cert_path: str | os.PathLike[str]
) -> frozenset[int]:
    """The serial numbers a CRL revokes, once its issuer, signature and dates check out.

    A CRL that cannot be trusted must not silently count as "nothing revoked":
    every doubt raises PkiError, and the daemon refuses to serve on one.
    """
    crl_path, ca_cert_path = Path(crl_path), Path(ca_cert_path)
    ca_cert = load_certificate(ca_cert_path, "CA certificate")
    try:
        crl = x509.load_pem_x509_crl(read_file(crl_path, "CRL"))
    except ValueError:
        raise PkiError(f"CRL {crl_path} is not a PEM CRL") from None
    ca_key = ca_cert.public_key()
    if not isinstance(
        ca_key,
        ec.EllipticCurvePublicKey
        | rsa.RSAPublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        raise PkiError(f"CA certificate {ca_cert_path} has a key type that cannot sign CRLs")
    # The name check alone is worthless (two test CAs may share a subject);
    # the signature check is what binds the CRL to this CA.
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_key):
        raise PkiError(f"CRL {crl_path} is not signed by the CA in {ca_cert_path}")
    now = datetime.datetime.now(datetime.UTC)
    if crl.last_update_utc > now + CLOCK_SKEW:
        # OpenSSL would refuse every client with it ("CRL is not yet valid").
        raise PkiError(
            f"CRL {crl_path} is not valid before {crl.last_update_utc:%Y-%m-%d %H:%M} UTC"
        )
    next_update = crl.next_update_utc
    if next_update is not None and next_update < now:
        raise PkiError(
            f"CRL {crl_path} expired at {next_update:%Y-%m-%d %H:%M} UTC; "
            "re-sign it (`kmipd pki crl DIR` or CertificateAuthority.write_crl)"
        )
    return frozenset(entry.serial_number for entry in crl)
