"""The ``kmipd`` command: the top-level parser and the dispatch to a command group's handler.

Exit status: 0 on success, 1 when the operation failed (the message says
why on stderr), 2 for a usage error.

Each command group is a module of this package with ``register(commands)``,
which adds its commands, their arguments and their handlers; a new group is
one such module and one entry in ``GROUPS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kmipd import client as km
from kmipd.audit import AuditError
from kmipd.cli import (
    _admin,
    _audit,
    _ca,
    _cert,
    _demo,
    _envelope,
    _hsm,
    _keys,
    _pki,
    _secret,
    _serve,
    _sign_key,
    _transport,
)
from kmipd.cli._common import CliError, Commands
from kmipd.daemon._backup import BackupError
from kmipd.daemon._systemd import SystemdError
from kmipd.daemon.config import ConfigError
from kmipd.hsm import HsmError
from kmipd.server import TlsConfigError
from kmipd.store import StoreError
from pki import PkiError

#: Every command group, in ``kmipd --help`` order.
GROUPS: tuple[Callable[[Commands], None], ...] = (
    _serve.register,  # serve
    _demo.register,  # demo
    _pki.register,  # pki
    _ca.register,  # ca
    _cert.register,  # cert
    _hsm.register,  # hsm
    _keys.register,  # dek, datakey, kek, status, key, job
    _secret.register,  # secret
    _sign_key.register,  # sign-key
    _audit.register,  # audit
    _envelope.register,  # encrypt, decrypt, seal, open
    _transport.register,  # transport
    _admin.register,  # check-config, backup, restore
)

#: Failures a user can act on: one line on stderr, exit status 1 (anything else is a bug).
_USER_ERRORS = (
    CliError,
    km.KmipdError,
    ConfigError,
    PkiError,
    HsmError,
    StoreError,
    TlsConfigError,
    SystemdError,
    BackupError,
    AuditError,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except _USER_ERRORS as exc:
        print(f"kmipd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmipd",
        description="Key manager daemon for storage systems: mutual-TLS DEK delivery, "
        "KEKs held by an HSM backend.",
    )
    commands = parser.add_subparsers(metavar="COMMAND")
    for register in GROUPS:
        register(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
