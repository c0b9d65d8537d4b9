"""What a config needs beyond its syntax: files, permissions, certificates, policy.

``load_config`` checks that a file *says* something valid; this module
checks that what it points at will work: every path readable (and private
files private), the server certificate matching its key and chaining to
the CA, the CRL signed and fresh, the HSM material opening, the grants
able to match anyone. Every problem is collected, each naming its key, so
an operator fixes them all in one go.

``kmipd check-config`` runs all of it. ``kmipd serve`` and a reload
(SIGHUP) run the TLS and policy checks too and refuse a config that fails
them: a server certificate that clients would reject is better refused
than served.
"""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from kmipd.audit import AuditError, read_audit_key
from kmipd.daemon.config import Config, ConfigError
from kmipd.hsm import (
    HsmError,
    Pkcs11Settings,
    SoftwareHsm,
    master_key_opens,
    read_master_key,
    read_pin,
)
from kmipd.server import TlsSettings
from kmipd.service import Policy
from kmipd.store import StoreError, store_problems
from kmipd.store._faults import directory_cause
from kmipd.store._managed import read_sqlite_expiry
from pki import PkiError, load_crl_serials

#: A server certificate closer than this to its end is worth a warning.
EXPIRY_WARNING = datetime.timedelta(days=30)
_SQLITE_HEADER = b"SQLite format 3\0"


