"""index.json: what the CA remembers between runs.

It records the trust domain and key type, the certificate currently issued
under each name (so ``revoke NAME`` knows which serial to revoke), every
revocation with its time and reason (so each CRL re-signing carries them all)
and the last CRL number (so each CRL is numbered higher than the one before).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, TypeVar

import attrs
from cryptography import x509

from pki._errors import PkiError
from pki._files import read_file, write_private_file

FORMAT_VERSION = 1
_T = TypeVar("_T")


@attrs.frozen
class Issued:
    """The certificate now issued under a name; re-issuing the name replaces it."""

    serial: int
    kind: str  # "client" or "server"
    cert: str  # file names relative to the CA directory, so the directory can move
    key: str


@attrs.frozen
class Revocation:
    serial: int
    name: str
    time: datetime.datetime
    reason: x509.ReasonFlags


@attrs.define
class Index:
    trust_domain: str
    key_type: str
    crl_number: int = 0
    issued: dict[str, Issued] = attrs.Factory(dict)
    revoked: dict[int, Revocation] = attrs.Factory(dict)

    def save(self, path: Path) -> None:
        # Serials are written as decimal strings: they are up to 159 bits, and
        # many JSON readers keep only 53 bits of a number.
        document = {
            "version": FORMAT_VERSION,
            "trust_domain": self.trust_domain,
            "key_type": self.key_type,
            "crl_number": self.crl_number,
            "issued": {
                name: {"serial": str(i.serial), "kind": i.kind, "cert": i.cert, "key": i.key}
                for name, i in sorted(self.issued.items())
            },
            "revoked": [
                {
                    "serial": str(r.serial),
                    "name": r.name,
                    "time": r.time.isoformat(),
                    "reason": r.reason.name,
                }
                for _, r in sorted(self.revoked.items())
            ],
        }
        write_private_file(path, json.dumps(document, indent=2).encode() + b"\n", mode=0o644)

    @classmethod
    def load(cls, path: Path) -> Index:
        data = read_file(path, "CA index")
        try:
            return _parse(json.loads(data))
        except (ValueError, _CorruptError) as exc:  # JSON and UTF-8 errors are ValueErrors
            raise PkiError(f"CA index {path} is corrupt: {exc}") from None


class _CorruptError(Exception):
    """A field is missing or has the wrong type or value."""


def _parse(document: Any) -> Index:
    if _get(document, "version", int) != FORMAT_VERSION:
        raise _CorruptError(f"unknown format version {document['version']!r}")
    index = Index(
        _get(document, "trust_domain", str),
        _get(document, "key_type", str),
        _get(document, "crl_number", int),
    )
    for name, entry in _get(document, "issued", dict).items():
        index.issued[name] = Issued(
            _serial(_get(entry, "serial", str)),
            _get(entry, "kind", str),
            _get(entry, "cert", str),
            _get(entry, "key", str),
        )
    for entry in _get(document, "revoked", list):
        revocation = Revocation(
            _serial(_get(entry, "serial", str)),
            _get(entry, "name", str),
            _time(_get(entry, "time", str)),
            _reason(_get(entry, "reason", str)),
        )
        index.revoked[revocation.serial] = revocation
    return index


def _get(document: Any, key: str, kind: type[_T]) -> _T:
    value = document.get(key) if isinstance(document, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _CorruptError(f"{key!r} is missing or not a {kind.__name__}")
    return value


def _serial(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise _CorruptError(f"serial {text!r} is not a positive decimal number")
    return int(text)


def _time(text: str) -> datetime.datetime:
    time = datetime.datetime.fromisoformat(text)
    if time.tzinfo is None:
        raise _CorruptError(f"time {text!r} has no time zone")
    return time


def _reason(text: str) -> x509.ReasonFlags:
    try:
        return x509.ReasonFlags[text]
    except KeyError:
        raise _CorruptError(f"unknown revocation reason {text!r}") from None
