"""The ``kmipd`` command: the daemon, the test CA, client calls and the demo.

Exit status: 0 on success, 1 when the operation failed (the message says
why on stderr), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmipd import client as km
from kmipd.audit import AuditError
from kmipd.audit import query as audit_query
from kmipd.audit import verify as audit_verify
from kmipd.cli._admin import add_operations_commands
from kmipd.cli._demo import run_demo
from kmipd.cli._hsm import init_kek, list_token_objects
from kmipd.crypto import DEFAULT_CHUNK_SIZE as SEALED_CHUNK_SIZE
from kmipd.crypto import (
    SealedEnvelopeError,
    certificate_fingerprint,
    transport_kem,
)
from kmipd.crypto import open_stream as open_sealed_stream
from kmipd.crypto._chunked_aead import DEFAULT_CHUNK_SIZE, Readable
from kmipd.daemon import RunningDaemon, run_daemon
from kmipd.daemon._backup import BackupError
from kmipd.daemon._dev import client_command, prepare_dev
from kmipd.daemon._logging import configure_logging
from kmipd.daemon._systemd import ServiceManager, SystemdError
from kmipd.daemon.config import ConfigError, load_config
from kmipd.hsm import HsmError, create_master_key
from kmipd.lifecycle import RevocationReason, State
from kmipd.server import TlsConfigError
from kmipd.service import ServiceError
from kmipd.store import StoreError
from pki import (
    SERVER_VALIDITY_DAYS,
    TRANSPORT_SUFFIX,
    CertificateAuthority,
    KeyType,
    PkiError,
    TransportKem,
)

DEFAULT_DEV_DIR = Path("kmipd-dev")
DEFAULT_DEV_LISTEN = "127.0.0.1:5696"


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except (
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
    ) as exc:
        print(f"kmipd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -- parser ----------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmipd",
        description="Key manager daemon for storage systems: mutual-TLS DEK delivery, "
        "KEKs held by an HSM backend.",
    )
    commands = parser.add_subparsers(metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    mode = serve.add_mutually_exclusive_group(required=True)
    mode.add_argument("--config", type=Path, help="TOML config file")
    mode.add_argument(
        "--dev",
        action="store_true",
        help="self-contained development server (test CA, software HSM)",
    )
    serve.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DEV_DIR,
        help="--dev: data directory (default ./kmipd-dev)",
    )
    serve.add_argument(
        "--listen",
        default=DEFAULT_DEV_LISTEN,
        help="--dev: HOST:PORT to listen on (default 127.0.0.1:5696)",
    )
    serve.set_defaults(handler=_serve)

    demo = commands.add_parser("demo", help="walk the DEK delivery flow step by step")
    demo.set_defaults(handler=_demo)

    _add_pki_commands(commands)
    _add_hsm_commands(commands)
    dek_actions, kek_actions = _add_client_commands(commands)
    _add_lifecycle_commands(commands, dek_actions, kek_actions)
    _add_audit_commands(commands)
    _add_envelope_commands(commands)
    add_operations_commands(commands)
    return parser


def _add_pki_commands(commands: Any) -> None:
    pki = commands.add_parser("pki", help="the built-in test CA").add_subparsers(metavar="ACTION")
    init = pki.add_parser("init", help="create a CA, a server certificate and an empty CRL")
    init.add_argument("directory", type=Path)
    init.add_argument("--trust-domain", default="kmipd.test")
    init.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="server DNS name (repeatable; default localhost)",
    )
    init.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="server IP address (repeatable; default 127.0.0.1)",
    )
    init.add_argument("--rsa", action="store_true", help="RSA-3072 instead of ECDSA P-256")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(handler=_pki_init)

    issue = pki.add_parser("issue", help="issue a client certificate for NAME")
    issue.add_argument("directory", type=Path)
    issue.add_argument("name")
    issue.add_argument("--days", type=int, default=365)
    issue.add_argument("--force", action="store_true", help="replace an existing certificate")
    issue.set_defaults(handler=_pki_issue)

    revoke = pki.add_parser(
        "revoke", help="add NAME's certificate (and its key-transport certificate) to the CRL"
    )
    revoke.add_argument("directory", type=Path)
    revoke.add_argument("name")
    revoke.add_argument(
        "--reason", default="unspecified", choices=[r.name for r in x509.ReasonFlags]
    )
    revoke.add_argument(
        "--keep-transport",
        action="store_true",
        help="revoke only the TLS certificate, not NAME-transport (e.g. one superseded by a "
        "re-issue on the same host)",
    )
    revoke.set_defaults(handler=_pki_revoke)

    renew = pki.add_parser(
        "renew-server", help="re-issue the server certificate for the same names (new key)"
    )
    renew.add_argument("directory", type=Path)
    renew.add_argument("--days", type=int, default=SERVER_VALIDITY_DAYS)
    renew.set_defaults(handler=_pki_renew_server)

    transport = pki.add_parser(
        "issue-transport",
        help="issue NAME's key-transport certificate (receives sealed keys; never TLS)",
    )
    transport.add_argument("directory", type=Path)
    transport.add_argument("name")
    transport.add_argument(
        "--kem",
        default=TransportKem.X25519.value,
        choices=[kem.value for kem in TransportKem],
        help="key type (default x25519; mlkem768-x25519 is the post-quantum hybrid)",
    )
    transport.add_argument("--days", type=int, default=365)
    transport.add_argument("--force", action="store_true", help="replace an existing one")
    transport.set_defaults(handler=_pki_issue_transport)

    crl = pki.add_parser("crl", help="re-sign the CRL (do it before it expires)")
    crl.add_argument("directory", type=Path)
    crl.add_argument("--days", type=int, default=365, help="validity of the new CRL")
    crl.set_defaults(handler=_pki_crl)


def _add_hsm_commands(commands: Any) -> None:
    hsm = commands.add_parser("hsm", help="HSM backends").add_subparsers(metavar="ACTION")
    soft = hsm.add_parser("software-init", help="create the software backend's master key")
    soft.add_argument("--master-key", type=Path, required=True)
    soft.set_defaults(handler=_hsm_software_init)
    init = hsm.add_parser(
        "init",
        help="create a namespace's KEK (version 1) in the configured HSM; daemon stopped",
        description="Logs in to the HSM of the config, creates KEK NAME version 1 as the "
        "create-kek operation does (audited), checks that it wraps and unwraps, and prints "
        "it (PKCS#11: the token object and its attributes). Takes the store's lock: stop "
        "the daemon first.",
    )
    init.add_argument("--config", type=Path, required=True, help="the daemon's config file")
    init.add_argument("name", metavar="NAME", help="the namespace (KEK name)")
    init.set_defaults(handler=_hsm_init)
    listing = hsm.add_parser(
        "list", help="kmipd's KEK objects on the PKCS#11 token and their attributes"
    )
    listing.add_argument("--config", type=Path, required=True, help="the daemon's config file")
    listing.set_defaults(handler=_hsm_list)


def _client_options() -> argparse.ArgumentParser:
    """--server/--ca/--cert/--key, each defaulting to a KMIPD_* environment variable."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "connection (or KMIPD_SERVER, KMIPD_CA, KMIPD_CERT, KMIPD_KEY)"
    )
    for flag, env, what in (
        ("--server", "KMIPD_SERVER", "HOST:PORT of the daemon (several: comma-separated)"),
        ("--ca", "KMIPD_CA", "CA certificate (PEM)"),
        ("--cert", "KMIPD_CERT", "client certificate (PEM)"),
        ("--key", "KMIPD_KEY", "client private key (PEM)"),
    ):
        group.add_argument(flag, default=os.environ.get(env), help=what)
    group.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    transport = parent.add_argument_group(
        "sealed delivery (or KMIPD_TRANSPORT_CERT, KMIPD_TRANSPORT_KEY): keys come sealed "
        "to this key-transport key (HPKE) instead of in the clear inside TLS"
    )
    for flag, env, what in (
        ("--transport-cert", "KMIPD_TRANSPORT_CERT", "key-transport certificate (PEM)"),
        ("--transport-key", "KMIPD_TRANSPORT_KEY", "key-transport private key (PEM)"),
    ):
        transport.add_argument(flag, type=Path, default=os.environ.get(env), help=what)
    return parent


