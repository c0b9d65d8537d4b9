"""The daemon's configuration file (TOML), checked in full before anything starts.

Why it is long: it is the declaration of every option, one entry each (data).

Every option is declared once below with its type, default and meaning; the
configuration table in docs/operators.md is the same list. A bad file is refused with
every problem at once, each naming the key: ``server.max_in_flight: expected
an integer, got text``. Relative paths are relative to the config file.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from kmipd.crypto._private_files import PrivateFileError, read_private_file
from kmipd.hsm import Pkcs11Settings
from kmipd.lifecycle import DAY, CryptoPeriod, LifecyclePolicy
from kmipd.net._address import parse_address
from kmipd.protocol import NAMESPACE_PATTERN, SECRET_MAX_VALUE_SIZE
from kmipd.protocol._framing import ABSOLUTE_MAX_FRAME_SIZE
from kmipd.server import KmipSettings, ServerLimits, TlsSettings
from kmipd.service import (
    CERTIFICATE_KEY_TYPES,
    DEFAULT_MAX_VALIDITY_DAYS,
    CertificateGrant,
    Grant,
    Policy,
    PolicyError,
    expand_operations,
)


class ConfigError(Exception):
    """The config cannot be used; ``problems`` lists every reason, each naming its key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


@attrs.frozen
class Option:
    kind: type | tuple[type, ...]
    default: Any
    help: str
    #: Extra check on the value; returns a problem or None.
    check: Callable[[Any], str | None] | None = None


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def _fraction(value: float) -> str | None:
    return None if 0 < value < 1 else "must be between 0 and 1 (a fraction of the lifetime)"


