"""``python -m conformance``: run the suite against a server, or against a local one.

Exit status: 0 when no case failed (skips and informational results do
not fail a run), 1 when any case failed, 2 when the suite could not run
(bad options, server unreachable, client refused at preflight).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from conformance._case import GROUPS, Case, Result, Verdict, all_cases, select_cases
from conformance._certs import Credentials
from conformance._context import Options, Run, Target
from conformance._report import (
    CASES_MD,
    format_result,
    json_report,
    render_cases_markdown,
    write_json,
    write_summary,
)
from conformance._runner import SuiteError, run_cases
from conformance._selftest import SelfTestError, SelfTestServer


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.write_cases is not None:
        path = Path(args.write_cases) if args.write_cases else CASES_MD
        path.write_text(render_cases_markdown(all_cases()), encoding="utf-8")
        print(f"wrote {path}")
        return 0
    try:
        cases = select_cases(all_cases(), [n for o in args.only for n in o.split(",")])
    except ValueError as exc:
        parser.error(str(exc))
    if args.list:
        for case in cases:
            print(f"{case.id:<10} {case.group:<9} {case.title}")
        return 0
    options = _options(args)
    if args.self_test:
        return _self_test(cases, options, args.json)
    target = _target(parser, args)
    with tempfile.TemporaryDirectory(prefix="kmipd-conformance-") as scratch:
        return _run(Run(target, options, scratch=Path(scratch)), cases, args.json)


def _run(run: Run, cases: list[Case], json_path: Path | None) -> int:
    started = datetime.datetime.now(datetime.UTC)
    print(f"kmipd conformance suite: {len(cases)} case(s) against {run.target.address}")
    try:
        results = run_cases(run, cases, report=_print_result)
    except SuiteError as exc:
        print(f"conformance: cannot run: {exc}", file=sys.stderr)
        return 2
    write_summary(results, sys.stdout)
    if json_path is not None:
        write_json(
            json_path,
            json_report(
                results,
                {
                    "server": run.target.address,
                    "identity": run.identity,
                    "protocol_version": run.hello.get("version"),
                    "started": started.isoformat(),
                    "options": {
                        "fuzz_examples": run.options.fuzz_examples,
                        "fuzz_seed": run.options.fuzz_seed,
                        "garbage_frames": run.options.garbage_frames,
                    },
                },
            ),
        )
        print(f"JSON report: {json_path}")
    return 1 if any(r.verdict is Verdict.FAIL for r in results) else 0


def _print_result(result: Result) -> None:
    print(format_result(result), flush=True)


def _self_test(cases: list[Case], options: Options, json_path: Path | None) -> int:
    with tempfile.TemporaryDirectory(prefix="kmipd-conformance-") as scratch:
        try:
            server = SelfTestServer(Path(scratch) / "dev")
        except SelfTestError as exc:
            print(f"conformance: {exc}", file=sys.stderr)
            return 2
        print(f"self-test: kmipd serve --dev listening on {server.address}")
        try:
            status = _run(
                Run(server.target(), options, scratch=Path(scratch), self_test=server),
                cases,
                json_path,
            )
        finally:
            try:
                code = server.stop()
            except SelfTestError as exc:
                print(f"conformance: {exc}", file=sys.stderr)
                return 1
        if code != 0:
            print(
                f"conformance: kmipd exited with status {code} on SIGTERM (expected 0):\n"
                f"{server.log_tail()}",
                file=sys.stderr,
            )
            return 1
        print("self-test: kmipd stopped cleanly on SIGTERM")
        return status


def _options(args: argparse.Namespace) -> Options:
    return Options(
        timeout=args.timeout,
        frame_timeout=args.frame_timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        max_wait=args.max_wait,
        garbage_frames=args.garbage_frames,
        fuzz_examples=args.fuzz_examples,
        fuzz_seed=args.fuzz_seed,
        sslyze_venv=args.sslyze_venv,
        sslyze_install=not args.no_sslyze_install,
    )


def _target(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Target:
    missing = [f"--{name}" for name in ("server", "ca", "cert", "key") if not getattr(args, name)]
    if missing:
        parser.error(f"missing {', '.join(missing)} (or use --self-test)")
    host, port = _parse_address(parser, args.server)
    return Target(
        host=host,
        port=port,
        ca=args.ca,
        client=Credentials(args.cert, args.key),
        admin=_pair(parser, args, "admin_cert", "admin_key"),
        ca_key=args.ca_key,
        ca_dir=args.ca_dir,
        other_ca=_pair(parser, args, "other_ca_cert", "other_ca_key"),
        revoked=_pair(parser, args, "revoked_cert", "revoked_key"),
    )


def _pair(
    parser: argparse.ArgumentParser, args: argparse.Namespace, cert: str, key: str
) -> Credentials | None:
    cert_path, key_path = getattr(args, cert), getattr(args, key)
    if (cert_path is None) != (key_path is None):
        parser.error(f"--{cert.replace('_', '-')} and --{key.replace('_', '-')} go together")
    return None if cert_path is None else Credentials(cert_path, key_path)


def _parse_address(parser: argparse.ArgumentParser, text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        parser.error(f"--server {text!r}: expected HOST:PORT ([IPv6]:PORT)")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Black-box conformance and hostile-input suite for a kmipd server.",
    )
    target = parser.add_argument_group("the server and the client's credentials")
    target.add_argument("--server", metavar="HOST:PORT")
    target.add_argument("--ca", type=Path, help="CA certificate the server's certificate chains to")
    target.add_argument("--cert", type=Path, help="client certificate (data operations, not admin)")
    target.add_argument("--key", type=Path, help="its private key")
    target.add_argument("--admin-cert", type=Path, help="an administrator's certificate")
    target.add_argument("--admin-key", type=Path)
    target.add_argument(
        "--ca-key",
        type=Path,
        help="the CA's private key: lets the suite make expired, wrong-usage and "
        "foreign-domain client certificates (never written anywhere)",
    )
    target.add_argument(
        "--ca-dir",
        type=Path,
        help="the kmipd pki directory whose CRL the server reads: the suite also issues "
        "and revokes a certificate there",
    )
    target.add_argument("--other-ca-cert", type=Path, help="a CA the server does not trust")
    target.add_argument("--other-ca-key", type=Path)
    target.add_argument("--revoked-cert", type=Path, help="a client certificate on the CRL")
    target.add_argument("--revoked-key", type=Path)
    target.add_argument(
        "--self-test",
        action="store_true",
        help="start a local kmipd serve --dev, run every case against it, stop it",
    )

    run = parser.add_argument_group("what to run and how")
    run.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GROUP",
        help=f"a group ({', '.join(GROUPS)}), an id prefix or a case id; repeatable",
    )
    run.add_argument("--json", type=Path, metavar="REPORT.json", help="also write a JSON report")
    run.add_argument("--list", action="store_true", help="list the cases and exit")
    run.add_argument(
        "--write-cases",
        nargs="?",
        const="",
        metavar="PATH",
        help="write CASES.md (default: the package's) and exit",
    )
    run.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a response")
    run.add_argument(
        "--frame-timeout", type=float, default=30.0, help="the server's frame timeout (30)"
    )
    run.add_argument(
        "--idle-timeout", type=float, default=300.0, help="the server's idle timeout (300)"
    )
    run.add_argument(
        "--max-connections", type=int, default=1024, help="the server's connection limit (1024)"
    )
    run.add_argument(
        "--max-wait",
        type=float,
        default=60.0,
        help="skip cases that must wait longer than this for a server timeout (60)",
    )
    run.add_argument(
        "--garbage-frames", type=int, default=1000, help="frames in the garbage flood (1000)"
    )
    run.add_argument(
        "--fuzz-examples", type=int, default=150, help="Hypothesis examples per fuzz case (150)"
    )
    run.add_argument("--fuzz-seed", type=int, help="Hypothesis seed (default: random, reported)")
    run.add_argument(
        "--sslyze-venv",
        type=Path,
        help="virtual environment for sslyze (default: a per-user cache directory)",
    )
    run.add_argument(
        "--no-sslyze-install",
        action="store_true",
        help="never install sslyze; skip its group when the environment lacks it",
    )
    return parser