@attrs.define
class CheckReport:
    #: Each makes the config unusable; ``key: what is wrong``.
    problems: list[str] = attrs.field(factory=list)
    #: Worth knowing, not worth refusing.
    warnings: list[str] = attrs.field(factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_config(config: Config, *, now: datetime.datetime | None = None) -> CheckReport:
    """Everything ``kmipd check-config`` checks."""
    report = CheckReport()
    _check_config_file(Path(config.source), report)
    check_tls(config.tls, report, now=now)
    check_policy(config.policy, config.tls.trust_domain, report)
    check_online_ca(config.tls, report, now=now)
    if config.hsm_backend == "software":
        _check_software_hsm(config, report)
    elif config.pkcs11 is not None:
        _check_pkcs11_hsm(config.pkcs11, report)
    if config.postgres is not None:
        _check_postgres_store(config, report)
    else:
        _check_store(config.sqlite_path(), report)
    if report.ok:
        check_managed_expiry(config, report, now=now)
    _check_audit(config, report)
    return report


def check_managed_expiry(
    config: Config, report: CheckReport, *, now: datetime.datetime | None = None
) -> None:
    """Warn, as for the server certificate, of managed certificates near their end."""
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        if config.postgres is not None:
            from kmipd.store._postgres import read_managed_expiry  # noqa: PLC0415

            rows = read_managed_expiry(config.postgres.connection_string())
        elif config.sqlite_path().exists():
            rows = read_sqlite_expiry(str(config.sqlite_path()))
        else:
            return
    except Exception as exc:
        report.warnings.append(f"store: cannot read the managed certificates' expiry ({exc})")
        return
    for namespace, name, version, not_after in rows:
        end = datetime.datetime.fromtimestamp(not_after, datetime.UTC)
        if end <= now:
            report.warnings.append(
                f"managed certificate {name!r} in {namespace!r}: version {version} expired "
                f"on {end:%Y-%m-%d}; renew it (kmipd cert renew-managed {name})"
            )
        elif end - now < EXPIRY_WARNING:
            report.warnings.append(
                f"managed certificate {name!r} in {namespace!r}: version {version} expires "
                f"in {(end - now).days} days ({end:%Y-%m-%d}); renew it "
                f"(kmipd cert renew-managed {name}) or check its lifetime action"
            )


def check_serving_config(config: Config, *, now: datetime.datetime | None = None) -> CheckReport:
    """What serve and a reload refuse on: the TLS material and the policy."""
    report = CheckReport()
    check_tls(config.tls, report, now=now)
    check_policy(config.policy, config.tls.trust_domain, report)
    return report


# -- TLS -------------------------------------------------------------------------------------


def check_tls(
    settings: TlsSettings, report: CheckReport, *, now: datetime.datetime | None = None
) -> None:
    now = now or datetime.datetime.now(datetime.UTC)
    roots = _load_certificates(settings.ca, "tls.ca", report)
    for root in roots:
        if not _is_ca(root):
            report.problems.append(
                f"tls.ca: {settings.ca} holds a certificate that is not a CA "
                f"({root.subject.rfc4514_string()})"
            )
        elif root.not_valid_after_utc < now:
            report.problems.append(f"tls.ca: the CA certificate in {settings.ca} has expired")
    chain = _load_certificates(settings.cert, "tls.cert", report)
    key = _load_private_key(settings.key, "tls.key", report)
    if chain:
        _check_server_certificate(settings, chain, roots, report, now)
        if key is not None and _public_der(chain[0].public_key()) != _public_der(key.public_key()):
            report.problems.append(
                f"tls.key: {settings.key} is not the key of the certificate in {settings.cert}"
            )
    if roots:
        try:
            load_crl_serials(settings.crl, settings.ca)
        except PkiError as exc:
            report.problems.append(f"tls.crl: {exc}")


def check_online_ca(
    settings: TlsSettings, report: CheckReport, *, now: datetime.datetime | None = None
) -> None:
    """The online CA's certificate: a CA under tls.ca, in validity (warned before it
    ends), and its CRL readable. Its HSM key is checked when the daemon starts."""
    if settings.online_ca is None:
        return
    now = now or datetime.datetime.now(datetime.UTC)
    where = f"online_ca.cert: {settings.online_ca}"
    certs = _load_certificates(settings.online_ca, "online_ca.cert", report)
    roots = _load_certificates(settings.ca, "tls.ca", report)
    if not certs:
        return
    cert = certs[0]
    if not _is_ca(cert):
        report.problems.append(f"{where} is not a CA certificate")
    if roots and not any(_issued_by(cert, root) for root in roots):
        report.problems.append(f"{where} is not signed by the CA in {settings.ca}")
    if cert.not_valid_after_utc < now:
        report.problems.append(f"{where} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    elif cert.not_valid_after_utc - now < EXPIRY_WARNING:
        report.warnings.append(
            f"{where} expires on {cert.not_valid_after_utc:%Y-%m-%d}, and every certificate "
            "it issued with it: make a new one (kmipd ca init) and reload"
        )
    if settings.online_ca_crl is not None:
        try:
            load_crl_serials(settings.online_ca_crl, settings.online_ca)
        except PkiError as exc:
            report.problems.append(f"online_ca.crl: {exc}")


def _check_server_certificate(
    settings: TlsSettings,
    chain: list[x509.Certificate],
    roots: list[x509.Certificate],
    report: CheckReport,
    now: datetime.datetime,
) -> None:
    leaf, where = chain[0], f"tls.cert: {settings.cert}"
    if now < leaf.not_valid_before_utc:
        report.problems.append(f"{where} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d}")
    elif leaf.not_valid_after_utc < now:
        report.problems.append(f"{where} expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    elif leaf.not_valid_after_utc - now < EXPIRY_WARNING:
        report.warnings.append(
            f"{where} expires on {leaf.not_valid_after_utc:%Y-%m-%d}: rotate it "
            "(issue a new one, then systemctl reload kmipd)"
        )
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
            report.problems.append(f"{where} lacks the serverAuth extended key usage")
    try:
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        report.problems.append(
            f"{where} has no subjectAltName: clients check the server's name against it"
        )
    if roots and not _chains_to(leaf, chain[1:], roots):
        report.problems.append(
            f"{where} does not chain to the CA in {settings.ca}: clients would refuse it"
        )


def _chains_to(
    leaf: x509.Certificate, intermediates: list[x509.Certificate], roots: list[x509.Certificate]
) -> bool:
    current = leaf
    for _ in range(len(intermediates) + 1):
        if any(_issued_by(current, root) for root in roots):
            return True
        parent = next((c for c in intermediates if _issued_by(current, c)), None)
        if parent is None:
            return False
        current = parent
    return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_certificates(path: Path, key: str, report: CheckReport) -> list[x509.Certificate]:
    data = _read(path, key, report)
    if data is None:
        return []
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        report.problems.append(f"{key}: {path} holds no PEM certificate")
        return []
    return certificates


def _load_private_key(path: Path, key: str, report: CheckReport) -> PrivateKeyTypes | None:
    if not _private(path, key, report):
        return None
    data = _read(path, key, report)
    if data is None:
        return None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        report.problems.append(
            f"{key}: {path} is encrypted; kmipd needs it unencrypted "
            "(protect it at rest with LoadCredentialEncrypted= instead)"
        )
    except ValueError:
        report.problems.append(f"{key}: {path} is not a PEM private key")
    return None


# -- policy ----------------------------------------------------------------------------------


def check_policy(policy: Policy, trust_domain: str, report: CheckReport) -> None:
    if not policy.grants:
        report.warnings.append(
            "grant: there is no [[grant]]: every request but hello and status is refused"
        )
    domain_prefix = f"spiffe://{trust_domain}/"
    for index, grant in enumerate(policy.grants):
        literal = _literal_prefix(grant.identity)
        # The glob's fixed start must agree with "spiffe://<trust domain>/".
        if not (literal.startswith(domain_prefix) or domain_prefix.startswith(literal)):
            report.problems.append(
                f"grant[{index}].identity: {grant.identity!r} can never match: client "
                f"identities are {domain_prefix}NAME (tls.trust_domain = {trust_domain!r})"
            )


def _literal_prefix(pattern: str) -> str:
    """The part of a glob before its first wildcard."""
    for index, char in enumerate(pattern):
        if char in "*?[":
            return pattern[:index]
    return pattern


# -- HSM, store, audit ------------------------------------------------------------------------


def _check_software_hsm(config: Config, report: CheckReport) -> None:
    assert config.master_key is not None
    try:
        master_key = read_master_key(config.master_key)
    except HsmError as exc:
        report.problems.append(f"hsm.master_key: {exc}")
        return
    if config.keyring_in_store:
        _check_keyring_in_store(config, master_key, report)
        return
    _, keyring = config.software_files()
    if config.postgres is not None:
        report.warnings.append(
            "hsm.keyring: a keyring file is shared only by daemons that see the same file; "
            "omit hsm.keyring to keep the keyring in the PostgreSQL store, shared by all"
        )
    if keyring.exists():
        try:
            SoftwareHsm(master_key, keyring).close()
        except HsmError as exc:
            report.problems.append(f"hsm.keyring: {exc}")
    else:
        _creatable(keyring, "hsm.keyring", report)


def _check_keyring_in_store(config: Config, master_key: bytes, report: CheckReport) -> None:
    """The store's keyring opens with this master key (once a daemon has used it)."""
    assert config.postgres is not None
    try:
        from kmipd.store._postgres import read_keyring_check  # noqa: PLC0415 - psycopg on demand

        proof = read_keyring_check(config.postgres.connection_string())
    except (ImportError, ConfigError, StoreError):
        return  # the store's own check reports why the database cannot be read
    if proof is not None and not master_key_opens(master_key, proof):
        report.problems.append(
            "hsm.master_key: the keyring in the PostgreSQL store is sealed under another "
            "master key: every daemon on one store must be given the same hsm.master_key"
        )


def _check_pkcs11_hsm(settings: Pkcs11Settings, report: CheckReport) -> None:
    """The library file and the PIN; logging in is left to serve (a wrong PIN counts)."""
    library = settings.library
    if not library.is_file():
        report.problems.append(f"hsm.library: {library} does not exist (is the package installed?)")
    elif not os.access(library, os.R_OK):
        report.problems.append(f"hsm.library: {library} is not readable by this user")
    try:
        read_pin(settings)
    except HsmError as exc:
        report.problems.append(str(exc))


def _check_postgres_store(config: Config, report: CheckReport) -> None:
    """Connects: the server answers, is the primary, has a usable schema and privileges."""
    assert config.postgres is not None
    try:
        from kmipd.store._postgres import check_database  # noqa: PLC0415 - psycopg on demand
    except ImportError as exc:
        report.problems.append(f"store.backend: 'postgresql' needs psycopg 3 ({exc})")
        return
    try:
        conninfo = config.postgres.connection_string()
    except ConfigError as exc:
        report.problems.extend(exc.problems)
        return
    problems, warnings = check_database(conninfo)
    report.problems.extend(problems)
    report.warnings.extend(warnings)


def _check_store(path: Path, report: CheckReport) -> None:
    if not path.exists():
        _creatable(path, "store.path", report)
        return
    unwritable = directory_cause(path.parent)  # a full or read-only disk, not permissions
    if unwritable is not None:
        report.problems.append(f"store.path: {path} cannot be written: {unwritable}")
    elif not os.access(path, os.R_OK | os.W_OK):
        report.problems.append(f"store.path: {path} is not readable and writable by this user")
        return
    with path.open("rb") as file:
        header = file.read(len(_SQLITE_HEADER))
    if header and header != _SQLITE_HEADER:
        report.problems.append(f"store.path: {path} is not an SQLite database")
    elif header:
        # What serve would refuse the store for: damage (never repaired).
        report.problems.extend(
            f"store.path: {problem}"
            for problem in store_problems(path)
            if unwritable is None or "cannot be written" not in problem
        )
    if path.parent.stat().st_mode & stat.S_IRWXO:
        report.warnings.append(
            f"store.path: its directory {path.parent} is open to others; 0700 is safer"
        )


def _check_audit(config: Config, report: CheckReport) -> None:
    if config.audit_path.exists():
        if not os.access(config.audit_path, os.W_OK):
            report.problems.append(f"audit.path: {config.audit_path} is not writable")
    else:
        _creatable(config.audit_path, "audit.path", report)
    if config.audit_key.exists():
        try:
            read_audit_key(config.audit_key, create=False)
        except (AuditError, OSError) as exc:
            report.problems.append(f"audit.key: {exc}")
    else:
        _creatable(config.audit_key, "audit.key", report)


def _check_config_file(path: Path, report: CheckReport) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # a config parsed from elsewhere (tests, --dev): nothing to check
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        report.problems.append(
            f"config: {path} is writable by group or others, who could grant themselves keys"
        )


# -- files -------------------------------------------------------------------------------------


def _read(path: Path, key: str, report: CheckReport) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        report.problems.append(f"{key}: cannot read {path}: {exc.strerror}")
        return None


def _private(path: Path, key: str, report: CheckReport) -> bool:
    """A private file must not be open to group or others (credentials are 0400: fine)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        report.problems.append(f"{key}: cannot read {path}: {exc.strerror}")
        return False
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        report.problems.append(
            f"{key}: {path} is accessible to group or others "
            f"(mode {stat.S_IMODE(mode):04o}); make it 0600"
        )
    return True


def _creatable(path: Path, key: str, report: CheckReport) -> None:
    """A file kmipd will create: its nearest existing directory must be writable."""
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not os.access(directory, os.W_OK | os.X_OK):
        report.problems.append(
            f"{key}: {path} does not exist and {directory} is not writable to create it"
        )
