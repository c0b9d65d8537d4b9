"""``kmipd audit verify|query``: the audit trail's files, read without a daemon."""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from kmipd.audit import AuditError, worker_trails
from kmipd.audit import query as audit_query
from kmipd.audit import verify as audit_verify
from kmipd.cli._common import CliError, Commands, parse_datetime

WORKERS_HELP = (
    "FILE is audit.path of a daemon with server.workers > 1: take every worker's trail "
    "beside it (audit-w0.log, audit-w1.log, ...); verify checks each chain, query merges "
    "them by time"
)


def _worker_trails(files: list[Path]) -> list[Path]:
    trails = [trail for path in files for trail in worker_trails(path)]
    if not trails:
        names = ", ".join(str(path) for path in files)
        raise CliError(f"--workers: no worker trails beside {names} (audit-w0.log, ...)")
    return trails


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
    check.add_argument("--workers", action="store_true", help=WORKERS_HELP)
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
    ask.add_argument("--workers", action="store_true", help=WORKERS_HELP)
    ask.set_defaults(handler=_audit_query)


def _audit_verify(args: argparse.Namespace) -> int:
    if args.workers:
        # One chain per worker: each checked on its own, all of them must be intact.
        codes = [_verify_chain([trail], args.partial) for trail in _worker_trails(args.files)]
        return max(codes)
    return _verify_chain(args.files, args.partial)


def _verify_chain(files: list[Path], partial: bool) -> int:
    report = audit_verify(*files, partial=partial)
    trail = " + ".join(str(path) for path in files)
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
    files = _worker_trails(args.files) if args.workers else args.files
    try:
        found = [
            record
            for path in files
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
    if args.workers:  # the workers' chains interleave in time
        found.sort(key=lambda record: datetime.datetime.fromisoformat(str(record.get("time"))))
    for record in found:
        print(json.dumps(record, sort_keys=True))
    return 0
