"""Operator commands: ``kmipd check-config``, ``kmipd backup``, ``kmipd restore``.

They work on a config file, not on a running daemon's protocol, and are
what an operator runs around ``systemctl``: before a start or a reload,
from a backup timer, after a disk loss.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kmipd.cli._common import Commands
from kmipd.daemon._backup import create_backup, restore_backup
from kmipd.daemon._checks import check_config
from kmipd.daemon.config import ConfigError, load_config


def register(commands: Commands) -> None:
    check = commands.add_parser(
        "check-config",
        help="check a config and everything it points at; list every problem",
        description="Checks the file's syntax, then what it points at: files readable, "
        "private files private, the server certificate matching its key and chaining to "
        "the CA, the CRL signed and fresh, the HSM material opening, grants able to match "
        "the trust domain. Exit status 1 if anything is wrong, with every problem listed.",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.set_defaults(handler=_check_config)

    backup = commands.add_parser(
        "backup",
        help="write the key store and the HSM keyring to one archive (no plaintext keys)",
        description="Safe while the daemon runs. The archive holds wrapped keys and the "
        "keyring sealed under the master key; the master key itself is never in it: "
        "back it up once, separately.",
    )
    backup.add_argument("--config", type=Path, required=True, help="the daemon's config file")
    backup.add_argument("output", type=Path, metavar="ARCHIVE")
    backup.add_argument("--force", action="store_true", help="replace an existing archive")
    backup.set_defaults(handler=_backup)

    restore = commands.add_parser(
        "restore",
        help="put a backup archive back in place (the daemon must be stopped)",
        description="Checks the archive (checksums, store integrity, the keyring opening "
        "with the configured master key) before changing anything; files it replaces are "
        "moved aside, not deleted.",
    )
    restore.add_argument("--config", type=Path, required=True, help="the daemon's config file")
    restore.add_argument("archive", type=Path, metavar="ARCHIVE")
    restore.add_argument(
        "--force", action="store_true", help="replace an existing store and keyring"
    )
    restore.set_defaults(handler=_restore)


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        _print_problems(args.file, exc.problems)
        return 1
    report = check_config(config)
    for warning in report.warnings:
        print(f"warning: {warning}")
    if report.problems:
        _print_problems(args.file, report.problems)
        return 1
    print(f"{args.file}: OK")
    return 0


def _print_problems(path: Path, problems: list[str]) -> None:
    print(f"{path}: {len(problems)} problem(s)")
    for problem in problems:
        print(f"  {problem}")


def _backup(args: argparse.Namespace) -> int:
    summary = create_backup(load_config(args.config), args.output, force=args.force)
    keyring = (
        f", keyring with {summary.keyring_keks} sealed KEK(s)"
        if summary.keyring_keks is not None
        else ""
    )
    print(
        f"backup written: {summary.path} (store {summary.store_id}: {summary.deks} DEK(s), "
        f"{summary.secret_versions} secret version(s), "
        f"{summary.kek_versions} KEK version(s){keyring})"
    )
    print("the master key is not in it: it must be backed up separately")
    return 0


def _restore(args: argparse.Namespace) -> int:
    summary = restore_backup(load_config(args.config), args.archive, force=args.force)
    print(
        f"restored store {summary.store_id}: {summary.deks} DEK(s), "
        f"{summary.secret_versions} secret version(s), "
        f"{summary.kek_versions} KEK version(s)"
    )
    for path in summary.moved_aside:
        print(f"  the previous {path.name.split('.before-restore-')[0]} is kept as {path}")
    return 0