def _add_client_commands(commands: Any) -> tuple[Any, Any]:
    common = _client_options()
    reveal = argparse.ArgumentParser(add_help=False)
    reveal.add_argument(
        "--reveal",
        action="store_true",
        help="print the key itself (hex); otherwise only its metadata",
    )

    dek = commands.add_parser("dek", help="stored DEKs").add_subparsers(metavar="ACTION")
    create = dek.add_parser("create", parents=[common, reveal], help="create a DEK")
    create.add_argument("--namespace", required=True)
    create.set_defaults(handler=_client_call(lambda c, a: c.create_dek(a.namespace)))
    get = dek.add_parser("get", parents=[common, reveal], help="fetch a DEK by id")
    get.add_argument("dek_id", metavar="ID")
    get.set_defaults(handler=_client_call(lambda c, a: c.get_dek(a.dek_id)))

    datakey = commands.add_parser("datakey", help="stateless data keys (caller keeps the blob)")
    actions = datakey.add_subparsers(metavar="ACTION")
    generate = actions.add_parser(
        "generate", parents=[common, reveal], help="new key + wrapped blob"
    )
    generate.add_argument("--kek", required=True)
    generate.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    generate.set_defaults(
        handler=_client_call(lambda c, a: c.generate_data_key(a.kek, _parse_context(a.context)))
    )
    unwrap = actions.add_parser("unwrap", parents=[common, reveal], help="recover a blob's key")
    unwrap.add_argument("blob", help="the blob, base64")
    unwrap.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    unwrap.set_defaults(
        handler=_client_call(lambda c, a: c.unwrap(_parse_blob(a.blob), _parse_context(a.context)))
    )

    kek = commands.add_parser("kek", help="KEK administration").add_subparsers(metavar="ACTION")
    kek_create = kek.add_parser("create", parents=[common], help="create a namespace's KEK")
    kek_create.add_argument("name")
    kek_create.add_argument(
        "--usage",
        action="append",
        choices=["wrap", "unwrap"],
        help="limit the KEK to one usage (repeatable; default both)",
    )
    kek_create.add_argument(
        "--activation",
        type=_timestamp,
        metavar="WHEN",
        help="activate later (ISO 8601 or epoch seconds): pre-active until",
    )
    kek_create.set_defaults(
        handler=_client_call(
            lambda c, a: c.create_kek(a.name, usage=a.usage, activation=a.activation)
        )
    )
    kek_list = kek.add_parser("list", parents=[common], help="list KEKs")
    kek_list.add_argument("--prefix")
    kek_list.set_defaults(handler=_client_call(lambda c, a: c.list_keks(a.prefix)))

    status = commands.add_parser("status", parents=[common], help="server health")
    status.set_defaults(handler=_client_call(lambda c, a: c.status()))
    return dek, kek


