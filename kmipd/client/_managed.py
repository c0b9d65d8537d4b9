"""Managed certificates on the client side: the policy file, and what a get returns.

A policy file is TOML (``.toml``) or JSON (anything else that parses as JSON)::

    subject = "CN=web.storage.example,O=Example"   # optional; default CN = first name
    dns = ["web.storage.example"]                  # at least one name in dns/uri/ip
    uri = ["spiffe://example.org/web"]
    ip = ["192.0.2.10"]
    key_type = "P-256"              # P-256, P-384, RSA-3072, RSA-4096, Ed25519
    validity_days = 30              # or validity_seconds
    usage = "server"                # serverAuth (default) or "client" (clientAuth)
    exportable = false              # may the private key be read back (with the grant)?

    [lifetime_action]               # absent, or action = "none": no automatic renewal
    renew_at_percent = 80           # renew at 80 % of the lifetime, or:
    # days_before_expiry = 10

``load_certificate_policy`` checks the shapes here (names every field it
refuses, before anything is sent); the daemon checks the meaning (names,
key type, the grant's bounds) and answers certificate-policy-invalid.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmipd.protocol import CertificatePolicy, ManagedCertificate, ManagedCertificateInfo

DAY = 86400
#: The wire's bound on validity and renew-before (seconds): ~136 years.
_MAX_SECONDS = 2**32 - 1
_TOP_KEYS = (
    "subject",
    "dns",
    "uri",
    "ip",
    "key_type",
    "validity_days",
    "validity_seconds",
    "usage",
    "exportable",
    "lifetime_action",
)
_ACTION_KEYS = ("action", "renew_at_percent", "days_before_expiry")


class PolicyFileError(ValueError):
    """A policy file that cannot be read or has a field of the wrong shape."""


def load_certificate_policy(path: Path) -> CertificatePolicy:
    """The policy in a TOML or JSON file (see the module docstring)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyFileError(f"cannot read the policy file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PolicyFileError(f"the policy file {path} is not UTF-8 text") from None
    document: Any
    if path.suffix == ".toml":
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyFileError(f"{path}: not valid TOML ({exc})") from None
    else:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyFileError(
                f"{path}: not valid JSON ({exc}); a TOML policy file ends in .toml"
            ) from None
    return certificate_policy(document, where=str(path))


def certificate_policy(document: Any, *, where: str = "policy") -> CertificatePolicy:
    """A policy from a parsed TOML or JSON document."""

    def fail(field: str, problem: str) -> PolicyFileError:
        return PolicyFileError(f"{where}: {field}: {problem}")

    if not isinstance(document, dict):
        raise PolicyFileError(f"{where}: the policy must be a table (a JSON object)")
    for key in document:
        if key not in _TOP_KEYS:
            raise fail(key, f"unknown field (known: {', '.join(_TOP_KEYS)})")

    def names(field: str) -> tuple[str, ...]:
        value = document.get(field, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise fail(field, "a list of non-empty strings")
        return tuple(value)

    key_type = document.get("key_type")
    if not isinstance(key_type, str) or not key_type:
        raise fail("key_type", "required: P-256, P-384, RSA-3072, RSA-4096 or Ed25519")
    subject = document.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise fail("subject", 'an RFC 4514 name, e.g. "CN=web.example,O=Example"')
    usage = document.get("usage", "server")
    if usage not in ("server", "client"):
        raise fail("usage", '"server" (serverAuth) or "client" (clientAuth)')
    exportable = document.get("exportable", False)
    if not isinstance(exportable, bool):
        raise fail("exportable", "true or false")
    percent, before = _lifetime_action(document.get("lifetime_action"), fail)
    return CertificatePolicy(
        key_type=key_type.lower().replace("-", ""),
        validity=_validity(document, fail),
        subject=subject,
        dns=names("dns"),
        uri=names("uri"),
        ip=names("ip"),
        usage=usage,
        exportable=exportable,
        renew_at_percent=percent,
        renew_before=before,
    )


def _number(value: Any) -> bool:
    # Finite: TOML's inf/nan and JSON's Infinity/NaN parse as floats, and convert to no int.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _validity(document: dict[str, Any], fail: Any) -> int:
    days, seconds = document.get("validity_days"), document.get("validity_seconds")
    if (days is None) == (seconds is None):
        raise fail("validity_days", "give validity_days or validity_seconds (one of them)")
    if days is not None:
        if not _number(days) or days <= 0:
            raise fail("validity_days", "a positive number of days")
        if days * DAY > _MAX_SECONDS:
            raise fail("validity_days", f"at most {_MAX_SECONDS // DAY} days")
        return int(days * DAY)
    if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 60:
        raise fail("validity_seconds", "a whole number of seconds, at least 60")
    if seconds > _MAX_SECONDS:
        raise fail("validity_seconds", f"at most {_MAX_SECONDS} seconds")
    return seconds


def _lifetime_action(action: Any, fail: Any) -> tuple[int | None, int | None]:
    if action is None:
        return None, None
    if not isinstance(action, dict):
        raise fail("lifetime_action", "a table: renew_at_percent, days_before_expiry or action")
    for key in action:
        if key not in _ACTION_KEYS:
            raise fail(
                f"lifetime_action.{key}", f"unknown field (known: {', '.join(_ACTION_KEYS)})"
            )
    kind = action.get("action", "renew")
    percent: Any = action.get("renew_at_percent")
    days: Any = action.get("days_before_expiry")
    if kind == "none":
        if percent is not None or days is not None:
            raise fail("lifetime_action", 'action = "none" takes no renewal point')
        return None, None
    if kind != "renew":
        raise fail("lifetime_action.action", '"renew" or "none"')
    if (percent is None) == (days is None):
        raise fail("lifetime_action", "give renew_at_percent or days_before_expiry (one of them)")
    if percent is not None:
        if not isinstance(percent, int) or isinstance(percent, bool) or not 1 <= percent <= 99:
            raise fail("lifetime_action.renew_at_percent", "a whole number from 1 to 99")
        return percent, None
    if not _number(days) or float(days) <= 0:
        raise fail("lifetime_action.days_before_expiry", "a positive number of days")
    if float(days) * DAY > _MAX_SECONDS:
        raise fail("lifetime_action.days_before_expiry", f"at most {_MAX_SECONDS // DAY} days")
    return None, max(1, int(float(days) * DAY))


@attrs.frozen
class CertificateBundle:
    """A managed certificate version: its certificate, chain and (when asked) key."""

    info: ManagedCertificateInfo
    certificate: x509.Certificate
    #: The issuing CAs above it, nearest first (for the online CA's: it, then the root).
    chain: tuple[x509.Certificate, ...]
    #: PKCS#8 DER, only from a get with ``with_key``.
    key: bytes | None = attrs.field(default=None, repr=False)

    @classmethod
    def from_result(cls, result: ManagedCertificate) -> CertificateBundle:
        return cls(
            info=result.info,
            certificate=x509.load_der_x509_certificate(result.certificate),
            chain=tuple(x509.load_der_x509_certificate(der) for der in result.chain),
            key=result.key,
        )

    def chain_pem(self) -> bytes:
        """The certificate, then every issuer above it, PEM."""
        certs = (self.certificate, *self.chain)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM (write it 0600)."""
        if self.key is None:
            raise ValueError("this bundle holds no private key (get it with with_key=True)")
        key = serialization.load_der_private_key(self.key, password=None)
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
