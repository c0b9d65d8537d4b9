"""``kmipd audit verify|query``: the audit trail's files, read without a daemon."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kmipd.audit import AuditError
from kmipd.audit import query as audit_query
from kmipd.audit import verify as audit_verify
from kmipd.cli._common import CliError, Commands, parse_datetime


def register(commands: Commands) -> None:
    audit = commands.add_parser("audit", help="the audit trail").add_subparsers(metavar="ACTION")
    check = audit.add_parser("verify", help="check the hash chain; exit 1 if it was tampered with")
    check.add_argument(
        "files", type=Path, nargs="+", metavar="FILE", help="the trail; rotated files oldest first"
    )
    check.add_argument(
        "--partial",
        action="store_true",
        help="the first file may start mid-chain (the rotated files before it are gone)",
    )
    check.set_defaults(handler=_audit_verify)
    ask = audit.add_parser(
        "query", help="who received which keys (successful deliveries, unless --all)"
    )
    ask.add_argument("files", type=Path, nargs="+", metavar="FILE", help="the trail's files")
    ask.add_argument("--identity", help="spiffe://... of the client")
    ask.add_argument("--dek", dest="dek_id", help="a DEK id")
    ask.add_argument("--since", type=parse_datetime, metavar="WHEN", help="ISO 8601 or epoch")
    ask.add_argument("--until", type=parse_datetime, metavar="WHEN", help="ISO 8601 or epoch")
    ask.add_argument("--all", action="store_true", help="every record, not just deliveries")
    ask.set_defaults(handler=_audit_query)


def _audit_verify(args: argparse.Namespace) -> int:
    report = audit_verify(*args.files, partial=args.partial)
    trail = " + ".join(str(path) for path in args.files)
    for where in report.torn:
        # Not tampering: a write cut off by a crash or a full disk; the daemon went on
        # after it on a new line, and the chain around it is checked as usual.
        print(f"{trail}: {where}: torn record (an incomplete write), not part of the chain")
    if report.ok:
        start = f" from seq {report.first_seq}" if (report.first_seq or 1) > 1 else ""
        print(
            f"{trail}: {report.records} records{start}, chain intact; last hash {report.last_hash}"
        )
        return 0
    print(f"{trail}: TAMPERED: {report.problem} ({report.records} records verified before)")
    return 1


def _audit_query(args: argparse.Namespace) -> int:
    try:
        found = [
            record
            for path in args.files
            for record in audit_query(
                path,
                identity=args.identity,
                dek_id=args.dek_id,
                since=args.since,
                until=args.until,
                delivered_only=not args.all,
            )
        ]
    except AuditError as exc:
        raise CliError(str(exc)) from None
    for record in found:
        print(json.dumps(record, sort_keys=True))
    return 0