def _at_least_one(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1"


def _read_batch(value: int) -> str | None:
    return None if 0 <= value <= 1000 else "must be 0..1000"


def _frame_size(value: int) -> str | None:
    if 16 <= value <= ABSOLUTE_MAX_FRAME_SIZE:
        return None
    return f"must be 16..{ABSOLUTE_MAX_FRAME_SIZE}"


def _secret_size(value: int) -> str | None:
    # The wire's own limit on a value.
    return None if 1 <= value <= SECRET_MAX_VALUE_SIZE else "must be 1..16777216 (16 MiB)"


def _addresses(value: list[Any]) -> str | None:
    if not value:
        return "needs at least one address"
    for item in value:
        if not isinstance(item, str):
            return "must be a list of HOST:PORT strings"
        try:
            parse_address(item)
        except ValueError as exc:
            return str(exc)
    return None


def _loopback_address(value: str) -> str | None:
    """The metrics endpoint is for a local scraper only: refuse anything else."""
    if value == "":
        return None
    try:
        host, _ = parse_address(value)
    except ValueError as exc:
        return str(exc)
    if host == "localhost":
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return None if loopback else f"{value} is not a loopback address (127.0.0.1, [::1])"


def _absolute(value: str) -> str | None:
    # Relative names would be looked up on the loader's search path: say which file.
    return None if Path(value).is_absolute() else "must be an absolute path"


def _namespace(value: str) -> str | None:
    return None if NAMESPACE_PATTERN.fullmatch(value) else "must be a namespace name"


def _credential_name(value: str) -> str | None:
    if value and "/" not in value and value not in (".", ".."):
        return None
    return "must be a credential name (LoadCredential=NAME:...), not a path"


def _no_password_in_conninfo(value: str) -> str | None:
    # Checked without repeating the value: it may hold the very secret refused here.
    lowered = value.lower()
    if re.search(r"(^|[\s;?&])password\s*=", lowered) or re.search(r"://[^/@]*:[^/@]*@", value):
        return (
            "holds a password: a password is never written in the config file; "
            "put it in store.password_file (mode 0600) or store.password_credential"
        )
    return None


#: The most worker processes server.workers starts (and "auto" picks).
MAX_WORKERS = 8


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, so taskset and cgroups count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _workers(value: Any) -> str | None:
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f'must be an integer 1..{MAX_WORKERS} or "auto" (the usable cores, capped)'
    if not 1 <= value <= MAX_WORKERS:
        return f'must be 1..{MAX_WORKERS} (got {value}), or "auto"'
    return None


def _sessions(value: int) -> str | None:
    return None if 1 <= value <= 256 else "must be 1..256"


def _namespace_globs(value: list[Any]) -> str | None:
    for item in value:
        if not isinstance(item, str) or not _namespace_glob_ok(item):
            return "must be a list of namespace names or globs"
    return None


def _one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


REQUIRED = object()

#: section -> key -> Option. Paths are str here and resolved after checking.
SCHEMA: dict[str, dict[str, Option]] = {
    "server": {
        "listen": Option(list, ["127.0.0.1:5696"], "addresses to listen on, HOST:PORT", _addresses),
        "name": Option(str, "kmipd", "server name reported by hello and status"),
        # 72 KiB: a secret of the default secrets.max_size (64 KiB) and its envelope fit.
        "max_frame_size": Option(int, 73728, "largest frame accepted, bytes", _frame_size),
        "max_in_flight": Option(int, 64, "unanswered requests per connection", _at_least_one),
        "max_connections": Option(int, 1024, "concurrent client connections", _at_least_one),
        "max_handshaking": Option(
            int, 128, "connections still in the TLS handshake (oldest shed)", _at_least_one
        ),
        "max_handshaking_per_address": Option(
            int, 16, "handshaking connections per source address (oldest shed)", _at_least_one
        ),
        "max_connections_per_identity": Option(
            int, 64, "authenticated connections per identity with a grant", _at_least_one
        ),
        "max_connections_ungranted": Option(
            int, 2, "authenticated connections per identity with no grant", _at_least_one
        ),
        "handshake_timeout": Option((int, float), 10.0, "seconds to finish TLS", _positive),
        "idle_timeout": Option((int, float), 300.0, "seconds a quiet connection stays", _positive),
        "frame_timeout": Option((int, float), 30.0, "seconds to finish a started frame", _positive),
        "send_timeout": Option((int, float), 30.0, "seconds a client may stall reading", _positive),
        "drain_timeout": Option(
            (int, float), 10.0, "seconds to finish requests on SIGTERM", _positive
        ),
        # 1 by default: one process with the files it always had (see docs/operators.md).
        "workers": Option(
            (int, str), 1, 'worker processes sharing the listeners: 1..8 or "auto"', _workers
        ),
    },
    "tls": {
        "ca": Option(str, REQUIRED, "CA certificate (PEM) that client certificates chain to"),
        "cert": Option(str, REQUIRED, "server certificate (PEM)"),
        "key": Option(str, REQUIRED, "server private key (PEM, mode 0600)"),
        "crl": Option(str, REQUIRED, "CRL (PEM) signed by the CA; checked on every handshake"),
        "trust_domain": Option(str, REQUIRED, "SPIFFE trust domain of client identities"),
        "allow_tls12": Option(bool, False, "also accept TLS 1.2 (ECDHE + AEAD suites only)"),
        "session_tickets": Option(int, 0, "TLS 1.3 tickets per handshake (0: no resumption)"),
    },
    "kmip": {
        "enabled": Option(
            bool, True, "serve KMIP on the listeners too (and accept TLS 1.2 for it)"
        ),
        "max_message_size": Option(int, 65536, "largest KMIP message accepted, bytes", _frame_size),
        "default_namespace": Option(
            str, "kmip", "namespace of KMIP objects created without an Object Group", _namespace
        ),
    },
    "store": {
        "backend": Option(str, "sqlite", "store backend", _one_of("sqlite", "postgresql")),
        "path": Option(str, None, "sqlite: the database file; required"),
        "cache_size": Option(int, 10_000, "wrapped DEK rows kept in memory", _at_least_one),
        "shared": Option(bool, False, "sqlite: several daemons on this host serve this store"),
        "conninfo": Option(
            str,
            None,
            "postgresql: libpq connection string (no password); required",
            _no_password_in_conninfo,
        ),
        "password_file": Option(str, None, "postgresql: file holding the password, mode 0600"),
        "password_credential": Option(
            str, None, "postgresql: systemd credential holding the password", _credential_name
        ),
        "pool_size": Option(int, 8, "postgresql: connections per daemon, 1..256", _sessions),
        "connect_timeout": Option(
            (int, float), 10.0, "postgresql: seconds to wait for the database", _positive
        ),
    },
    "hsm": {
        "backend": Option(str, "software", "HSM backend", _one_of("software", "pkcs11")),
        "master_key": Option(str, None, "software: master key file (32 bytes, 0600); required"),
        "keyring": Option(
            str,
            None,
            "software: encrypted KEK file; required with SQLite (PostgreSQL: absent keeps "
            "the keyring in the store, shared by every daemon)",
        ),
        "library": Option(str, None, "pkcs11: the PKCS#11 module, an absolute path", _absolute),
        "token_label": Option(str, None, "pkcs11: the token's label (or token_serial)"),
        "token_serial": Option(str, None, "pkcs11: the token's serial number (or token_label)"),
        "pin_file": Option(str, None, "pkcs11: file holding the user PIN, mode 0600/0400"),
        "pin_credential": Option(
            str, None, "pkcs11: systemd credential holding the PIN", _credential_name
        ),
        "label_prefix": Option(str, "kmipd/", "pkcs11: KEK object labels: PREFIX<kek>/v<N>"),
        "sessions": Option(int, 4, "pkcs11: sessions (worker threads), 1..256", _sessions),
        "timeout": Option((int, float), 5.0, "pkcs11: seconds a token call may take", _positive),
        "retry_interval": Option(
            (int, float), 5.0, "pkcs11: seconds between reconnect probes when down", _positive
        ),
    },
    "keys": {
        "create_kek_on_demand": Option(
            bool, False, "create a namespace's KEK on its first create-dek / generate-data-key"
        ),
    },
    "lifecycle": {
        "soft_delete_days": Option(
            (int, float), 7, "destroyed keys stay recoverable this long", _not_negative
        ),
        "auto_rotate": Option(
            bool, True, "rotate a KEK when its newest version reaches protect-stop"
        ),
        "check_interval": Option(
            (int, float), 60.0, "seconds between maintenance passes", _positive
        ),
        "rewrap_batch": Option(int, 100, "DEKs rewrapped per batch by a rewrap job", _at_least_one),
        "rewrap_pause": Option((int, float), 0.0, "seconds between rewrap batches", _not_negative),
        "change_feed_days": Option(
            (int, float), 30, "days the changes-since feed keeps an entry", _positive
        ),
    },
    "audit": {
        "path": Option(str, "audit.log", "audit trail file (JSON lines, hash-chained)"),
        "key": Option(str, "audit.key", "HMAC key for audit values (32 bytes, 0600)"),
        "fail_open_reads": Option(bool, False, "serve reads even when the audit cannot be written"),
        "read_batch_ms": Option(
            int,
            10,
            "read records written and fsynced together within this many ms (0: each at once)",
            _read_batch,
        ),
    },
    "transport": {
        "require_sealed": Option(
            list,
            [],
            "namespaces (globs) whose keys leave the daemon only sealed (HPKE)",
            _namespace_globs,
        ),
    },
    "secrets": {
        "max_size": Option(int, 64 * 1024, "largest secret value accepted, bytes", _secret_size),
    },
    "online_ca": {
        "cert": Option(
            str, None, "online issuing CA certificate (PEM), signed by tls.ca; unset: none"
        ),
        "key": Option(str, None, "HSM handle of its signing key (kmipd ca init prints it)"),
        "crl": Option(str, None, "the online CA's CRL (PEM), written by the daemon"),
        "renew_server": Option(
            bool, True, "renew tls.cert from the online CA when due (rewrites tls.key/tls.cert)"
        ),
        "renew_at": Option(
            (int, float),
            2 / 3,
            "fraction of tls.cert's lifetime after which it is renewed",
            _fraction,
        ),
    },
    "logging": {
        "level": Option(str, "info", "log level", _one_of("debug", "info", "warning", "error")),
    },
    "metrics": {
        "listen": Option(
            str, "", "Prometheus endpoint, loopback HOST:PORT; empty: off", _loopback_address
        ),
    },
}

_PATH_KEYS = {
    ("audit", "path"),
    ("audit", "key"),
    ("tls", "ca"),
    ("tls", "cert"),
    ("tls", "key"),
    ("tls", "crl"),
    ("online_ca", "cert"),
    ("online_ca", "crl"),
    ("store", "path"),
    ("hsm", "master_key"),
    ("hsm", "keyring"),
    ("hsm", "pin_file"),
    ("store", "password_file"),
}

#: Keys only one store backend reads.
_STORE_BACKEND_KEYS = {
    "sqlite": ("path", "shared"),
    "postgresql": (
        "conninfo",
        "password_file",
        "password_credential",
        "pool_size",
        "connect_timeout",
    ),
}

#: Keys only one HSM backend reads; giving one to the other backend is an error.
_BACKEND_KEYS = {
    "software": ("master_key", "keyring"),
    "pkcs11": (
        "library",
        "token_label",
        "token_serial",
        "pin_file",
        "pin_credential",
        "label_prefix",
        "sessions",
        "timeout",
        "retry_interval",
    ),
}

#: Keys refused with their own message, whose value is never repeated.
_REFUSED_KEYS = {
    ("hsm", "pin"): "a PIN is never written in the config file: put it in hsm.pin_file "
    "(mode 0600) or a systemd credential (hsm.pin_credential)",
    ("hsm", "so_pin"): "kmipd never needs the security officer's PIN; remove it",
}

GRANT_KEYS = {"identity", "namespaces", "operations"}
CERTIFICATE_GRANT_KEYS = {
    "identity",
    "client",
    "server_dns",
    "max_validity_days",
    "key_types",
    "uris",
    "ips",
}


@attrs.frozen
class PostgresSettings:
    conninfo: str
    password_file: Path | None
    password_credential: str | None
    pool_size: int
    connect_timeout: float

    def password(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The password from its file or credential (mode 0600), None if neither is set."""
        if self.password_file is not None:
            key, path = "store.password_file", self.password_file
        elif self.password_credential is not None:
            key = "store.password_credential"
            directory = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise ConfigError(
                    key,
                    [
                        f"{key}: $CREDENTIALS_DIRECTORY is not set (not running under systemd "
                        f"with LoadCredential={self.password_credential}:...?)"
                    ],
                )
            path = Path(directory) / self.password_credential
        else:
            return None
        try:
            data = read_private_file(path, "password file")
        except PrivateFileError as exc:
            raise ConfigError(key, [f"{key}: {exc}"]) from None
        try:
            password = data.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigError(key, [f"{key}: {path} is not UTF-8 text"]) from None
        if not password:
            raise ConfigError(key, [f"{key}: {path} is empty"])
        return password

    def connection_string(self, environ: Mapping[str, str] | None = None) -> str:
        """store.conninfo with the password from its file merged in (never logged)."""
        password = self.password(environ)
        if password is None:
            return self.conninfo
        from psycopg.conninfo import make_conninfo  # noqa: PLC0415 - only this backend

        return make_conninfo(self.conninfo, password=password)


@attrs.frozen
class Config:
    source: str
    listen: tuple[str, ...]
    server_name: str
    limits: ServerLimits
    tls: TlsSettings
    #: SQLite's file; None with the postgresql backend (see sqlite_path()).
    store_path: Path | None
    store_cache_size: int
    store_shared: bool
    hsm_backend: str
    #: The software backend's files (None with another backend).
    master_key: Path | None
    keyring: Path | None
    #: The PKCS#11 backend's settings (None with another backend).
    pkcs11: Pkcs11Settings | None
    create_kek_on_demand: bool
    policy: Policy
    lifecycle: LifecyclePolicy
    check_interval: float
    rewrap_batch: int
    rewrap_pause: float
    audit_path: Path
    audit_key: Path
    audit_fail_open_reads: bool
    #: Seconds a read's audit record may wait to be written with others.
    audit_read_batch: float
    log_level: str
    metrics_listen: str | None
    require_sealed: tuple[str, ...] = ()
    kmip: KmipSettings = KmipSettings()
    store_backend: str = "sqlite"
    #: The postgresql backend's settings (None with SQLite).
    postgres: PostgresSettings | None = None
    #: secrets.max_size: the largest secret value set-secret accepts.
    secret_max_size: int = 64 * 1024
    #: The HSM handle of the online CA's signing key (None: no online CA).
    online_ca_key: str | None = None
    #: Renew tls.cert from the online CA once past online_ca_renew_at of its lifetime.
    online_ca_renew_server: bool = True
    online_ca_renew_at: float = 2 / 3
    #: server.workers, resolved ("auto": the usable cores, at most MAX_WORKERS).
    workers: int = 1

    def sqlite_path(self) -> Path:
        """The SQLite store's file; only for that backend."""
        if self.store_path is None:
            raise ValueError(
                f"store.backend is {self.store_backend!r}: this works on the SQLite store "
                "only (for PostgreSQL use pg_dump/pg_basebackup: see the README)"
            )
        return self.store_path

    @property
    def keyring_in_store(self) -> bool:
        """The software backend's keyring is the PostgreSQL store's, not a file."""
        return self.hsm_backend == "software" and self.keyring is None

    def software_files(self) -> tuple[Path, Path]:
        """(master key, keyring) of the software backend; only for that backend."""
        if self.master_key is None:
            raise ValueError(f"hsm.backend is {self.hsm_backend!r}, not 'software'")
        if self.keyring is None:
            raise ValueError(
                "the software keyring is in the PostgreSQL store, not a file (hsm.keyring "
                "is not set): back it up with the database"
            )
        return self.master_key, self.keyring


#: ``${NAME}`` or ``${NAME:-default}`` in a path: the directories systemd
#: passes a service (LoadCredential=, StateDirectory=, LogsDirectory=, ...).
DIRECTORY_VARIABLES = (
    "CREDENTIALS_DIRECTORY",
    "STATE_DIRECTORY",
    "LOGS_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "CACHE_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
)
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_path(text: str, base: Path, environ: Mapping[str, str]) -> Path:
    """A path option's value as a path: variables expanded, relative to ``base``.

    Raises ValueError naming the variable when it cannot be expanded.
    """

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name not in DIRECTORY_VARIABLES:
            raise ValueError(
                f"${{{name}}} is not one of the directories systemd passes "
                f"({', '.join(DIRECTORY_VARIABLES)})"
            )
        value = environ.get(name)
        if value:
            # Several StateDirectory= entries give a colon-separated list: the first is ours.
            return value.split(":")[0]
        if default is not None:
            return default
        raise ValueError(
            f"${{{name}}} is not set (not running under systemd?); "
            f"give a default for other uses: ${{{name}:-/some/directory}}"
        )

    return base / Path(_VARIABLE.sub(substitute, text))


def load_config(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["not UTF-8 text"]) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None
    return parse_config(document, source=str(path), base=path.parent)


def parse_config(
    document: Mapping[str, Any],
    *,
    source: str,
    base: Path,
    environ: Mapping[str, str] | None = None,
) -> Config:
    problems: list[str] = []
    for section in document:
        if section not in SCHEMA and section not in _TABLE_ARRAYS:
            problems.append(_unknown(section, [*SCHEMA, *_TABLE_ARRAYS]))
    values = {
        (section, key): value
        for section, options in SCHEMA.items()
        for key, value in _check_section(document, section, options, problems).items()
    }
    grants = _parse_grants(document.get("grant", []), problems)
    certificate_grants = _parse_certificate_grants(document.get("certificate_grant", []), problems)
    online = [values[("online_ca", k)] for k in ("cert", "key", "crl")]
    if any(v is not None for v in online) and any(v is None for v in online):
        problems.append("online_ca: give cert, key and crl together (or none of them)")
    kek_periods, dek_periods, signing_periods = _parse_crypto_periods(
        document.get("crypto_period", []), problems
    )
    _check_hsm_backend(document.get("hsm", {}), values, problems)
    _check_store_backend(document.get("store", {}), values, problems)
    _check_secret_frames(values, problems)
    env = os.environ if environ is None else environ
    for section, key in sorted(_PATH_KEYS):
        if isinstance(values[(section, key)], str):
            try:
                values[(section, key)] = expand_path(values[(section, key)], base, env)
            except ValueError as exc:
                problems.append(f"{section}.{key}: {exc}")
    if problems:
        raise ConfigError(source, problems)

    def v(section: str, key: str) -> Any:
        return values[(section, key)]

    return Config(
        source=source,
        listen=tuple(v("server", "listen")),
        server_name=v("server", "name"),
        limits=ServerLimits(
            **{
                key: v("server", key)
                for key in (
                    "max_frame_size",
                    "max_in_flight",
                    "max_connections",
                    "max_handshaking",
                    "max_handshaking_per_address",
                    "max_connections_per_identity",
                    "max_connections_ungranted",
                    "handshake_timeout",
                    "idle_timeout",
                    "frame_timeout",
                    "send_timeout",
                    "drain_timeout",
                )
            }
        ),
        tls=TlsSettings(
            ca=v("tls", "ca"),
            cert=v("tls", "cert"),
            key=v("tls", "key"),
            crl=v("tls", "crl"),
            trust_domain=v("tls", "trust_domain"),
            allow_tls12=v("tls", "allow_tls12"),
            session_tickets=v("tls", "session_tickets"),
            kmip_tls12=v("kmip", "enabled"),
            online_ca=v("online_ca", "cert"),
            online_ca_crl=v("online_ca", "crl"),
        ),
        kmip=KmipSettings(
            enabled=v("kmip", "enabled"),
            max_message_size=v("kmip", "max_message_size"),
            default_namespace=v("kmip", "default_namespace"),
        ),
        store_path=v("store", "path"),
        store_cache_size=v("store", "cache_size"),
        store_shared=v("store", "shared"),
        hsm_backend=v("hsm", "backend"),
        master_key=v("hsm", "master_key"),
        keyring=v("hsm", "keyring"),
        pkcs11=_pkcs11_settings(values),
        create_kek_on_demand=v("keys", "create_kek_on_demand"),
        policy=Policy(tuple(grants), tuple(certificate_grants)),
        lifecycle=LifecyclePolicy(
            kek_periods=tuple(kek_periods),
            dek_periods=tuple(dek_periods),
            signing_periods=tuple(signing_periods),
            soft_delete_seconds=int(v("lifecycle", "soft_delete_days") * DAY),
            auto_rotate=v("lifecycle", "auto_rotate"),
            change_feed_seconds=int(v("lifecycle", "change_feed_days") * DAY),
        ),
        check_interval=float(v("lifecycle", "check_interval")),
        rewrap_batch=v("lifecycle", "rewrap_batch"),
        rewrap_pause=float(v("lifecycle", "rewrap_pause")),
        audit_path=v("audit", "path"),
        audit_key=v("audit", "key"),
        audit_fail_open_reads=v("audit", "fail_open_reads"),
        audit_read_batch=v("audit", "read_batch_ms") / 1000,
        log_level=v("logging", "level"),
        metrics_listen=v("metrics", "listen") or None,
        require_sealed=tuple(v("transport", "require_sealed")),
        store_backend=v("store", "backend"),
        postgres=_postgres_settings(values),
        secret_max_size=v("secrets", "max_size"),
        online_ca_key=v("online_ca", "key"),
        online_ca_renew_server=v("online_ca", "renew_server"),
        online_ca_renew_at=float(v("online_ca", "renew_at")),
        workers=_resolve_workers(v("server", "workers")),
    )


def _resolve_workers(value: int | str) -> int:
    return min(usable_cores(), MAX_WORKERS) if value == "auto" else int(value)


#: What a set-secret frame carries beside the value: ids, names, content type, a few tags.
SECRET_FRAME_HEADROOM = 8 * 1024


def _check_secret_frames(values: dict[tuple[str, str], Any], problems: list[str]) -> None:
    """A value travels in one frame: secrets.max_size must fit in server.max_frame_size."""
    frame, size = values[("server", "max_frame_size")], values[("secrets", "max_size")]
    if isinstance(frame, int) and isinstance(size, int) and frame < size + SECRET_FRAME_HEADROOM:
        problems.append(
            f"secrets.max_size: a secret of {size} bytes cannot reach the daemon in a frame "
            f"of server.max_frame_size = {frame} bytes: raise server.max_frame_size to at "
            f"least {size + SECRET_FRAME_HEADROOM} (the value and {SECRET_FRAME_HEADROOM} "
            "bytes for its name and attributes), or lower secrets.max_size"
        )


def _check_section(
    document: Mapping[str, Any], section: str, options: dict[str, Option], problems: list[str]
) -> dict[str, Any]:
    """The section's values (defaults filled in); problems are appended, not raised."""
    table = document.get(section, {})
    if not isinstance(table, dict):
        problems.append(f"{section}: must be a table ([{section}])")
        table = {}
    for key in table:
        refusal = _REFUSED_KEYS.get((section, key))
        if refusal is not None:
            problems.append(f"{section}.{key}: {refusal}")
        elif key not in options:
            problems.append(_unknown(f"{section}.{key}", [f"{section}.{k}" for k in options]))
    values: dict[str, Any] = {}
    for key, option in options.items():
        if key not in table:
            if option.default is REQUIRED:
                problems.append(f"{section}.{key}: required")
            values[key] = option.default
            continue
        value = table[key]
        problem = _check_type(value, option.kind)
        if problem is None and option.check is not None:
            problem = option.check(value)
        if problem is not None:
            problems.append(f"{section}.{key}: {problem}")
        values[key] = value
    return values


def _check_hsm_backend(table: Any, values: dict[tuple[str, str], Any], problems: list[str]) -> None:
    """Each backend's keys: the required ones present, the other backend's absent."""
    if not isinstance(table, dict):
        return
    backend = values[("hsm", "backend")]
    if backend not in _BACKEND_KEYS:
        return
    for other, keys in _BACKEND_KEYS.items():
        if other != backend:
            problems.extend(
                f"hsm.{key}: only for backend {other!r}, not {backend!r}"
                for key in keys
                if key in table
            )
    if backend == "software":
        # On PostgreSQL the keyring may live in the store (hsm.keyring absent).
        on_postgres = values[("store", "backend")] == "postgresql"
        problems.extend(
            f"hsm.{key}: required (backend 'software'"
            + (", store backend 'sqlite')" if key == "keyring" else ")")
            for key in ("master_key", "keyring")
            if key not in table and not (key == "keyring" and on_postgres)
        )
        return
    if "library" not in table:
        problems.append(
            "hsm.library: required (backend 'pkcs11'), e.g. a path like "
            "/usr/lib/softhsm/libsofthsm2.so"
        )
    for one, other in (("token_label", "token_serial"), ("pin_file", "pin_credential")):
        if one in table and other in table:
            problems.append(f"hsm.{other}: give hsm.{one} or hsm.{other}, not both")
        elif one not in table and other not in table:
            problems.append(f"hsm.{one}: required (or hsm.{other}) for backend 'pkcs11'")


def _check_store_backend(
    table: Any, values: dict[tuple[str, str], Any], problems: list[str]
) -> None:
    if not isinstance(table, dict):
        return
    backend = values[("store", "backend")]
    if backend not in _STORE_BACKEND_KEYS:
        return
    for other, keys in _STORE_BACKEND_KEYS.items():
        if other != backend:
            problems.extend(
                f"store.{key}: only for backend {other!r}, not {backend!r}"
                for key in keys
                if key in table
            )
    required = "path" if backend == "sqlite" else "conninfo"
    if required not in table:
        problems.append(f"store.{required}: required (backend {backend!r})")
    if "password_file" in table and "password_credential" in table:
        problems.append("store.password_credential: give store.password_file or it, not both")


def _postgres_settings(values: dict[tuple[str, str], Any]) -> PostgresSettings | None:
    if values[("store", "backend")] != "postgresql":
        return None
    return PostgresSettings(
        conninfo=values[("store", "conninfo")],
        password_file=values[("store", "password_file")],
        password_credential=values[("store", "password_credential")],
        pool_size=values[("store", "pool_size")],
        connect_timeout=float(values[("store", "connect_timeout")]),
    )


def _pkcs11_settings(values: dict[tuple[str, str], Any]) -> Pkcs11Settings | None:
    if values[("hsm", "backend")] != "pkcs11":
        return None
    return Pkcs11Settings(
        library=Path(values[("hsm", "library")]),
        token_label=values[("hsm", "token_label")],
        token_serial=values[("hsm", "token_serial")],
        pin_file=values[("hsm", "pin_file")],
        pin_credential=values[("hsm", "pin_credential")],
        label_prefix=values[("hsm", "label_prefix")],
        sessions=values[("hsm", "sessions")],
        timeout=float(values[("hsm", "timeout")]),
        retry_interval=float(values[("hsm", "retry_interval")]),
    )


def _check_type(value: Any, kind: type | tuple[type, ...]) -> str | None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # TOML booleans are not integers here, whatever Python thinks.
    if isinstance(value, bool) and bool not in kinds:
        return f"expected {_kind_name(kinds)}, got a boolean"
    if not isinstance(value, kinds):
        return f"expected {_kind_name(kinds)}, got {_kind_name((type(value),))}"
    return None


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {
        str: "text",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _unknown(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{name}: unknown key{hint}"


def _parse_grants(raw: Any, problems: list[str]) -> list[Grant]:
    if not isinstance(raw, list):
        problems.append("grant: must be an array of tables ([[grant]])")
        return []
    grants = []
    for index, entry in enumerate(raw):
        where = f"grant[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a table")
            continue
        for key in entry:
            if key not in GRANT_KEYS:
                problems.append(_unknown(f"{where}.{key}", [f"{where}.{k}" for k in GRANT_KEYS]))
        identity = entry.get("identity")
        if not isinstance(identity, str) or not identity:
            problems.append(f"{where}.identity: required, a SPIFFE ID or glob (spiffe://td/name)")
            continue
        namespaces = entry.get("namespaces")
        if (
            not isinstance(namespaces, list)
            or not namespaces
            or not all(isinstance(n, str) and _namespace_glob_ok(n) for n in namespaces)
        ):
            problems.append(f"{where}.namespaces: required, a list of namespace names or globs")
            continue
        operations = entry.get("operations")
        if not isinstance(operations, list) or not all(isinstance(o, str) for o in operations):
            problems.append(f"{where}.operations: required, a list of operation names")
            continue
        try:
            grants.append(Grant(identity, tuple(namespaces), expand_operations(operations)))
        except PolicyError as exc:
            problems.append(f"{where}.operations: {exc}")
    return grants


def _parse_certificate_grants(raw: Any, problems: list[str]) -> list[CertificateGrant]:
    if not isinstance(raw, list):
        problems.append("certificate_grant: must be an array of tables ([[certificate_grant]])")
        return []
    grants = []
    for index, entry in enumerate(raw):
        where = f"certificate_grant[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a table")
            continue
        for key in entry:
            if key not in CERTIFICATE_GRANT_KEYS:
                known = [f"{where}.{k}" for k in CERTIFICATE_GRANT_KEYS]
                problems.append(_unknown(f"{where}.{key}", known))
        identity = entry.get("identity")
        client = entry.get("client", True)
        dns = entry.get("server_dns", [])
        days = entry.get("max_validity_days", DEFAULT_MAX_VALIDITY_DAYS)
        key_types = entry.get("key_types", list(CERTIFICATE_KEY_TYPES))
        before = len(problems)
        uris, ips = _managed_bounds(entry, where, problems)
        if not isinstance(identity, str) or not identity:
            problems.append(f"{where}.identity: required, a SPIFFE ID or glob (spiffe://td/name)")
        if not isinstance(client, bool):
            problems.append(f"{where}.client: must be true or false")
        if not isinstance(dns, list) or not all(
            isinstance(d, str) and _DNS_GLOB.fullmatch(d) for d in dns
        ):
            problems.append(
                f'{where}.server_dns: a list of DNS names or globs (e.g. "*.storage.example")'
            )
        if isinstance(days, bool) or not isinstance(days, int | float) or not 0 < days <= 3650:
            problems.append(f"{where}.max_validity_days: a number of days in (0, 3650]")
        if (
            not isinstance(key_types, list)
            or not key_types
            or not all(k in CERTIFICATE_KEY_TYPES for k in key_types)
        ):
            problems.append(
                f"{where}.key_types: a non-empty list of {', '.join(CERTIFICATE_KEY_TYPES)}"
            )
        if len(problems) == before and isinstance(identity, str):
            grants.append(
                CertificateGrant(
                    identity,
                    client,
                    tuple(dns),
                    float(days),
                    tuple(key_types),
                    tuple(uris),
                    tuple(ips),
                )
            )
    return grants


def _managed_bounds(
    entry: dict[str, Any], where: str, problems: list[str]
) -> tuple[list[str], list[str]]:
    """A certificate grant's uris and ips: what managed certificates may name beyond DNS."""
    uris, ips = entry.get("uris", []), entry.get("ips", [])
    if not isinstance(uris, list) or not all(isinstance(u, str) and u for u in uris):
        problems.append(f'{where}.uris: a list of URIs or globs (e.g. "spiffe://td/web/*")')
        uris = []
    if not isinstance(ips, list) or not all(_is_network(n) for n in ips):
        problems.append(f'{where}.ips: a list of IP networks (e.g. "10.0.0.0/8", "::1")')
        ips = []
    return uris, ips


def _is_network(text: object) -> bool:
    if not isinstance(text, str):
        return False
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


#: DNS names and globs a certificate grant may name (a label may be "*").
_DNS_GLOB = re.compile(
    r"(?:\*|[A-Za-z0-9_*](?:[A-Za-z0-9_*-]{0,61}[A-Za-z0-9_*])?)"
    r"(?:\.[A-Za-z0-9_*](?:[A-Za-z0-9_*-]{0,61}[A-Za-z0-9_*])?)*"
)
_TABLE_ARRAYS = ("grant", "crypto_period", "certificate_grant")


CRYPTO_PERIOD_KEYS = {"applies_to", "namespaces", "protect_days", "process_days"}


def _parse_crypto_periods(
    raw: Any, problems: list[str]
) -> tuple[list[CryptoPeriod], list[CryptoPeriod], list[CryptoPeriod]]:
    """[[crypto_period]] tables: the first whose namespaces match a new key's applies.

    Per kind: KEKs, DEKs, and signing keys (protect_days: how long the private half
    signs; process_days: how long its signatures verify)."""
    periods: dict[str, list[CryptoPeriod]] = {"kek": [], "dek": [], "signing-key": []}
    if not isinstance(raw, list):
        problems.append("crypto_period: must be an array of tables ([[crypto_period]])")
        return [], [], []
    for index, entry in enumerate(raw):
        where = f"crypto_period[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a table")
            continue
        for key in entry:
            if key not in CRYPTO_PERIOD_KEYS:
                problems.append(
                    _unknown(f"{where}.{key}", [f"{where}.{k}" for k in CRYPTO_PERIOD_KEYS])
                )
        kind = entry.get("applies_to", "kek")
        if kind not in periods:
            problems.append(f"{where}.applies_to: must be kek, dek or signing-key")
            continue
        namespaces = entry.get("namespaces", ["*"])
        if not isinstance(namespaces, list) or not all(
            isinstance(n, str) and _namespace_glob_ok(n) for n in namespaces
        ):
            problems.append(f"{where}.namespaces: a list of namespace names or globs")
            continue
        days = {}
        for key in ("protect_days", "process_days"):
            value = entry.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
            ):
                problems.append(f"{where}.{key}: must be a positive number of days")
                value = None
            days[key] = value
        protect, process = days["protect_days"], days["process_days"]
        if protect is not None and process is not None and process < protect:
            problems.append(
                f"{where}.process_days: must be at least protect_days (a key "
                "processes what it protected)"
            )
            continue
        periods[kind].append(CryptoPeriod(tuple(namespaces), protect, process))
    return periods["kek"], periods["dek"], periods["signing-key"]


def _namespace_glob_ok(pattern: str) -> bool:
    """A glob is fine if replacing its wildcards yields a valid namespace name."""
    sample = pattern.replace("*", "x").replace("?", "x")
    return "[" not in pattern and NAMESPACE_PATTERN.fullmatch(sample) is not None


def render_config(values: Mapping[str, Mapping[str, Any]], grants: list[Mapping[str, Any]]) -> str:
    """Write a config file (for --dev), in the same shape load_config reads."""
    lines: list[str] = []
    for section, table in values.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    for grant in grants:
        lines.append("[[grant]]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in grant.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