def _key_ref(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "dek_id", None) is not None:
        return {"dek_id": args.dek_id}
    return {"kek": args.name, "version": args.version}


def _add_state_commands(group: Any, target: str, common: argparse.ArgumentParser) -> None:
    """revoke, destroy, recover, activate, attributes for DEKs ("dek") or KEK versions."""

    def add(action: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(action, parents=[common], help=help_text)
        if target == "dek":
            parser.add_argument("dek_id", metavar="ID")
        else:
            parser.add_argument("name")
            parser.add_argument("--version", type=int, required=True)
        return parser

    revoke = add("revoke", "revoke: key-compromise compromises, other reasons deactivate")
    revoke.add_argument("--reason", required=True, choices=[r.value for r in RevocationReason])
    revoke.add_argument("--message")
    revoke.set_defaults(
        handler=_client_call(lambda c, a: c.revoke(a.reason, message=a.message, **_key_ref(a)))
    )
    destroy = add("destroy", "destroy (recoverable during the soft-delete window)")
    destroy.add_argument(
        "--purge-now", action="store_true", help="erase the material now, beyond recovery"
    )
    if target == "kek":
        destroy.add_argument(
            "--force", action="store_true", help="even if DEKs still depend on it (they are lost)"
        )
    destroy.set_defaults(
        handler=_client_call(
            lambda c, a: c.destroy(
                force=getattr(a, "force", False), purge_now=a.purge_now, **_key_ref(a)
            )
        )
    )
    add("recover", "undo a destroy within the soft-delete window").set_defaults(
        handler=_client_call(lambda c, a: c.recover(**_key_ref(a)))
    )
    add("activate", "activate a pre-active key now").set_defaults(
        handler=_client_call(lambda c, a: c.activate(**_key_ref(a)))
    )
    add("attributes", "state, dates, usage").set_defaults(
        handler=_client_call(lambda c, a: c.get_attributes(**_key_ref(a)))
    )


def _add_lifecycle_commands(commands: Any, dek: Any, kek: Any) -> None:
    """Revoke, destroy, recover, activate, rotate, rewrap: for DEKs and KEK versions alike."""
    common = _client_options()
    _add_state_commands(dek, "dek", common)
    _add_state_commands(kek, "kek", common)
    dek.add_parser(
        "rewrap", parents=[common], help="re-wrap under the newest KEK version"
    ).add_argument("dek_id", metavar="ID")
    dek.choices["rewrap"].set_defaults(handler=_client_call(lambda c, a: c.rewrap_dek(a.dek_id)))
    rotate = kek.add_parser("rotate", parents=[common], help="make the KEK's next version")
    rotate.add_argument("name")
    rotate.set_defaults(handler=_client_call(lambda c, a: c.rotate_kek(a.name)))
    dependents = kek.add_parser(
        "dependents", parents=[common], help="which DEKs depend on a KEK version"
    )
    dependents.add_argument("name")
    dependents.add_argument("--version", type=int, required=True)
    dependents.add_argument("--limit", type=int)
    dependents.set_defaults(
        handler=_client_call(lambda c, a: c.dependents(a.name, a.version, limit=a.limit))
    )
    rewrap = kek.add_parser(
        "rewrap", parents=[common], help="rewrap every DEK of the namespace (background job)"
    )
    rewrap.add_argument("name")
    rewrap.add_argument("--wait", action="store_true", help="follow the job until it is done")
    rewrap.set_defaults(handler=_rewrap_namespace)

    key = commands.add_parser("key", help="find keys").add_subparsers(metavar="ACTION")
    locate = key.add_parser("list", parents=[common], help="KEK versions and DEKs")
    locate.add_argument("--kind", choices=["dek", "kek"])
    locate.add_argument("--namespace", help="a namespace or glob")
    locate.add_argument("--state", choices=[s.value for s in State])
    locate.add_argument("--after", help="continue after this DEK id (a previous next)")
    locate.add_argument("--limit", type=int)
    locate.set_defaults(
        handler=_client_call(
            lambda c, a: c.locate(
                kind=a.kind, namespace=a.namespace, state=a.state, after=a.after, limit=a.limit
            )
        )
    )

    job = commands.add_parser("job", help="rewrap jobs").add_subparsers(metavar="ACTION")
    job_get = job.add_parser("get", parents=[common], help="a job's progress")
    job_get.add_argument("job_id", metavar="ID")
    job_get.set_defaults(handler=_client_call(lambda c, a: c.get_job(a.job_id)))
    job_list = job.add_parser("list", parents=[common], help="jobs")
    job_list.add_argument("--state", choices=["running", "done", "failed"])
    job_list.set_defaults(handler=_client_call(lambda c, a: c.list_jobs(a.state)))


def _add_audit_commands(commands: Any) -> None:
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
    ask.add_argument("--since", type=_datetime, metavar="WHEN", help="ISO 8601 or epoch")
    ask.add_argument("--until", type=_datetime, metavar="WHEN", help="ISO 8601 or epoch")
    ask.add_argument("--all", action="store_true", help="every record, not just deliveries")
    ask.set_defaults(handler=_audit_query)


def _add_envelope_commands(commands: Any) -> None:
    common = _client_options()
    progress = argparse.ArgumentParser(add_help=False)
    progress.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    progress.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress on stderr (default: when stderr is a terminal)",
    )
    encrypt = commands.add_parser(
        "encrypt", parents=[common, progress], help="envelope-encrypt a file under a fresh data key"
    )
    encrypt.add_argument("input", nargs="?", default="-", help="file to encrypt (default: stdin)")
    encrypt.add_argument("--kek", required=True, help="namespace whose KEK wraps the data key")
    encrypt.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    encrypt.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    encrypt.set_defaults(handler=_encrypt)
    decrypt = commands.add_parser(
        "decrypt", parents=[common, progress], help="open an envelope made by kmipd encrypt"
    )
    decrypt.add_argument("input", nargs="?", default="-", help="envelope (default: stdin)")
    decrypt.set_defaults(handler=_decrypt)

    seal = commands.add_parser(
        "seal",
        parents=[common, progress],
        help="seal a file for another client (its certified transport key; HPKE)",
    )
    seal.add_argument("input", nargs="?", default="-", help="file to seal (default: stdin)")
    seal.add_argument(
        "--to", required=True, metavar="NAME", help="recipient: a client name or SPIFFE ID"
    )
    seal.add_argument("--chunk-size", type=int, default=SEALED_CHUNK_SIZE)
    seal.set_defaults(handler=_seal)
    opening = commands.add_parser(
        "open",
        parents=[progress],
        help="open a file sealed to this client's transport key (no daemon needed)",
    )
    opening.add_argument("input", nargs="?", default="-", help="sealed file (default: stdin)")
    for flag, env, what in (
        ("--transport-cert", "KMIPD_TRANSPORT_CERT", "key-transport certificate (PEM)"),
        ("--transport-key", "KMIPD_TRANSPORT_KEY", "key-transport private key (PEM)"),
    ):
        opening.add_argument(flag, type=Path, default=os.environ.get(env), help=what)
    opening.set_defaults(handler=_open)

    transport = commands.add_parser(
        "transport", help="key-transport certificates (the daemon's directory)"
    ).add_subparsers(metavar="ACTION")
    register = transport.add_parser(
        "register", parents=[common], help="register this client's transport certificate"
    )
    register.add_argument(
        "certificate",
        nargs="?",
        type=Path,
        help="certificate (PEM); default: --transport-cert",
    )
    register.set_defaults(handler=_transport_register)
    fetch = transport.add_parser(
        "get",
        parents=[common],
        help="fetch and verify a client's transport certificate",
    )
    fetch.add_argument("identity", metavar="NAME", help="a client name or SPIFFE ID")
    fetch.add_argument("-o", "--output", type=Path, help="write the certificate (PEM) here")
    fetch.set_defaults(handler=_transport_get)


