"""The client certificates the TLS and authorization probes present.

Made with the project's ``pki`` package (a CA library, not the daemon):
* from another CA: ``--other-ca-cert/--other-ca-key``, or a throwaway CA;
* expired, serverAuth-only, without EKU, from a foreign trust domain, or a
  valid identity no policy grants: need the server's CA key (``--ca-key``, or
  the ``--ca-dir`` the server uses); the deployment's CA files are copied to
  a scratch directory, never written;
* revoked: ``--revoked-cert/--revoked-key``, or ``--ca-dir``, whose CRL the
  server reads: the suite issues a certificate there and revokes it.
"""

from __future__ import annotations

import datetime
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import attrs
from cryptography.x509.oid import ExtendedKeyUsageOID

from conformance._case import CaseSkipped
from pki import CertificateAuthority, IssuedCertificate

DAY = datetime.timedelta(days=1)


@attrs.frozen
class Credentials:
    cert: Path
    key: Path


class CertificateFactory:
    def __init__(
        self,
        *,
        scratch: Path,
        trust_domain: str,
        ca_cert: Path,
        ca_key: Path | None,
        ca_dir: Path | None,
        other_ca: Credentials | None,
        revoked: Credentials | None,
    ) -> None:
        self._scratch = scratch
        self._trust_domain = trust_domain
        self._ca_cert = ca_cert
        self._ca_key = ca_key if ca_key is not None else ca_dir / "ca-key.pem" if ca_dir else None
        self._ca_dir = ca_dir
        self._other_ca = other_ca
        self._revoked = revoked
        self._made: dict[str, Credentials] = {}
        self._authorities: dict[str, CertificateAuthority] = {}
        self._lock = threading.Lock()
        self._suffix = secrets.token_hex(4)

    @property
    def can_mint(self) -> bool:
        return self._ca_key is not None

    def _authority(self, name: str, trust_domain: str) -> CertificateAuthority:
        if name not in self._authorities:
            if self._ca_key is None:
                raise CaseSkipped("needs the server's CA key (--ca-key or --ca-dir)")
            self._authorities[name] = CertificateAuthority.adopt(
                self._scratch / name, self._ca_cert, self._ca_key, trust_domain=trust_domain
            )
        return self._authorities[name]

    def _issue(self, label: str, make: Callable[[], IssuedCertificate]) -> Credentials:
        with self._lock:
            if label not in self._made:
                issued = make()
                self._made[label] = Credentials(issued.cert_path, issued.key_path)
            return self._made[label]

    def client_name(self, role: str) -> str:
        return f"conformance-{role}-{self._suffix}"

    # -- certificates ---------------------------------------------------------------------

    def from_other_ca(self) -> Credentials:
        """Same trust domain and name shape as a real client, signed by a CA the server lacks."""

        def make() -> IssuedCertificate:
            if self._other_ca is not None:
                other = CertificateAuthority.adopt(
                    self._scratch / "other-ca",
                    self._other_ca.cert,
                    self._other_ca.key,
                    trust_domain=self._trust_domain,
                )
            else:
                other = CertificateAuthority.init(
                    self._scratch / "other-ca", trust_domain=self._trust_domain
                )
            return other.issue_client(self.client_name("intruder"))

        return self._issue("other-ca", make)

    def expired(self) -> Credentials:
        now = datetime.datetime.now(datetime.UTC)
        return self._issue(
            "expired",
            lambda: self._authority("ca", self._trust_domain).issue_client(
                self.client_name("expired"), not_before=now - 10 * DAY, not_after=now - DAY
            ),
        )

    def server_auth_only(self) -> Credentials:
        return self._issue(
            "server-auth-only",
            lambda: self._authority("ca", self._trust_domain).issue_client(
                self.client_name("server-eku"),
                extended_key_usages=[ExtendedKeyUsageOID.SERVER_AUTH],
            ),
        )

    def without_eku(self) -> Credentials:
        return self._issue(
            "no-eku",
            lambda: self._authority("ca", self._trust_domain).issue_client(
                self.client_name("no-eku"), extended_key_usages=[]
            ),
        )

    def foreign_trust_domain(self) -> Credentials:
        return self._issue(
            "foreign-domain",
            lambda: self._authority("foreign", "conformance-foreign.test").issue_client(
                self.client_name("foreigner")
            ),
        )

    def outsider(self) -> Credentials:
        """A valid certificate for an identity that (presumably) no grant names."""
        return self._issue(
            "outsider",
            lambda: self._authority("ca", self._trust_domain).issue_client(
                self.client_name("outsider")
            ),
        )

    def with_transport(self, identity: str) -> tuple[Credentials, Credentials]:
        """A fresh TLS certificate for ``identity`` (same identity, same grants, a new key)
        and a key-transport certificate for it: (TLS, transport)."""
        name = identity.removeprefix(f"spiffe://{self._trust_domain}/")
        if name == identity or "/" in name:
            raise CaseSkipped(f"cannot issue certificates for {identity} with the built-in CA")
        authority = self._authority("transport", self._trust_domain)
        with self._lock:
            if "transport" not in self._made:
                tls = authority.issue_client(name)
                transport = authority.issue_transport(name)
                self._made["transport"] = Credentials(tls.cert_path, tls.key_path)
                self._made["transport-key"] = Credentials(transport.cert_path, transport.key_path)
            return self._made["transport"], self._made["transport-key"]

    def revoked(self) -> Credentials:
        if self._revoked is not None:
            return self._revoked
        if self._ca_dir is None:
            raise CaseSkipped(
                "needs a revoked client certificate (--revoked-cert/--revoked-key) or the "
                "CA directory whose CRL the server reads (--ca-dir)"
            )
        ca_dir = self._ca_dir

        def make() -> IssuedCertificate:
            authority = CertificateAuthority.load(ca_dir)
            name = self.client_name("revoked")
            issued = authority.issue_client(name)
            authority.revoke(name)
            return issued

        return self._issue("revoked", make)

    def revocable(self) -> tuple[Credentials, Callable[[], None]]:
        """A fresh valid certificate, and a function that revokes it in the server's CRL."""
        if self._ca_dir is None:
            raise CaseSkipped("needs the CA directory whose CRL the server reads (--ca-dir)")
        ca_dir = self._ca_dir
        name = self.client_name("revoked-while-connected")
        issued = self._issue(
            "revocable", lambda: CertificateAuthority.load(ca_dir).issue_client(name)
        )

        def revoke() -> None:
            CertificateAuthority.load(ca_dir).revoke(name)

        return issued, revoke

    def short_lived(self, seconds: float) -> tuple[Credentials, datetime.datetime]:
        """A certificate that expires ``seconds`` from now (never cached: each call is new)."""
        not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
        not_after = not_after.replace(microsecond=0)  # what the certificate can say
        issued = self._authority("ca", self._trust_domain).issue_client(
            self.client_name(f"short-lived-{secrets.token_hex(2)}"),
            not_before=not_after - DAY,
            not_after=not_after,
        )
        return Credentials(issued.cert_path, issued.key_path), not_after
