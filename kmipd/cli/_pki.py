"""``kmipd pki ...``: the built-in test CA (init, issue, revoke, renew-server, crl)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography import x509

from kmipd.cli._common import Commands
from pki import (
    SERVER_VALIDITY_DAYS,
    TRANSPORT_SUFFIX,
    CertificateAuthority,
    KeyType,
    TransportKem,
)


def register(commands: Commands) -> None:
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
    init.add_argument(
        "--online-ca",
        action="store_true",
        help="let the root sign one intermediate level: the daemon's online CA (kmipd ca init)",
    )
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


def _pki_init(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.init(
        args.directory,
        trust_domain=args.trust_domain,
        key_type=KeyType.RSA_3072 if args.rsa else KeyType.EC_P256,
        dns_names=tuple(args.dns) or ("localhost",),
        ip_addresses=tuple(args.ip) or ("127.0.0.1",),
        force=args.force,
        path_length=1 if args.online_ca else 0,
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