# -- handlers ----------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    config_path = prepare_dev(args.data, args.listen) if args.dev else args.config
    config = load_config(config_path)
    configure_logging(config.log_level)
    manager = ServiceManager.from_environment()

    def announce(daemon: RunningDaemon) -> None:
        if args.dev:
            print(f"kmipd: dev data in {args.data}/ (config {config_path})")
            print("kmipd: try, in another shell:")
            print(f"  {client_command(args.data, daemon.addresses[0])} --reveal")
        # The last line, and the one to wait for: everything is ready.
        print(f"kmipd: listening on {', '.join(daemon.addresses)}", flush=True)

    trio.run(functools.partial(run_daemon, config, announce, manager=manager))
    return 0


def _rewrap_namespace(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        job = client.start_rewrap(args.name)
        print(json.dumps(_to_json(job, reveal=False), indent=2), flush=True)
        while args.wait and job.state == "running":
            time.sleep(0.5)  # polling a long-running job's progress for a human
            job = client.get_job(job.job_id)
            print(
                f"{job.job_id}: {job.rewrapped} rewrapped, {job.remaining} remaining",
                file=sys.stderr,
                flush=True,
            )
    return 0 if job.state != "failed" else 1


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


def _datetime(text: str) -> datetime.datetime:
    try:
        if text.replace(".", "", 1).isdigit():
            return datetime.datetime.fromtimestamp(float(text), datetime.UTC)
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither ISO 8601 nor epoch seconds"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def _timestamp(text: str) -> int:
    return int(_datetime(text).timestamp())


def _pki_init(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.init(
        args.directory,
        trust_domain=args.trust_domain,
        key_type=KeyType.RSA_3072 if args.rsa else KeyType.EC_P256,
        dns_names=tuple(args.dns) or ("localhost",),
        ip_addresses=tuple(args.ip) or ("127.0.0.1",),
        force=args.force,
    )
    print(f"CA for trust domain {ca.trust_domain} in {ca.directory}")
    for label, path in (
        ("CA certificate", ca.ca_cert_path),
        ("server cert", ca.server_cert_path),
        ("server key", ca.server_key_path),
        ("CRL", ca.crl_path),
    ):
        print(f"  {label}: {path}")
    return 0


def _pki_issue(args: argparse.Namespace) -> int:
    issued = CertificateAuthority.load(args.directory).issue_client(
        args.name, validity_days=args.days, force=args.force
    )
    print(f"issued {issued.identity}")
    print(f"  certificate: {issued.cert_path}\n  key: {issued.key_path}")
    return 0


def _pki_revoke(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.directory)
    names = [args.name]
    # A client's two keys live side by side: whoever has one likely has both.
    transport = args.name + TRANSPORT_SUFFIX
    if not args.keep_transport and ca.has_issued(transport):
        names.append(transport)
    for name in names:
        ca.revoke(name, reason=x509.ReasonFlags[args.reason])
    print(f"revoked {' and '.join(names)}; CRL updated: {ca.crl_path}")
    print(
        "a running daemon reading this CRL picks it up within a second: new connections, "
        "and seals to or fetches of a revoked transport certificate, are refused"
    )
    return 0


def _pki_renew_server(args: argparse.Namespace) -> int:
    issued = CertificateAuthority.load(args.directory).renew_server(validity_days=args.days)
    print(f"server certificate re-issued, valid {args.days} days: {issued.cert_path}")
    print("restart the daemon to serve it")
    return 0


def _pki_crl(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.directory)
    ca.write_crl(next_update_days=args.days)
    print(f"CRL re-signed, valid {args.days} days: {ca.crl_path}")
    return 0


def _pki_issue_transport(args: argparse.Namespace) -> int:
    issued = CertificateAuthority.load(args.directory).issue_transport(
        args.name, kem=TransportKem(args.kem), validity_days=args.days, force=args.force
    )
    print(f"issued a {args.kem} key-transport certificate for {issued.identity}")
    print(f"  certificate: {issued.cert_path}\n  key: {issued.key_path}")
    print(f"revoke it with: kmipd pki revoke {args.directory} {issued.name}")
    return 0


def _hsm_software_init(args: argparse.Namespace) -> int:
    create_master_key(args.master_key)
    print(f"created master key {args.master_key} (mode 0600); back it up somewhere safe")
    return 0


def _hsm_init(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging(config.log_level)
    try:
        result = trio.run(init_kek, config, args.name)
    except ServiceError as exc:
        raise CliError(f"{args.name}: {exc.message}") from None
    print(
        f"created KEK {result.kek.name!r} version {result.kek.version} "
        f"(HSM handle {result.handle}), audited as {result.identity}; wrap+unwrap verified"
    )
    if result.token_object is not None:
        print(json.dumps(result.token_object, indent=2))
    return 0


def _hsm_list(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(json.dumps(trio.run(list_token_objects, config), indent=2))
    return 0


def _connect(args: argparse.Namespace) -> km.Client:
    missing = [f for f in ("server", "ca", "cert", "key") if not getattr(args, f)]
    if missing:
        raise CliError("missing " + ", ".join(f"--{f}" for f in missing))
    servers = [address.strip() for address in args.server.split(",")]
    return km.Client(
        servers,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        timeout=args.timeout,
        transport=_transport_key(args, required=False),
    )


def _transport_key(args: argparse.Namespace, *, required: bool) -> km.TransportKey | None:
    cert, key = args.transport_cert, args.transport_key
    if cert is None and key is None and not required:
        return None
    if cert is None or key is None:
        raise CliError("give both --transport-cert and --transport-key")
    try:
        return km.TransportKey.from_files(cert, key)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _recipient(client: km.Client, name: str) -> str:
    """A SPIFFE ID as given, or a client name in our own trust domain."""
    if name.startswith("spiffe://"):
        return name
    domain = client.connect().identity[len("spiffe://") :].split("/", 1)[0]
    return f"spiffe://{domain}/{name}"


def _transport_register(args: argparse.Namespace) -> int:
    path = args.certificate or args.transport_cert
    if path is None:
        raise CliError("give the certificate file or --transport-cert")
    try:
        certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise CliError(f"{path} is not a PEM certificate") from None
    with _connect(args) as client:
        info = client.register_transport_certificate(certificate)
    print(json.dumps(_certificate_json(info), indent=2))
    return 0


def _transport_get(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        identity = _recipient(client, args.identity)
        certificate = client.get_transport_certificate(identity)
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    if args.output is not None:
        with _output(args) as sink:
            sink.write(pem)
    print(
        json.dumps(
            {
                "identity": identity,
                "suite": transport_kem(certificate).value,
                "fingerprint": certificate_fingerprint(certificate).hex(),
                "not_after": certificate.not_valid_after_utc.isoformat(),
                "verified": "against this client's CA",
            },
            indent=2,
        )
    )
    return 0


def _certificate_json(info: km.TransportCertInfo) -> dict[str, Any]:
    return {
        "identity": info.identity,
        "suite": info.suite,
        "fingerprint": info.fingerprint.hex(),
        "registered": info.registered,
        "not_after": info.not_after,
    }


def _seal(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        recipient = _recipient(client, args.to)
        with _input(args) as source, _output(args) as sink:
            client.seal_stream(source, sink, recipient, chunk_size=args.chunk_size)
    return 0


def _open(args: argparse.Namespace) -> int:
    key = _transport_key(args, required=True)
    assert key is not None
    with _input(args) as source, _output(args) as sink:
        try:
            open_sealed_stream(key, source, sink)
        except SealedEnvelopeError as exc:
            lost = (
                f"{args.output} was not written"
                if args.output is not None
                else "discard what reached stdout"
            )
            raise CliError(f"{exc}; {lost}") from None
    return 0


def _encrypt(args: argparse.Namespace) -> int:
    context = _parse_context(args.context)
    with _connect(args) as client, _input(args) as source, _output(args) as sink:
        client.encrypt_stream(source, sink, args.kek, context, chunk_size=args.chunk_size)
    return 0


def _decrypt(args: argparse.Namespace) -> int:
    with _connect(args) as client, _input(args) as source, _output(args) as sink:
        client.decrypt_stream(source, sink)
    return 0


@contextlib.contextmanager
def _input(args: argparse.Namespace) -> Iterator[Readable]:
    if args.input == "-":
        source: BinaryIO = sys.stdin.buffer
        size = None
    else:
        try:
            source = open(args.input, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise CliError(f"cannot read {args.input}: {exc.strerror}") from None
        size = os.fstat(source.fileno()).st_size
    show = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        yield _Progress(source, size, args.handler.__name__.strip("_")) if show else source
    finally:
        if source is not sys.stdin.buffer:
            source.close()
        if show:
            print(file=sys.stderr)


@contextlib.contextmanager
def _output(args: argparse.Namespace) -> Iterator[BinaryIO]:
    """stdout, or a file that appears only complete: written aside, renamed on success."""
    if args.output is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    partial = args.output.with_name(f".{args.output.name}.partial")
    try:
        # 0600 from the first byte: the output may be plaintext (decrypt, open).
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # a partial file left by a crash keeps no wider mode
        sink = os.fdopen(fd, "wb")
    except OSError as exc:
        raise CliError(f"cannot write {args.output}: {exc.strerror}") from None
    try:
        yield sink
    except BaseException:
        sink.close()
        partial.unlink(missing_ok=True)
        raise
    sink.close()
    os.replace(partial, args.output)


class _Progress:
    """A reader that reports how far it got, on one stderr line."""

    def __init__(self, source: BinaryIO, size: int | None, verb: str) -> None:
        self._source, self._size, self._verb = source, size, verb
        self._done = 0
        self._started = time.monotonic()
        self._shown = 0.0

    def read(self, n: int = -1) -> bytes:
        data = self._source.read(n)
        self._done += len(data)
        now = time.monotonic()
        if now - self._shown >= 0.2 or not data:
            self._shown = now
            rate = self._done / max(now - self._started, 1e-6) / 2**20
            done = f"{self._done / 2**20:.1f} MiB"
            if self._size:
                done += f" of {self._size / 2**20:.1f} MiB ({100 * self._done // self._size}%)"
            print(f"\r{self._verb}: {done}, {rate:.1f} MiB/s", end="", file=sys.stderr)
        return data


def _client_call(call: Callable[[km.Client, argparse.Namespace], Any]) -> Callable[..., int]:
    def handler(args: argparse.Namespace) -> int:
        with _connect(args) as client:
            result = call(client, args)
        print(json.dumps(_to_json(result, reveal=getattr(args, "reveal", False)), indent=2))
        return 0

    return handler


def _to_json(result: Any, *, reveal: bool) -> Any:
    if isinstance(result, list):
        return [_to_json(item, reveal=reveal) for item in result]
    if isinstance(result, km.Dek):
        with result:
            fields = {
                "dek_id": result.dek_id,
                "namespace": result.namespace,
                "kek_version": result.kek_version,
                "key": bytes(result.key),
            }
        return _jsonable(fields, reveal=reveal)
    if isinstance(result, km.DataKey):
        with result:
            fields = {
                "key": bytes(result.key),
                "blob": result.blob,
                "kek": result.kek,
                "kek_version": result.kek_version,
            }
        return _jsonable(fields, reveal=reveal)
    return _jsonable(attrs.asdict(result), reveal=reveal)


def _jsonable(value: Any, *, reveal: bool) -> Any:
    """Bytes become base64, except a key: hex with --reveal, else only its length."""
    if isinstance(value, dict):
        out = {}
        for name, member in value.items():
            if name == "key" and isinstance(member, bytes):
                out[name] = member.hex() if reveal else f"<{len(member)} bytes; --reveal prints it>"
            else:
                out[name] = _jsonable(member, reveal=reveal)
        return out
    if isinstance(value, list | tuple):
        return [_jsonable(member, reveal=reveal) for member in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def _parse_context(pairs: list[str]) -> dict[str, str]:
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--context {pair!r}: expected KEY=VALUE")
        context[key] = value
    return context


def _parse_blob(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise CliError("the blob must be base64, as datakey generate prints it") from None


def _demo(args: argparse.Namespace) -> int:
    return run_demo()


if __name__ == "__main__":
    sys.exit(main())
