"""Certificates from the daemon's online CA, on the client side: CSRs, results, renewal.

``Renewal`` is what a client configured with ``renewal_dir`` carries: before
each operation it asks whether the certificate it connects with has passed
``renew_at`` of its lifetime (two thirds by default); if so the operation
first renews it (a new key of the same type, a CSR, ``renew-certificate``
over a connection the current certificate opened), writes ``key.pem`` and
``cert.pem`` (the certificate and its chain) atomically with mode 0600, and
loads them into the client's TLS context: connections opened from then on
present the new certificate, those already open (and the requests in flight
on them) carry on with the old one until they close. A renewal that fails
is logged and tried again after ``retry`` seconds; the operation itself goes
ahead with the current certificate.
"""

from __future__ import annotations

import datetime
import logging
import ssl
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from kmipd.client._errors import KmipdError
from kmipd.crypto._issuing import PrivateKey, generate_key, key_type_of, renewal_due
from kmipd.protocol import CertificateResult
from pki import write_private_file

log = logging.getLogger("kmipd.client")

KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
DEFAULT_RENEW_AT = 2 / 3


@attrs.frozen
class IssuedCertificate:
    """A certificate the online CA signed, and the chain up to (and with) the root."""

    serial: str
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    not_before: int
    not_after: int

    @classmethod
    def from_result(cls, result: CertificateResult) -> IssuedCertificate:
        return cls(
            serial=result.serial,
            certificate=x509.load_der_x509_certificate(result.certificate),
            chain=tuple(x509.load_der_x509_certificate(der) for der in result.chain),
            not_before=result.not_before,
            not_after=result.not_after,
        )

    def fullchain_pem(self) -> bytes:
        """The certificate, then the online CA's (what a TLS peer presents); not the root."""
        certs = (self.certificate, *self.chain[:-1])
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def make_csr(
    key: PrivateKey, *, identity: str | None = None, dns_names: Sequence[str] = ()
) -> bytes:
    """A DER CSR for ``key`` naming a SPIFFE ID (client) or DNS names (server)."""
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    if identity is not None:
        sans.append(x509.UniformResourceIdentifier(identity))
    common_name = identity or (dns_names[0] if dns_names else "kmipd client")
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name[:64])])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, digest)
    return csr.public_bytes(serialization.Encoding.DER)


def identity_of(cert: x509.Certificate) -> str | None:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else None


def write_key_and_certificate(directory: Path, key: PrivateKey, issued: IssuedCertificate) -> None:
    """``key.pem`` then ``cert.pem``, each atomically with mode 0600.

    The key first: a crash between the two leaves a new key beside the old
    certificate, which ``Renewal.load`` notices (they do not match) and ignores.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private_file(directory / KEY_FILE, pem)
    write_private_file(directory / CERT_FILE, issued.fullchain_pem())


@attrs.define
class Renewal:
    """A client's own certificate, renewed before it expires (see the module docstring)."""

    directory: Path
    renew_at: float = DEFAULT_RENEW_AT
    #: Seconds before a failed renewal is tried again.
    retry: float = 60.0
    certificate: x509.Certificate | None = None
    _next_try: float = 0.0
    _running: bool = False

    def __attrs_post_init__(self) -> None:
        if not 0 < self.renew_at < 1:
            raise KmipdError("renew_at is a fraction of the lifetime, between 0 and 1")

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    def load(self, cert: str | Path | None, key: str | Path | None) -> tuple[Path, Path] | None:
        """The certificate and key to connect with: the renewal directory's when they
        exist, match and outlive ``cert``; else ``cert`` and ``key`` (None: not given)."""
        given = _read_certificate(Path(cert)) if cert is not None else None
        renewed = _read_certificate(self.cert_path) if self.cert_path.exists() else None
        if (
            renewed is not None
            and _matches(renewed, self.key_path)
            and (given is None or renewed.not_valid_after_utc > given.not_valid_after_utc)
        ):
            self.certificate = renewed
            return self.cert_path, self.key_path
        self.certificate = given
        return None if cert is None or key is None else (Path(cert), Path(key))

    def due(self, now: float | None = None) -> bool:
        cert = self.certificate
        if cert is None or self._running:
            return False
        now = time.time() if now is None else now
        if now < self._next_try:
            return False
        return renewal_due(cert, self.renew_at, now)

    def begin(self) -> None:
        """A renewal starts: no other starts until it finished or failed."""
        self._running = True

    def new_key(self) -> tuple[PrivateKey, bytes]:
        """A new key of the current certificate's type and its CSR."""
        assert self.certificate is not None
        key = generate_key(key_type_of(self.certificate.public_key()) or "p256")
        return key, make_csr(key, identity=identity_of(self.certificate))

    def finish(self, key: PrivateKey, issued: IssuedCertificate, context: ssl.SSLContext) -> None:
        """Write the files, then have new connections present the new certificate."""
        self._running = False
        write_key_and_certificate(self.directory, key, issued)
        # OpenSSL copies the context's certificate into each new connection: the
        # ones open now keep the old one, the next ones get this.
        context.load_cert_chain(self.cert_path, self.key_path)
        self.certificate = issued.certificate
        log.info(
            "renewed the client certificate: serial %s, valid until %s",
            issued.serial,
            datetime.datetime.fromtimestamp(issued.not_after, datetime.UTC).isoformat(),
        )

    def failed(self, exc: Exception) -> None:
        self._running = False
        self._next_try = time.time() + self.retry
        log.warning("certificate renewal failed, retrying in %g s: %s", self.retry, exc)


def _read_certificate(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _matches(cert: x509.Certificate, key_path: Path) -> bool:
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) == cert.public_key().public_bytes(serialization.Encoding.DER, spki)
